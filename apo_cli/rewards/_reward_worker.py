"""The worker process of one isolated reward (see :mod:`apo_cli.rewards.isolated`): JSON lines.

Run as ``python -m apo_cli.rewards._reward_worker``. Protocol, one JSON object per line:

- parent -> worker, first: ``{"name", "key", "kwargs", "sys_path"}``; the worker imports the reward
  (the parent checked the user's opt-in) and answers ``{"ready": true, "verifies", "accepts"}``, or
  ``{"fatal": "<one line>"}`` and exits when it cannot be loaded;
- parent -> worker, per step: ``{"calls": [kwargs of group 0, kwargs of group 1, ...]}``;
- worker -> parent, per group as it finishes: ``{"i", "values", "correct", "counts", "bad"}`` (the
  return value checked by :func:`apo_cli.rewards.rewardset._validate`), ``{"i", "error": traceback}``
  (the reward raised, or called ``sys.exit``) or ``{"i", "invalid": message}`` (it returned something
  unusable: a bug in the reward, which stops the step).

The protocol runs on private copies of the standard streams: what the reward prints goes to stderr,
and it reads an empty stdin. A watchdog thread ends the worker if its parent goes away.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from typing import Any, TextIO


def _private_streams() -> tuple[TextIO, TextIO]:
    """(protocol in, protocol out); fd 0 becomes /dev/null and fd 1 a copy of stderr for the reward."""
    proto_in = os.fdopen(os.dup(0), "r", encoding="utf-8")
    proto_out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.stdin = open(os.devnull, encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    sys.stdout = sys.stderr
    return proto_in, proto_out


def _watch_parent() -> None:
    """End this process when the parent dies (the pipe alone cannot stop a reward stuck in a loop)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="apo-reward-watchdog").start()


def _send(out: TextIO, msg: dict[str, Any]) -> None:
    try:
        line = json.dumps(msg, separators=(",", ":"))
    except (TypeError, ValueError) as e:  # e.g. counts that are not numbers
        line = json.dumps({"i": msg.get("i"), "invalid": f"returned something that is not JSON data ({e})"})
    out.write(line + "\n")
    out.flush()


def _call(fn: Any, kw: dict[str, Any], key: str, n: int) -> dict[str, Any]:
    """One group's call, checked: values, an error traceback, or an invalid-return message."""
    from apo_cli.errors import RewardError
    from apo_cli.rewards.rewardset import _validate

    try:
        out = fn(**kw)
    except SystemExit as e:  # sys.exit() in a reward is a failed call, not the end of the worker
        return {"error": f"{traceback.format_exc()}the reward called sys.exit({e.code!r})"}
    except Exception:  # noqa: BLE001 - reported to the parent as this group's failure
        return {"error": traceback.format_exc()}
    try:
        values, correct, counts, bad = _validate(key, out, n)
    except RewardError as e:
        return {"invalid": str(e)}
    flags = None if correct is None else [None if c is None else bool(c) for c in correct]
    return {"values": values, "correct": flags, "counts": dict(counts), "bad": bad}


def _load(init: dict[str, Any]) -> Any:
    from apo_cli.rewards.loading import load_reward
    from apo_cli.trust import grant

    sys.path[:] = init["sys_path"]  # the parent's, so 'module:function' resolves as it would there
    grant()  # the parent checked the user's opt-in before starting this worker
    return load_reward(init["name"])


def main() -> None:
    """Load the reward, announce readiness, then score each step's groups until stdin closes."""
    proto_in, proto_out = _private_streams()
    _watch_parent()
    init = json.loads(proto_in.readline() or "null")
    if not init:
        return
    from apo_cli.errors import ApoError
    from apo_cli.rewards.rewardset import _accepts

    try:
        fn = _load(init)
    except ApoError as e:
        _send(proto_out, {"fatal": str(e)})
        return
    except BaseException as e:  # noqa: BLE001 - e.g. sys.exit() while importing
        _send(proto_out, {"fatal": f"reward {init['name']!r}: importing it failed: {type(e).__name__}: {e}"})
        return
    accepts = _accepts(fn)
    _send(proto_out, {"ready": True, "verifies": bool(getattr(fn, "verifies", False)),
                      "accepts": None if accepts is None else sorted(accepts)})
    bound = init.get("kwargs") or {}
    for line in proto_in:
        if not line.strip():
            continue
        for i, data in enumerate(json.loads(line)["calls"]):
            kw = {**data, **bound}
            if accepts is not None:
                kw = {k: v for k, v in kw.items() if k in accepts}
            _send(proto_out, {"i": i, **_call(fn, kw, init["key"], len(data["completions"]))})


if __name__ == "__main__":
    main()
