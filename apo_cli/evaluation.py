"""Scoring models on a dataset: k samples per problem, mean@k, pass@k, maj@k with 95 % intervals.

Per problem j with n sampled completions (n >= k, default n = k), c of them correct:

- ``mean@k``: c / n, the expected accuracy of one sample;
- ``pass@k``: the unbiased estimator of "at least one of k samples is correct" (Chen et al. 2021),
  1 - C(n-c, k) / C(n, k), computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i) (no huge binomials);
- ``maj@k``: whether the most frequent extracted answer among the first k samples is correct
  (answers by :func:`apo_cli.rewards.extract.extract_answer` with the last-number fallback,
  compared after :func:`~apo_cli.rewards.extract.normalize_answer`; ties go to the answer seen
  first; samples without an answer do not vote; no answer at all counts as wrong);
- ``reward``: the mean total reward of the problem's samples.

A sample is correct when a verifying reward (math_verify, exact_match, ...) says so; with no
verifying reward, when its total reward reaches ``pass_threshold``.

**Confidence intervals** are 95 % normal-approximation intervals over problems: the mean of the m
per-problem scores ± 1.96 · s / sqrt(m), with s their sample standard deviation (clipped to the
metric's range). They count both the problem-to-problem spread and the sampling noise of each
problem's score; more samples per problem shrink the latter.

**Cache and resumption.** Problems are sampled in fixed chunks of ``batch_size`` (chunk b with seed
``batch_seed(seed, b)``), and each finished chunk is appended to a cache file named by a hash of the
model (path and checkpoint checksums), the dataset (source, columns, every problem's prompt and
reference, rewards) and the sampling settings. A rerun with the same key reuses the finished chunks
and samples only the rest, so an interrupted evaluation gives, when resumed, exactly what an
uninterrupted one would.

**During training** (recipe section ``eval``, apo_cli/train/evaluate.py) the same chunks are sampled
and scored by :func:`sample_problems` with the policy being trained, on the training backend; the
records go to the run's eval.jsonl with ``"source": "train"`` (no cache: a step whose evaluation was
killed is redone after ``--resume``, and :func:`drop_training_evals_after` removes the records of the
steps to redo, so each step's record is written once).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from apo_cli.generation import ResolvedModel, Sample, Sampler, batch_seed, chunks
from apo_cli.sampling import sample_and_score

CACHE_VERSION = 1
EVAL_FILE = "eval.jsonl"
Z95 = 1.959963984540054
METRICS = ("mean", "pass", "maj", "reward")


# --------------------------------------------------------------------------------------------------
# Estimators


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k)/C(n, k), as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def majority_correct(answers: list[str | None], correct: list[bool]) -> bool:
    """Is the most frequent answer (first seen wins ties; None does not vote) a correct one?"""
    from apo_cli.rewards.extract import normalize_answer

    keys = [None if a is None else normalize_answer(a) for a in answers]
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return False
    top = max(counts.values())
    winner = next(k for k in keys if k is not None and counts[k] == top)
    return any(ok for key, ok in zip(keys, correct) if key == winner)


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def mean_ci(scores: list[float], lo: float = 0.0, hi: float = 1.0) -> Interval:
    """Mean of ``scores`` with a 95 % normal-approximation interval, clipped to [lo, hi]."""
    m = len(scores)
    if m == 0:
        return Interval(float("nan"), float("nan"), float("nan"))
    mean = sum(scores) / m
    if m < 2:
        return Interval(mean, mean, mean)
    var = sum((x - mean) ** 2 for x in scores) / (m - 1)
    h = Z95 * math.sqrt(var / m)
    return Interval(mean, max(lo, mean - h), min(hi, mean + h))


# --------------------------------------------------------------------------------------------------
# Results


@dataclass
class ProblemResult:
    position: int  # index in the task's example list
    prompt: str
    reference: str | None
    completions: list[str]
    finish_reasons: list[str]
    tokens: list[int]
    rewards: list[float]
    correct: list[bool]
    answers: list[str | None]

    def scores(self, k: int) -> dict[str, float]:
        n, c = len(self.correct), sum(self.correct)
        return {
            "mean": c / n,
            "pass": pass_at_k(n, c, k),
            "maj": float(majority_correct(self.answers[:k], self.correct[:k])),
            "reward": sum(self.rewards) / n,
        }


def summarize(results: list[ProblemResult], k: int) -> dict[str, Interval]:
    """Each metric over problems, with its 95 % interval (see the module docstring)."""
    per = [r.scores(k) for r in results]
    out = {}
    for name in METRICS:
        vals = [p[name] for p in per]
        out[name] = mean_ci(vals) if name != "reward" else mean_ci(vals, -math.inf, math.inf)
    return out


def metric_label(name: str, k: int) -> str:
    return "reward" if name == "reward" else f"{name}@{k}"


# --------------------------------------------------------------------------------------------------
# What is evaluated, and how


@dataclass(frozen=True)
class EvalSettings:
    k: int
    samples: int  # n >= k completions per problem
    greedy: bool
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    stop: tuple[str, ...]
    seed: int
    batch_size: int
    pass_threshold: float

    def key(self) -> dict[str, Any]:
        return asdict(self)

    def params(self, chunk: int):
        from backends import SamplingParams

        return SamplingParams(n=self.samples, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                              top_p=self.top_p, top_k=self.top_k, stop=self.stop,
                              seed=batch_seed(self.seed, chunk), greedy=self.greedy)


@dataclass
class EvalTask:
    """The problems and how to score them."""

    label: str
    spec: Any  # DataSpec
    examples: list[Any]  # [Example]
    rewards: list[Any]  # [RewardSpec]
    _digest: str | None = field(default=None, repr=False)

    def key(self) -> dict[str, Any]:
        if self._digest is None:
            h = hashlib.sha256()
            for ex in self.examples:
                row = [ex.prompt, ex.answer, _jsonable(ex.columns)]
                if getattr(ex, "messages", None):  # a chat prompt: the whole conversation (text rows hash as before)
                    row.append(_jsonable(ex.messages))
                h.update(json.dumps(row, sort_keys=True).encode())
            self._digest = h.hexdigest()
        return {"data": self.spec.model_dump(mode="json"), "problems": self._digest,
                "rewards": [r.model_dump(mode="json") for r in self.rewards]}


def _jsonable(v: Any) -> Any:
    try:
        json.dumps(v)
        return v
    except TypeError:
        return repr(v)


def cache_key(model: ResolvedModel, task: EvalTask, settings: EvalSettings) -> str:
    blob = {"v": CACHE_VERSION, "model": model.identity(), "task": task.key(), "sampling": settings.key()}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:20]


def cache_path(model: ResolvedModel, key: str) -> Path:
    from apo_cli.models import cache_dir

    root = model.run_dir / "eval_cache" if model.kind == "checkpoint" and model.run_dir else cache_dir() / "eval"
    return root / f"{key}.jsonl"


def read_cache(path: Path) -> dict[int, ProblemResult]:
    """Finished problems of a cache file (a torn last line, from a kill, is ignored)."""
    done: dict[int, ProblemResult] = {}
    if not path.is_file():
        return done
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
                r = ProblemResult(**rec)
            except (json.JSONDecodeError, TypeError):
                continue
            done[r.position] = r
    return done


# --------------------------------------------------------------------------------------------------
# Running


@dataclass
class ModelResult:
    model: ResolvedModel
    key: str
    results: list[ProblemResult]
    cached: int  # problems taken from the cache

    def summary(self, k: int) -> dict[str, Interval]:
        return summarize(self.results, k)


def evaluate(model: ResolvedModel, task: EvalTask, settings: EvalSettings, *, backend: str = "cpu",
             advance: Callable[[int], None] = lambda n: None, use_cache: bool = True) -> ModelResult:
    """Sample and score every problem of ``task`` with ``model`` (reusing the cache where it can)."""
    from apo_cli.errors import ApoError
    from apo_cli.rewards import RewardSet

    still_there(model)  # before its cache key (a pruned checkpoint has no checksums left to key on)
    key = cache_key(model, task, settings)
    path = cache_path(model, key)
    done = read_cache(path) if use_cache else {}
    positions = list(range(len(task.examples)))
    todo = [(b, part) for b, part in chunks(positions, settings.batch_size) if not all(p in done for p in part)]
    cached = len(task.examples) - sum(len(part) for _, part in todo)
    advance(cached)
    if todo:
        rewards = RewardSet(task.rewards)
        try:
            sampler = Sampler(model, backend, chat_template=task.spec.chat_template, system=task.spec.system_prompt)
        except ApoError:
            still_there(model)  # removed while it was loading: say so, not what loading a missing folder says
            raise
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with path.open("a", encoding="utf-8") as cache:
                for b, part in todo:
                    fresh = _run_chunk(sampler, rewards, task, settings, b, part)
                    cache.write("".join(json.dumps(asdict(r)) + "\n" for r in fresh))
                    cache.flush()
                    done.update({r.position: r for r in fresh})
                    advance(len(part))
        finally:
            sampler.close()
    return ModelResult(model, key, [done[p] for p in positions], cached)


def still_there(model: ResolvedModel) -> None:
    """CheckpointError when a checkpoint listed for evaluation is gone (checkpoint.keep_last of a
    training still running prunes the older ones while they wait their turn)."""
    from apo_cli.errors import CheckpointError

    if model.kind == "checkpoint" and not Path(model.path).is_dir():
        raise CheckpointError(f"checkpoint {model.path} is gone: it was removed after apo eval listed it "
                              "(checkpoint.keep_last of a running training prunes older checkpoints)",
                              hint="evaluate the run's current checkpoints, or raise keep_last")


def sample_problems(sampler: Any, rewards: Any, task: EvalTask, settings: EvalSettings) -> list[ProblemResult]:
    """Every problem of ``task``, chunk by chunk, sampled and scored with ``sampler`` (anything with
    ``backend``, ``tok``, ``render`` and ``encode``, as :class:`~apo_cli.generation.Sampler`); no cache."""
    out: list[ProblemResult] = []
    for b, part in chunks(list(range(len(task.examples))), settings.batch_size):
        out += _run_chunk(sampler, rewards, task, settings, b, part)
    return out


def _run_chunk(sampler: Sampler, rewards, task: EvalTask, settings: EvalSettings, b: int,
               part: list[int]) -> list[ProblemResult]:
    from apo_cli.rewards.extract import extract_answer

    examples = [task.examples[p] for p in part]
    texts = [sampler.render(ex.prompt, ex, task.spec) for ex in examples]
    scored = sample_and_score(sampler.backend, sampler.tok, rewards, sampler.encode(texts, settings.max_new_tokens),
                              texts, examples, settings.params(b))
    n = settings.samples
    flat = [Sample(k // n, k % n, text, c.finish_reason, list(c.ids))
            for k, (c, text) in enumerate(zip(scored.completions, scored.texts))]
    out = scored.rewards
    if out.correct is not None:
        correct = [bool(c) for c in out.correct]
    else:
        correct = [t >= settings.pass_threshold for t in out.total]
    results = []
    for i, (p, ex) in enumerate(zip(part, examples)):
        rows = range(i * n, (i + 1) * n)
        results.append(ProblemResult(
            position=p, prompt=ex.prompt, reference=ex.answer,
            completions=[flat[j].completion for j in rows], finish_reasons=[flat[j].finish_reason for j in rows],
            tokens=[len(flat[j].ids) for j in rows], rewards=[float(out.total[j]) for j in rows],
            correct=[correct[j] for j in rows],
            answers=[extract_answer(flat[j].completion, fallback_last_number=True) for j in rows],
        ))
    return results


# --------------------------------------------------------------------------------------------------
# Records


def record(res: ModelResult, task: EvalTask, settings: EvalSettings) -> dict[str, Any]:
    """One machine-readable result (the --json output and the line appended to a run's eval.jsonl)."""
    k = settings.k
    return {
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": res.model.label,
        "path": res.model.path,
        "kind": res.model.kind,
        "step": res.model.step,
        "data": task.label,
        "problems": len(res.results),
        "k": k,
        "samples": settings.samples,
        "greedy": settings.greedy,
        "temperature": settings.temperature,
        "max_new_tokens": settings.max_new_tokens,
        "seed": settings.seed,
        "key": res.key,
        "metrics": {metric_label(name, k): {"value": iv.value, "ci_low": iv.low, "ci_high": iv.high}
                    for name, iv in res.summary(k).items()},
    }


def append_run_record(res: ModelResult, rec: dict[str, Any]) -> Path | None:
    """Append ``rec`` to the run's eval.jsonl (checkpoints of a run only; once per cache key)."""
    if res.model.kind != "checkpoint" or res.model.run_dir is None:
        return None
    path = res.model.run_dir / EVAL_FILE
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("key") == res.key:
                    return path
            except (json.JSONDecodeError, AttributeError):
                continue
    _append(path, rec)
    return path


def _append(path: Path, rec: dict[str, Any]) -> None:
    """One JSON line onto ``path``, never through a symbolic link (a planted or dangling link in a
    run directory someone sent would make apo write outside it): RunDirError naming the file."""
    from apo_cli.errors import RunDirError
    from apo_cli.metrics import open_append, why_not_written

    try:
        with open_append(path) as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
    except OSError as e:
        raise RunDirError(f"cannot write {path}: {why_not_written(path, e)}") from None


TRAINING = "train"  # the "source" of the records written by evaluation during training


def append_training_record(run_dir: Path, rec: dict[str, Any]) -> Path:
    """Append an evaluation-during-training record to the run's eval.jsonl (once per step)."""
    path = Path(run_dir) / EVAL_FILE
    rec = {**rec, "source": TRAINING}
    if any(r.get("source") == TRAINING and r.get("step") == rec["step"] for r in read_run_evals(run_dir)):
        return path
    _append(path, rec)
    return path


def drop_training_evals_after(run_dir: Path, step: int) -> None:
    """Remove the evaluation-during-training records of steps after ``step`` (redone after a resume);
    the records `apo eval` wrote stay."""
    from apo_cli.checkpoint import atomic_write_text

    path = Path(run_dir) / EVAL_FILE
    if not path.is_file():
        return
    recs = read_run_evals(run_dir)
    kept = [r for r in recs if r.get("source") != TRAINING or not isinstance(r.get("step"), int) or r["step"] <= step]
    if len(kept) != len(recs):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def dump_samples(path: Path, all_results: list[ModelResult]) -> None:
    """Per-sample JSONL for --dump."""
    with path.open("w", encoding="utf-8") as f:
        for res in all_results:
            for r in res.results:
                for j, text in enumerate(r.completions):
                    f.write(json.dumps({
                        "model": res.model.label, "problem": r.position, "sample": j, "prompt": r.prompt,
                        "reference": r.reference, "completion": text, "answer": r.answers[j],
                        "correct": r.correct[j], "reward": r.rewards[j], "finish_reason": r.finish_reasons[j],
                        "tokens": r.tokens[j],
                    }, ensure_ascii=False) + "\n")


def read_run_evals(run_dir: Path) -> list[dict[str, Any]]:
    """The records of a run's eval.jsonl (unreadable lines skipped)."""
    path = Path(run_dir) / EVAL_FILE
    out: list[dict[str, Any]] = []
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


# --------------------------------------------------------------------------------------------------
# Which models


def expand_models(args: list[str], *, base: bool = False) -> list[ResolvedModel]:
    """MODEL arguments as models: a glob expands to its matches, a run directory to all its intact
    checkpoints (oldest first); ``base`` adds each run's base model first. Duplicates are dropped."""
    import glob

    from apo_cli.checkpoint import list_checkpoints, verify_checkpoint
    from apo_cli.errors import CheckpointError, UsageError
    from apo_cli.generation import checkpoint_model, is_run_dir, resolve_model, run_base_model, warn

    found: list[ResolvedModel] = []
    for arg in args:
        if any(ch in arg for ch in "*?[") and not Path(arg).exists():
            matches = sorted(glob.glob(arg))
            if not matches:
                raise UsageError(f"no path matches {arg!r}")
            found += expand_models(matches)
            continue
        p = Path(arg).expanduser()
        if is_run_dir(p) and not (p / "config.json").is_file():
            ckpts = []
            for c in list_checkpoints(p):
                try:
                    verify_checkpoint(c)
                except CheckpointError as e:
                    warn(f"{e}; skipping it")
                    continue
                ckpts.append(checkpoint_model(c))
            if not ckpts:
                raise CheckpointError(f"run directory {p} has no intact checkpoint to evaluate")
            found += ckpts
            continue
        found.append(resolve_model(arg))
    if base:
        runs = list(dict.fromkeys(m.run_dir for m in found if m.run_dir is not None))
        if not runs:
            raise UsageError("--base needs a run directory or a checkpoint of a run among the models")
        found = [run_base_model(r) for r in runs] + found
    unique: dict[str, ResolvedModel] = {}
    for m in found:
        unique.setdefault(m.path, m)
    return list(unique.values())


# --------------------------------------------------------------------------------------------------
# Which problems


def task_from_recipe(recipe: Any, source: str, limit: int | None = None) -> EvalTask:
    """A recipe's evaluation split (data.eval_split, or the data.eval_fraction held out) and its rewards."""
    from apo_cli.data import load_examples
    from apo_cli.errors import UsageError

    examples = load_examples(recipe.data, recipe.run.seed, "eval")
    if not examples:
        raise UsageError(
            f"{source} has no evaluation split",
            hint="set data.eval_fraction or data.eval_split in the recipe, or evaluate on --data SOURCE",
        )
    _need_answers(examples, recipe.data, "data.answer_column")
    return EvalTask(f"{recipe.data.source} [eval]", recipe.data, examples[:limit], list(recipe.rewards))


def task_from_source(source: str, rewards: list[str], *, prompt_column: str = "prompt",
                     answer_column: str = "answer", chat_template: str = "auto", system: str | None = None,
                     limit: int | None = None) -> EvalTask:
    """Every row of ``source`` (a builtin: task, a local file or a hub dataset), in order."""
    from pydantic import ValidationError

    from apo_cli.data import load_examples
    from apo_cli.errors import UsageError
    from apo_cli.data.spec import DataSpec
    from apo_cli.rewards.spec import RewardSpec

    try:
        spec = DataSpec(source=source, prompt_column=prompt_column, answer_column=answer_column, shuffle=False,
                        chat_template=chat_template, system_prompt=system, limit=limit)
        specs = [RewardSpec(name=n) for n in rewards]
    except ValidationError as e:
        raise UsageError(f"--data {source}: {e.errors()[0]['msg']}") from None
    examples = load_examples(spec, 0, "train")
    _need_answers(examples, spec, "--answer-column")
    return EvalTask(source, spec, examples, specs)


def _need_answers(examples: list[Any], spec: Any, option: str) -> None:
    from apo_cli.errors import DataError

    if spec.answer_column is None or any(ex.answer is None for ex in examples):
        raise DataError(f"{spec.source}: evaluation needs a reference answer per problem; set {option}")
