"""The comparison's curves, each arm's mean over its finished seeds against step: the training reward
(its moving average, with the band of ± one std over seeds in the PNG), the held-out mean@k of the
evaluations during training, and alpha for the arms whose objective reads it (APO). In the terminal
with uniplot (as `apo inspect-alpha`), as a PNG with matplotlib (an optional dependency)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from apo_cli.errors import UsageError

__all__ = ["PANELS", "curves", "charts_text", "write_png"]

PANELS = ("reward", "held_out", "alpha")
TITLES = {"reward": "reward (moving average)", "held_out": "held-out", "alpha": "alpha (APO arms)"}


def _mean_curve(series: list[list[float]]) -> list[list[float]]:
    """[[step, mean, std], ...] over the steps every series has (steps 1..n)."""
    n = min((len(s) for s in series), default=0)
    out = []
    for i in range(n):
        xs = [s[i] for s in series]
        out.append([i + 1, statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0])
    return out


def curves(c: Any, arm: Any) -> dict[str, Any]:
    """An arm's mean curves: reward [[step, mean, std]], held_out {metric: [[step, mean]]}, alpha."""
    from apo_cli.compare.stats import moving_average

    runs = arm.done()
    out: dict[str, Any] = {"reward": _mean_curve([moving_average(r.rewards, c.window) for r in runs])}
    held: dict[str, list[list[float]]] = {}
    names = sorted({k for r in runs for _, m in r.evals for k in m}, key=lambda k: (not k.startswith("mean"), k))
    for name in names[:1]:  # mean@k: the accuracy the table's first held-out column shows
        by_run = [{s: m[name] for s, m in r.evals if name in m} for r in runs]
        steps = sorted(set.intersection(*(set(b) for b in by_run))) if by_run else []
        held[name] = [[s, statistics.fmean(b[s] for b in by_run)] for s in steps]
    out["held_out"] = held
    if arm.reads_alpha():
        alphas = [[a for a in r.alphas if a is not None] for r in runs]
        out["alpha"] = [[s, m] for s, m, _ in _mean_curve([a for a in alphas if a])]
    return out


def _series(c: Any, panel: str) -> tuple[list[list[float]], list[list[float]], list[str]]:
    xs, ys, labels = [], [], []
    for arm in c.arms:
        cv = curves(c, arm)
        if panel == "held_out":
            items = [(f"{arm.name} {name}", pts) for name, pts in cv["held_out"].items()]
        else:
            items = [(arm.name, cv.get(panel) or [])]
        for name, pts in items:
            if pts:
                xs.append([p[0] for p in pts])
                ys.append([p[1] for p in pts])
                labels.append(name)
    return xs, ys, labels


def charts_text(c: Any, width: int, height: int = 10, color: bool = False) -> str:
    """The three panels as one text block (uniplot); a panel with nothing to draw says so."""
    from uniplot import plot_to_string

    from apo_cli.inspect import _label_rows, _y_range

    blocks = []
    for panel in PANELS:
        xs, ys, labels = _series(c, panel)
        if not ys:
            blocks.append(f"{TITLES[panel]}: nothing to draw" + (" (no evaluation during training)"
                                                                   if panel == "held_out" else ""))
            continue
        lo, hi, decimals = _y_range(ys)
        opts: dict[str, Any] = dict(title=f"{TITLES[panel]} vs step", lines=True, width=max(20, width - 14),
                                    height=height, legend_labels=labels, x_gridlines=[], y_gridlines=[],
                                    y_labels=False, y_min=lo, y_max=hi)
        opts.update(color=True) if color else opts.update(color=False, character_set="ascii")
        blocks.append(_label_rows(plot_to_string(ys, xs, **opts).rstrip("\n"), lo, hi, decimals))
    return "\n\n".join(blocks)


def write_png(c: Any, path: Path) -> None:
    """The three panels side by side as a PNG; the reward with a band of ± one std over seeds."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--png needs matplotlib (pip install 'apo-cli[plot]')") from None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    try:
        for ax, panel in zip(axes, PANELS):
            xs, ys, labels = _series(c, panel)
            for x, y, name in zip(xs, ys, labels):
                line = ax.plot(x, y, label=name)[0]
                if panel == "reward":  # the band of the arm's seeds, in its line's colour
                    arm = next(a for a in c.arms if a.name == name)
                    pts = curves(c, arm)["reward"]
                    ax.fill_between(x, [p[1] - p[2] for p in pts], [p[1] + p[2] for p in pts],
                                    color=line.get_color(), alpha=0.15)
            if panel == "reward" and c.threshold is not None:
                ax.axhline(c.threshold, color="grey", lw=0.8, ls="--")
            ax.set_title(TITLES[panel] if ys else f"{TITLES[panel]}: nothing to draw", fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if labels:
                ax.legend(fontsize=7)
        seeds = ",".join(map(str, c.seeds))
        fig.suptitle(f"{c.root.name}: mean over seeds {seeds}", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=110)
    finally:
        plt.close(fig)
