from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from apo_cli.commands._common import guarded
from apo_cli.errors import UsageError


def shipped_recipes_dir() -> Path:
    """The shipped recipes: the source tree's recipes/ when run from a checkout, else the installed copy."""
    package = Path(__file__).resolve().parents[1]  # apo_cli/
    source_tree = package.parent / "recipes"
    if source_tree.is_dir() and (package.parent / "pyproject.toml").is_file():
        return source_tree
    return package / "shipped_recipes"  # installed from a wheel (pyproject maps recipes/ there)


def shipped_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(shipped_recipes_dir().glob("*.yaml"))}


def _first_comment(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip().lstrip("#").strip()
        if not line.startswith("#"):
            break
        if text and not text.startswith("apo "):
            first = text.split(". ")[0].rstrip(".")
            return first if len(first) <= 80 else first[:79] + "…"
    return ""


@guarded
def recipes(
    name: Annotated[str | None, typer.Argument(help="A shipped recipe to copy.", show_default=False)] = None,
    dest: Annotated[Path | None, typer.Argument(help="Where to copy it (file or folder).", show_default=False)] = None,
) -> None:
    """List the shipped recipes, or copy one to a path to edit it.

    Examples:

        apo recipes

        apo recipes quickstart my-recipe.yaml
    """
    from rich.console import Console
    from rich.table import Table

    found = shipped_recipes()
    if name is None:
        table = Table(title="Shipped recipes", show_lines=False)
        table.add_column("name", style="bold cyan")
        table.add_column("what it is")
        for stem, path in found.items():
            table.add_row(stem, _first_comment(path))
        Console().print(table)
        return
    key = name.removesuffix(".yaml")
    if key not in found:
        raise UsageError(f"no shipped recipe named {name!r}; available: {', '.join(found)}")
    target = dest or Path(f"{key}.yaml")
    if target.is_dir():
        target = target / f"{key}.yaml"
    _copy_new(found[key], target)
    typer.echo(f"copied {key} to {target}")


def _copy_new(source: Path, target: Path) -> None:
    """Copy ``source`` to a new file ``target``: never over a file, nor through a symbolic link (even a
    dangling one, which would write wherever it points); the create is exclusive, so no race either."""
    if target.is_symlink():
        raise UsageError(f"{target} is a symbolic link (to {os.readlink(target)}); choose another path")
    if target.exists():
        raise UsageError(f"{target} already exists; choose another path")
    try:
        with open(target, "xb") as out:  # O_CREAT | O_EXCL: fails on anything there, a link included
            out.write(source.read_bytes())
    except FileExistsError:
        raise UsageError(f"{target} already exists; choose another path") from None
