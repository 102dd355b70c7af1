"""Custom rewards in worker processes that are killed at the time box.

A reward that is not apo's own code (``module:function``, ``file.py:function``, an ``apo.rewards``
entry point) runs in a persistent fresh interpreter of its own (``python -m
apo_cli.rewards._reward_worker``; never ``fork``: the parent holds torch threads), speaking JSON
lines. The trainer process never imports that code, so nothing it does can take the trainer down:

- each step is one message (the kwargs of every group); the worker answers group by group, and each
  group has ``timeout_s`` from the moment the previous one was answered;
- a group that overruns (an infinite loop, a catastrophic regex holding the GIL) has its worker
  killed (the whole process group: what it started too) and is a time-out; a fresh worker takes the
  remaining groups, its start-up not billed to any group;
- a worker that dies in a call (a segfault, ``os._exit``) makes that group an error naming the exit;
  ``sys.exit`` and exceptions are errors with the traceback. Each such group scores None and is
  counted, and a reward failing on every sample of a step stops the run with one line naming it
  (the failure policy of :mod:`apo_cli.rewards.rewardset`).

Arguments travel as JSON: tuples become lists, numpy values their lists, dates ISO strings.
"""

from __future__ import annotations

import json
import select
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from apo_cli.errors import RewardError
from apo_cli.rewards._child import ChildProcess

STARTUP_TIMEOUT_S = 120.0  # importing a reward module (torch, a judge model) may take a while
_COMPACT = (",", ":")  # a step's completion ids are most of a message: no spaces


@dataclass
class GroupResult:
    """One group's outcome: ``status`` ok (``values`` ...), error, timeout, died or invalid."""

    status: str
    values: list[float | None] | None = None
    correct: list[bool | None] | None = None
    counts: dict[str, Any] | None = None
    bad: str | None = None
    detail: str = ""  # the traceback (error), or why the group has no result


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    raise TypeError(f"a {type(obj).__name__} cannot be passed to a reward's worker process")


class _Process(ChildProcess):
    """One worker: the child process, and the messages read but not yet taken."""

    def __init__(self, init: dict[str, Any]) -> None:
        super().__init__("apo_cli.rewards._reward_worker", own_group=True)
        self.lines: list[dict[str, Any]] = []
        try:
            self.send(init)
        except OSError:  # it died at once: reported as such by the caller
            pass

    def send(self, obj: dict[str, Any]) -> None:
        self.send_line(json.dumps(obj, default=_jsonable, separators=_COMPACT))

    def next_message(self, deadline: float) -> dict[str, Any] | None:
        """The next message; None when the worker exited; TimeoutError at ``deadline``."""
        while not self.lines:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise TimeoutError
            messages = self.read_messages()
            if messages is None:
                return None
            self.lines += messages
        return self.lines.pop(0)


class IsolatedReward:
    """One custom reward behind a persistent worker process; :meth:`score` runs a step's groups."""

    def __init__(self, name: str, key: str, kwargs: dict[str, Any]) -> None:
        self.name, self.key = name, key
        try:
            json.dumps(kwargs, default=_jsonable, separators=_COMPACT)
        except (TypeError, ValueError) as e:
            raise RewardError(f"reward {key}: kwargs cannot be passed to its worker process: {e}") from None
        self._init = {"name": name, "key": key, "kwargs": kwargs, "sys_path": list(sys.path)}
        self._proc: _Process | None = None
        self._lock = threading.Lock()
        self.verifies = False
        self.accepts: frozenset[str] | None = None
        with self._lock:
            self._start()

    def _start(self) -> _Process:
        """A ready worker (the reward imported in it), or RewardError naming the reward."""
        proc = _Process(self._init)
        try:
            msg = proc.next_message(time.monotonic() + STARTUP_TIMEOUT_S)
        except (KeyboardInterrupt, SystemExit):  # a signal while it imports: no worker is left behind
            proc.kill()
            raise
        except TimeoutError:  # (an OSError: caught first)
            proc.kill()
            raise RewardError(f"reward {self.key}: its worker process did not load {self.name!r} within "
                              f"{STARTUP_TIMEOUT_S:g} s") from None
        except OSError:
            msg = None
        if msg is None or "fatal" in msg:
            why = msg["fatal"] if msg else f"reward {self.name!r}: its worker process {proc.exit_text()} while importing it"
            proc.kill()
            raise RewardError(why)
        self.verifies = bool(msg.get("verifies"))
        self.accepts = None if msg.get("accepts") is None else frozenset(msg["accepts"])
        self._proc = proc
        return proc

    def close(self) -> None:
        """Stop the worker (a later :meth:`score` starts a fresh one)."""
        if self._proc is not None:
            self._proc.kill()
            self._proc = None

    def score(self, calls: list[dict[str, Any]], timeout_s: float) -> list[GroupResult]:
        """Each group's result; the group running at ``timeout_s`` past the previous answer times out."""
        try:
            payload = json.dumps({"calls": calls}, default=_jsonable, separators=_COMPACT)
        except (TypeError, ValueError) as e:
            raise RewardError(f"reward {self.key}: its arguments cannot be passed to its worker process: {e}") from None
        results: list[GroupResult] = []
        with self._lock:
            try:
                while len(results) < len(calls):
                    results += self._run(payload if not results else self._rest(calls, len(results)), timeout_s,
                                         len(calls) - len(results))
            except BaseException:  # interrupted mid-call: its late answers must not reach the next call
                self.close()
                raise
        return results

    @staticmethod
    def _rest(calls: list[dict[str, Any]], done: int) -> str:
        return json.dumps({"calls": calls[done:]}, default=_jsonable, separators=_COMPACT)

    def _run(self, payload: str, timeout_s: float, n: int) -> list[GroupResult]:
        """Send ``n`` groups to a (fresh if need be) worker; the results until the first that failed."""
        proc = self._proc if self._proc is not None and self._proc.proc.poll() is None else self._restart()
        try:
            proc.send_line(payload)
        except OSError:  # the worker died between steps: a fresh one takes the groups
            proc = self._restart()
            proc.send_line(payload)
        out: list[GroupResult] = []
        while len(out) < n:
            try:
                msg = proc.next_message(time.monotonic() + timeout_s)
            except TimeoutError:
                self.close()
                return [*out, GroupResult("timeout", detail=f"timed out after {timeout_s:g} s")]
            if msg is None:
                why = f"crashed (its worker process {proc.exit_text()})"
                self.close()
                return [*out, GroupResult("died", detail=why)]
            out.append(self._result(msg))
        return out

    def _restart(self) -> _Process:
        self.close()
        return self._start()

    @staticmethod
    def _result(msg: dict[str, Any]) -> GroupResult:
        if "error" in msg:
            return GroupResult("error", detail=msg["error"])
        if "invalid" in msg:
            return GroupResult("invalid", detail=msg["invalid"])
        return GroupResult("ok", values=msg["values"], correct=msg["correct"], counts=msg["counts"], bad=msg["bad"])
