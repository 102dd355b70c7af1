"""Reading runs' alpha trajectories back: charts, a per-run summary, exports, and what-if replays.

A run directory's ``metrics.jsonl`` holds, per step, the schedule signals (``reward``,
``reward_signal``, ``confidence``, ``entropy_proxy``, ``calibration``) and the ``alpha`` and
``tau`` they produced. Because the signals are logged under their :class:`Signals` field names,
any alpha schedule can be replayed on them: :func:`replay` rebuilds ``Signals(step=row.step - 1,
...)`` row by row and feeds them to :func:`apo_cli.algo.schedules.make_alpha_schedule`, the code
training uses, so replaying a run's own schedule reproduces its logged alpha exactly, and another
rule (or other parameters) shows what it would have done on the same signals. (The signals
themselves came from the run's policy; a different alpha would have changed them afterwards, so a
what-if is a first-order answer.)

Regimes: a step is in *coverage* when alpha > (alpha_max + alpha_min) / 2 of the run's recipe, in
*exploitation* otherwise; a *transition* is a change of regime between consecutive steps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apo_cli.errors import RunDirError, UsageError

PANELS = ("alpha", "reward", "confidence", "tau")
SIGNAL_KEYS = ("reward", "reward_signal", "confidence", "entropy_proxy", "calibration")


@dataclass
class Run:
    path: Path
    name: str
    rows: list[dict[str, Any]]
    alpha_spec: Any  # AlphaScheduleSpec
    max_steps: int | None
    has_recipe: bool
    evals: list[dict[str, Any]] = field(default_factory=list)
    what_if: list[float | None] | None = None  # replayed alpha per row
    what_if_label: str = ""

    def steps(self) -> list[int]:
        return [int(r["step"]) for r in self.rows]

    def values(self, key: str) -> list[float | None]:
        return [_num(r.get(key)) for r in self.rows]


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


# --------------------------------------------------------------------------------------------------
# Loading


def _recipe_dict(run_dir: Path) -> dict[str, Any] | None:

    from apo_cli.recipe_yaml import load_file

    path = run_dir / "recipe.yaml"
    if not path.is_file():
        return None
    try:
        data = load_file(path)  # under a recipe's caps: the run may be someone else's
    except ValueError as e:  # not YAML, or over a recipe's caps
        raise RunDirError(str(e)) from None
    return data if isinstance(data, dict) else None


def _alpha_spec(recipe: dict[str, Any] | None, where: Path):
    from pydantic import ValidationError

    from apo_cli.algo.spec import AlphaScheduleSpec

    raw = ((recipe or {}).get("algorithm") or {}).get("alpha") or {}
    try:
        return AlphaScheduleSpec.model_validate(raw)
    except ValidationError as e:
        raise RunDirError(f"{where}/recipe.yaml: algorithm.alpha does not validate ({e.errors()[0]['msg']})") from None


def _max_steps(run_dir: Path, recipe: dict[str, Any] | None, rows: list[dict[str, Any]]) -> int | None:
    """The run's length as training computed it: run.max_steps, else a checkpoint's, else the last step."""
    from apo_cli.checkpoint import list_checkpoints, read_trainer_state
    from apo_cli.errors import CheckpointError

    ms = ((recipe or {}).get("run") or {}).get("max_steps")
    if isinstance(ms, int):
        return ms
    for c in reversed(list_checkpoints(run_dir)):
        try:
            return int(read_trainer_state(c)["max_steps"])
        except (CheckpointError, KeyError, TypeError, ValueError):
            continue
    return int(rows[-1]["step"]) if rows else None


def metrics_path(arg: Path) -> tuple[Path, Path]:
    """(run directory, metrics file) for a RUN argument (a run directory or its metrics file)."""
    arg = arg.expanduser()
    if arg.is_file():
        return arg.parent, arg
    if not arg.exists():
        raise RunDirError(f"run directory {arg} does not exist")
    name = (((_recipe_dict(arg) or {}).get("logging") or {}).get("metrics_file")) or "metrics.jsonl"
    return arg, arg / name


def load_run(arg: Path, warn: Callable[[str], None], *, wait: bool = False) -> Run:
    """Read one run (RunDirError naming what is wrong; truncated metrics lines are skipped with ``warn``)."""
    from apo_cli.evaluation import read_run_evals
    from apo_cli.metrics import read_metrics

    run_dir, mpath = metrics_path(arg)
    rows: list[dict[str, Any]] = []
    if mpath.is_file():
        rows = [r for r in read_metrics(mpath, warn=warn) if isinstance(r.get("step"), int)]
    elif not wait:
        raise RunDirError(f"{run_dir} has no {mpath.name}: not a run directory, or the run has not logged a step yet")
    if not rows and not wait:
        raise RunDirError(f"{mpath} holds no readable step")
    rows.sort(key=lambda r: r["step"])
    recipe = _recipe_dict(run_dir)
    name = ((recipe or {}).get("run") or {}).get("name") or run_dir.name
    return Run(run_dir, str(name), rows, _alpha_spec(recipe, run_dir), _max_steps(run_dir, recipe, rows),
               recipe is not None, read_run_evals(run_dir))


def distinct_names(runs: list[Run]) -> None:
    """Two runs with the same name are told apart by their paths."""
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            r.name = str(r.path)


# --------------------------------------------------------------------------------------------------
# What-if replay


def what_if_spec(base: Any, kind: str | None, params: list[str]):
    """``base`` (a run's AlphaScheduleSpec) with another ``kind`` and/or ``key=value`` parameters."""
    import yaml
    from pydantic import ValidationError

    from apo_cli.algo.spec import AlphaScheduleSpec

    data = base.model_dump()
    if kind is not None:
        data["kind"] = kind
    for item in params:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"schedule parameter {item!r}: expected key=value, e.g. max_rate=0.1")
        if key not in AlphaScheduleSpec.model_fields or key == "kind":
            valid = ", ".join(k for k in AlphaScheduleSpec.model_fields if k != "kind")
            raise UsageError(f"unknown schedule parameter {key!r}; valid: {valid}")
        try:
            data[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise UsageError(f"schedule parameter {item!r}: value is not valid YAML") from None
    try:
        return AlphaScheduleSpec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "schedule"
        msg = err["msg"].removeprefix("Value error, ")
        raise UsageError(f"what-if schedule: {where}: {msg}") from None


def replay(run: Run, spec: Any) -> list[float]:
    """Alpha per logged row under ``spec``, from the run's logged signals (the training schedule code)."""
    from apo_cli.algo.schedules import Signals, make_alpha_schedule

    try:
        schedule = make_alpha_schedule(spec, run.max_steps)
    except ValueError as e:
        raise UsageError(f"what-if schedule: {e}") from None
    out = []
    for row in run.rows:
        missing = [k for k in SIGNAL_KEYS if _num(row.get(k)) is None]
        if missing:
            raise RunDirError(
                f"{run.path}: step {row['step']} lacks the signal {missing[0]!r}; cannot replay the schedule"
            )
        sig = Signals(step=int(row["step"]) - 1, reward=float(row["reward"]), reward_signal=float(row["reward_signal"]),
                      confidence=float(row["confidence"]), entropy_proxy=float(row["entropy_proxy"]),
                      calibration=float(row["calibration"]))
        out.append(schedule.step(sig))
    return out


# --------------------------------------------------------------------------------------------------
# Summary


def regime_stats(alphas: list[float | None], rewards: list[float | None], mid: float) -> dict[str, Any]:
    """Coverage / exploitation step counts, transitions, and the reward at the first transition."""
    pairs = [(a, r) for a, r in zip(alphas, rewards) if a is not None]
    regimes = [a > mid for a, _ in pairs]
    switches = [i for i in range(1, len(regimes)) if regimes[i] != regimes[i - 1]]
    return {
        "coverage_steps": sum(regimes),
        "exploitation_steps": len(regimes) - sum(regimes),
        "transitions": len(switches),
        "reward_at_first_switch": pairs[switches[0]][1] if switches else None,
    }


def final_eval(run: Run) -> dict[str, Any] | None:
    """The eval.jsonl record of the newest evaluated checkpoint (the latest record for that step)."""
    recs = [e for e in run.evals if isinstance(e.get("step"), int) and isinstance(e.get("metrics"), dict)]
    if not recs:
        return None
    top = max(e["step"] for e in recs)
    return [e for e in recs if e["step"] == top][-1]


def summary(run: Run) -> dict[str, Any]:
    spec = run.alpha_spec
    mid = (spec.alpha_max + spec.alpha_min) / 2
    alphas = run.values("alpha")
    logged = [a for a in alphas if a is not None]
    out: dict[str, Any] = {
        "run": run.name, "path": str(run.path), "steps": run.steps()[-1] if run.rows else 0,
        "schedule": spec.kind, "alpha_max": spec.alpha_max, "alpha_min": spec.alpha_min, "midpoint": mid,
        "alpha_start": logged[0] if logged else None, "alpha_end": logged[-1] if logged else None,
        **regime_stats(alphas, run.values("reward"), mid),
    }
    ev = final_eval(run)
    out["final_eval"] = None if ev is None else {
        "step": ev["step"], "data": ev.get("data"),
        **{k: v.get("value") for k, v in ev["metrics"].items() if isinstance(v, dict)},
    }
    if run.what_if is not None:
        wi = regime_stats(list(run.what_if), run.values("reward"), mid)
        diffs = [abs(a - b) for a, b in zip(run.what_if, alphas) if a is not None and b is not None]
        out["what_if"] = {
            "schedule": run.what_if_label, "alpha_end": run.what_if[-1] if run.what_if else None,
            "coverage_steps": wi["coverage_steps"], "exploitation_steps": wi["exploitation_steps"],
            "transitions": wi["transitions"],
            "max_abs_diff_vs_logged": max(diffs) if diffs else None,
        }
    return out


# --------------------------------------------------------------------------------------------------
# Rendering


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def summary_table(runs: list[Run]):
    """The per-run summary: a table of regimes, then the newest eval scores and the what-if, one line each."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    sums = [summary(r) for r in runs]
    table = Table(title="alpha regimes (cover: α > (α_max + α_min) / 2)")
    table.add_column("run (steps, rule)", overflow="fold", ratio=1)
    for col in ("α start", "α end", "cover", "exploit", "switches", "reward@1st"):
        table.add_column(col, justify="right", no_wrap=True, min_width=len(col))
    lines = []
    for s in sums:
        table.add_row(f"{escape(s['run'])}\n{s['steps']} steps, {s['schedule']}", _fmt(s["alpha_start"]), _fmt(s["alpha_end"]),
                      str(s["coverage_steps"]), str(s["exploitation_steps"]), str(s["transitions"]),
                      _fmt(s["reward_at_first_switch"]))
        ev = s["final_eval"]
        if ev is not None:
            scores = " · ".join(f"{k} {_fmt(v)}" for k, v in ev.items() if k not in ("step", "data"))
            lines.append(f"final eval of {s['run']} (step {ev['step']}, {ev.get('data')}): {scores}")
        if "what_if" in s:
            w = s["what_if"]
            diff = w["max_abs_diff_vs_logged"]
            lines.append(
                f"what-if {s['run']} [{w['schedule']}]: α end {_fmt(w['alpha_end'])}, coverage {w['coverage_steps']}, "
                f"exploit {w['exploitation_steps']}, switches {w['transitions']}, "
                f"max |Δα| vs logged {'–' if diff is None else format(diff, '.3g')}"
            )
    return Group(table, *(Text(line) for line in lines))


def _panel_series(runs: list[Run], key: str) -> tuple[list[list[float]], list[list[float]], list[str]]:
    xs, ys, labels = [], [], []
    for r in runs:
        pts = [(s, v) for s, v in zip(r.steps(), r.values(key)) if v is not None]
        if pts:
            xs.append([p[0] for p in pts])
            ys.append([p[1] for p in pts])
            labels.append(r.name)
        if key == "alpha" and r.what_if is not None:
            xs.append(r.steps())
            ys.append(list(r.what_if))
            labels.append(f"{r.name} (what-if {r.what_if_label})")
    return xs, ys, labels


def _y_range(ys: list[list[float]]) -> tuple[float, float, int]:
    """Padded (low, high) of the values and the decimals that tell the axis labels apart."""
    lo, hi = min(min(y) for y in ys), max(max(y) for y in ys)
    span = hi - lo if hi > lo else max(abs(hi), 1.0) * 0.1
    lo, hi = lo - 0.05 * span, hi + 0.05 * span
    return lo, hi, min(6, max(1, 2 - math.floor(math.log10(hi - lo))))


def _label_rows(plot: str, lo: float, hi: float, decimals: int) -> str:
    """Write the y values of the top, middle and bottom rows beside the plot area.

    (uniplot's own y labels can round 0.5 and 0.6 to "0" and "1", so they are turned off.)
    """
    lines = plot.split("\n")
    top = next(i for i, line in enumerate(lines) if line.lstrip().startswith("┌")) + 1
    bottom = next(i for i, line in enumerate(lines) if line.lstrip().startswith("└")) - 1
    rows = bottom - top + 1
    for r, value in ((0, hi), (rows // 2, hi - (hi - lo) * (rows // 2 + 0.5) / rows), (rows - 1, lo)):
        lines[top + r] += f" {value:.{decimals}f}"
    return "\n".join(lines)


def charts_text(runs: list[Run], width: int, height: int = 10, color: bool = False) -> str:
    """The four panels (alpha, reward, confidence, tau against step) as one text block (uniplot)."""
    from uniplot import plot_to_string

    blocks = []
    for key in PANELS:
        xs, ys, labels = _panel_series(runs, key)
        if not ys:
            blocks.append(f"{key}: not logged")
            continue
        lo, hi, decimals = _y_range(ys)
        opts: dict[str, Any] = dict(title=f"{key} vs step", lines=True, width=max(20, width - 14), height=height,
                                    legend_labels=labels, x_gridlines=[], y_gridlines=[], y_labels=False,
                                    y_min=lo, y_max=hi)
        if color:
            opts["color"] = True
        else:
            opts.update(color=False, character_set="ascii")
        blocks.append(_label_rows(plot_to_string(ys, xs, **opts).rstrip("\n"), lo, hi, decimals))
    return "\n\n".join(blocks)


# --------------------------------------------------------------------------------------------------
# Exports


def write_png(runs: list[Run], path: Path) -> None:
    """The same four panels as a PNG (matplotlib, an optional dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--png needs matplotlib (pip install matplotlib)") from None
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    try:
        for ax, key in zip(axes.flat, PANELS):
            xs, ys, labels = _panel_series(runs, key)
            for x, y, label in zip(xs, ys, labels):
                ax.plot(x, y, label=label, linestyle="--" if "(what-if" in label else "-")
            ax.set_title(key)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if labels:
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=100)
    finally:
        plt.close(fig)


def table_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """Long format: one row per (run, step) with alpha, reward, confidence, tau (and the what-if alpha)."""
    out = []
    for r in runs:
        for i, row in enumerate(r.rows):
            rec = {"run": r.name, "step": row["step"], **{k: _num(row.get(k)) for k in PANELS}}
            if r.what_if is not None:
                rec["what_if_alpha"] = r.what_if[i]
            out.append(rec)
    return out


def write_csv(runs: list[Run], path: Path) -> None:
    import csv

    rows = table_rows(runs)
    fields = ["run", "step", *PANELS] + (["what_if_alpha"] if any("what_if_alpha" in r for r in rows) else [])
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        for row in rows:
            w.writerow({k: "" if v is None else v for k, v in row.items()})


def write_json(runs: list[Run], path: Path) -> None:
    payload = {"runs": [{**summary(r), "series": table_rows([r])} for r in runs]}
    path.write_text(json.dumps(payload, indent=1), encoding="utf-8")
