"""The `apo` command: a thin composition root. Each command lives in apo_cli/commands/<name>.py."""

from __future__ import annotations

from apo_cli.runtime import signals

if signals.started_as_command():  # the `apo` script: before typer, the commands and torch are imported
    signals.install()

import typer

from apo_cli import __version__
from apo_cli.commands._common import ApoTyper
from apo_cli.commands import eval as eval_cmd
from apo_cli.commands import generate, inspect_alpha, recipes, schema, train, validate

app = ApoTyper(  # every command's --help: unwrapped docstrings, flags without a type
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
from apo_cli.commands import compare as compare_cmd  # noqa: E402 - one module per command, as above

app.command("compare")(compare_cmd.compare)
app.command("validate")(validate.validate)
app.command("schema")(schema.schema)
app.command("recipes")(recipes.recipes)


def main() -> None:
    signals.install()  # SIGINT/SIGTERM/SIGHUP: one line and 130/143/129 (apo_cli/runtime/signals.py)
    from apo_cli.runtime.threads import configure_process

    configure_process()  # OpenMP's wait policy, before anything imports torch (apo_cli/runtime/threads.py)
    app()


if __name__ == "__main__":
    main()
