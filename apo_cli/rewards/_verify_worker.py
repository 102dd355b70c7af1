"""The math-verify worker process (see :mod:`apo_cli.rewards.verify`): JSON lines in, JSON lines out.

Run as ``python -m apo_cli.rewards._verify_worker``. Reads ``{"id", "gold", "pred"}`` per line on
stdin and writes ``{"id", "status", "detail"}`` per line on stdout, after a first ``"ready"`` line.
math-verify's own time-outs are off (they rely on ``signal.alarm``); the parent kills this process
when a sample overruns its deadline.
"""

from __future__ import annotations

import json
import logging
import sys


def _wrap(expr: str) -> str:
    """Hand math-verify a boxed expression so its LaTeX extractor takes the whole string as the answer."""
    return expr if "\\boxed" in expr else "\\boxed{" + expr + "}"


def check(gold: str, pred: str, cache: dict[str, list]) -> tuple[str, str]:
    """(status, detail) for one pair: equal, different, gold_unparsed or pred_unparsed."""
    from math_verify import parse, verify

    parsed_gold = cache.get(gold)
    if parsed_gold is None:
        parsed_gold = parse(_wrap(gold), parsing_timeout=None)
        if len(cache) > 4096:
            cache.clear()
        cache[gold] = parsed_gold
    if not parsed_gold:
        return "gold_unparsed", gold
    parsed_pred = parse(_wrap(pred), parsing_timeout=None)
    if not parsed_pred:
        return "pred_unparsed", pred
    return ("equal" if verify(parsed_gold, parsed_pred, timeout_seconds=None) else "different"), ""


def main() -> None:
    """Announce readiness after the heavy imports, then answer requests until stdin closes."""
    logging.disable(logging.WARNING)  # math-verify warns on every call that its time-out is off
    import math_verify  # noqa: F401  (imported before "ready", so start-up is not billed to a sample)

    cache: dict[str, list] = {}
    out = sys.stdout
    out.write('"ready"\n')
    out.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        try:
            status, detail = check(msg["gold"], msg["pred"], cache)
        except Exception as e:  # noqa: BLE001 - one bad expression must not end the worker
            status, detail = "error", f"{type(e).__name__}: {e}"
        out.write(json.dumps({"id": msg["id"], "status": status, "detail": detail}) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
