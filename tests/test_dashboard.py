"""The live dashboard renders every state a run goes through, and plain mode prints one line a step."""

from __future__ import annotations

import io

from rich.console import Console

from apo_cli.dashboard import PlainDashboard, RichDashboard, make_dashboard, sparkline


def _record(step: int, **extra) -> dict:
    return {"step": step, "reward": 0.1 * step, "reward_std": 0.2, "alpha": 0.9 - 0.05 * step,
            "confidence": 0.5, "tau": 0.5, "loss": 0.01, "completions/mean_length": 12.0,
            "completions/clipped_ratio": 0.0, "step_time": 1.5, "tokens_per_s": 200.0, **extra}


def test_sparkline_scales_into_blocks():
    assert sparkline([0.0, 0.5, 1.0], lo=0.0, hi=1.0) == "▁▅█"
    assert sparkline([None, 1.0], lo=0.0, hi=1.0) == " █"
    assert sparkline([]) == ""


def test_rich_dashboard_renders_metrics_samples_and_warnings():
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=True, color_system=None)
    dash = RichDashboard("demo", total_steps=5, console=console)
    with dash:
        dash.message("resumed from step 0")
        for s in range(1, 4):
            dash.update(_record(s, **({"completions/clipped_ratio": 0.5} if s == 3 else {})),
                        [{"prompt": "What is 1 + 1?", "completion": "2", "reward": 1.0}])
    text = out.getvalue()
    for piece in ("demo", "reward", "alpha", "confidence", "What is 1 + 1?", "30%", "resumed from step 0"):
        assert piece in text, piece


def test_plain_dashboard_prints_one_line_per_step():
    out = io.StringIO()
    dash = PlainDashboard("demo", 2, console=Console(file=out, width=200, color_system=None))
    with dash:
        dash.update(_record(1), [])
        dash.update(_record(2, skipped_steps=1), [])
    lines = [line for line in out.getvalue().splitlines() if line.startswith("step")]
    assert len(lines) == 2 and lines[0].startswith("step 1/2") and "skipped 1" in lines[1]


def test_auto_mode_is_plain_without_a_terminal(capsys):
    assert isinstance(make_dashboard("auto", "x", 3), PlainDashboard)  # pytest captures stdout: not a TTY


def test_rich_dashboard_messages_after_the_panel_closes_are_printed():
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=True, color_system=None)
    dash = RichDashboard("demo", total_steps=1, console=console)
    with dash:
        dash.update(_record(1), [])
    dash.message("done: 1 steps; final checkpoint runs/demo/checkpoints/step-1")
    assert "final checkpoint runs/demo/checkpoints/step-1" in out.getvalue()


def test_dashboards_show_the_evaluation_and_mfu():
    row = _record(2, **{"perf/mfu": 0.1234, "eval/mean@4": 0.5, "eval/mean@4/ci_low": 0.4,
                        "eval/mean@4/ci_high": 0.6, "eval/pass@4": 0.75, "time/eval": 3.2})
    out = io.StringIO()
    dash = PlainDashboard("demo", 2, console=Console(file=out, width=200, color_system=None))
    with dash:
        dash.update(row, [])
    text = out.getvalue()
    assert "mfu 12.34 %" in text and "eval @ step 2: mean@4 0.500 ±0.100  pass@4 0.750" in text
    out = io.StringIO()
    rich = RichDashboard("demo", 3, console=Console(file=out, width=160, force_terminal=True, color_system=None))
    with rich:
        rich.update(row, [])
        rich.update(_record(3), [])  # the latest evaluation stays on screen
    text = out.getvalue()
    assert "MFU" in text and "eval @ step 2: mean@4 0.500" in text
