"""Symbolic answer checking with math-verify, time-boxed in killable worker processes.

Why processes: math-verify (sympy underneath) can run without bound on innocent-looking input
(``9^{9^{9^{9}}}``), and its own time-out is ``signal.alarm``, which only works in the main thread
of the main interpreter. The training loop may score rewards from any thread, so here math-verify
runs with its time-outs switched off (``parsing_timeout=None``, ``timeout_seconds=None``) inside
worker processes, and the parent enforces the deadline: a worker that overruns is killed and
replaced, and that one sample is reported as a time-out. A Python thread could not be stopped.

Workers are fresh interpreters (``python -m apo_cli.rewards._verify_worker``; never ``fork``: the
parent holds torch threads), started lazily and reused across calls; each announces itself after
importing math-verify, so its start-up time never counts against a sample's deadline.
``APO_VERIFY_WORKERS`` caps how many run at once (default: up to 4, never more than the CPU count).
"""

from __future__ import annotations

import atexit
import json
import os
import select
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal

from apo_cli.errors import RewardError
from apo_cli.rewards._child import ChildProcess

Status = Literal["equal", "different", "gold_unparsed", "pred_unparsed", "timeout", "error"]
STARTUP_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking one (gold, prediction) pair; ``detail`` explains errors."""

    status: Status
    detail: str = ""


class _Worker(ChildProcess):
    """One ``python -m apo_cli.rewards._verify_worker`` child; its stderr kept for error messages."""

    def __init__(self) -> None:
        self.stderr = tempfile.TemporaryFile()
        super().__init__("apo_cli.rewards._verify_worker", stderr=self.stderr)
        self.ready = False
        self.started = time.monotonic()
        self.task: tuple[int, float] | None = None  # (task index, deadline)

    def send(self, obj: object) -> None:
        """Write one JSON request line to the worker."""
        self.send_line(json.dumps(obj))

    def why_dead(self) -> str:
        """How the worker ended and the last line it wrote to stderr, for error messages."""
        how = self.exit_text()
        self.stderr.seek(0)
        tail = self.stderr.read().decode(errors="replace").strip().splitlines()[-1:] or [""]
        return how + (f": {tail[0]}" if tail[0] else "")

    def kill(self) -> None:
        """Stop the worker now (it may be stuck in sympy) and release its pipes."""
        super().kill(self.stderr)


class VerifierPool:
    """A small pool of math-verify worker processes with a per-sample deadline."""

    def __init__(self, max_workers: int | None = None) -> None:
        env = os.environ.get("APO_VERIFY_WORKERS")
        default = max(1, min(4, os.cpu_count() or 1))
        self.max_workers = max_workers or (int(env) if env else default)
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()

    def close(self) -> None:
        """Stop every worker."""
        for w in self._workers:
            w.kill()
        self._workers = []

    def verify(self, pairs: list[tuple[str, str]], timeout_s: float) -> list[Verdict]:
        """Check each (gold, prediction) pair; a pair still running after ``timeout_s`` is a time-out."""
        if not pairs:
            return []
        with self._lock:
            return self._run(pairs, timeout_s)

    def _run(self, pairs: list[tuple[str, str]], timeout_s: float) -> list[Verdict]:
        results: list[Verdict | None] = [None] * len(pairs)
        pending = deque(range(len(pairs)))
        # dead workers, and busy ones left over from an interrupted call, are not reusable
        for w in [w for w in self._workers if w.proc.poll() is not None or w.task]:
            self._replace(w, respawn=False)
        while len(self._workers) < min(self.max_workers, len(pairs)):
            self._workers.append(_Worker())
        while pending or any(w.task for w in self._workers):
            for w in self._workers:
                if w.ready and w.task is None and pending:
                    i = pending.popleft()
                    try:
                        w.send({"id": i, "gold": pairs[i][0], "pred": pairs[i][1]})
                    except OSError:
                        pending.appendleft(i)
                        self._replace(w)
                        continue
                    w.task = (i, time.monotonic() + timeout_s)
            self._wait_once(results, timeout_s)
        return [r if r is not None else Verdict("error", "no result") for r in results]

    def _wait_once(self, results: list[Verdict | None], timeout_s: float) -> None:
        """Wait for the next message or deadline; collect results; replace dead or overdue workers."""
        waiting = [w for w in self._workers if w.task or not w.ready]
        if not waiting:
            return
        deadlines = [w.task[1] if w.task else w.started + STARTUP_TIMEOUT_S for w in waiting]
        readable, _, _ = select.select([w.fd for w in waiting], [], [], max(0.0, min(deadlines) - time.monotonic()))
        for w in [w for w in waiting if w.fd in readable]:
            messages = w.read_messages()
            if messages is None:
                self._worker_died(w, results)
                continue
            for msg in messages:
                if msg == "ready":
                    w.ready = True
                elif w.task and msg["id"] == w.task[0]:
                    results[msg["id"]] = Verdict(msg["status"], msg.get("detail", ""))
                    w.task = None
        now = time.monotonic()
        for w in list(self._workers):
            if w.task and now >= w.task[1]:
                results[w.task[0]] = Verdict("timeout", f"no verdict within {timeout_s:g} s")
                self._replace(w)
            elif not w.ready and now >= w.started + STARTUP_TIMEOUT_S:
                self._replace(w, respawn=False)
                raise RewardError(f"math-verify worker process did not start within {STARTUP_TIMEOUT_S:g} s")

    def _worker_died(self, w: _Worker, results: list[Verdict | None]) -> None:
        why = w.why_dead()
        if not w.ready:
            self._replace(w, respawn=False)
            raise RewardError(f"math-verify worker process failed to start ({why})")
        if w.task:
            results[w.task[0]] = Verdict("error", f"math-verify worker died ({why})")
        self._replace(w)

    def _replace(self, w: _Worker, respawn: bool = True) -> None:
        """Kill ``w``; start a fresh worker in its place unless the pool is giving up."""
        w.kill()
        if respawn:
            self._workers[self._workers.index(w)] = _Worker()
        else:
            self._workers.remove(w)


_POOL: VerifierPool | None = None
_POOL_LOCK = threading.Lock()


def get_pool() -> VerifierPool:
    """The process-wide pool, created on first use and closed at interpreter exit."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = VerifierPool()
            atexit.register(_POOL.close)
        return _POOL


def verify_pairs(pairs: list[tuple[str, str]], timeout_s: float) -> list[Verdict]:
    """Check (gold, prediction) answer strings for mathematical equality, each within ``timeout_s``."""
    return get_pool().verify(pairs, timeout_s)
