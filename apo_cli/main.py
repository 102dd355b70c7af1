"""The `apo` command: a thin composition root. Each command lives in apo_cli/commands/<name>.py."""

from __future__ import annotations

import typer

from apo_cli import __version__
from apo_cli.commands import eval as eval_cmd
from apo_cli.commands import generate, inspect_alpha, recipes, schema, train, validate

app = typer.Typer(
    name="apo",
    help="Train language models with APO (alpha-divergence preference optimization), GRPO, GSPO and ADPO.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"apo {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
) -> None:
    """apo: on-policy group RL for LLMs with the APO objective."""


app.command("train")(train.train)
app.command("generate")(generate.generate)
app.command("eval")(eval_cmd.eval_)
app.command("inspect-alpha")(inspect_alpha.inspect_alpha)
app.command("validate")(validate.validate)
app.command("schema")(schema.schema)
app.command("recipes")(recipes.recipes)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
