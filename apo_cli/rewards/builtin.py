"""The built-in rewards, TRL-style: ``fn(completions=..., answer=..., **kwargs) -> list[float | None]``.

Each returns a :class:`Scores` (a plain list, so any TRL-style consumer can use it) that may also carry
``correct`` (for the verifying rewards) and ``counts`` (what went wrong on the way: parse failures,
time-outs), which :class:`apo_cli.rewards.RewardSet` turns into metrics.

None means "no judgement for this sample" (the reference does not parse, the check timed out): the
sample is skipped by this reward rather than scored 0, so a broken reference never looks like a wrong
answer. A completion with no extractable answer, on the other hand, is simply wrong (0).

Only the standard library is imported here; math-verify runs in worker processes
(:mod:`apo_cli.rewards.verify`) and reasoning-gym is imported on first use.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Literal

from apo_cli.errors import RewardError
from apo_cli.registry import Registry
from apo_cli.rewards.extract import answers_equal, extract_answer, extract_gold, ngram_repetition


class Scores(list):
    """Per-sample reward values, plus optional per-sample correctness and counters for metrics."""

    def __init__(self, values: Sequence[float | None], correct: list[bool | None] | None = None,
                 counts: dict[str, int] | None = None) -> None:
        super().__init__(values)
        self.correct = correct
        self.counts = dict(counts or {})


def reward(*, verifies: bool = False, per_sample_timeout: bool = False) -> Callable[[Callable], Callable]:
    """Mark a built-in: ``verifies`` = it reports correctness; ``per_sample_timeout`` = it takes
    ``timeout_s`` and enforces it per sample itself (so the caller must not time-box the whole call)."""

    def mark(fn: Callable) -> Callable:
        fn.verifies = verifies
        fn.per_sample_timeout = per_sample_timeout
        return fn

    return mark


def _answers(answer: Sequence[Any] | None, n: int) -> list[str | None]:
    if answer is None:
        return [None] * n
    return [None if a is None else str(a) for a in answer]


def _lengths(completions: Sequence[str], completion_ids: Sequence[Sequence[int]] | None,
             unit: Literal["tokens", "words", "chars"]) -> list[int]:
    """Completion lengths in ``unit``; tokens fall back to words when no ids were given."""
    if unit == "tokens" and completion_ids is not None:
        return [len(ids) for ids in completion_ids]
    if unit == "chars":
        return [len(c) for c in completions]
    return [len(c.split()) for c in completions]


def check_answers(completions: Sequence[str], answer: Sequence[Any] | None,
                  timeout_s: float) -> tuple[list[bool | None], Counter]:
    """Math-verify each completion's final answer against its reference.

    Returns per-sample True/False, or None where no judgement is possible (no reference, a reference
    that does not parse, a time-out, a checker error), and counters for metrics. The reference is
    parsed first, even when the completion has no answer, so a bad reference is always counted.
    """
    from apo_cli.rewards.verify import verify_pairs

    n = len(completions)
    golds = [None if a is None else extract_gold(a) for a in _answers(answer, n)]
    preds = [extract_answer(c) for c in completions]
    counts: Counter = Counter(dict.fromkeys(("gold_missing", "gold_parse_failures", "pred_parse_failures", "no_answer"), 0))
    result: list[bool | None] = [None] * n
    todo = [i for i in range(n) if golds[i] is not None]
    counts["gold_missing"] += n - len(todo)
    verdicts = verify_pairs([(golds[i], preds[i] or "") for i in todo], timeout_s)
    for i, v in zip(todo, verdicts):
        if v.status == "gold_unparsed":
            counts["gold_parse_failures"] += 1
        elif v.status == "timeout":
            counts["timeouts"] += 1
        elif v.status == "error":
            counts["errors"] += 1
        elif preds[i] is None:
            counts["no_answer"] += 1
            result[i] = False
        elif v.status == "pred_unparsed":
            counts["pred_parse_failures"] += 1
            result[i] = False
        else:
            result[i] = v.status == "equal"
    return result, counts


@reward(verifies=True, per_sample_timeout=True)
def math_verify(completions: list[str], answer: list[Any] | None = None, *, timeout_s: float = 5.0,
                **_: Any) -> Scores:
    """1.0 when the completion's final answer is mathematically equal to the reference, else 0.0.

    The reference may be a bare answer or a worked solution (its last ``\\boxed{}`` is used). None
    where the reference is missing or does not parse, or the check timed out (see check_answers).
    """
    correct, counts = check_answers(completions, answer, timeout_s)
    return Scores([None if c is None else float(c) for c in correct], correct, counts)


@reward(verifies=True)
def exact_match(completions: list[str], answer: list[Any] | None = None, *, last_number: bool = True,
                **_: Any) -> Scores:
    """1.0 when the final answer equals the reference after normalisation, else 0.0.

    Normalisation drops ``$``, ``\\text{}``, TeX spacing, degree signs, thousands separators and
    unit words after a number; numbers then compare by exact value (``42`` = ``42.0`` = ``84/2``),
    so the arithmetic task's integers must match exactly. None where there is no reference.
    Without a box, answer tags or an "answer is" phrase, the completion's last number is its answer
    (``last_number: false`` in the reward's kwargs turns that off).
    """
    counts: Counter = Counter({"gold_missing": 0, "no_answer": 0})
    values: list[float | None] = []
    correct: list[bool | None] = []
    for text, ref in zip(completions, _answers(answer, len(completions))):
        gold = None if ref is None else extract_gold(ref)
        pred = extract_answer(text, fallback_last_number=last_number)
        if not gold:
            counts["gold_missing"] += 1
            values.append(None)
            correct.append(None)
            continue
        if pred is None:
            counts["no_answer"] += 1
        ok = pred is not None and answers_equal(pred, gold)
        values.append(float(ok))
        correct.append(ok)
    return Scores(values, correct, counts)


@reward()
def format_reward(completions: list[str], *, tags: Sequence[str] = ("<answer>", "</answer>"),
                  in_order: bool = True, **_: Any) -> Scores:
    """1.0 when every string in ``tags`` appears in the completion (in that order if ``in_order``), else 0.0."""
    values = []
    for text in completions:
        pos, ok = 0, True
        for tag in tags:
            found = text.find(tag, pos if in_order else 0)
            if found < 0:
                ok = False
                break
            pos = found + len(tag)
        values.append(float(ok))
    return Scores(values)


@reward()
def repetition(completions: list[str], completion_ids: list[list[int]] | None = None, *, n: int = 4,
               scale: float = 1.0, unit: Literal["words", "tokens"] = "words", **_: Any) -> Scores:
    """``-scale × r`` with r the fraction of repeated n-grams (``1 - unique/total``) of the completion.

    Words by default, so the value does not depend on the tokenizer; ``unit: tokens`` uses the ids.
    """
    values = []
    for i, text in enumerate(completions):
        seq = list(completion_ids[i]) if unit == "tokens" and completion_ids is not None else text.split()
        values.append(-scale * ngram_repetition(seq, n))
    return Scores(values)


@reward()
def length(completions: list[str], completion_ids: list[list[int]] | None = None, *, target: int = 256,
           scale: float = 0.1, unit: Literal["tokens", "words", "chars"] = "tokens", **_: Any) -> Scores:
    """``scale × clip(1 - |L - target| / target, -1, 1)``: +scale at the target length, 0 at 0 and at
    twice the target, down to -scale beyond three times the target."""
    if target <= 0:
        raise RewardError(f"reward length: target must be positive (got {target})")
    return Scores([scale * max(-1.0, min(1.0, 1 - abs(n - target) / target))
                   for n in _lengths(completions, completion_ids, unit)])


def overlong_problem(max_len: Any = None, buffer: Any = None, **_: Any) -> str | None:
    """The rule the ``overlong`` kwargs break, or None: max_len and buffer are integers, 1 <= max_len,
    0 <= buffer <= max_len (checked when the recipe is read and again at each call)."""
    if max_len is None or buffer is None:
        return "needs kwargs max_len and buffer (in tokens: the penalty starts at max_len - buffer)"
    for name, v in (("max_len", max_len), ("buffer", buffer)):
        if not isinstance(v, int) or isinstance(v, bool):
            return f"kwargs.{name} must be a whole number of tokens (got {v!r})"
    if max_len < 1:
        return f"kwargs.max_len must be at least 1 token (got {max_len})"
    if not 0 <= buffer <= max_len:
        return f"kwargs.buffer must be between 0 and max_len={max_len} tokens (got {buffer})"
    return None


@reward()
def overlong(completions: list[str], completion_ids: list[list[int]] | None = None, *, max_len: int | None = None,
             buffer: int | None = None, **_: Any) -> Scores:
    """DAPO's soft overlong punishment, on the completion's length L in tokens::

        0                              if L <= max_len - buffer
        (max_len - buffer - L) / buffer  if max_len - buffer < L <= max_len   (down to -1 at max_len)
        -1                             if L > max_len

    DAPO sets ``max_len`` to the longest completion (``rollout.max_new_tokens``; a completion cut
    there scores -1) and ``buffer`` to its L_cache (4096 of 20480). ``buffer: 0`` is a hard cliff.
    """
    problem = overlong_problem(max_len, buffer)
    if problem is not None:
        raise RewardError(f"reward overlong: {problem}")
    if completion_ids is None:
        raise RewardError("reward overlong counts tokens: it needs completion_ids")
    start = max_len - buffer
    return Scores([0.0 if n <= start else -1.0 if n > max_len else (start - n) / buffer
                   for n in (len(ids) for ids in completion_ids)])


overlong.check_kwargs = overlong_problem  # the recipe's rewards section is checked with it (rewards/spec.py)


@reward(verifies=True, per_sample_timeout=True)
def reference(completions: list[str], answer: list[Any] | None = None,
              completion_ids: list[list[int]] | None = None, *, timeout_s: float = 5.0,
              bonus_per_token: float = 1e-4, bonus_max: float = 0.1, n: int = 4,
              repetition_threshold: float = 0.3, repetition_cliff: float = 0.5,
              repetition_scale: float = 0.1, **_: Any) -> Scores:
    """The paper's reward (APO_METHOD §7), exactly::

        R = 1.0                                                    if the answer is verified equal
        R = min(bonus_max, bonus_per_token × L) - P(rep)           otherwise
        P(rep) = repetition_cliff          if rep > repetition_threshold
               = repetition_scale × rep    otherwise

    with L the completion length in tokens (words when no ids are given), rep the fraction of
    repeated word 4-grams (``1 - unique/total``), and defaults bonus 1e-4/token capped at 0.1
    (reached at 1000 tokens), threshold 0.3, cliff 0.5, scale 0.1 (at most 0.03 below the cliff).
    So R ∈ [-0.5, 0.1] for a wrong answer and 1.0 for a right one; the small bonus keeps wrong
    groups from being all-equal, and the cliff makes degenerate loops clearly worse than trying.
    None where the check cannot judge (missing/unparseable reference, time-out), as math_verify.
    """
    correct, counts = check_answers(completions, answer, timeout_s)
    lengths = _lengths(completions, completion_ids, "tokens")
    values: list[float | None] = []
    for text, ok, n_tok in zip(completions, correct, lengths):
        if ok is None:
            values.append(None)
        elif ok:
            values.append(1.0)
        else:
            rep = ngram_repetition(text.split(), n)
            penalty = repetition_cliff if rep > repetition_threshold else repetition_scale * rep
            values.append(min(bonus_max, bonus_per_token * n_tok) - penalty)
    return Scores(values, correct, counts)


_RG_SCORERS: dict[str, Callable[[str | None, dict], float]] = {}


def _rg_scorer(name: str) -> Callable[[str | None, dict], float]:
    if name not in _RG_SCORERS:
        import reasoning_gym

        try:
            _RG_SCORERS[name] = reasoning_gym.get_score_answer_fn(name)
        except ValueError:
            raise RewardError(f"reward reasoning_gym: unknown reasoning-gym dataset {name!r}") from None
    return _RG_SCORERS[name]


@reward(verifies=True)
def reasoning_gym(completions: list[str], answer: list[Any] | None = None, prompts: list[str] | None = None,
                  metadata: list[dict] | None = None, *, task: str | None = None, **_: Any) -> Scores:
    """The reasoning-gym dataset's own ``score_answer`` on the extracted final answer (score in [0, 1]).

    Needs the ``metadata`` column that builtin reasoning-gym tasks provide (its ``source_dataset``
    names the scorer; ``task`` overrides it). Correct means a score of 1.
    """
    if metadata is None:
        raise RewardError(
            "reward reasoning_gym needs the 'metadata' column of a builtin reasoning-gym task "
            "(data.source: builtin:<dataset>)"
        )
    values: list[float | None] = []
    refs = _answers(answer, len(completions))
    for i, text in enumerate(completions):
        meta = metadata[i] or {}
        name = task or meta.get("source_dataset")
        if not name:
            raise RewardError("reward reasoning_gym: metadata has no 'source_dataset'; set kwargs.task")
        entry = {"question": prompts[i] if prompts else "", "answer": refs[i], "metadata": meta}
        score = float(_rg_scorer(name)(extract_answer(text), entry))
        values.append(score if math.isfinite(score) else None)
    return Scores(values, [None if v is None else v >= 1.0 for v in values])


REWARDS: Registry[Callable[..., Scores]] = Registry("reward", group="apo.rewards")
"""Rewards by the name a recipe gives them (``rewards: [{name: exact_match}]``): the built-ins below,
and those a third-party package names in the ``apo.rewards`` entry-point group (``myreward =
"my_pkg.rewards:score"``, imported only when a recipe uses it). ``module:function`` and
``file.py:function`` names are not registered: :func:`apo_cli.rewards.loading.load_reward` imports them."""

for _name, _fn in (
    ("math_verify", math_verify),
    ("exact_match", exact_match),
    ("format", format_reward),
    ("repetition", repetition),
    ("length", length),
    ("overlong", overlong),
    ("reference", reference),
    ("reasoning_gym", reasoning_gym),
):
    REWARDS.add(_name, _fn)
del _name, _fn
