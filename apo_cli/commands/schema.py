from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from apo_cli.commands._common import guarded


@guarded
def schema(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout.")] = None,
) -> None:
    """Print the JSON schema of recipes (for editors and validators).

    Example:

        apo schema -o recipe.schema.json
    """
    from apo_cli.recipe import json_schema

    text = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
