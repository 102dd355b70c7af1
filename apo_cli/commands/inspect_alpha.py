from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from apo_cli.commands._common import guarded


class ScheduleKind(str, Enum):
    constant = "constant"
    linear = "linear"
    cosine = "cosine"
    reward_confidence = "reward_confidence"
    guarded = "guarded"


@guarded
def inspect_alpha(
    runs: Annotated[
        list[str],
        typer.Argument(help="Run directories (or their metrics.jsonl); with a what-if, key=value schedule "
                            "parameters may follow.", show_default=False),
    ],
    schedule: Annotated[
        ScheduleKind | None,
        typer.Option("--schedule", "-s", help="What-if: replay this alpha rule on each run's logged signals "
                                              "(parameters from the run's recipe, then key=value arguments)."),
    ] = None,
    follow: Annotated[bool, typer.Option("--follow", "-F", help="Redraw while the runs train (Ctrl-C stops).")] = False,
    interval: Annotated[float, typer.Option("--interval", min=0.1, help="--follow: seconds between polls.")] = 2.0,
    png: Annotated[Path | None, typer.Option("--png", help="Also write the charts as a PNG (needs matplotlib).")] = None,
    csv_path: Annotated[Path | None, typer.Option("--csv", help="Export step, alpha, reward, confidence, tau per run.")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Export the summaries and the series as JSON.")] = None,
    width: Annotated[int | None, typer.Option("--width", min=40, help="Output width (default: the terminal's).")] = None,
    height: Annotated[int, typer.Option("--height", min=3, help="Lines per chart.")] = 10,
) -> None:
    """Alpha, reward, confidence and tau trajectories of runs, and the alpha regimes they went through.

    Charts of each quantity against step (several runs overlaid, with a legend) and a summary per
    run: alpha at start and end, steps in coverage (alpha above the midpoint of the recipe's
    alpha_max and alpha_min) and in exploitation, regime switches, the reward at the first switch,
    and the newest scores in the run's eval.jsonl (written by `apo eval`).

    What-if: --schedule KIND and/or key=value parameters replay another alpha rule on the run's
    logged signals with the training schedule code (replaying the run's own rule reproduces its
    logged alpha exactly) and overlay the result.

    Examples:

        apo inspect-alpha runs/apo runs/grpo runs/apo-cosine

        apo inspect-alpha runs/apo --follow

        apo inspect-alpha runs/apo --schedule reward_confidence alpha_min=0.2 --png alpha.png

        apo inspect-alpha runs/apo max_rate=0.1 window=4 --csv alpha.csv
    """
    from apo_cli.errors import UsageError

    paths = [a for a in runs if not ("=" in a and not Path(a).exists())]
    params = [a for a in runs if a not in paths]
    if not paths:
        raise UsageError("give at least one run directory")
    state = _State(paths, schedule.value if schedule else None, params, follow, height)
    state.load()
    console = _console(width)
    state.export(png, csv_path, json_path)
    if not follow:
        console.print(state.renderable(console))
        return
    _follow(state, console, interval, (png, csv_path, json_path))


class _State:
    """The runs being shown, reloaded on demand (for --follow)."""

    def __init__(self, paths: list[str], kind: str | None, params: list[str], wait: bool, height: int):
        self.paths, self.kind, self.params, self.wait, self.height = paths, kind, params, wait, height
        self.runs: list = []
        self._warned: set[str] = set()

    def _warn(self, message: str) -> None:
        from apo_cli.generation import warn

        if message not in self._warned:  # --follow rereads the file: say it once
            self._warned.add(message)
            warn(message)

    def load(self) -> None:
        from apo_cli.inspect import distinct_names, load_run, replay, what_if_spec

        runs = [load_run(Path(p), self._warn, wait=self.wait) for p in self.paths]
        distinct_names(runs)
        if self.kind is not None or self.params:
            for r in runs:
                spec = what_if_spec(r.alpha_spec, self.kind, self.params)
                r.what_if = replay(r, spec) if r.rows else []
                r.what_if_label = " ".join([spec.kind, *self.params])
        self.runs = runs

    def stamp(self) -> tuple:
        from apo_cli.inspect import metrics_path

        out = []
        for p in self.paths:
            f = metrics_path(Path(p))[1]
            out.append(f.stat().st_mtime_ns if f.exists() else None)
        return tuple(out)

    def renderable(self, console):
        from rich.console import Group
        from rich.text import Text

        from apo_cli.inspect import charts_text, summary_table

        color = console.is_terminal and console.color_system is not None
        if not any(r.rows for r in self.runs):
            return Text("waiting for the first logged step...")
        shown = [r for r in self.runs if r.rows]
        text = charts_text(shown, console.width, self.height, color)
        return Group(Text.from_ansi(text) if color else Text(text), Text(""), summary_table(shown))

    def export(self, png: Path | None, csv_path: Path | None, json_path: Path | None) -> None:
        from apo_cli.inspect import write_csv, write_json, write_png

        runs = [r for r in self.runs if r.rows]
        if not runs:
            return
        if png is not None:
            write_png(runs, png)
        if csv_path is not None:
            write_csv(runs, csv_path)
        if json_path is not None:
            write_json(runs, json_path)


def _console(width: int | None):
    from rich.console import Console

    return Console(highlight=False, width=width)


def _follow(state: _State, console, interval: float, exports: tuple) -> None:
    import time

    from rich.live import Live

    stamp = state.stamp()
    with Live(state.renderable(console), console=console, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(interval)
                now = state.stamp()
                if now != stamp:
                    stamp = now
                    state.load()
                    state.export(*exports)
                    live.update(state.renderable(console), refresh=True)
        except KeyboardInterrupt:
            pass  # Ctrl-C ends --follow normally
