"""How an `apo` process answers SIGINT, SIGTERM and SIGHUP (below everything else: no torch, no rich).

Exit codes are 128 + the signal's number, as a shell reports a process that the signal killed:
SIGINT (Ctrl-C) 130, SIGTERM 143, SIGHUP (the terminal or the SSH session closed) 129.

- In the training loop (:class:`apo_cli.train.session.StopFlag`) the first of them lets the step
  finish, then the run saves and exits with that signal's code; a second one aborts at once (no
  save), still with the first one's code.
- Everywhere else a signal stops the process at once with one line (``interrupted`` for SIGINT,
  ``stopped: SIGTERM …`` / ``stopped: SIGHUP …`` otherwise) through :func:`abort`, which

  - raises :class:`Stopped`, a ``KeyboardInterrupt``: ``finally`` blocks run, the error mapper
    (apo_cli/errors.py ``run_cli``) prints its line and exits with its code, and an ``except
    Exception`` around user code (a reward module being imported) does not swallow it;
  - or, where an exception is not safe, prints the line and ends the process with ``os._exit``:
    while the process is importing (an exception raised inside an extension module's
    initialisation — torch, numpy — can be swallowed by it, turned into an ImportError or a
    SystemError, or abort the process with SIGABRT/SIGSEGV), and outside a command's body (click
    would turn it into "Aborted!" and exit 1). Only a process :func:`install` set up (the `apo`
    command) is ended this way; a library caller (a script, the tests) always gets the exception.
    Nothing is lost that a kill would not lose: apo writes every file atomically.
- SIGHUP means the terminal is gone and writing to it fails (EIO): :func:`leave_terminal` points
  the standard streams that are terminals at /dev/null first, so that the step can finish and save.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import sys
from collections.abc import Callable, Iterator
from typing import Any

# the signals apo handles; SIGHUP does not exist on Windows
HANDLED: tuple[int, ...] = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None))
                                 if s is not None)

_owned = False  # install() ran: this process is the `apo` command and may end itself with os._exit
_in_command = 0  # how many command bodies are running (apo_cli/commands/_common.py ``guarded``)


def exit_code(signum: int) -> int:
    """128 + the signal's number: 130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP."""
    return 128 + int(signum)


def name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def is_hangup(signum: int | None) -> bool:
    return signum is not None and signum == getattr(signal, "SIGHUP", None)


class Stopped(KeyboardInterrupt):
    """A signal that stops the process at once. ``exit_code`` is that of ``code_signum`` (the first
    signal, when this is the second one) or else of ``signum``; :meth:`line` is what is printed."""

    def __init__(self, signum: int, detail: str | None = None, code_signum: int | None = None):
        self.signum = signum
        self.detail = detail
        self.exit_code = exit_code(code_signum or signum)
        super().__init__(self.line())

    def line(self) -> str:
        head = "interrupted" if self.signum == signal.SIGINT else f"stopped: {name(self.signum)}"
        return f"{head} {self.detail}" if self.detail else head


def importing(frame: Any) -> bool:
    """Whether ``frame`` (the main thread's, as a signal handler gets it) runs inside an import."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def abort(signum: int, frame: Any, detail: str | None = None, code_signum: int | None = None) -> None:
    """Stop now: raise :class:`Stopped`, or print its line and end the process where raising is not
    safe (see the module docstring)."""
    if is_hangup(signum):
        leave_terminal()
    stop = Stopped(signum, detail, code_signum)
    if _owned and (not _in_command or importing(frame)):
        exit_now(stop)
    raise stop


def note(text: str) -> None:
    """Write one line to stderr from a signal handler (on rank 0 under torchrun): straight to the
    file descriptor, as the interrupted code may be in the middle of a write to ``sys.stderr``."""
    from apo_cli.runtime.ranks import other_rank

    if other_rank() is None:
        try:
            os.write(2, (text + "\n").encode())
        except OSError:
            pass


def exit_now(stop: Stopped) -> None:
    """Print ``stop``'s line and end the process with its code, running no Python code on the way
    out (no finalizers of half-imported extension modules)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a write the signal interrupted (reentrant call), a closed pipe
            pass
    note(stop.line())
    os._exit(stop.exit_code)


def leave_terminal() -> None:
    """Point stdin, stdout and stderr at /dev/null where they are a terminal (a character device):
    after a hang-up, reading or writing the terminal fails. Files and pipes are left as they are."""
    try:
        null = os.open(os.devnull, os.O_RDWR)
    except OSError:
        return
    for fd in (0, 1, 2):
        try:
            if stat.S_ISCHR(os.fstat(fd).st_mode):
                os.dup2(null, fd)
        except OSError:
            pass
    os.close(null)


def _default(signum: int, frame: Any) -> None:
    abort(signum, frame)


def set_handlers(handler: Callable[[int, Any], None]) -> dict[int, Any] | None:
    """Install ``handler`` for every signal of :data:`HANDLED`; the old handlers, or None when this
    is not the main thread (where handlers cannot be set)."""
    old: dict[int, Any] = {}
    try:
        for s in HANDLED:
            old[s] = signal.signal(s, handler)
    except ValueError:  # not the main thread
        restore(old)
        return None
    return old


def restore(old: dict[int, Any] | None) -> None:
    for s, h in (old or {}).items():
        signal.signal(s, h if h is not None else signal.SIG_DFL)


def install() -> None:
    """At the start of the `apo` command, before anything heavy is imported: every handled signal
    stops the process with its line and code (:func:`abort`)."""
    global _owned
    if set_handlers(_default) is not None:
        _owned = True


@contextlib.contextmanager
def command_body() -> Iterator[None]:
    """While a command's body runs, a signal outside an import raises :class:`Stopped`."""
    global _in_command
    _in_command += 1
    try:
        yield
    finally:
        _in_command -= 1


def started_as_command() -> bool:
    """Whether this process is the `apo` console script (its ``sys.argv[0]`` is named ``apo``)."""
    return os.path.basename(sys.argv[0] if sys.argv else "") == "apo"
