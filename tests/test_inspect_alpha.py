"""`apo inspect-alpha`: charts and summary (snapshots), exports, what-if replay, --follow, bad inputs.

Snapshots live in tests/snapshots/; after an intended change of the output, regenerate them with
``APO_UPDATE_SNAPSHOTS=1 pytest tests/test_inspect_alpha.py`` and review the diff.
"""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

import pytest
import yaml

from apo_cli.algo.schedules import Signals, make_alpha_schedule
from apo_cli.recipe import AlphaScheduleSpec

SNAPSHOTS = Path(__file__).parent / "snapshots"
WIDTH = "100"


def synthetic_run(root: Path, name: str, kind: str = "reward_confidence", steps: int = 12, *,
                  signals=None, alpha: dict | None = None, evals: list[dict] | None = None) -> Path:
    """A run directory whose alpha was produced by the real schedule from the given signals."""
    spec = AlphaScheduleSpec(kind=kind, **(alpha or {}))
    schedule = make_alpha_schedule(spec, steps)
    run = root / name
    run.mkdir(parents=True)
    lines = []
    for i in range(steps):
        sig = signals(i) if signals else _ramp(i, steps)
        a = schedule.step(Signals(step=i, **sig))
        lines.append(json.dumps({"step": i + 1, **sig, "alpha": a, "tau": 0.5 + 0.01 * i, "loss": 0.1}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    recipe = {"run": {"name": name, "max_steps": steps}, "model": {"name_or_path": "tiny-random"},
              "algorithm": {"alpha": spec.model_dump()}}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    if evals:
        (run / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    return run


def _ramp(i: int, steps: int) -> dict[str, float]:
    """Signals that rise then stall: alpha drops into exploitation and comes back once."""
    t = i / (steps - 1)
    r = round(min(1.0, 0.1 + 1.2 * t) if t < 0.75 else 0.5, 4)
    return {"reward": r, "reward_signal": r, "confidence": round(0.4 + 0.5 * t, 4),
            "entropy_proxy": round(0.6 - 0.5 * t, 4), "calibration": 0.7}


def _eval(step: int, value: float) -> dict:
    return {"step": step, "data": "toy [eval]", "key": f"k{step}",
            "metrics": {"mean@4": {"value": value}, "pass@4": {"value": min(1.0, 2 * value)}}}


def check_snapshot(name: str, text: str) -> None:
    path = SNAPSHOTS / name
    if os.environ.get("APO_UPDATE_SNAPSHOTS") == "1" or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8"), f"output differs from {path}"


def run_cli(cli, *args):
    res = cli("inspect-alpha", *args, "--width", WIDTH)
    assert res.exit_code == 0, res.output
    return res


# -- rendering ----------------------------------------------------------------------------------------


def test_one_run_snapshot(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    synthetic_run(Path("."), "apo-demo", evals=[_eval(6, 0.2), _eval(12, 0.375)])
    res = run_cli(cli, "apo-demo")
    assert "\x1b[" not in res.stdout  # no colours off a terminal
    check_snapshot("inspect_alpha_one_run.txt", res.stdout)
    out = res.stdout
    for word in ("alpha vs step", "reward vs step", "confidence vs step", "tau vs step", "apo-demo",
                 "final eval of apo-demo (step 12, toy [eval]): mean@4 0.375 · pass@4 0.750"):
        assert word in out


def test_three_runs_overlay_with_a_legend(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    synthetic_run(Path("."), "rc")
    synthetic_run(Path("."), "lin", kind="linear")
    synthetic_run(Path("."), "const", kind="constant", alpha={"value": 0.5})
    res = run_cli(cli, "rc", "lin", "const")
    check_snapshot("inspect_alpha_three_runs.txt", res.stdout)
    legend = [line for line in res.stdout.splitlines() if "rc" in line and "lin" in line and "const" in line]
    assert len(legend) == 4  # one legend per chart
    table = res.stdout.split("alpha regimes")[1]
    for name in ("rc", "lin", "const"):
        assert f"│ {name} " in table


def test_summary_counts_regimes(tmp_path):
    from apo_cli.inspect import load_run, summary

    run = load_run(synthetic_run(tmp_path, "r"), print)
    s = summary(run)
    mid = (0.9 + 0.35) / 2
    alphas = run.values("alpha")
    regimes = [a > mid for a in alphas]
    switches = [i for i in range(1, len(regimes)) if regimes[i] != regimes[i - 1]]
    assert s["coverage_steps"] == sum(regimes) and s["exploitation_steps"] == len(regimes) - sum(regimes)
    assert s["transitions"] == len(switches) == 2
    assert s["reward_at_first_switch"] == run.values("reward")[switches[0]]
    assert (s["alpha_start"], s["alpha_end"]) == (alphas[0], alphas[-1])


def test_png_csv_json_exports(cli, tmp_path):
    run = synthetic_run(tmp_path, "r")
    png, csv_path, js = tmp_path / "a.png", tmp_path / "a.csv", tmp_path / "a.json"
    run_cli(cli, str(run), "--png", str(png), "--csv", str(csv_path), "--json", str(js), "--schedule", "linear")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 12 and set(rows[0]) == {"run", "step", "alpha", "reward", "confidence", "tau", "what_if_alpha"}
    data = json.loads(js.read_text())
    assert data["runs"][0]["run"] == "r" and len(data["runs"][0]["series"]) == 12
    assert data["runs"][0]["what_if"]["schedule"] == "linear"


def test_png_without_matplotlib_is_one_line(cli, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    res = cli("inspect-alpha", str(synthetic_run(tmp_path, "r")), "--png", str(tmp_path / "a.png"))
    assert res.exit_code == 2
    assert res.stderr.strip() == "error: --png needs matplotlib (pip install matplotlib)"


# -- what-if replay -----------------------------------------------------------------------------------


def test_replay_reproduces_a_synthetic_reward_confidence_run_exactly(tmp_path):
    from apo_cli.inspect import load_run, replay

    rng = random.Random(3)

    def noisy(i):
        c = rng.random()
        return {"reward": rng.random(), "reward_signal": rng.random(), "confidence": c, "entropy_proxy": 1 - c,
                "calibration": rng.random()}

    run = load_run(synthetic_run(tmp_path, "rc", steps=40, signals=noisy, alpha={"alpha_min": 0.123}), print)
    assert replay(run, run.alpha_spec) == run.values("alpha")
    assert len(set(run.values("alpha"))) > 10  # the rule did move


@pytest.fixture(scope="module")
def guarded_run(tmp_path_factory) -> Path:
    from apo_cli.recipe import recipe_from_dict
    from apo_cli.train import train_from_recipe
    from tests.helpers import tiny_recipe

    root = tmp_path_factory.mktemp("guarded")
    alpha = {"kind": "guarded", "window": 2, "confidence_threshold": 0.0, "max_rate": 0.2, "smoothing": 0.0, "ema": 0.5}
    train_from_recipe(recipe_from_dict(tiny_recipe(root, "g", run={"max_steps": 4}, algorithm={"alpha": alpha},
                                                   checkpoint={"every": 10})))
    return root / "g"


def test_replay_reproduces_a_real_guarded_run_exactly(cli, guarded_run):
    from apo_cli.inspect import load_run, replay, what_if_spec

    run = load_run(guarded_run, print)
    assert run.alpha_spec.kind == "guarded"
    own = what_if_spec(run.alpha_spec, None, [])
    assert replay(run, own) == run.values("alpha")
    res = run_cli(cli, str(guarded_run), "--schedule", "guarded")
    assert "max |Δα| vs logged 0" in res.stdout


def test_what_if_overlays_another_rule(cli, guarded_run):
    res = run_cli(cli, str(guarded_run), "--schedule", "reward_confidence", "alpha_min=0.1")
    assert "g (what-if reward_confidence alpha_min=0.1)" in res.stdout
    assert "what-if g [reward_confidence alpha_min=0.1]" in res.stdout
    # parameters alone keep the run's own rule
    res = run_cli(cli, str(guarded_run), "max_rate=0.01")
    assert "what-if g [guarded max_rate=0.01]" in res.stdout


# -- --follow -----------------------------------------------------------------------------------------


def test_follow_redraws_and_stops_cleanly_on_ctrl_c(cli, tmp_path, monkeypatch):
    import time

    run = synthetic_run(tmp_path, "live", steps=3)
    calls = []

    def fake_sleep(s):
        calls.append(s)
        if len(calls) == 1:  # the run logs another step
            with (run / "metrics.jsonl").open("a") as f:
                f.write(json.dumps({"step": 4, **_ramp(3, 4), "alpha": 0.4, "tau": 0.5}) + "\n")
            os.utime(run / "metrics.jsonl", ns=(time.time_ns() + 10**9,) * 2)
            return
        raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", fake_sleep)
    res = cli("inspect-alpha", str(run), "--follow", "--interval", "0.5", "--width", WIDTH)
    assert res.exit_code == 0, res.output
    assert calls == [0.5, 0.5]
    assert "4 steps" in res.stdout


# -- bad inputs ---------------------------------------------------------------------------------------


def test_truncated_metrics_line_is_skipped_with_a_warning(cli, tmp_path):
    run = synthetic_run(tmp_path, "r", steps=5)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "reward": 0.')
    res = run_cli(cli, str(run))
    assert f"{run / 'metrics.jsonl'}:6: skipping a truncated or malformed metrics line" in res.stderr
    assert "5 steps" in res.stdout


@pytest.mark.parametrize("case", ["no_metrics", "missing_dir", "empty_metrics", "bad_param", "unknown_param",
                                  "no_signals"])
def test_bad_inputs(cli, tmp_path, case):
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    run = synthetic_run(tmp_path, "r", steps=3)
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "metrics.jsonl").write_text('{"step": 1, "rew')
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "metrics.jsonl").write_text('{"step": 1, "alpha": 0.9}\n')
    args, code, words = {
        "no_metrics": ([str(empty_dir)], 1, [str(empty_dir), "no metrics.jsonl"]),
        "missing_dir": ([str(tmp_path / "nope")], 1, [str(tmp_path / "nope"), "does not exist"]),
        "empty_metrics": ([str(blank)], 1, [str(blank / "metrics.jsonl"), "no readable step"]),
        "bad_param": ([str(run), "window=1"], 2, ["window", "greater than or equal to 2"]),
        "unknown_param": ([str(run), "speed=3"], 2, ["'speed'", "valid:"]),
        "no_signals": ([str(bare), "--schedule", "guarded"], 1, [str(bare), "'reward'"]),
    }[case]
    res = cli("inspect-alpha", *args)
    assert res.exit_code == code, res.output
    err = [line for line in res.stderr.strip().splitlines() if not line.startswith("warning:")]
    assert len(err) == 1 and err[0].startswith("error:"), res.stderr
    for w in words:
        assert w in err[0]
