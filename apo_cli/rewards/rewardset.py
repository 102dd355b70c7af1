"""Scoring a step's completions with every reward of the recipe, weighted, time-boxed and accounted for.

How a reward is called (TRL-style keyword arguments)::

    fn(prompts=[...], completions=[...], completion_ids=[...], answer=[...],
       <each example column>=[...], **spec.kwargs)  ->  list[float | None], one per completion

Custom functions that do not take ``**kwargs`` receive only the arguments they name.

Failure policy, chosen so that one bad completion never stops a run but a broken reward always does:

- Rewards are called once per *group* (consecutive completions of one example), each call with
  ``RewardSpec.timeout_s`` as its deadline. A call that raises, overruns or crashes scores its
  samples None; they are counted (``errors`` / ``timeouts``) and the first traceback is printed once.
- Custom rewards (``module:function``, ``file.py:function``, ``apo.rewards`` entry points) run in a
  persistent worker process of their own, one message per step (:mod:`apo_cli.rewards.isolated`): an
  overrunning call has its worker killed, and a segfault, ``os._exit`` or ``sys.exit`` in a reward is
  that call's error, never the end of the trainer. Their code is never imported here.
- The cheap built-ins (apo's own code: fixed, linear patterns; no kwargs is ever compiled as a
  regex) run in this process, each call in a daemon thread (an overrun is abandoned, not killed).
- math_verify and reference take one call per step and time-box each sample themselves in
  killable worker processes, so a pathological expression costs at most ``timeout_s``.
- Returning something other than a list, or a list of the wrong length, is a bug in the reward:
  RewardError naming it. A single bad value (non-finite, or not a number) is isolated: that sample
  scores None and is counted (``bad_values``), and the first one is reported once.
- A reward that fails (error, time-out, missing or unparseable reference) on every sample of a
  step raises RewardError: training on an all-None reward would silently learn nothing.
- A sample's total is the weighted sum of its non-None rewards; if every reward is None it is 0.0
  and counted in ``rewards/all_none``.
"""

from __future__ import annotations

import inspect
import math
import numbers
import sys
import threading
import traceback
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from apo_cli.errors import RewardError
from apo_cli.rewards.builtin import REWARDS
from apo_cli.rewards.isolated import GroupResult, IsolatedReward
from apo_cli.rewards.loading import check_name, load_reward, metric_key
from apo_cli.trust import check_rewards

if TYPE_CHECKING:
    from apo_cli.rewards.spec import RewardSpec

_RESERVED = ("prompts", "completions", "completion_ids", "answer")
# counters that mean "this sample could not be judged because something is broken"
_FAILURES = ("errors", "timeouts", "gold_parse_failures", "gold_missing", "bad_values")


@dataclass
class RewardOutput:
    """What the loop gets back for one step of N completions."""

    total: list[float]  # [N] weighted sum over rewards, None skipped
    correct: list[bool] | None  # [N] any verifying reward says correct; None without a verifying reward
    metrics: dict[str, float]  # rewards/<name>/{mean,std,none_frac,errors,timeouts,...}, rewards/all_none
    per_reward: dict[str, list[float | None]] = field(default_factory=dict)  # [N] each reward's raw values
    counts: dict[str, Counter] = field(default_factory=dict)  # each reward's failure and event counters
    first_errors: dict[str, str] = field(default_factory=dict)  # each failing reward's first failure


def merge_outputs(parts: list[RewardOutput]) -> RewardOutput:
    """The output for the concatenation of the parts' completions (the ranks of a torchrun step),
    with its metrics computed over all of them, as one call on every completion would give."""
    if len(parts) == 1:
        return parts[0]
    total = [v for p in parts for v in p.total]
    keys = list(parts[0].per_reward)
    per_reward = {k: [v for p in parts for v in p.per_reward[k]] for k in keys}
    counts = {k: Counter() for k in keys}
    for p in parts:
        for k in keys:
            counts[k].update(p.counts.get(k, {}))  # update, not +: a counter reported as 0 stays a metric
    correct = None
    if any(p.correct is not None for p in parts):
        correct = [bool(c) for p in parts for c in (p.correct or [False] * len(p.total))]
    first_errors: dict[str, str] = {}
    for p in parts:
        for k, why in p.first_errors.items():
            first_errors.setdefault(k, why)
    return RewardOutput(total=total, correct=correct, metrics=_step_metrics(per_reward, counts, correct),
                        per_reward=per_reward, counts=counts, first_errors=first_errors)


def _step_metrics(per_reward: dict[str, list[float | None]], counts: dict[str, Counter],
                  correct: list[bool] | None) -> dict[str, float]:
    """rewards/<name>/{mean,std,none_frac,errors,timeouts,<counters>}, rewards/all_none, correct_frac."""
    metrics: dict[str, float] = {}
    n = len(next(iter(per_reward.values()), []))
    judged = [False] * n
    for key, values in per_reward.items():
        metrics.update(_reward_metrics(key, values, counts.get(key, Counter())))
        for i, v in enumerate(values):
            judged[i] = judged[i] or v is not None
    metrics["rewards/all_none"] = float(n - sum(judged))
    if correct is not None and n:
        metrics["rewards/correct_frac"] = sum(correct) / n
    return metrics


def _reward_metrics(key: str, values: list[float | None], counts: Counter) -> dict[str, float]:
    n = len(values)
    vals = [v for v in values if v is not None]
    mean = sum(vals) / len(vals) if vals else 0.0
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals)) if vals else 0.0
    out = {
        f"rewards/{key}/mean": mean,
        f"rewards/{key}/std": std,
        f"rewards/{key}/none_frac": (n - len(vals)) / n if n else 0.0,
        f"rewards/{key}/errors": float(counts.get("errors", 0)),
        f"rewards/{key}/timeouts": float(counts.get("timeouts", 0)),
    }
    for name, count in counts.items():
        out.setdefault(f"rewards/{key}/{name}", float(count))
    return out


@dataclass
class _Bound:
    key: str
    spec: RewardSpec
    fn: Callable | None  # None for an isolated reward: its code lives in its worker process only
    verifies: bool
    per_sample_timeout: bool
    accepts: frozenset[str] | None  # parameter names, or None when it takes **kwargs
    isolated: IsolatedReward | None = None


@dataclass
class _Partial:
    values: list[float | None]
    correct: list[bool | None] | None = None
    counts: Counter = field(default_factory=Counter)
    first_error: str | None = None


def _accepts(fn: Callable) -> frozenset[str] | None:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params)


def _check_kwargs(key: str, fn: Callable, kwargs: dict[str, Any]) -> None:
    """Reject recipe kwargs a built-in does not know (built-ins swallow columns in **_, so check here)."""
    import difflib

    params = inspect.signature(fn).parameters
    known = [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY and n != "timeout_s"]
    for k in kwargs:
        if k not in known:
            close = difflib.get_close_matches(k, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid: {', '.join(known) or 'none'}"
            raise RewardError(f"reward {key}: unknown kwargs key {k!r}; {hint}")


def _call_with_deadline(fn: Callable, kwargs: dict[str, Any], timeout_s: float | None) -> tuple[Any, str | None, bool]:
    """(result, traceback text or None, timed out). Works from any thread: no signals involved."""
    if timeout_s is None:
        try:
            return fn(**kwargs), None, False
        except Exception:  # noqa: BLE001
            return None, traceback.format_exc(), False
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(**kwargs)
        except BaseException:  # noqa: BLE001 - reported to the caller
            box["error"] = traceback.format_exc()

    worker = threading.Thread(target=target, daemon=True, name="apo-reward")
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        return None, None, True
    return box.get("value"), box.get("error"), False


def _validate(key: str, out: Any, n: int) -> tuple[list[float | None], list[bool | None] | None, Counter, str | None]:
    """Check a reward's return value; RewardError naming the reward and what came back otherwise."""
    if not isinstance(out, (list, tuple)):
        shown = repr(out) if len(repr(out)) < 60 else type(out).__name__
        raise RewardError(f"reward {key} returned {shown}; expected a list of {n} floats or None")
    if len(out) != n:
        raise RewardError(f"reward {key} returned {len(out)} values for {n} completions")
    values: list[float | None] = []
    counts = Counter(getattr(out, "counts", {}) or {})
    first_bad: str | None = None
    for i, v in enumerate(out):
        if v is None:
            values.append(None)
            continue
        f = float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else None
        if f is None or not math.isfinite(f):
            # one bad value is isolated to its sample (None, counted); the step goes on
            counts["bad_values"] += 1
            first_bad = first_bad or f"returned {type(v).__name__} {repr(v)[:40]} for completion {i}; expected a finite float or None"
            values.append(None)
        else:
            values.append(f)
    correct = getattr(out, "correct", None)
    if correct is not None and len(correct) != n:
        raise RewardError(f"reward {key} reported {len(correct)} correctness flags for {n} completions")
    return values, correct, counts, first_bad


def _groups(examples: Sequence[Any]) -> list[tuple[int, int]]:
    """[start, end) runs of consecutive completions that share one example (a rollout group)."""
    spans, start = [], 0
    for i in range(1, len(examples) + 1):
        if i == len(examples) or not (examples[i] is examples[start] or examples[i] == examples[start]):
            spans.append((start, i))
            start = i
    return spans


def _first_line(tb: str) -> str:
    lines = [line for line in tb.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "unknown error"


class RewardSet:
    """The recipe's rewards, resolved once; call it on a step's completions to get a RewardOutput."""

    def __init__(self, specs: list[RewardSpec]) -> None:
        for spec in specs:
            check_name(spec.name)
        check_rewards(specs)  # the user's opt-in to custom code, before any of it is imported
        self._rewards: list[_Bound] = []
        self._finalizer = weakref.finalize(self, _close_all, self._rewards)  # workers stop with the set
        seen: Counter = Counter()
        for spec in specs:
            key = metric_key(spec.name)
            seen[key] += 1
            if seen[key] > 1:
                key = f"{key}_{seen[key]}"
            self._rewards.append(self._bind(spec, key))
        self.names = [r.key for r in self._rewards]
        self.verifying = [r.key for r in self._rewards if r.verifies]  # rewards that report correctness
        self._reported: set[str] = set()

    @staticmethod
    def _bind(spec: RewardSpec, key: str) -> _Bound:
        """A built-in resolved here; anything else behind its own worker process."""
        if spec.name not in REWARDS.builtins():  # custom code and plugins' rewards: isolated
            iso = IsolatedReward(spec.name, key, spec.kwargs)
            return _Bound(key=key, spec=spec, fn=None, verifies=iso.verifies, per_sample_timeout=False,
                          accepts=iso.accepts, isolated=iso)
        fn = load_reward(spec.name)
        _check_kwargs(key, fn, spec.kwargs)
        return _Bound(key=key, spec=spec, fn=fn, verifies=bool(getattr(fn, "verifies", False)),
                      per_sample_timeout=bool(getattr(fn, "per_sample_timeout", False)), accepts=None)

    def close(self) -> None:
        """Stop the rewards' worker processes (also done when the set is collected or at exit)."""
        self._finalizer()

    # ----------------------------------------------------------------------------------------------

    def __call__(self, prompts: list[str], completions: list[str], completion_ids: list[list[int]],
                 examples: list[Any], *, check: bool = True) -> RewardOutput:
        """Score N completions (prompts, ids and examples aligned with them, groups consecutive).

        ``check``: raise when a reward failed on every completion (see :meth:`check`); under
        torchrun the loop checks the output merged over the ranks instead, as one process would."""
        n = len(completions)
        if not (len(prompts) == len(completion_ids) == len(examples) == n):
            raise ValueError(
                f"RewardSet: {len(prompts)} prompts, {n} completions, {len(completion_ids)} id lists and "
                f"{len(examples)} examples must align"
            )
        total = [0.0] * n
        correct: list[bool] | None = None
        per_reward: dict[str, list[float | None]] = {}
        counts: dict[str, Counter] = {}
        firsts: dict[str, str | None] = {}
        for r in self._rewards:
            part = self._score(r, prompts, completions, completion_ids, examples)
            per_reward[r.key] = part.values
            counts[r.key] = part.counts
            firsts[r.key] = part.first_error
            if check:  # stop at the first broken reward: the later ones need not run
                self._check_reward(r.key, part.values, part.counts, part.first_error)
            for i, v in enumerate(part.values):
                if v is not None:
                    total[i] += r.spec.weight * v
            if r.verifies or part.correct is not None:
                flags = part.correct or [None] * n
                correct = [bool((correct or [False] * n)[i] or flags[i]) for i in range(n)]
        first_errors = {k: why for k, why in firsts.items() if why is not None}
        return RewardOutput(total=total, correct=correct, metrics=_step_metrics(per_reward, counts, correct),
                            per_reward=per_reward, counts=counts, first_errors=first_errors)

    def check(self, out: RewardOutput) -> None:
        """RewardError when a reward failed (errors, timeouts, bad values, no gold answer) on every
        completion of the step: a broken reward, not a bad sample."""
        for key, values in out.per_reward.items():
            self._check_reward(key, values, out.counts.get(key, Counter()), out.first_errors.get(key))

    def _check_reward(self, key: str, values: list[float | None], counts: Counter, first_error: str | None) -> None:
        n = len(values)
        failed = sum(counts[k] for k in _FAILURES)
        if n and failed >= n and all(v is None for v in values):
            why = first_error or self._describe_counts(counts)
            raise RewardError(f"reward {key} failed on all {n} samples of this step: {why}")

    def _kwargs(self, r: _Bound, prompts: list[str], completions: list[str], completion_ids: list[list[int]],
                examples: list[Any], s: int, e: int) -> dict[str, Any]:
        """One group's arguments; for an isolated reward only the data (its worker binds the kwargs)."""
        kw: dict[str, Any] = {
            "prompts": prompts[s:e], "completions": completions[s:e], "completion_ids": completion_ids[s:e],
            "answer": [getattr(x, "answer", None) for x in examples[s:e]],
        }
        columns: dict[str, None] = {}
        for x in examples[s:e]:
            columns.update(dict.fromkeys(getattr(x, "columns", {}) or {}))
        for col in columns:
            if col not in _RESERVED:
                kw[col] = [(getattr(x, "columns", {}) or {}).get(col) for x in examples[s:e]]
        if r.isolated is not None:
            return kw
        kw.update(r.spec.kwargs)
        if r.per_sample_timeout:
            kw["timeout_s"] = r.spec.timeout_s
        if r.accepts is not None:
            kw = {k: v for k, v in kw.items() if k in r.accepts}
        return kw

    def _score(self, r: _Bound, prompts: list[str], completions: list[str], completion_ids: list[list[int]],
               examples: list[Any]) -> _Partial:
        """Run one reward over the step (whole, or group by group), applying the failure policy."""
        n = len(completions)
        spans = [] if n == 0 else [(0, n)] if r.per_sample_timeout else _groups(examples)
        calls = [self._kwargs(r, prompts, completions, completion_ids, examples, s, e) for s, e in spans]
        if r.isolated is not None:
            results = r.isolated.score(calls, r.spec.timeout_s)  # one message for the step's groups
        else:
            results = [self._call_here(r, kw, e - s) for kw, (s, e) in zip(calls, spans)]
        part = _Partial(values=[None] * n)
        correct: list[bool | None] = [None] * n
        any_correct = False
        for (s, e), res in zip(spans, results):
            if res.status == "invalid":  # a bug in the reward (a wrong length, not a list): stop
                raise RewardError(res.detail)
            if res.status != "ok":
                reason = _first_line(res.detail) if res.status == "error" else res.detail
                part.counts["timeouts" if res.status == "timeout" else "errors"] += e - s
                part.first_error = part.first_error or reason
                self._report(r.key, e - s, res.detail if res.status == "error" else f"reward {r.key}: a call {reason}\n")
                continue
            counts = Counter(res.counts or {})
            if res.bad is not None:
                part.first_error = part.first_error or res.bad
                self._report(r.key, counts["bad_values"], f"reward {r.key} {res.bad}\n")
            part.values[s:e] = res.values
            part.counts.update(counts)
            if res.correct is not None:
                correct[s:e] = res.correct
                any_correct = True
        part.correct = correct if (any_correct or r.verifies) else None
        return part

    @staticmethod
    def _call_here(r: _Bound, kw: dict[str, Any], n: int) -> GroupResult:
        """One group's call of a built-in in this process, time-boxed by a thread join."""
        out, tb, timed_out = _call_with_deadline(r.fn, kw, None if r.per_sample_timeout else r.spec.timeout_s)
        if timed_out:
            return GroupResult("timeout", detail=f"timed out after {r.spec.timeout_s:g} s")
        if tb is not None:
            return GroupResult("error", detail=tb)
        values, flags, counts, bad = _validate(r.key, out, n)
        return GroupResult("ok", values=values, correct=flags, counts=counts, bad=bad)

    @staticmethod
    def _describe_counts(counts: Counter) -> str:
        if counts["gold_missing"]:
            return "no reference answer (set data.answer_column)"
        if counts["gold_parse_failures"]:
            return "no reference answer could be parsed (check data.answer_column)"
        return "see the counts in the metrics"

    def _report(self, key: str, k: int, text: str) -> None:
        """Print the first failure of a reward as one block; later ones are only counted."""
        if key in self._reported:
            return
        self._reported.add(key)
        from apo_cli.runtime.world import World

        w = World.from_env()
        where = f"rank {w.rank}: " if w.distributed else ""  # under torchrun each rank scores its own samples
        sys.stderr.write(
            f"{where}reward {key} failed on a call ({k} samples scored None); later failures are only counted:\n"
            f"{text.rstrip()}\n"
        )


def _close_all(rewards: list[_Bound]) -> None:
    for r in rewards:
        if r.isolated is not None:
            r.isolated.close()
