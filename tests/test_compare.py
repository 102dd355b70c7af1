"""`apo compare`: arms × seeds as ordinary run directories, a killed comparison continued, the report.

The end-to-end fixture is 2 arms (apo, grpo) × 2 seeds × 3 steps of the tiny model: the first
`apo compare` is SIGKILLed while the second run (grpo-s0) trains, the same command again (with
--jobs 2) skips the finished run, resumes the interrupted one and starts the other two. The plan,
the errors and the statistics are tested without training.
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import FIXTURES, tiny_recipe, write_recipe

REPO = Path(__file__).resolve().parents[1]


def compare_recipe(tmp: Path) -> Path:
    d = tiny_recipe(tmp, "cmp", run={"max_steps": 3}, checkpoint={"every": 1, "keep_last": 5},
                    data={"task_kwargs": {"level": 1, "size": 60}, "eval_fraction": 0.1},
                    eval={"every": 3, "k": 2, "limit": 4}, algorithm={"tau": 0.7})
    del d["run"]["output_dir"]
    return write_recipe(tmp, d)


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **extra}


def _compare(*args: str) -> list[str]:
    return [sys.executable, "-m", "apo_cli", "compare", *args]


def _wait(cond, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, "the comparison ended before the kill"
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def _wait_unlocked(run_dir: Path, timeout: float = 120) -> None:
    """Until no process holds the run directory's lock (the killed comparison's run saved and exited)."""
    deadline = time.time() + timeout
    fd = os.open(run_dir / ".lock", os.O_RDWR)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                assert time.time() < deadline, f"{run_dir} stayed locked"
                time.sleep(0.05)
    finally:
        os.close(fd)


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    out = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(p.name))
        except (OSError, ValueError, IndexError):
            continue
    return out


def steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    recipe, root = compare_recipe(tmp), tmp / "cmp-compare"
    args = [str(recipe), "--objectives", "apo,grpo", "--seeds", "0,1", "-o", str(root)]
    logs = tmp / "first.log"
    with logs.open("w") as out:  # 1. SIGKILL, run and comparison, while the second run trains
        first = subprocess.Popen(_compare(*args), env=_env(APO_FAULT_SLOW_CHECKPOINT="0.2"), stdout=out,
                                 stderr=subprocess.STDOUT, cwd=tmp)  # slow checkpoints: a wide window
        _wait(lambda: (root / "grpo-s0" / "checkpoints" / "step-1").is_dir(), first)
        for pid in _children(first.pid):  # the run (nothing saved after the kill), then the comparison
            os.kill(pid, signal.SIGKILL)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    _wait_unlocked(root / "grpo-s0")
    done_before = {f: (root / "apo-s0" / f).read_bytes() for f in ("metrics.jsonl", "recipe.yaml")}
    mtime_before = (root / "apo-s0" / "metrics.jsonl").stat().st_mtime_ns
    interrupted_at = max(int(p.name.split("-")[1]) for p in (root / "grpo-s0" / "checkpoints").glob("step-*"))
    exports = [str(tmp / "c.png"), str(tmp / "c.csv"), str(tmp / "c.json")]
    second = subprocess.run(_compare(*args, "--jobs", "2", "--png", exports[0], "--csv", exports[1], "--json",
                                     exports[2], "--width", "80"),
                            env=_env(), capture_output=True, text=True, cwd=tmp, timeout=600)
    return dict(tmp=tmp, root=root, first=logs.read_text(), second=second, done_before=done_before,
                mtime_before=mtime_before, interrupted_at=interrupted_at, exports=[Path(e) for e in exports])


def test_four_ordinary_run_directories(comparison):
    root, second = comparison["root"], comparison["second"]
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    for arm in ("apo", "grpo"):
        for seed in (0, 1):
            run = root / f"{arm}-s{seed}"
            assert steps(run) == [1, 2, 3], run  # each step logged once, the resumed one included
            assert (run / "checkpoints" / "step-3").is_dir()
            r = yaml.safe_load((run / "recipe.yaml").read_text())
            assert (r["run"]["seed"], r["algorithm"]["objective"]) == (seed, arm)
            assert r["algorithm"]["tau"] == (0.7 if arm == "apo" else 0.5)  # grpo took its own defaults
            assert [json.loads(x)["step"] for x in (run / "eval.jsonl").read_text().splitlines()] == [3]
    manifest = json.loads((root / "compare.json").read_text())
    assert [a["name"] for a in manifest["arms"]] == ["apo", "grpo"] and manifest["seeds"] == [0, 1]
    assert manifest["arms"][1]["dropped"] == ["algorithm.tau"]


def test_rerun_after_a_kill_finishes_only_what_was_missing(comparison):
    root, out = comparison["root"], comparison["second"].stdout
    assert "starting apo-s0" in comparison["first"] and "starting grpo-s0" in comparison["first"]
    assert "finished already, skipped: apo-s0" in out
    assert "starting apo-s0" not in out and "resuming apo-s0" not in out
    assert "resuming grpo-s0" in out and "starting apo-s1" in out and "starting grpo-s1" in out
    for f, data in comparison["done_before"].items():  # the finished run was not touched
        assert (root / "apo-s0" / f).read_bytes() == data
    assert (root / "apo-s0" / "metrics.jsonl").stat().st_mtime_ns == comparison["mtime_before"]
    assert comparison["interrupted_at"] < 3
    log = (root / "logs" / "grpo-s0.log").read_text()
    assert f"resumed from {root / 'grpo-s0' / 'checkpoints'}/step-{comparison['interrupted_at']}" in log
    assert not (root / "logs" / "apo-s0.log").exists()


def test_report_has_both_arms_an_interval_and_a_verdict(comparison, cli):
    out = comparison["second"].stdout
    res = cli("compare", "--report", str(comparison["root"]), "--width", "80")
    assert res.exit_code == 0, res.output
    for text in (out, res.stdout):
        table = text.split("comparison ")[-1]
        lines = table.splitlines()
        header = next(line for line in lines if line.startswith("arm  "))
        for col in ("final reward", "held-out mean@2", "held-out pass@2", "steps to", "noise", "length", "time s"):
            assert col in header
        assert any(line.startswith("apo ") and "2/2" in line for line in lines)
        assert any(line.startswith("grpo ") and "2/2" in line for line in lines)
        diff = table.split("difference from apo")[1]
        assert diff.splitlines()[2].startswith("grpo ") and " [" in diff  # a value and its interval
        assert re.search(r"grpo vs apo: final reward .*(with|over) 2 seeds \(", table)
        for chart in ("reward (moving average) vs step", "held-out vs step", "alpha (APO arms) vs step"):
            assert chart in table
    assert "\x1b[" not in res.stdout


def test_png_csv_json(comparison):
    png, csv_path, js = comparison["exports"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["arm"] for r in rows] == ["apo", "grpo"] and rows[0]["runs"] == "2"
    lo, d, hi = (float(rows[1][f"final_reward_diff{s}"]) for s in ("_ci_low", "", "_ci_high"))
    assert lo <= d <= hi
    data = json.loads(js.read_text())
    apo, grpo = data["arms"]
    assert len(apo["runs"]) == 2 and all(r["finished"] for r in apo["runs"] + grpo["runs"])
    assert len(apo["curves"]["reward"]) == 3 and "alpha" in apo["curves"] and "alpha" not in grpo["curves"]
    assert grpo["difference_from_first"]["final_reward"]["n"] == 2
    expect = [r["final_reward"] for r in grpo["runs"]]
    assert grpo["summary"]["final_reward"]["mean"] == pytest.approx(sum(expect) / 2)


# --------------------------------------------------------------------------------------------------
# The plan and its errors (no training)


def test_dry_run_plan_objective_defaults_and_set(tmp_path, cli):
    recipe = compare_recipe(tmp_path)
    res = cli("compare", str(recipe), "rollout.max_new_tokens=6", "-O", "apo,rc=apo,gspo", "--seeds", "3",
              "--set", "rc:algorithm.alpha.kind=reward_confidence", "--set", "gspo:algorithm.eps_high=0.001",
              "-o", str(tmp_path / "c"), "--dry-run")
    assert res.exit_code == 0, res.output
    assert "gspo: objective gspo" in res.stdout and "gspo's defaults for algorithm.tau" in res.stdout
    assert "rc: objective apo" in res.stdout and "set algorithm.alpha.kind=reward_confidence" in res.stdout
    for run in ("apo-s3", "rc-s3", "gspo-s3"):
        assert f"{run}: to start" in res.stdout
    assert not (tmp_path / "c").exists()  # a dry run writes nothing


def test_twin_recipes_are_arms_named_after_their_files(tmp_path, cli):
    d = yaml.safe_load(compare_recipe(tmp_path).read_text())
    a = write_recipe(tmp_path, d, "twin_a.yaml")
    b = write_recipe(tmp_path, {**d, "algorithm": {"objective": "gspo", "eps_high": 0.001}}, "twin_b.yaml")
    res = cli("compare", str(a), str(b), "--seeds", "0", "-o", str(tmp_path / "c"), "--dry-run")
    assert res.exit_code == 0, res.output
    assert "twin_a: objective apo" in res.stdout and "twin_b: objective gspo" in res.stdout
    assert "defaults for" not in res.stdout  # each arm is its recipe as written
    res = cli("compare", str(a), str(b), "-O", "apo,grpo", "--seeds", "0", "-o", str(tmp_path / "c"), "--dry-run")
    assert res.exit_code == 0, res.output
    for arm in ("twin_a-apo", "twin_a-grpo", "twin_b-apo", "twin_b-grpo"):
        assert f"  {arm}-s0: to start" in res.stdout
    assert "twin_b-grpo: objective grpo" in res.stdout and "grpo's defaults for algorithm.eps_high" in res.stdout


def test_written_recipes_load_on_their_own(tmp_path):
    from apo_cli.compare.plan import build_plan
    from apo_cli.compare.runner import write_plan
    from apo_cli.recipe import load_recipe

    d = yaml.safe_load(compare_recipe(tmp_path).read_text())
    d["algorithm"]["alpha"] = {"kind": "guarded", "window": 4}  # unread once rc switches alpha.kind
    recipe = write_recipe(tmp_path, d)
    plan = build_plan([str(recipe)], objectives="apo,rc=apo,grpo", seeds="0", name=None,
                      sets=["rc:algorithm.alpha.kind=reward_confidence", "grpo:algorithm.eps_high=0.3"],
                      output_dir=tmp_path / "c")
    write_plan(plan)
    rc = load_recipe(plan.recipe_file("rc", 0))
    assert rc.algorithm.alpha.kind == "reward_confidence" and rc.algorithm.alpha.window == 8
    assert plan.arms[1].unread == ["algorithm.alpha.window"]
    grpo = load_recipe(plan.recipe_file("grpo", 0))
    assert (grpo.algorithm.objective, grpo.algorithm.eps_high, grpo.algorithm.tau) == ("grpo", 0.3, 0.5)
    assert grpo.run.output_dir == str(tmp_path / "c" / "grpo-s0") and grpo.run.seed == 0
    assert load_recipe(plan.recipe_file("apo", 0)).algorithm.tau == 0.7
    assert rc.rewards[0].name == f"{FIXTURES / 'toy_rewards.py'}:frac_a"


@pytest.mark.parametrize("args, message", [
    (["-O", "apo,nope"], "error: --objectives: unknown objective 'nope'; valid names: "),
    (["-O", "apo,,grpo"], "error: --objectives 'apo,,grpo': expected a comma-separated list of objectives"),
    (["-O", "apo,apo"], "error: two arms are named 'apo'"),
    (["-O", "apo,bad name=grpo"], "error: arm name 'bad name': a name must be 1-60 letters"),
    (["-O", "apo"], "error: a comparison needs at least two arms"),
    (["-O", "apo,grpo", "--seeds", "0,x"], "error: --seeds '0,x': expected comma-separated non-negative integers"),
    (["-O", "apo,grpo", "--seeds", "1,1"], "error: --seeds '1,1': a seed appears twice"),
    (["-O", "apo,grpo", "--set", "gspo:algorithm.tau=1"], "error: --set 'gspo:algorithm.tau=1': no arm named "
                                                          "'gspo'; the arms are: apo, grpo"),
    (["-O", "apo,grpo", "--set", "algorithm.tau=1"], "error: --set 'algorithm.tau=1': expected ARM:key.path=value"),
    (["-O", "apo,grpo", "--set", "grpo:algorithm.tau=1"], "algorithm.tau is set but objective 'grpo' does not use it"),
    (["-O", "apo,grpo", "--set", "grpo:algorithm.tua=1"], "unknown key 'algorithm.tua'; did you mean 'tau'?"),
])
def test_bad_command_lines_are_one_line_errors(tmp_path, cli, args, message):
    res = cli("compare", str(compare_recipe(tmp_path)), *args, "-o", str(tmp_path / "c"), "--dry-run")
    assert res.exit_code == 2, res.output
    assert message in res.stderr and "Traceback" not in res.stderr
    if message.startswith("error:"):
        assert res.stderr.strip().startswith(message) and len(res.stderr.strip().splitlines()) == 1


def test_code_the_recipe_names_needs_the_opt_in_before_any_run(tmp_path, cli, monkeypatch):
    monkeypatch.delenv("APO_TRUST_CODE", raising=False)
    res = cli("compare", str(compare_recipe(tmp_path)), "-O", "apo,grpo", "-o", str(tmp_path / "c"))
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("error: the recipe wants to run code outside apo: rewards[0] imports ")
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "c").exists()
    res = cli("compare", str(compare_recipe(tmp_path)), "-O", "apo,grpo", "-o", str(tmp_path / "c"), "--trust-code",
              "--dry-run")
    assert res.exit_code == 0, res.output


def test_a_run_directory_of_another_recipe_stops_before_training(tmp_path, cli):
    recipe = compare_recipe(tmp_path)
    run = tmp_path / "c" / "grpo-s0"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump({"run": {"seed": 0}, "model": {"name_or_path": "other"}}))
    res = cli("compare", str(recipe), "-O", "apo,grpo", "--seeds", "0", "-o", str(tmp_path / "c"))
    assert res.exit_code == 1, res.output
    assert res.stderr.startswith(f"error: {run} holds a run of another recipe (it differs in ")
    assert "model.name_or_path" in res.stderr and not (tmp_path / "c" / "apo-s0").exists()


def test_report_of_a_folder_that_is_no_comparison(tmp_path, cli):
    res = cli("compare", "--report", str(tmp_path))
    assert res.exit_code == 2 and res.stderr.startswith(f"error: {tmp_path} holds no comparison")
    res = cli("compare", "--report", str(tmp_path / "nope"))
    assert res.exit_code == 2 and "does not exist" in res.stderr
    res = cli("compare", "x.yaml", "--report", str(tmp_path))
    assert res.exit_code == 2 and "--report reads an existing comparison" in res.stderr


# --------------------------------------------------------------------------------------------------
# The statistics, on run directories written here


def fake_run(root: Path, name: str, rewards: list[float], objective: str = "apo", evals: list[float] = ()) -> None:
    run = root / name
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump({"run": {"max_steps": len(rewards)},
                                                     "algorithm": {"objective": objective}}))
    rows = [{"step": i + 1, "reward": r, "alpha": 0.9, "completions/mean_length": 4.0, "step_time": 0.5}
            for i, r in enumerate(rewards)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs = [{"step": len(rewards), "source": "train", "metrics": {"mean@4": {"value": v}, "pass@4": {"value": v}}}
            for v in evals]
    (run / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_statistics_by_hand():
    from apo_cli.compare.report import bootstrap_diff, final_reward, noise, steps_to, verdict

    rewards = [0.0] * 10 + [1.0] * 10
    assert final_reward(rewards) == 1.0  # the last 10 %: 2 of 20 steps
    assert final_reward([0.0, 1.0, 0.5]) == 0.5  # at least one step
    # second half [1, 0, 1, 0]: differences -1, 1, -1: sqrt(mean(1, 1, 1) / 2)
    assert noise([9.0, 9.0, 9.0, 9.0, 1.0, 0.0, 1.0, 0.0]) == pytest.approx(0.5 ** 0.5)
    assert steps_to([0.0, 1.0, 1.0], 0.5, 1) == 2 and steps_to([0.0, 1.0, 1.0], 0.5, 2) == 2
    assert steps_to([0.0, 0.6, 0.0, 1.0], 0.5, 2) == 4 and steps_to([0.0], 0.5, 1) is None
    a = bootstrap_diff([0.1, 0.2, 0.3])
    assert a == bootstrap_diff([0.1, 0.2, 0.3]) and a[0] == pytest.approx(0.2) and 0.1 <= a[1] < a[0] < a[2] <= 0.3
    assert bootstrap_diff([0.4]) == (0.4, 0.4, 0.4)
    d = {"value": 0.2, "ci_low": 0.1, "ci_high": 0.3, "n": 3}
    assert verdict("g", "a", "final reward", d) == "g vs a: final reward higher for g over 3 seeds " \
                                                    "(+0.200, 95 % interval [+0.100, +0.300])"
    assert "not distinguishable with 3 seeds" in verdict("g", "a", "x", {**d, "ci_low": -0.1})
    assert "not distinguishable with 1 seed " in verdict("g", "a", "x", {**d, "n": 1})


def test_a_dynamic_sampling_step_counts_the_reward_of_everything_it_sampled():
    """With dynamic sampling ``reward`` covers only the trained groups (those with spread): the
    report reads ``sampling/reward``, and a step that trained nothing still has a reward."""
    from apo_cli.compare.report import step_rewards

    rows = [{"step": 1, "reward": 0.5, "sampling/reward": 0.9},  # spread groups read near the middle
            {"step": 2, "sampling/reward": 1.0},  # every group flat: no update, no "reward"
            {"step": 3, "reward": 0.25}, {"step": 4}]
    assert step_rewards(rows) == [0.9, 1.0, 0.25, 0.25]


def test_report_on_written_runs(tmp_path, cli):
    for seed, (lo, hi) in enumerate([(0.1, 0.5), (0.2, 0.6), (0.0, 0.4)]):
        fake_run(tmp_path, f"base-s{seed}", [lo] * 10, evals=[lo])
        fake_run(tmp_path, f"new-s{seed}", [lo] * 5 + [hi] * 5, "grpo", evals=[hi])
    fake_run(tmp_path, "new-s7", [0.0, 0.0], "grpo")
    (tmp_path / "new-s7" / "recipe.yaml").write_text(yaml.safe_dump({"run": {"max_steps": 10}}))
    (tmp_path / "compare.json").write_text(json.dumps({"seeds": [0, 1, 2, 7], "arms": [
        {"name": "base", "objective": "apo"}, {"name": "new", "objective": "grpo"}]}))
    res = cli("compare", "--report", str(tmp_path), "--threshold", "0.45", "--window", "1", "--width", "60")
    assert res.exit_code == 0, res.output
    out = res.stdout
    base = next(line for line in out.splitlines() if line.startswith("base "))
    new = next(line for line in out.splitlines() if line.startswith("new "))
    assert base.split()[1] == "3/4" and "0.100 ± 0.100" in base and "- (0/3)" in base
    assert "0.500 ± 0.100" in new and "6 (2/3)" in new  # 0.5 and 0.6 pass 0.45 at step 6, 0.4 never
    assert "new vs base: final reward higher for new over 3 seeds (+0.400, 95 % interval [+0.400, +0.400])" in out
    assert "new vs base: held-out mean@4 higher for new over 3 seeds" in out
    assert "not counted (unfinished): base-s7 (not started), new-s7 (2/10 steps)" in out


# --------------------------------------------------------------------------------------------------
# The runner's processes (no training: a sleeping child)

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def test_a_signal_to_the_comparison_is_passed_on_to_its_runs(tmp_path):
    from apo_cli.compare.runner import _Running, _Signals

    run = _Running("x", SLEEPER, dict(os.environ), tmp_path / "x.log")
    try:
        with _Signals([run]) as sig:
            os.kill(os.getpid(), signal.SIGTERM)  # to this process only: the run is in its own session
            assert run.proc.wait(timeout=60) == -signal.SIGTERM
        assert sig.signum == signal.SIGTERM
    finally:
        run.proc.kill()


def test_a_run_gets_sigterm_when_the_comparison_dies(tmp_path):
    """PR_SET_PDEATHSIG: a comparison killed outright (OOM killer, SIGKILL) leaves no run training."""
    from apo_cli.compare.runner import _Running

    ask = "import ctypes; s = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(s)); print(s.value)"
    run = _Running("x", [sys.executable, "-c", ask], dict(os.environ), tmp_path / "x.log")  # 2 = PR_GET_PDEATHSIG
    assert run.proc.wait(timeout=60) == 0
    assert (tmp_path / "x.log").read_text().strip() == str(int(signal.SIGTERM))
