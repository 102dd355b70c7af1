"""The report of a comparison: per run, per arm (mean ± std over seeds), and each arm against the first.

Per run (its metrics.jsonl and eval.jsonl; only finished runs are counted):

- ``final reward``: the mean training reward over the last 10 % of the steps (at least one step).
  A step's reward is ``reward``, or with dynamic sampling ``sampling/reward`` (every completion the
  step sampled: ``reward`` there covers only the groups with spread, which were trained, so arms
  with and without dynamic sampling would not compare alike); a step with neither (none in a run
  apo wrote) repeats the step before;
- ``held-out mean@k`` / ``pass@k``: the evaluation at the run's last evaluated step, from evaluation
  during training (the ``eval:`` section) or else the newest record `apo eval` wrote to eval.jsonl;
- ``steps to T``: the first step at which the reward's moving average (``window`` steps) reaches the
  threshold T (``--threshold``; by default halfway from the mean starting reward to the best arm's
  final reward), and in how many seeds it was reached;
- ``noise``: the step-to-step noise of the reward over the second half of the run,
  sqrt(mean((r[t+1] - r[t])²) / 2): for a smooth trend plus independent noise, the noise's std;
- ``length``: the mean completion length (tokens); ``time``: the seconds spent in steps and
  evaluations (``step_time`` + ``time/eval``, so a resumed run is not charged for its restarts).

Against the first arm: for each seed both arms ran, the difference of the arm's value from the first
arm's (the same seed means the same data order, sampling seeds and, for a model built from the seed,
the same initial weights, so the pairs share their luck); the mean difference and its 95 % interval
from a percentile bootstrap over seeds (10 000 resamples, seeded: the same runs give the same
interval). A verdict says "not distinguishable with N seeds" when the interval covers zero. With few
seeds the interval is narrow only by chance (with two it is the range of the two differences):
read it as a lower bound on the uncertainty.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from apo_cli.compare.plan import read_manifest
from apo_cli.compare.stats import BOOTSTRAP, bootstrap_diff, final_reward, moving_average, noise, steps_to
from apo_cli.errors import UsageError

__all__ = ["BOOTSTRAP", "ArmResult", "Comparison", "RunResult", "bootstrap_diff", "final_reward", "load",
           "moving_average", "noise", "render", "steps_to", "summarize", "verdict"]

_RUN_DIR = re.compile(r"(?P<arm>[A-Za-z0-9][A-Za-z0-9._-]*)-s(?P<seed>\d+)$")
LABELS = {"final_reward": "final reward", "noise": "noise", "completion_length": "length", "time_s": "time s"}
DIFF_SHOWN = ("final_reward",)  # besides the held-out metrics


@dataclass
class RunResult:
    arm: str
    seed: int
    path: Path
    steps: int
    max_steps: int | None
    rewards: list[float]
    alphas: list[float | None]
    evals: list[tuple[int, dict[str, float]]]  # training evaluations: (step, {"mean@4": ...})
    values: dict[str, float | None] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.max_steps is not None and self.steps >= self.max_steps


@dataclass
class ArmResult:
    name: str
    objective: str | None
    runs: list[RunResult]
    missing: list[int] = field(default_factory=list)  # seeds with no run directory (not started)
    summary: dict[str, dict[str, float]] = field(default_factory=dict)
    reached: tuple[int, int] = (0, 0)  # seeds that reached the threshold, finished seeds
    diff: dict[str, dict[str, float]] = field(default_factory=dict)

    def done(self) -> list[RunResult]:
        return [r for r in self.runs if r.finished]

    def reads_alpha(self) -> bool:
        from apo_cli.algo.spec import objective_params

        return "alpha" in (objective_params(self.objective or "") or ())


@dataclass
class Comparison:
    root: Path
    arms: list[ArmResult]
    seeds: list[int]
    threshold: float | None = None
    threshold_note: str = ""
    window: int = 1
    verdicts: list[str] = field(default_factory=list)

    def metric_keys(self) -> list[str]:
        keys = ["final_reward"]
        held = sorted({k for a in self.arms for r in a.done() for k in r.values if k.startswith("held_out_")},
                      key=lambda k: (k.split("@")[0] != "held_out_mean", k))
        return keys + held + ["noise", "completion_length", "time_s"]


def label(key: str) -> str:
    return LABELS.get(key) or key.replace("held_out_", "held-out ")


def _mean_std(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


# --------------------------------------------------------------------------------------------------
# Loading


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _eval_values(records: list[dict[str, Any]]) -> tuple[list[tuple[int, dict[str, float]]], dict[str, float]]:
    """(training evaluations by step, the final held-out values) from a run's eval.jsonl records."""
    def values(rec: dict[str, Any]) -> dict[str, float]:
        out = {}
        for name, m in (rec.get("metrics") or {}).items():
            if re.fullmatch(r"(mean|pass)@\d+", name) and isinstance(m, dict) and _num(m.get("value")) is not None:
                out[name] = float(m["value"])
        return out

    train = sorted(((int(r["step"]), values(r)) for r in records
                    if r.get("source") == "train" and isinstance(r.get("step"), int)), key=lambda t: t[0])
    final = train[-1][1] if train else next((values(r) for r in reversed(records) if values(r)), {})
    return train, final


def step_rewards(rows: list[dict[str, Any]]) -> list[float]:
    """The reward of each step: ``sampling/reward`` (dynamic sampling: every sampled completion), else
    ``reward``; a row with neither repeats the one before (0 before the first)."""
    out: list[float] = []
    for x in rows:
        v = _num(x.get("sampling/reward"))
        v = _num(x.get("reward")) if v is None else v
        out.append(v if v is not None else (out[-1] if out else 0.0))
    return out


def _run(arm: str, seed: int, path: Path, warn: Callable[[str], None]) -> RunResult:
    from apo_cli.inspect import load_run

    run = load_run(path, warn)
    rows = run.rows
    evals, final = _eval_values(run.evals)
    r = RunResult(arm, seed, path, int(rows[-1]["step"]), run.max_steps,
                  step_rewards(rows), [_num(x.get("alpha")) for x in rows], evals)
    lengths = [v for x in rows if (v := _num(x.get("completions/mean_length"))) is not None]
    r.values = {"final_reward": final_reward(r.rewards), "noise": noise(r.rewards),
                "completion_length": statistics.fmean(lengths) if lengths else None,
                "time_s": sum((_num(x.get("step_time")) or 0.0) + (_num(x.get("time/eval")) or 0.0) for x in rows)}
    r.values.update({f"held_out_{k}": v for k, v in final.items()})
    return r


def _arms_and_seeds(root: Path) -> tuple[list[tuple[str, str | None]], list[int]]:
    manifest = read_manifest(root)
    if manifest is not None:
        return [(str(a["name"]), a.get("objective")) for a in manifest["arms"]], [int(s) for s in manifest["seeds"]]
    found = [(m["arm"], int(m["seed"])) for p in sorted(root.iterdir()) if p.is_dir() and (m := _RUN_DIR.match(p.name))]
    if not found:
        raise UsageError(f"{root} holds no comparison: no compare.json and no <arm>-s<seed> run directories")
    arms = list(dict.fromkeys(a for a, _ in found))
    return [(a, None) for a in arms], sorted({s for _, s in found})


def _objective(path: Path) -> str | None:

    from apo_cli.recipe_yaml import load_file

    try:
        data = load_file(path / "recipe.yaml")
        return str(((data or {}).get("algorithm") or {}).get("objective") or "apo")
    except (OSError, ValueError, AttributeError):
        return None


def load(root: Path, warn: Callable[[str], None]) -> Comparison:
    """Read every run of the comparison in ``root`` (UsageError when it is not one)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UsageError(f"comparison folder {root} does not exist")
    arm_list, seeds = _arms_and_seeds(root)
    arms = []
    for name, objective in arm_list:
        arm = ArmResult(name, objective, [])
        for seed in seeds:
            path = root / f"{name}-s{seed}"
            if not (path / "metrics.jsonl").is_file():
                arm.missing.append(seed)
                continue
            arm.runs.append(_run(name, seed, path, warn))
            arm.objective = arm.objective or _objective(path)
        arms.append(arm)
    return Comparison(root, arms, seeds)


# --------------------------------------------------------------------------------------------------
# Figures and verdicts


def _default_threshold(c: Comparison) -> tuple[float | None, str]:
    runs = [r for a in c.arms for r in a.done()]
    if not runs:
        return None, ""
    start = statistics.fmean(statistics.fmean(r.rewards[: max(1, math.ceil(len(r.rewards) / 10))]) for r in runs)
    best = max(a.summary["final_reward"]["mean"] for a in c.arms if "final_reward" in a.summary)
    t = start + (best - start) / 2 if best > start else best
    return t, (f"halfway from the mean starting reward {start:.3f} to the best arm's final reward {best:.3f}; "
               "--threshold sets it")


def summarize(c: Comparison, threshold: float | None = None, window: int | None = None) -> Comparison:
    """Fill in each arm's summary, threshold figures, differences from the first arm and the verdicts."""
    done = [r for a in c.arms for r in a.done()]
    c.window = window or min(20, max(1, min((len(r.rewards) for r in done), default=1) // 10))
    for a in c.arms:
        for key in c.metric_keys():
            xs = [v for r in a.done() if (v := r.values.get(key)) is not None]
            if xs:
                a.summary[key] = _mean_std(xs)
    c.threshold, c.threshold_note = (threshold, "--threshold") if threshold is not None else _default_threshold(c)
    for a in c.arms:
        if c.threshold is None:
            continue
        hits = [steps_to(r.rewards, c.threshold, c.window) for r in a.done()]
        for r, h in zip(a.done(), hits):
            r.values["steps_to_threshold"] = None if h is None else float(h)
        a.reached = (sum(h is not None for h in hits), len(hits))
        if any(h is not None for h in hits):
            a.summary["steps_to_threshold"] = _mean_std([float(h) for h in hits if h is not None])
    _differences(c)
    return c


def _differences(c: Comparison) -> None:
    if not c.arms:
        return
    base = {r.seed: r for r in c.arms[0].done()}
    keys = [k for k in c.metric_keys()]
    for i, a in enumerate(c.arms[1:], 1):
        for key in keys:
            pairs = [(r.values.get(key), base[r.seed].values.get(key)) for r in a.done() if r.seed in base]
            diffs = [x - y for x, y in pairs if x is not None and y is not None]
            if not diffs:
                continue
            mean, lo, hi = bootstrap_diff(diffs, seed=i)
            a.diff[key] = {"value": mean, "ci_low": lo, "ci_high": hi, "n": len(diffs)}
            if key in DIFF_SHOWN or key.startswith("held_out_"):
                c.verdicts.append(verdict(a.name, c.arms[0].name, label(key), a.diff[key]))


def verdict(arm: str, base: str, what: str, d: dict[str, float]) -> str:
    n = int(d["n"])
    seeds = f"{n} seed{'s' if n != 1 else ''}"
    ci = f"{d['value']:+.3f}, 95 % interval [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
    if n < 2:
        return f"{arm} vs {base}: {what} not distinguishable with {seeds} ({d['value']:+.3f}; one seed has no spread)"
    if d["ci_low"] <= 0 <= d["ci_high"]:
        return f"{arm} vs {base}: {what} not distinguishable with {seeds} ({ci})"
    side = "higher" if d["ci_low"] > 0 else "lower"
    return f"{arm} vs {base}: {what} {side} for {arm} over {seeds} ({ci})"


# --------------------------------------------------------------------------------------------------
# The table


def _cell(s: dict[str, float] | None, digits: int) -> str:
    return "-" if s is None else f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return [fmt(headers)] + [fmt(r) for r in rows]


def render(c: Comparison) -> str:
    """The report as text: the table, the differences from the first arm, the verdicts, what is missing."""
    keys = c.metric_keys()
    digits = {"completion_length": 1, "time_s": 0}
    steps = sorted({r.max_steps for a in c.arms for r in a.runs if r.max_steps})
    lines = [f"comparison {c.root}: {len(c.arms)} arms, seeds {','.join(map(str, c.seeds))}, "
             f"{'/'.join(map(str, steps)) or '?'} steps per run"]
    if c.threshold is not None:
        avg = f"{c.window} step{'s' if c.window != 1 else ''}"
        lines.append(f"reward threshold {c.threshold:.3f} ({c.threshold_note}); moving average over {avg}")
    to = f"steps to {c.threshold:.3f}" if c.threshold is not None else "steps to threshold"
    headers = ["arm", "runs"] + [label(k) for k in keys[:-3]] + [to] + [label(k) for k in keys[-3:]]
    rows = []
    for a in c.arms:
        st = a.summary.get("steps_to_threshold")
        reached = f"{st['mean']:.1f}".removesuffix(".0") + f" ({a.reached[0]}/{a.reached[1]})" if st else f"- (0/{a.reached[1]})"
        cells = [_cell(a.summary.get(k), digits.get(k, 3)) for k in keys]
        rows.append([a.name, f"{len(a.done())}/{len(c.seeds)}"] + cells[:-3] + [reached] + cells[-3:])
    lines += [""] + _table(headers, rows)
    if not any(k.startswith("held_out_") for k in keys):
        lines.append("held-out: no evaluations (set eval.every and data.eval_fraction, or run apo eval on the runs)")
    shown = [k for k in keys if k in DIFF_SHOWN or k.startswith("held_out_")]
    if len(c.arms) > 1:
        lines += ["", f"difference from {c.arms[0].name} (paired over seeds, bootstrap 95 % interval):"]
        drows = [[a.name] + [_diff_cell(a.diff.get(k)) for k in shown] for a in c.arms[1:]]
        lines += _table(["arm"] + [label(k) for k in shown], drows)
        lines += ["", "verdicts:"] + [f"  {v}" for v in c.verdicts or ["  no pair has a finished run at a common seed"]]
    lines += _not_counted(c)
    return "\n".join(lines)


def _diff_cell(d: dict[str, float] | None) -> str:
    if d is None:
        return "-"
    if d["n"] < 2:
        return f"{d['value']:+.3f} (1 seed, no interval)"
    return f"{d['value']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"


def _not_counted(c: Comparison) -> list[str]:
    out = []
    for a in c.arms:
        out += [f"{a.name}-s{r.seed} ({r.steps}/{r.max_steps or '?'} steps)" for r in a.runs if not r.finished]
        out += [f"{a.name}-s{s} (not started)" for s in a.missing]
    return ["", "not counted (unfinished): " + ", ".join(out)] if out else []


# --------------------------------------------------------------------------------------------------
# Exports


def as_json(c: Comparison) -> dict[str, Any]:
    from apo_cli.compare.charts import curves

    return {"root": str(c.root), "seeds": c.seeds, "threshold": c.threshold, "window": c.window,
            "verdicts": c.verdicts,
            "arms": [{"name": a.name, "objective": a.objective, "summary": a.summary, "reached": list(a.reached),
                      "difference_from_first": a.diff, "curves": curves(c, a),
                      "runs": [{"seed": r.seed, "path": str(r.path), "steps": r.steps, "max_steps": r.max_steps,
                                "finished": r.finished, **r.values} for r in a.runs]} for a in c.arms]}


def write_json(c: Comparison, path: Path) -> None:
    import json

    path.write_text(json.dumps(as_json(c), indent=1) + "\n", encoding="utf-8")


def write_csv(c: Comparison, path: Path) -> None:
    """One row per arm: each figure's mean and std over seeds, and its difference from the first arm."""
    import csv

    keys = c.metric_keys() + ["steps_to_threshold"]
    fields = ["arm", "objective", "runs", "reached"] + [f"{k}_{s}" for k in keys for s in ("mean", "std")] \
        + [f"{k}_diff{s}" for k in keys for s in ("", "_ci_low", "_ci_high")]
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        for a in c.arms:
            row: dict[str, Any] = {"arm": a.name, "objective": a.objective or "", "runs": len(a.done()),
                                   "reached": a.reached[0]}
            for k in keys:
                if k in a.summary:
                    row[f"{k}_mean"], row[f"{k}_std"] = a.summary[k]["mean"], a.summary[k]["std"]
                if k in a.diff:
                    d = a.diff[k]
                    row[f"{k}_diff"], row[f"{k}_diff_ci_low"], row[f"{k}_diff_ci_high"] = d["value"], d["ci_low"], d["ci_high"]
            w.writerow(row)
