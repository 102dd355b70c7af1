"""Domain errors and the single place that maps them to one-line messages and exit codes.

Every error a user can cause (a bad recipe, a missing file, a model that will not load) is raised as
an :class:`ApoError` subclass somewhere in the tool and turned into one line on stderr by
:func:`run_cli`. Tracebacks are shown only with ``APO_DEBUG=1``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import NoReturn

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2  # bad input: a recipe, an override, a command-line argument, a data file
EXIT_INTERRUPTED = 130  # SIGINT
EXIT_TERMINATED = 143  # SIGTERM
EXIT_HANGUP = 129  # SIGHUP (the terminal or SSH session closed); treated like SIGTERM


class ApoError(Exception):
    """An error with a message meant for the user. ``exit_code`` is what the CLI exits with."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class RecipeError(ApoError):
    """A recipe that does not parse or does not validate. Holds every problem found, not just the first."""

    exit_code = EXIT_USAGE

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        head = f"{source}: {len(problems)} problem{'s' if len(problems) != 1 else ''} in recipe"
        super().__init__(head + "\n" + "\n".join(f"  - {p}" for p in problems))


class UsageError(ApoError):
    """Bad command-line input (a missing file, a bad flag combination)."""

    exit_code = EXIT_USAGE


class DataError(ApoError):
    """A dataset, a row or a column that cannot be used: bad input, like a bad recipe."""

    exit_code = EXIT_USAGE


class ModelError(ApoError):
    """A model or tokenizer that cannot be found or loaded."""


class RewardError(ApoError):
    """A reward function that cannot be loaded or that returns something unusable."""


class BackendError(ApoError):
    """A backend that is unknown, not installed, or not usable on this machine."""


class CheckpointError(ApoError):
    """A checkpoint that is missing, corrupted or cannot be written."""


class RunDirError(ApoError):
    """A run directory that holds another run, or cannot be written."""


class TrainingError(ApoError):
    """Training stopped for a reason the user must act on (e.g. repeated non-finite losses)."""


class NotYetAvailable(ApoError):
    """A command whose machinery is not in this version."""


class Interrupted(ApoError):
    """The run was interrupted by a signal after saving its state."""

    def __init__(self, message: str, exit_code: int = EXIT_INTERRUPTED):
        super().__init__(message)
        self.exit_code = exit_code


def debug_enabled() -> bool:
    return os.environ.get("APO_DEBUG", "").strip() not in ("", "0", "false", "False")


def fail(error: ApoError) -> NoReturn:
    """Print ``error`` as the tool's one-line (or one-block, for recipes) message and exit."""
    from rich.console import Console

    from apo_cli.runtime.ranks import leaves_message_to_rank_0, other_rank

    if leaves_message_to_rank_0(error):  # under torchrun, rank 0 prints the line every rank stops with
        raise SystemExit(error.exit_code)
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    rank = other_rank()
    text = str(error) if rank is None else f"rank {rank}: {error}"
    first, _, rest = text.partition("\n")
    from rich.markup import escape

    label = "[bold yellow]stopped:[/bold yellow]" if isinstance(error, Interrupted) else "[bold red]error:[/bold red]"
    console.print(f"{label} {escape(first)}", markup=True, emoji=False)
    if rest:
        console.print(rest, markup=False, emoji=False)
    raise SystemExit(error.exit_code)


def run_cli(fn: Callable[[], object]) -> None:
    """Run ``fn`` and map every exception to a message and an exit code."""
    try:
        fn()
    except ApoError as e:
        if debug_enabled():
            raise
        fail(e)
    except KeyboardInterrupt as e:  # Ctrl-C, or a signal's apo_cli.runtime.signals.Stopped
        if debug_enabled():
            raise
        from apo_cli.runtime.ranks import other_rank

        if other_rank() is None:  # under torchrun, once
            print(e.line() if hasattr(e, "line") else "interrupted", file=sys.stderr)
        raise SystemExit(getattr(e, "exit_code", EXIT_INTERRUPTED)) from None
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        if debug_enabled():
            raise
        fail(_wrapped(ApoError(f"{e.strerror or type(e).__name__}: {e.filename}"), e))
    except OSError as e:
        if debug_enabled():
            raise
        fail(_wrapped(ApoError(f"{type(e).__name__}: {e}"), e))
    except MemoryError:
        if debug_enabled():
            raise
        fail(ApoError("out of memory (MemoryError)", hint="APO_DEBUG=1 shows where"))


def _wrapped(error: ApoError, cause: BaseException) -> ApoError:
    """``error`` standing for ``cause``, still marked shared under torchrun when ``cause`` was."""
    if getattr(cause, "shared", False):
        error.shared = True  # type: ignore[attr-defined]
    return error
