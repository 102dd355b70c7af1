"""Dynamic sampling (DAPO; ``rollout.dynamic_sampling``, apo_cli/train/rollout.py): groups whose
rewards have no spread are dropped and more prompts sampled, round after round.

The reward of fixtures/flat_rewards.py scores every completion of a prompt with an odd answer 0.5
(a group with no spread) and the others by their distinct characters (spread within a group)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from apo_cli.recipe import recipe_from_dict
from apo_cli.train import Trainer, train_from_recipe
from apo_cli.train.rollout import zero_spread
from tests.helpers import FIXTURES, tiny_recipe, write_recipe
from tests.test_faults import _same_weights
from tests.test_train_loop import _metrics, _stable

FLAT = f"{FIXTURES / 'flat_rewards.py'}:flat_on_odd"
KEYS = ("sampling/dynamic_rounds", "sampling/filtered_groups", "sampling/trained_groups")


def _recipe(tmp_path: Path, name: str, enabled: bool = True, max_rounds: int = 3, reward: str = FLAT, **sections):
    return tiny_recipe(tmp_path, name, rewards=[{"name": reward}],
                       rollout={"dynamic_sampling": {"enabled": enabled, "max_rounds": max_rounds}}, **sections)


def _first_rollout(tmp_path: Path, d: dict):
    t = Trainer(recipe_from_dict(d))
    t.state.step = 1
    ro, _, metrics = t.rollout()
    return t, ro, metrics


def _groups(ro) -> list[tuple]:
    """Each group of a rollout as (prompt ids, completion ids, rewards), in order."""
    G = 4
    return [(tuple(ro.prompt_ids[g * G]), tuple(tuple(c) for c in ro.completion_ids[g * G:(g + 1) * G]),
             tuple(ro.rewards[g * G:(g + 1) * G].tolist())) for g in range(len(ro.rewards) // G)]


def test_the_trained_groups_all_have_spread_and_round_zero_is_the_plain_rollout(tmp_path):
    _, plain, plain_m = _first_rollout(tmp_path, _recipe(tmp_path, "plain", enabled=False))
    t, ro, m = _first_rollout(tmp_path, _recipe(tmp_path, "dyn"))
    assert not any(k in plain_m for k in KEYS)  # off: the metrics line of today
    flat = zero_spread(plain.rewards, 4)
    assert 0 < int(flat.sum()) < 4  # the plain rollout has groups with and without spread
    assert not zero_spread(ro.rewards, 4).any()  # every trained group has spread
    assert m["frac_reward_zero_std"] == 0.0 and plain_m["frac_reward_zero_std"] == float(flat.float().mean())
    informative = [g for g, f in zip(_groups(plain), flat.tolist()) if not f]
    assert _groups(ro)[: len(informative)] == informative  # round 0 samples what the plain step samples
    rounds, filtered, trained = (m[k] for k in KEYS)
    assert rounds > 1 and filtered >= int(flat.sum()) and trained == len(ro.rewards) // 4
    assert t.state.order.pos == rounds * 4  # each round took prompts_per_step prompts of the data order
    assert ro.group_ids.tolist() == [g for g in range(int(trained)) for _ in range(4)]
    # the reward metrics cover every completion sampled: the filtered groups (all 0.5 here) and the trained
    n = rounds * 16
    assert m["rewards/flat_on_odd/mean"] == pytest.approx((float(ro.rewards.sum()) + 0.5 * 4 * filtered) / n)
    # sampling/reward is the policy's reward over the same completions (one reward: its mean)
    assert m["sampling/reward"] == pytest.approx(m["rewards/flat_on_odd/mean"])


def test_a_step_out_of_rounds_trains_whole_mini_batches_of_the_informative_groups(tmp_path):
    d = _recipe(tmp_path, "short", max_rounds=1, algorithm={"mini_batches": 2}, optim={"micro_batch_size": 8})
    _, ro, m = _first_rollout(tmp_path, d)
    _, plain, _ = _first_rollout(tmp_path, _recipe(tmp_path, "plain", enabled=False, **{k: d[k] for k in ("algorithm", "optim")}))
    informative = 4 - int(zero_spread(plain.rewards, 4).sum())
    assert informative % 2 == 1  # one informative group too many for two mini-batches of whole groups
    assert m["sampling/dynamic_rounds"] == 1 and m["sampling/filtered_groups"] == 4 - informative
    assert m["sampling/trained_groups"] == informative - 1 == len(ro.rewards) // 4


def test_a_step_without_informative_groups_makes_no_update_and_says_so(tmp_path, capsys):
    d = _recipe(tmp_path, "none", reward=f"{FIXTURES / 'flat_rewards.py'}:constant", max_rounds=2,
                run={"max_steps": 2})
    train_from_recipe(recipe_from_dict(d))
    rows = _metrics(tmp_path / "none")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert (r["sampling/dynamic_rounds"], r["sampling/filtered_groups"], r["sampling/trained_groups"]) == (2, 8, 0)
        assert "loss" not in r and "grad_norm" not in r and r["skipped_steps"] == 0
        assert r["rewards/constant/mean"] == 1.0 and r["sampling/reward"] == 1.0 and "reward" not in r
    assert rows[-1]["epoch"] == 2 * 2 * 4 / 200  # two steps of two rounds of four prompts
    ckpt = tmp_path / "none" / "checkpoints"
    assert _same_weights(ckpt / "step-1", ckpt / "step-2")
    samples = tmp_path / "none" / "samples.jsonl"
    assert not samples.exists() or not samples.read_text().strip()  # nothing trained, nothing shown
    assert capsys.readouterr().out.count("groups 0 (no update)") == 2


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path, cli):
    d = _recipe(tmp_path, "straight", run={"max_steps": 4}, logging={"samples_per_step": 2})
    train_from_recipe(recipe_from_dict(d))
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    rows = _metrics(straight)
    assert all(r["frac_reward_zero_std"] == 0.0 for r in rows)  # only groups with spread were trained
    assert max(r["sampling/dynamic_rounds"] for r in rows) > 1 and sum(r["sampling/filtered_groups"] for r in rows) > 0
    shutil.copytree(straight, cut)
    for step in (3, 4):
        shutil.rmtree(cut / "checkpoints" / f"step-{step}")  # killed after step 2's checkpoint
    res = cli("train", str(write_recipe(tmp_path, d)), "--resume", "--output-dir", str(cut))
    assert res.exit_code == 0, res.output
    assert _stable(_metrics(cut)) == _stable(rows)
    assert _same_weights(cut / "checkpoints" / "step-4", straight / "checkpoints" / "step-4")
    samples = [(straight / "samples.jsonl").read_text(), (cut / "samples.jsonl").read_text()]
    assert samples[0] == samples[1] and len(samples[0].splitlines()) == 8
    state = [json.loads((run / "checkpoints" / "step-4" / "trainer_state.json").read_text()) for run in (straight, cut)]
    assert state[0]["data"] == state[1]["data"]


def test_dynamic_sampling_changes_the_update(tmp_path):
    for name, enabled in (("off", False), ("on", True)):
        train_from_recipe(recipe_from_dict(_recipe(tmp_path, name, enabled=enabled, run={"max_steps": 1})))
    assert not _same_weights(tmp_path / "off" / "checkpoints" / "step-1", tmp_path / "on" / "checkpoints" / "step-1")


@pytest.mark.slow
def test_two_processes_train_the_groups_one_process_trains(tmp_path):
    """Sampling fixed per prompt (fixtures/dp_driver.py), 2 mini-batches: each process trains its
    block of every mini-batch of the informative groups, which both gathered from every round."""
    from safetensors.torch import load_file

    reward = f"{FIXTURES / 'flat_rewards.py'}:by_length"
    out = {}
    for name, nproc in (("one", 1), ("two", 2)):
        d = _recipe(tmp_path, name, reward=reward, max_rounds=6, optim={"micro_batch_size": 4},
                    algorithm={"mini_batches": 2})
        args = [str(FIXTURES / "dp_driver.py"), "train", str(write_recipe(tmp_path, d, f"{name}.yaml"))]
        cmd = [sys.executable, *args] if nproc == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
        p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "APO_DEBUG": "0", "PYTHONWARNINGS": "ignore"})
        assert p.returncode == 0, p.stderr[-3000:]
        out[name] = (_metrics(tmp_path / name), load_file(str(tmp_path / name / "checkpoints/step-4/model.safetensors")))
    (m1, w1), (m2, w2) = out["one"], out["two"]
    assert all(r["sampling/trained_groups"] == 4 for r in m1)  # no step ran short (whose count would depend
    assert sum(r["sampling/filtered_groups"] for r in m1) > 0  # on the number of processes)
    for a, b in zip(m1, m2, strict=True):
        for key in (*KEYS, "reward", "reward_std", "frac_reward_zero_std", "rewards/by_length/mean", "epoch"):
            assert b[key] == pytest.approx(a[key], abs=1e-6), key
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3, abs=1e-7)
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-5


@pytest.mark.parametrize("value, rule", [("0", "greater than or equal to 1"), ("101", "less than or equal to 100"),
                                         ("2.5", "valid integer")])
def test_max_rounds_out_of_range_is_one_line_naming_the_field(tmp_path, cli, value, rule):
    path = write_recipe(tmp_path, _recipe(tmp_path, "bad"))
    res = cli("validate", str(path), f"rollout.dynamic_sampling.max_rounds={value}")
    assert res.exit_code == 2
    assert "rollout.dynamic_sampling.max_rounds: Input should be" in res.output and rule in res.output
    assert "Traceback" not in res.output
