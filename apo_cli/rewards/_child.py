"""One of apo's worker modules in a fresh interpreter, speaking JSON lines on stdin/stdout.

Shared by the custom-reward workers (:mod:`apo_cli.rewards.isolated`) and the math-verify pool
(:mod:`apo_cli.rewards.verify`). A plain subprocess rather than ``multiprocessing`` or ``fork``:
the parent holds torch threads, and a fresh interpreter never re-imports the caller's main module,
so it works from scripts, notebooks and threads alike. The caller keeps the deadlines (``select``
on :attr:`ChildProcess.fd`); this class only starts, talks to and stops the child.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO, Any


def exit_text(code: int | None) -> str:
    """How a child ended, for messages: "exited with code 1", "was killed by SIGKILL"."""
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class ChildProcess:
    """``python -u -m MODULE`` with apo_cli importable, its stdin/stdout as JSON-line pipes.

    ``own_group`` starts it in a session of its own, so :meth:`kill` also stops what it started;
    ``stderr`` is where its standard error goes (default: the parent's).
    """

    def __init__(self, module: str, *, stderr: IO[bytes] | None = None, own_group: bool = False) -> None:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # so the child finds apo_cli even if not installed
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen([sys.executable, "-u", "-m", module], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=stderr, env=env, close_fds=True,
                                     start_new_session=own_group)
        self.fd = self.proc.stdout.fileno()
        self._own_group = own_group
        self._buffer = b""

    def send_line(self, text: str) -> None:
        """Write one line (``text`` without its newline); OSError when the child has gone."""
        self.proc.stdin.write((text + "\n").encode())
        self.proc.stdin.flush()

    def read_messages(self) -> list[Any] | None:
        """The messages of the lines completed by one read of stdout (call when :attr:`fd` is
        readable); None at end of file (the child exited)."""
        chunk = os.read(self.fd, 1 << 16)
        if not chunk:
            return None
        *lines, self._buffer = (self._buffer + chunk).split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    def exit_text(self) -> str:
        """How the child ended (waiting up to 5 s for it to be reaped), e.g. "was killed by SIGKILL"."""
        self._reap()
        return exit_text(self.proc.returncode)

    def kill(self, *also_close: IO[bytes]) -> None:
        """Stop the child now (and, with ``own_group``, what it started); close its pipes and ``also_close``."""
        try:
            if self._own_group:
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                self.proc.kill()
        except OSError:  # already gone
            pass
        self._reap()
        for f in (self.proc.stdin, self.proc.stdout, *also_close):
            try:
                f.close()
            except OSError:
                pass

    def _reap(self) -> None:
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
