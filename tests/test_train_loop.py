"""The training loop end to end on a tiny random model: it learns, resumes exactly, saves loadable
checkpoints, and its update does not depend on how a mini-batch is cut into micro-batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from apo_cli.recipe import recipe_from_dict
from apo_cli.train import Trainer, train_from_recipe
from tests.helpers import tiny_recipe

TIMING_KEYS = ("time/", "step_time", "tokens_per_s", "perf/")  # perf/: throughput and MFU, timings too


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _stable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(TIMING_KEYS)} for r in rows]


@pytest.mark.parametrize("objective", ["apo", "grpo", "gspo"])
def test_tiny_model_learns_trivial_task(tmp_path, objective):
    d = tiny_recipe(tmp_path, objective, run={"max_steps": 20}, algorithm={"objective": objective},
                    checkpoint={"every": 20, "keep_last": 1})
    train_from_recipe(recipe_from_dict(d))
    rewards = [r["reward"] for r in _metrics(tmp_path / objective)]
    start, end = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    # a random char-level model emits 'a' ~1% of the time; 20 steps of RL push it far higher
    assert start < 0.05
    assert end > start + 0.1, rewards


def test_checkpoint_loads_with_from_pretrained_and_generates(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tiny_recipe(tmp_path, "ck", run={"max_steps": 2})
    last = train_from_recipe(recipe_from_dict(d))
    assert last is not None and last.name == "step-2"
    model = AutoModelForCausalLM.from_pretrained(last)
    tok = AutoTokenizer.from_pretrained(last)
    ids = tok("1+1=", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["step"] == 2 and "alpha_schedule" in state and "data" in state


def test_run_dir_layout(tmp_path):
    d = tiny_recipe(tmp_path, "layout", run={"max_steps": 3}, checkpoint={"every": 1, "keep_last": 2})
    train_from_recipe(recipe_from_dict(d))
    run = tmp_path / "layout"
    assert (run / "recipe.yaml").is_file() and (run / "samples.jsonl").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-3"]
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("reward", "reward_std", "frac_reward_zero_std", "alpha", "confidence", "reward_signal", "tau",
                "loss", "grad_norm", "step_time", "tokens_per_s", "completions/mean_length",
                "completions/clipped_ratio", "entropy", "learning_rate"):
        assert key in rows[0], key


def test_resume_equals_straight_run(tmp_path):
    straight = tiny_recipe(tmp_path, "straight", run={"max_steps": 4})
    train_from_recipe(recipe_from_dict(straight))
    # the same run stopped after 2 steps, then resumed to 4 (max_steps is safe to change)
    first = tiny_recipe(tmp_path, "split", run={"max_steps": 2})
    train_from_recipe(recipe_from_dict(first))
    second = tiny_recipe(tmp_path, "split", run={"max_steps": 4})
    train_from_recipe(recipe_from_dict(second), resume=True, allow_recipe_change=True)
    assert _stable(_metrics(tmp_path / "split")) == _stable(_metrics(tmp_path / "straight"))
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "straight/checkpoints/step-4/model.safetensors"))
    wb = load_file(str(tmp_path / "split/checkpoints/step-4/model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_of_finished_run_trains_nothing(tmp_path, capsys):
    d = tiny_recipe(tmp_path, "fin", run={"max_steps": 2})
    train_from_recipe(recipe_from_dict(d))
    before = (tmp_path / "fin/metrics.jsonl").read_text()
    train_from_recipe(recipe_from_dict(d), resume=True)
    assert (tmp_path / "fin/metrics.jsonl").read_text() == before
    assert "already finished" in capsys.readouterr().out


def _one_step_weights(tmp_path, name, micro):
    d = tiny_recipe(tmp_path, name, run={"max_steps": 1}, rollout={"group_size": 2, "prompts_per_step": 4},
                    optim={"micro_batch_size": micro, "grad_clip": None})
    t = Trainer(recipe_from_dict(d))
    t.train()
    return {k: v.detach().clone() for k, v in t.model.state_dict().items()}


def test_micro_batch_accumulation_invariance(tmp_path):
    one = _one_step_weights(tmp_path, "m8", 8)  # 1 micro-batch of 8 sequences
    four = _one_step_weights(tmp_path, "m2", 2)  # 4 micro-batches of 2 (one group each)
    diffs = [float((one[k] - four[k]).abs().max()) for k in one]
    assert max(diffs) < 1e-6


@pytest.mark.parametrize("field,value", [("mini_batches", 2), ("epochs", 2)])
def test_loop_fields_change_the_update(tmp_path, field, value):
    """The loop's own algorithm fields are not dead: they change the number of optimizer steps."""
    base = tiny_recipe(tmp_path, "base", run={"max_steps": 1}, optim={"micro_batch_size": 8})
    other = tiny_recipe(tmp_path, "other", run={"max_steps": 1}, optim={"micro_batch_size": 8},
                        algorithm={field: value})
    ta, tb = Trainer(recipe_from_dict(base)), Trainer(recipe_from_dict(other))
    ta.train()
    tb.train()
    assert ta.lr_scheduler.last_epoch == 1
    assert tb.lr_scheduler.last_epoch == 2


def test_non_finite_loss_is_skipped_and_stops_the_run(tmp_path):
    import dataclasses

    from apo_cli.errors import TrainingError

    d = tiny_recipe(tmp_path, "nan", run={"max_steps": 10}, optim={"max_consecutive_skips": 3})
    t = Trainer(recipe_from_dict(d))
    before = {k: v.detach().clone() for k, v in t.model.state_dict().items()}

    def poisoned(batch, spec, ctx):
        return (batch.logp * float("nan")).sum(), {}

    t.objective = dataclasses.replace(t.objective, fn=poisoned)
    with pytest.raises(TrainingError, match="3 optimizer steps in a row"):
        t.train()
    after = t.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # NaN never reached the weights
    rows = _metrics(tmp_path / "nan")
    assert [r["skipped_steps"] for r in rows] == [1, 2, 3]
    assert (tmp_path / "nan/checkpoints/step-3").is_dir()  # the last good state is saved
