"""Live training display: a rich dashboard on a terminal, one plain line per step elsewhere."""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

_BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 40, lo: float | None = None, hi: float | None = None) -> str:
    """Unicode block sparkline of the last ``width`` values (None entries are blanks)."""
    vals = [v for v in values[-width:]]
    finite = [v for v in vals if v is not None]
    if not finite:
        return ""
    lo = min(finite) if lo is None else lo
    hi = max(finite) if hi is None else hi
    span = (hi - lo) or 1.0
    out = []
    for v in vals:
        if v is None:
            out.append(" ")
        else:
            idx = int(round((min(max(v, lo), hi) - lo) / span * (len(_BLOCKS) - 1)))
            out.append(_BLOCKS[idx])
    return "".join(out)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.2e}"
        return f"{v:.{digits}f}"
    return str(v)


class PlainDashboard:
    """One line per step; used when stdout is not a terminal or logging.dashboard is plain."""

    def __init__(self, title: str, total_steps: int, console: Console | None = None):
        self.title, self.total = title, total_steps
        self.console = console or Console(highlight=False, soft_wrap=True)

    def __enter__(self):
        self.console.print(f"{self.title}: training for {self.total} steps")
        return self

    def __exit__(self, *exc):
        return False

    def message(self, text: str, style: str = "") -> None:
        self.console.print(text, style=style or None, markup=False)

    def update(self, m: dict[str, Any], samples: list[dict[str, Any]]) -> None:
        parts = [
            f"step {m['step']}/{self.total}",
            f"reward {_fmt(m.get('reward'))}±{_fmt(m.get('reward_std'))}",
            f"alpha {_fmt(m.get('alpha'))}",
            f"conf {_fmt(m.get('confidence'))}",
            f"tau {_fmt(m.get('tau'))}",
            f"loss {_fmt(m.get('loss'), 4)}",
            f"len {_fmt(m.get('completions/mean_length'), 1)}",
            f"{_fmt(m.get('step_time'), 1)}s",
        ]
        if m.get("perf/mfu") is not None:
            parts.append(f"mfu {_pct(m['perf/mfu'])}")
        if m.get("skipped_steps"):
            parts.append(f"skipped {m['skipped_steps']}")
        if "sampling/trained_groups" in m:  # rollout.dynamic_sampling: the groups with reward spread trained
            parts.append(f"groups {m['sampling/trained_groups']:g}" + ("" if m["sampling/trained_groups"] else " (no update)"))
        self.console.print("  ".join(parts), markup=False)
        if evals := eval_line(m):
            self.console.print(evals, markup=False)


class RichDashboard:
    """Progress with ETA, sparklines of reward/confidence/alpha, a metrics table and latest samples."""

    def __init__(self, title: str, total_steps: int, start_step: int = 0, console: Console | None = None):
        self.title, self.total = title, total_steps
        self.console = console or Console()
        self.history: dict[str, deque] = {k: deque(maxlen=200) for k in ("reward", "confidence", "alpha", "tau")}
        self.metrics: dict[str, Any] = {}
        self.last_eval: dict[str, Any] = {}  # the row of the latest evaluation
        self.samples: list[dict[str, Any]] = []
        self.notes: deque[Text] = deque(maxlen=4)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        )
        self.task = self.progress.add_task(title, total=total_steps, completed=start_step)
        self.live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)

    def __enter__(self):
        self.live.__enter__()
        self._active = True
        return self

    def __exit__(self, *exc):
        self.live.update(self._render())
        self._active = False
        return self.live.__exit__(*exc)

    def message(self, text: str, style: str = "") -> None:
        if not getattr(self, "_active", False):  # before or after the live panel: a plain line
            self.console.print(text, style=style or None, markup=False, highlight=False)
            return
        self.notes.append(Text(text, style=style or "dim"))
        self.live.update(self._render())

    def update(self, m: dict[str, Any], samples: list[dict[str, Any]]) -> None:
        self.metrics = m
        if "time/eval" in m:
            self.last_eval = m
        for k in self.history:
            self.history[k].append(m.get(k))
        if samples:
            self.samples = samples
        self.progress.update(self.task, completed=m["step"])
        self.live.update(self._render())

    def _render(self):
        curves = Table.grid(padding=(0, 1))
        curves.add_column(style="bold", width=11)
        curves.add_column()
        curves.add_column(justify="right", width=8)
        ranges = {"alpha": (0.0, 1.0), "confidence": (0.0, 1.0)}
        for name, series in self.history.items():
            lo, hi = ranges.get(name, (None, None))
            last = next((v for v in reversed(series) if v is not None), None)
            curves.add_row(name, Text(sparkline(list(series), 48, lo, hi), style="cyan"), _fmt(last))
        m = self.metrics
        table = Table(show_header=False, box=None, padding=(0, 2))
        for _ in range(4):
            table.add_column(style="dim")
            table.add_column(justify="right")
        cells = [
            ("reward", f"{_fmt(m.get('reward'))} ± {_fmt(m.get('reward_std'))}"),
            ("zero-std grp", _fmt(m.get("frac_reward_zero_std"), 2)),
            ("kl", _fmt(m.get("kl"), 4)),
            ("entropy", _fmt(m.get("entropy"))),
            ("loss", _fmt(m.get("loss"), 4)),
            ("grad norm", _fmt(m.get("grad_norm"))),
            ("len mean", _fmt(m.get("completions/mean_length"), 1)),
            ("truncated", _fmt(m.get("completions/clipped_ratio"), 2)),
            ("clip region", _fmt(m.get("clip_ratio/region_mean"), 3)),
            ("lr", _fmt(m.get("learning_rate"))),
            ("step time", f"{_fmt(m.get('step_time'), 1)} s"),
            ("tokens/s", _fmt(m.get("tokens_per_s"), 0)),
            ("train tok/s", _fmt(_sum(m, "perf/train/prompt_tokens_per_s", "perf/train/completion_tokens_per_s"), 0)),
            ("gen tok/s", _fmt(m.get("perf/rollout/completion_tokens_per_s"), 0)),
            ("MFU", _pct(m.get("perf/mfu"))),
            ("eval time", f"{_fmt(self.last_eval.get('time/eval'), 1)} s"),
        ]
        for i in range(0, len(cells), 4):
            row = []
            for k, v in cells[i : i + 4]:
                row += [k, v]
            table.add_row(*row)
        parts: list[Any] = [self.progress, curves, table]
        if evals := eval_line(self.last_eval):
            parts.append(Text(evals, style="bold"))
        if (m.get("completions/clipped_ratio") or 0) > 0.3:
            parts.append(Text("⚠ over 30% of completions hit max_new_tokens: raise rollout.max_new_tokens", style="yellow"))
        if m.get("sampling/trained_groups") == 0:
            parts.append(Text("⚠ no group with reward spread in this step's sampling rounds: no update", style="yellow"))
        if self.samples:
            s = Table(show_header=True, header_style="bold", box=None, expand=True)
            s.add_column("prompt", ratio=2, overflow="ellipsis", no_wrap=True)
            s.add_column("completion", ratio=3, overflow="ellipsis", no_wrap=True)
            s.add_column("reward", justify="right", width=7)
            for smp in self.samples[:4]:
                s.add_row(_one_line(smp["prompt"]), _one_line(smp["completion"]), _fmt(smp["reward"], 2))
            parts.append(s)
        parts.extend(self.notes)
        return Panel(Group(*parts), title=f"[bold]apo[/bold] · {self.title}", border_style="blue")


def _pct(v: Any) -> str:
    return "–" if v is None else f"{100 * v:.2f} %"


def _sum(m: dict[str, Any], *keys: str) -> float | None:
    vals = [m.get(k) for k in keys]
    return None if any(v is None for v in vals) else sum(vals)


def eval_line(m: dict[str, Any]) -> str:
    """``eval @ step 10: mean@4 0.412 ±0.05  pass@4 ...`` for a row holding an evaluation, else ''."""
    names = [k for k in m if k.startswith("eval/") and not k.endswith(("/ci_low", "/ci_high"))]
    if not names:
        return ""
    cells = []
    for k in names:
        lo, hi = m.get(f"{k}/ci_low"), m.get(f"{k}/ci_high")
        half = f" ±{(hi - lo) / 2:.3f}" if lo is not None and hi is not None else ""
        cells.append(f"{k.removeprefix('eval/')} {_fmt(m[k])}{half}")
    return f"eval @ step {m.get('step')}: " + "  ".join(cells) + f"  ({_fmt(m.get('time/eval'), 1)} s)"


def _one_line(text: str) -> str:
    return " ".join(text.split())[-200:]


def make_dashboard(mode: str, title: str, total_steps: int, start_step: int = 0, *, muted: bool = False):
    """``muted``: nothing at all, not even messages (a torchrun process other than rank 0)."""
    if muted:
        return _Muted()
    if mode == "off":
        return _Silent()
    if mode == "plain" or (mode == "auto" and not sys.stdout.isatty()):
        return PlainDashboard(title, total_steps)
    return RichDashboard(title, total_steps, start_step)


class _Silent:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def message(self, text: str, style: str = "") -> None:
        print(text, file=sys.stderr)

    def update(self, m, samples) -> None:
        pass


def now() -> float:
    return time.perf_counter()


class _Muted(_Silent):
    def message(self, text: str, style: str = "") -> None:
        pass
