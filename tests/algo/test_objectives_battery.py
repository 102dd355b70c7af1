"""Properties every registered objective must have, parametrised over every key of OBJECTIVES."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from apo_cli.algo import (
    OBJECTIVES,
    LossBatch,
    LossContext,
    Signals,
    TauSchedule,
    compute_advantages,
    compute_signals,
    get_objective,
    make_alpha_schedule,
    objective_loss,
    resolved,
    sequence_logprob,
)
from apo_cli.algo.spec import RolloutCorrectionSpec
from apo_cli.recipe import _ALWAYS_USED, AdaptiveTauSpec, AlgorithmSpec, AlphaScheduleSpec

from .conftest import make_batch, make_ctx, run_loss

NAMES = sorted(OBJECTIVES)
SOFTMAX_NAMES = [n for n in NAMES if "clip_u" in OBJECTIVES[n].params]  # group-softmax objectives
LOOP_FIELDS = {"objective", "mini_batches", "epochs", "disable_dropout"}  # disable_dropout: tests/algo/test_fidelity.py


def test_registry_has_the_seven_objectives_and_consistent_metadata():
    assert set(NAMES) >= {"apo", "adpo", "grpo", "gspo", "dr_grpo", "cispo", "sapo"}
    fields = set(AlgorithmSpec.model_fields)
    for name, info in OBJECTIVES.items():
        assert info.name == name
        assert info.params <= fields - LOOP_FIELDS, name
        assert set(info.defaults) <= fields, name
        for f, v in info.defaults.items():  # defaults are only for fields the recipe may leave None
            assert AlgorithmSpec.model_fields[f].default is None, (name, f)
            assert f in info.params | _ALWAYS_USED, (name, f)
            AlgorithmSpec(objective=name, **{f: v})  # and they validate
    assert [n for n in NAMES if OBJECTIVES[n].uses_alpha] == ["apo"]


def test_unknown_objective_lists_valid_names():
    with pytest.raises(KeyError, match="valid names: adpo, apo, cispo, dr_grpo, grpo, gspo, sapo"):
        get_objective("ppo")


def test_resolved_uses_objective_defaults():
    assert resolved(AlgorithmSpec(objective="grpo"), "eps_low") == 0.2
    assert resolved(AlgorithmSpec(objective="gspo"), "eps_high") == 4e-4
    assert resolved(AlgorithmSpec(objective="gspo", eps_high=1e-3), "eps_high") == 1e-3
    assert resolved(AlgorithmSpec(objective="apo"), "advantage_std") == "none"
    assert resolved(AlgorithmSpec(objective="grpo"), "advantage_std") == "group"


@pytest.mark.parametrize("name", NAMES)
def test_loss_is_scalar_with_finite_float_metrics(name):
    b = make_batch(seed=1)
    loss, metrics = run_loss(name, b, make_ctx(b), kl_coef=0.1)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert metrics and all(type(v) is float and math.isfinite(v) for v in metrics.values()), metrics
    assert "kl" in metrics
    expected = {"alpha", "tau", "apo/W", "apo/weight_std", "apo/u_abs_mean", "apo/z_loss"} if name in SOFTMAX_NAMES \
        else {"ratio/mean", "sapo/gate_mean"} if name == "sapo" \
        else {"clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"}
    assert expected <= set(metrics)


@pytest.mark.parametrize("name", NAMES)
def test_kl_needs_reference_logprobs(name):
    b = replace(make_batch(), logp_ref=None)
    run_loss(name, b, make_ctx(b))  # fine without KL
    with pytest.raises(ValueError, match="logp_ref"):
        run_loss(name, b, make_ctx(b), kl_coef=0.1)


@pytest.mark.parametrize("name", NAMES)
def test_zero_advantage_gives_zero_gradient(name):
    """At the on-policy point (the first update after sampling) zero advantages carry no signal."""
    b = make_batch(on_policy=True, seed=2)
    b = replace(b, advantages=torch.zeros_like(b.advantages))
    loss, _ = run_loss(name, b, make_ctx(b))
    (grad,) = torch.autograd.grad(loss, b.logp)
    assert grad.abs().max().item() < 1e-14


@pytest.mark.parametrize("name", [n for n in NAMES if n not in SOFTMAX_NAMES])
def test_ratio_losses_zero_advantage_zero_gradient_off_policy(name):
    b = make_batch(seed=3)
    b = replace(b, advantages=torch.zeros_like(b.advantages))
    (grad,) = torch.autograd.grad(run_loss(name, b, make_ctx(b))[0], b.logp)
    assert grad.abs().max().item() == 0.0


@pytest.mark.parametrize("name", NAMES)
def test_masked_tokens_contribute_nothing(name):
    """Garbage (NaN, inf, huge) on padding changes neither the loss nor any gradient."""
    b = make_batch(seed=4)
    pad = b.mask == 0
    assert pad.any()
    dirty = LossBatch(
        logp=b.logp.detach().masked_fill(pad, float("nan")).requires_grad_(True),
        logp_old=b.logp_old.masked_fill(pad, float("-inf")),
        mask=b.mask,
        advantages=b.advantages,
        group_ids=b.group_ids,
        logp_ref=b.logp_ref.masked_fill(pad, 1e30),
    )
    ctx = make_ctx(b)
    clean_loss, _ = run_loss(name, b, ctx, kl_coef=0.05)
    dirty_loss, _ = run_loss(name, dirty, ctx, kl_coef=0.05)
    torch.testing.assert_close(dirty_loss, clean_loss, rtol=0, atol=0)
    (g_clean,) = torch.autograd.grad(clean_loss, b.logp)
    (g_dirty,) = torch.autograd.grad(dirty_loss, dirty.logp)
    assert torch.all(g_dirty[pad] == 0)
    torch.testing.assert_close(g_dirty, g_clean, rtol=0, atol=0)


@pytest.mark.parametrize("name", SOFTMAX_NAMES)
def test_group_softmax_is_shift_invariant(name):
    """Adding c_g to every token log-prob of group g shifts each u of the group by c_g/tau: same loss, same gradient."""
    b = make_batch(seed=5)
    shift = (b.group_ids.to(torch.float64) % 5 - 2.0) * 0.03  # [N] per-group constants
    shifted = replace(b, logp=(b.logp.detach() + shift[:, None]).requires_grad_(True))
    ctx = make_ctx(b)
    l0, _ = run_loss(name, b, ctx)
    l1, _ = run_loss(name, shifted, ctx)
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.autograd.grad(l1, shifted.logp)[0], torch.autograd.grad(l0, b.logp)[0],
                               rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("name", NAMES)
def test_shuffling_rows_keeping_group_ids_gives_same_loss(name):
    b = make_batch(n_groups=5, g=4, seed=6)
    perm = torch.randperm(b.logp.shape[0], generator=torch.Generator().manual_seed(1))
    shuffled = LossBatch(b.logp.detach()[perm].requires_grad_(True), b.logp_old[perm], b.mask[perm],
                         b.advantages[perm], b.group_ids[perm], b.logp_ref[perm])
    ctx = make_ctx(b)
    l0, m0 = run_loss(name, b, ctx, kl_coef=0.1, z_loss_coef=0.01) if name in SOFTMAX_NAMES else \
        run_loss(name, b, ctx, kl_coef=0.1)
    l1, m1 = run_loss(name, shuffled, ctx, kl_coef=0.1, z_loss_coef=0.01) if name in SOFTMAX_NAMES else \
        run_loss(name, shuffled, ctx, kl_coef=0.1)
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.autograd.grad(l1, shuffled.logp)[0], torch.autograd.grad(l0, b.logp)[0][perm],
                               rtol=1e-9, atol=1e-13)
    assert m1 == pytest.approx(m0)


@pytest.mark.parametrize("name", NAMES)
def test_micro_batch_losses_add_up_to_the_mini_batch_loss(name):
    """Gradient accumulation invariance: whole-mini-batch normalisers make micro-batch losses additive."""
    b = make_batch(n_groups=6, g=3, t=8, seed=7)
    ctx = make_ctx(b, max_new_tokens=10)
    extra = {"z_loss_coef": 0.02} if name in SOFTMAX_NAMES else {}
    whole, _ = run_loss(name, b, ctx, kl_coef=0.1, **extra)
    (g_whole,) = torch.autograd.grad(whole, b.logp)
    ids = torch.unique(b.group_ids)
    total = torch.zeros((), dtype=torch.float64)
    g_sum = torch.zeros_like(b.logp)
    for chunk in (ids[:1], ids[1:4], ids[4:]):  # micro-batches of 1, 3 and 2 whole groups
        rows = torch.isin(b.group_ids, chunk).nonzero().squeeze(1)
        logp = b.logp.detach()[rows].requires_grad_(True)
        micro = LossBatch(logp, b.logp_old[rows], b.mask[rows], b.advantages[rows], b.group_ids[rows], b.logp_ref[rows])
        loss, _ = run_loss(name, micro, ctx, kl_coef=0.1, **extra)
        loss.backward()
        total = total + loss.detach()
        g_sum[rows] += logp.grad
    torch.testing.assert_close(total, whole.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_sum, g_whole, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", SOFTMAX_NAMES)
def test_incomplete_group_is_refused(name):
    b = make_batch(seed=8)
    keep = torch.arange(1, b.logp.shape[0])  # drop one row: its group is no longer whole
    part = LossBatch(b.logp[keep], b.logp_old[keep], b.mask[keep], b.advantages[keep], b.group_ids[keep])
    with pytest.raises(ValueError, match="equal size"):
        run_loss(name, part, make_ctx(part))


# --------------------------------------------------------------------------------------------------
# No dead fields: every algorithm field an objective declares changes its loss or its gradient.

# Alternatives tried in order; the first that differs from the current resolved value is used.
ALTERNATIVES = {
    "tau": [0.8],
    "beta_r": [1.0],
    "clip_ratio": [0.05],
    "clip_u": [0.1],
    "z_loss_coef": [0.1],
    "z_loss_form": ["centred", "reference"],
    "advantage_eps": [0.5],
    "kl_coef": [0.1],
    "logprob_reduction": ["sum"],
    "advantage_std": ["group", "none"],
    "eps_low": [0.01, 0.3],
    "eps_high": [0.01, 0.3],
    "loss_aggregation": ["seq_mean_token_mean", "token_mean"],
    "alpha": [AlphaScheduleSpec(kind="constant", value=0.2)],
    "adaptive_tau": [AdaptiveTauSpec(enabled=True)],
    "sapo_temperature_pos": [3.0],
    "sapo_temperature_neg": [3.0],
    "kl_estimator": ["k2", "k1"],
    "rollout_correction": [RolloutCorrectionSpec(mode="token_truncate", clip_max=1.05)],
    "off_policy_mask_threshold": [0.0],
    "mask_truncated": [True],
    "entropy_coef": [0.1],
    "top_entropy_quantile": [0.5],
}


def _pipeline_loss(spec: AlgorithmSpec, seed: int = 9) -> torch.Tensor:
    """What the training loop does for one update: advantages, signals, schedules, loss (with the
    stabilizers' inputs: a separate engine's log-probs, truncated rows, the policy entropy)."""
    b = make_batch(n_groups=4, g=4, t=8, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    b = replace(b, logp_engine=b.logp_old + 0.4 * torch.randn(b.logp_old.shape, generator=gen, dtype=torch.float64),
                truncated=torch.arange(b.logp.shape[0]) % 3 == 0,
                entropy=3 * torch.rand(b.logp.shape, generator=gen, dtype=torch.float64) * b.mask)
    rewards = torch.rand(b.logp.shape[0], generator=gen, dtype=torch.float64) ** 2  # spread within groups
    adv, _ = compute_advantages(rewards, b.group_ids, resolved(spec, "advantage_std"), spec.advantage_eps)
    seq_mean = sequence_logprob(b.logp_old, b.mask, "mean")
    signals: Signals = compute_signals(3, rewards, adv, b.group_ids, seq_mean, vocab_size=50, correct=rewards > 0.5)
    info = get_objective(spec.objective)
    alpha = make_alpha_schedule(spec.alpha, max_steps=10).step(signals) if info.uses_alpha else 1.0
    tau = TauSchedule(spec.tau, spec.adaptive_tau).step(signals)
    ctx = LossContext(alpha=alpha, tau=tau, total_groups=4, total_seqs=16, total_tokens=float(b.mask.sum()),
                      max_new_tokens=12)
    loss, _ = objective_loss(info, replace(b, advantages=adv), spec, ctx)
    (grad,) = torch.autograd.grad(loss, b.logp)  # the update: some stabilizers change only the gradient
    return torch.cat([loss.detach().reshape(1), grad.reshape(-1)])


_CASES = [(n, f) for n in NAMES for f in sorted(OBJECTIVES[n].params | (_ALWAYS_USED - LOOP_FIELDS))]
# fields that matter only together with another one: the base the change is measured from
_BASE_EXTRA = {"z_loss_form": {"z_loss_coef": 0.1}, "advantage_eps": {"advantage_std": "group"},
               "kl_estimator": {"kl_coef": 0.1}}


@pytest.mark.parametrize("name, field", _CASES, ids=[f"{n}-{f}" for n, f in _CASES])
def test_every_declared_field_changes_the_loss(name, field):
    base = AlgorithmSpec(objective=name, **_BASE_EXTRA.get(field, {}))
    current = resolved(base, field)
    new = next(v for v in ALTERNATIVES[field] if v != current)
    changed = base.model_copy(update={field: new})
    assert not torch.allclose(_pipeline_loss(changed), _pipeline_loss(base), rtol=1e-9, atol=1e-12)


def test_every_algorithm_field_is_read_by_some_objective():
    covered = {f for _, f in _CASES}
    assert covered == set(AlgorithmSpec.model_fields) - LOOP_FIELDS
    assert set(ALTERNATIVES) == covered


# --------------------------------------------------------------------------------------------------
# Finite differences: the autograd gradient is the derivative of the loss (CISPO: of its surrogate,
# the importance weight held fixed, which is how it is defined)


@pytest.mark.parametrize("corrected", [False, True], ids=["plain", "rollout-corrected"])
@pytest.mark.parametrize("name", NAMES)
def test_gradient_matches_finite_differences(name, corrected):
    if corrected and name in SOFTMAX_NAMES:
        pytest.skip("apo/adpo weight the gradient only (the divergence's value is unchanged): tests/test_stabilizers_loss.py")
    b = make_batch(n_groups=2, g=3, t=4, seed=12)
    gen = torch.Generator().manual_seed(3)
    engine = b.logp_old + 0.3 * torch.randn(b.logp_old.shape, generator=gen, dtype=torch.float64)
    ctx = make_ctx(b)
    wide = {"eps_low": 0.5, "eps_high": 0.5} if name in ("grpo", "dr_grpo", "gspo") else {}  # few clipped tokens
    spec = AlgorithmSpec(objective=name, kl_coef=0.1, **wide,
                         rollout_correction=RolloutCorrectionSpec(mode="token_truncate" if corrected else "off"))
    log_ratio = (b.logp - b.logp_old).detach()

    def f(x):
        old = x - log_ratio if name == "cispo" else b.logp_old  # CISPO: the detached weight stays fixed
        batch = replace(b, logp=x, logp_old=old, logp_engine=engine if corrected else None)
        return objective_loss(get_objective(name), batch, spec, ctx)[0]

    assert torch.autograd.gradcheck(f, (b.logp.detach().clone().requires_grad_(True),), eps=1e-6, atol=1e-8)
