"""Option aliases shared by commands, and the wrapper that maps domain errors to messages."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer

from apo_cli.errors import run_cli

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="Dotted overrides, e.g. algorithm.alpha.alpha_min=0.3 rollout.group_size=8.", show_default=False),
]


def guarded(fn):
    """Run a command body through the single error-mapping layer (one-line errors, exit codes)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        result = None

        def body():
            nonlocal result
            result = fn(*args, **kwargs)

        run_cli(body)
        return result

    return wrapper
