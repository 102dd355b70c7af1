"""Option aliases shared by commands, the wrapper that maps domain errors to messages, and the
`--help` rendering every command shares (:class:`ApoTyper`)."""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from apo_cli.errors import run_cli
from apo_cli.runtime import signals

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="Dotted overrides, e.g. algorithm.alpha.alpha_min=0.3 rollout.group_size=8.", show_default=False),
]
TrustCodeOpt = Annotated[
    bool,
    typer.Option("--trust-code", help="Allow the code the recipe names: custom rewards (module:function, "
                                      "file.py:function) and model.trust_remote_code. Or set APO_TRUST_CODE=1."),
]


def guarded(fn):
    """Run a command body through the single error-mapping layer (one-line errors, exit codes). A
    signal while it runs (outside an import) raises, so that its ``finally`` blocks run."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        result = None

        def body():
            nonlocal result
            with signals.command_body():
                result = fn(*args, **kwargs)

        from apo_cli import trust

        with trust.scope():  # a command's --trust-code ends with the command
            run_cli(body)
        return result

    return wrapper


# --------------------------------------------------------------------------------------------------
# --help: docstrings as rich wraps them, flags without a type


def cli_help(doc: str | None) -> str | None:
    """A command's docstring as its ``--help`` text. In rich markup mode typer keeps the source's
    line breaks and rich wraps each line again, which breaks sentences in the middle: each prose
    paragraph becomes one line (rich wraps it to the terminal); an indented paragraph (the
    examples) keeps its lines."""
    if not doc:
        return doc
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    out = [p if all(line.startswith(" ") for line in p.splitlines()) else " ".join(p.split())
           for p in paragraphs]
    if len(out) == 1:
        return out[0]
    # typer dedents the text after the first paragraph by its lines' common indentation, the first
    # line excepted (inspect.cleandoc): a leading newline (dropped there) keeps the examples indented
    # when that text starts with a heading ("Examples:")
    return out[0] + "\n\n\n" + "\n\n".join(out[1:])


class _NoFlagType:
    """A flag (``--base``, ``--help``) takes no value: show no ``<bool>`` type beside it."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)  # type: ignore[misc]
        for p in params:
            if getattr(p, "is_flag", False) and p.metavar is None:
                p.metavar = ""
        return params


class ApoCommand(_NoFlagType, TyperCommand):
    pass


class ApoGroup(_NoFlagType, TyperGroup):
    pass


class ApoTyper(typer.Typer):
    """The `apo` app: every command's help is :func:`cli_help` of its docstring, and its flags show
    no type (:class:`ApoCommand`)."""

    def __init__(self, **kwargs: Any):
        super().__init__(cls=kwargs.pop("cls", ApoGroup), **kwargs)

    def command(self, name: str | None = None, *, cls: type[TyperCommand] | None = None, help: str | None = None,
                **kwargs: Any):
        register = super().command

        def decorator(f):
            text = help if help is not None else cli_help(inspect.getdoc(f))
            return register(name, cls=cls or ApoCommand, help=text, **kwargs)(f)

        return decorator
