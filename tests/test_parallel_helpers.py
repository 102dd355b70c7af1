"""The pieces of apo_cli/runtime/ that a single process can check (the torchrun runs are in
test_parallel.py), and the merge of reward outputs across ranks."""

from __future__ import annotations

import pytest
import torch

from apo_cli.errors import RewardError
from apo_cli.runtime.world import World
from apo_cli.runtime.fsdp import _name_optimizer_state, is_named_optimizer_state, load_optimizer_state


def test_ranks_split_the_prompts_into_contiguous_equal_blocks():
    blocks = [list(World(rank=r, local_rank=r, size=4).shard(12)) for r in range(4)]
    assert blocks == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert list(World().shard(5)) == [0, 1, 2, 3, 4]


def test_world_from_env(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    w = World.from_env()
    assert (w.rank, w.local_rank, w.size, w.is_main, w.distributed) == (3, 1, 4, False, True)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key)
    assert World.from_env() == World()


def test_one_process_collectives_are_identities():
    w = World()
    assert w.gather({"a": 1}) == [{"a": 1}]
    assert w.all_true(True) and not w.all_true(False)
    assert w.mean({"loss": 2.0, "sampling/logprob_diff_max": 3.0}) == {"loss": 2.0, "sampling/logprob_diff_max": 3.0}
    w.raise_if_any(None)
    with pytest.raises(RewardError, match="boom"):
        w.raise_if_any(RewardError("boom"))


def _trained(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 4)).square().sum().backward()
    opt.step()
    return model, opt


def test_optimizer_state_loads_from_either_format():
    """One-process checkpoints hold ``optimizer.state_dict()``; several-process ones name the
    parameters. Both load into a one-process optimizer with the same result."""
    model, opt = _trained(0)
    saved = opt.state_dict()
    named = _name_optimizer_state(model, opt, saved)
    assert is_named_optimizer_state(named) and not is_named_optimizer_state(saved)
    assert set(named["state"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    for state in (saved, named):
        m2, o2 = _trained(1)
        load_optimizer_state(m2, o2, state)
        got = o2.state_dict()["state"]
        for i, s in saved["state"].items():
            assert torch.equal(got[i]["exp_avg"], s["exp_avg"]) and torch.equal(got[i]["exp_avg_sq"], s["exp_avg_sq"])


def test_an_optimizer_state_of_another_model_is_refused():
    model, opt = _trained(0)
    small = torch.nn.Linear(4, 2)
    small_opt = torch.optim.AdamW(small.parameters())
    with pytest.raises(ValueError, match="holds 4 parameters, this run's 2"):
        _name_optimizer_state(small, small_opt, opt.state_dict())


def test_reward_outputs_merged_over_ranks_equal_one_call_on_everything(tmp_path):
    """Each rank scores its completions; the merged output (totals, correctness, counters and the
    metrics computed from them) is what one call on all the completions gives."""
    from apo_cli.recipe import RewardSpec
    from apo_cli.rewards import RewardSet, merge_outputs

    module = tmp_path / "rw.py"
    module.write_text(
        "def half_bad(completions, **_):\n"
        "    return [None if c.startswith('x') else float(len(c)) for c in completions]\n"
    )
    rs = RewardSet([RewardSpec(name="exact_match"), RewardSpec(name=f"{module}:half_bad", weight=0.5)])
    completions = ["The answer is 4", "5", "x", "4", "xx 4", "nothing", "4.0", "3"]
    answers = ["4", "4", "4", "4", "5", "5", "5", "5"]
    examples = [type("Ex", (), {"answer": a, "columns": {}})() for a in answers]
    prompts = ["p"] * 8
    ids = [[1]] * 8
    whole = rs(prompts, completions, ids, examples)
    halves = [rs(prompts[s], completions[s], ids[s], examples[s]) for s in (slice(0, 4), slice(4, 8))]
    merged = merge_outputs(halves)
    assert merged.total == whole.total
    assert merged.correct == whole.correct
    assert merged.metrics == pytest.approx(whole.metrics)
    assert merged.metrics["rewards/half_bad/none_frac"] == pytest.approx(2 / 8)


@pytest.mark.parametrize("command", [["generate", "tiny-random", "-p", "1+1="], ["eval", "tiny-random", "--data", "builtin:arithmetic"]])
def test_generate_and_eval_refuse_torchrun(cli, monkeypatch, command):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    res = cli(*command)
    assert res.exit_code == 2
    assert "only apo train runs under torchrun" in res.output
