"""Group gathering, advantages and the target q, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from apo_cli.algo import compute_advantages, group_order, group_target, group_view, ungroup

F64 = torch.float64
# two groups of 4, interleaved rows: group 10 gets rewards [1, 0, 0, 1], group 20 gets [1, 1, 1, 1]
IDS = torch.tensor([10, 20, 10, 20, 10, 20, 10, 20])
REWARDS = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0], dtype=F64)


def test_centred_advantages_by_hand():
    adv, stats = compute_advantages(REWARDS, IDS, "none")
    # group 10: mean 1/2 -> [+.5, -.5, -.5, +.5]; group 20: all equal -> 0
    torch.testing.assert_close(adv, torch.tensor([0.5, 0, -0.5, 0, -0.5, 0, 0.5, 0], dtype=F64))
    assert stats["reward"] == pytest.approx(6 / 8)
    # unbiased std: group 10 sqrt(4 * 0.25 / 3) = sqrt(1/3) = 0.57735, group 20: 0 -> mean 0.288675
    assert stats["reward_std"] == pytest.approx(math.sqrt(1 / 3) / 2)
    assert stats["frac_reward_zero_std"] == 0.5


def test_group_std_advantages_by_hand():
    adv, _ = compute_advantages(REWARDS, IDS, "group", eps=0.0)
    # group 10: ±0.5 / sqrt(1/3) = ±0.8660254; group 20: 0 / (0 + 0) would be NaN with eps = 0 ...
    a = 0.5 / math.sqrt(1 / 3)
    torch.testing.assert_close(adv[IDS == 10], torch.tensor([a, -a, -a, a], dtype=F64))
    adv, _ = compute_advantages(REWARDS, IDS, "group")  # ... and 0 with the default eps
    assert torch.all(adv[IDS == 20] == 0)


def test_batch_std_advantages_by_hand():
    adv, _ = compute_advantages(REWARDS, IDS, "batch", eps=0.0)
    # batch std (unbiased) of [1,1,0,1,0,1,1,1]: mean 3/4, sum sq dev = 6/16 + 2*9/16 = 24/16, /7 -> sqrt(3/14)
    s = math.sqrt(3 / 14)
    torch.testing.assert_close(adv, torch.tensor([0.5, 0, -0.5, 0, -0.5, 0, 0.5, 0], dtype=F64) / s)


def test_unknown_std_mode():
    with pytest.raises(ValueError, match="valid: none, group, batch"):
        compute_advantages(REWARDS, IDS, "global")


def test_advantages_follow_rows_when_shuffled():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.rand(24, generator=gen, dtype=F64)
    ids = torch.arange(6).repeat_interleave(4)
    perm = torch.randperm(24, generator=gen)
    for std in ("none", "group", "batch"):
        a, _ = compute_advantages(rewards, ids, std)
        b, _ = compute_advantages(rewards[perm], ids[perm], std)
        torch.testing.assert_close(b, a[perm])


def test_group_view_and_ungroup():
    x = torch.arange(8.0)
    xg, order = group_view(x, IDS)  # [2, 4]
    assert xg.tolist() == [[0.0, 2.0, 4.0, 6.0], [1.0, 3.0, 5.0, 7.0]]  # stable: row order kept within a group
    assert torch.equal(ungroup(xg, order), x)
    assert group_order(IDS)[1] == 4


def test_unequal_groups_are_refused():
    with pytest.raises(ValueError, match=r"group sizes \[1, 3\]"):
        group_order(torch.tensor([1, 1, 1, 2]))


def test_group_target_by_hand():
    # A = [ln 3 / 2, -ln 3 / 2] with beta_r = 1: q = [3/4, 1/4]; the second group: uniform
    adv = torch.tensor([math.log(3) / 2, 0.0, -math.log(3) / 2, 0.0], dtype=F64)
    q = group_target(adv, torch.tensor([0, 1, 0, 1]), beta_r=1.0)
    torch.testing.assert_close(q, torch.tensor([0.75, 0.5, 0.25, 0.5], dtype=F64))
    q_hot = group_target(adv, torch.tensor([0, 1, 0, 1]), beta_r=0.5)  # beta_r 1/2: e^{ln 3} -> [9/10, 1/10]
    torch.testing.assert_close(q_hot[[0, 2]], torch.tensor([0.9, 0.1], dtype=F64))
    assert not q.requires_grad
