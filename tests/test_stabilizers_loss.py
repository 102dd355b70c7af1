"""Issue 16, the loss side: rollout correction, off-policy mask, mask_truncated, entropy mask and bonus,
KL estimators (apo_cli/algo/stabilizers.py, apo_cli/train/loss_inputs.py). The objectives' battery
(every registered name, TRL equality) is in tests/algo/; here: each stabilizer by hand on synthetic
tensors, its recipe checks, and the loop on a real engine/trainer mismatch (a test backend whose
engine log-probs come from a perturbed copy of the policy)."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace

import pytest
import torch

from apo_cli.algo import OBJECTIVES, LossBatch, get_objective, importance_ratio, objective_loss, prepare, token_kl
from apo_cli.errors import RecipeError
from apo_cli.recipe import AlgorithmSpec, recipe_from_dict
from tests.algo.conftest import make_batch, make_ctx
from tests.helpers import install_plugin, tiny_recipe, uninstall_plugin

F64 = torch.float64
NAMES = sorted(OBJECTIVES)
SOFTMAX_NAMES = [n for n in NAMES if "clip_u" in OBJECTIVES[n].params]


def _loss_grad(name: str, batch: LossBatch, ctx=None, **fields) -> tuple[torch.Tensor, torch.Tensor]:
    spec = AlgorithmSpec(objective=name, **fields)
    loss, _ = objective_loss(get_objective(name), batch, spec, ctx or make_ctx(batch))
    (grad,) = torch.autograd.grad(loss, batch.logp)
    return loss.detach(), grad


def _fresh(b: LossBatch, **over) -> LossBatch:
    return replace(b, logp=b.logp.detach().clone().requires_grad_(True), **over)


# --------------------------------------------------------------------------------------------------
# rollout correction: the ratio, by hand


def _two_rows():
    """Row 0: token diffs (old − engine) [ln 4, 0, −ln 2]; row 1: [ln 1.1] then padding."""
    old = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, 0.0, 0.0]], dtype=F64)
    engine = old - torch.tensor([[math.log(4), 0.0, -math.log(2)], [math.log(1.1), 0.0, 0.0]], dtype=F64)
    engine[1, 1:] = float("nan")  # garbage on padding changes nothing
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]], dtype=F64)
    return old, engine, mask


@pytest.mark.parametrize("mode, want", [
    # token ratios [4, 1, 0.5] and [1.1]; bounds [0.8, 3]
    ("token_truncate", [[3.0, 1.0, 0.8], [1.1, 0.0, 0.0]]),  # 4 clamped to 3, 0.5 to 0.8
    ("token_mask", [[0.0, 1.0, 0.0], [1.1, 0.0, 0.0]]),  # 4 and 0.5 outside: 0
    # sequence ratios: row 0 exp(ln4 + 0 − ln2) = 2 (inside), row 1 = 1.1, the same weight on every real token
    ("sequence_truncate", [[2.0, 2.0, 2.0], [1.1, 0.0, 0.0]]),
    ("sequence_mask", [[2.0, 2.0, 2.0], [1.1, 0.0, 0.0]]),
])
def test_importance_ratio_by_hand(mode, want):
    old, engine, mask = _two_rows()
    weight, ratio, outside = importance_ratio(old, engine, mask, mode, 0.8, 3.0)
    torch.testing.assert_close(weight, torch.tensor(want, dtype=F64), rtol=1e-12, atol=1e-14)
    if mode.startswith("token"):
        assert outside.tolist() == [[True, False, True], [False, False, False]]
    else:
        assert ratio.shape == (2, 1) and not outside.any()


def test_a_sequence_ratio_above_the_cap_is_clamped_or_masked():
    old, engine, mask = _two_rows()
    # row 0's sequence ratio 2 is above a cap of 1.5: clamped to 1.5 or masked to 0; row 1 (1.1) untouched
    w, _, _ = importance_ratio(old, engine, mask, "sequence_truncate", None, 1.5)
    assert w[0].tolist() == [1.5, 1.5, 1.5] and w[1, 0].item() == pytest.approx(1.1)
    w, _, out = importance_ratio(old, engine, mask, "sequence_mask", None, 1.5)
    assert w[0].tolist() == [0.0, 0.0, 0.0] and out[:, 0].tolist() == [True, False]


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize("name", NAMES)
def test_a_ratio_of_one_changes_nothing(name, mode):
    """Engine log-probs equal to the anchors: every objective's loss and gradient are those without correction."""
    b = make_batch(seed=31, std="group")
    plain = _loss_grad(name, _fresh(b), rollout_correction={"mode": "off"}, kl_coef=0.05)
    same = _loss_grad(name, _fresh(b, logp_engine=b.logp_old.clone()),
                      rollout_correction={"mode": mode, "clip_max": 1.0, "clip_min": 1.0}, kl_coef=0.05)
    torch.testing.assert_close(same[0], plain[0], rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(same[1], plain[1], rtol=1e-12, atol=1e-15)


def test_defaults_leave_the_batch_untouched():
    b = make_batch(seed=32)
    out, metrics, ent_mask = prepare(b, AlgorithmSpec())
    assert out is b and metrics == {} and ent_mask is None
    # the default correction (null) is sequence_mask once the batch has a separate engine's log-probs
    with_engine = replace(b, logp_engine=b.logp_old - 2.0)  # every sequence ratio exp(2 · len) > 3: all masked
    out, _, _ = prepare(with_engine, AlgorithmSpec())
    assert out.weights is not None and float(out.weights.abs().sum()) == 0.0


@pytest.mark.parametrize("name", SOFTMAX_NAMES)
def test_group_objectives_weight_each_completions_gradient_term(name):
    """apo/adpo: the divergence's value is unchanged and completion j's gradient is w_j times its own."""
    b = make_batch(seed=33)
    gen = torch.Generator().manual_seed(1)
    per_row = torch.rand(b.logp.shape[0], 1, generator=gen, dtype=F64) * 0.6 - 0.3  # sequence log-ratio per row
    n = b.mask.sum(dim=-1, keepdim=True)
    engine = b.logp_old - per_row / n * b.mask  # summed diff = per_row: sequence ratio exp(per_row) in [0.74, 1.35]
    loss0, g0 = _loss_grad(name, _fresh(b), rollout_correction={"mode": "off"})
    loss1, g1 = _loss_grad(name, _fresh(b, logp_engine=engine), rollout_correction={"mode": "sequence_truncate"})
    assert loss1.item() == loss0.item()
    torch.testing.assert_close(g1, g0 * per_row.exp(), rtol=1e-10, atol=1e-14)


def test_gspo_weights_each_sequence_term_by_its_token_mean():
    b = make_batch(seed=34, std="group")
    gen = torch.Generator().manual_seed(2)
    engine = b.logp_old + 0.2 * torch.randn(b.logp_old.shape, generator=gen, dtype=F64)
    spec_kw = dict(eps_low=0.5, eps_high=0.5, rollout_correction={"mode": "token_truncate", "clip_max": 1.1})
    w, _, _ = importance_ratio(b.logp_old, engine, b.mask, "token_truncate", None, 1.1)
    w_bar = (w * b.mask).sum(-1) / b.mask.sum(-1)
    _, g0 = _loss_grad("gspo", _fresh(b), eps_low=0.5, eps_high=0.5)
    _, g1 = _loss_grad("gspo", _fresh(b, logp_engine=engine), **spec_kw)
    torch.testing.assert_close(g1, g0 * w_bar[:, None], rtol=1e-10, atol=1e-14)


# --------------------------------------------------------------------------------------------------
# off-policy mask, truncated rows, entropy


def test_off_policy_mask_drops_negative_advantage_completions_that_drifted():
    # one group of 2, one token each: row 0 A = +1, row 1 A = −1; both drifted by log(pi_old / pi) = 0.5
    old = torch.tensor([[-1.0], [-1.0]], dtype=F64)
    b = LossBatch(logp=(old - 0.5).requires_grad_(True), logp_old=old, mask=torch.ones(2, 1, dtype=F64),
                  advantages=torch.tensor([1.0, -1.0], dtype=F64), group_ids=torch.tensor([0, 0]))
    ctx = make_ctx(b)
    spec = AlgorithmSpec(objective="grpo", off_policy_mask_threshold=0.4)
    loss, m = objective_loss(get_objective("grpo"), b, spec, ctx)
    (g,) = torch.autograd.grad(loss, b.logp)
    assert m["off_policy/masked_frac"] == 0.5
    assert g[1].item() == 0.0 and g[0].item() != 0.0  # the negative one (KL 0.5 > 0.4) left; the positive stays
    spec = AlgorithmSpec(objective="grpo", off_policy_mask_threshold=0.6)  # KL 0.5 <= 0.6: kept
    loss, m = objective_loss(get_objective("grpo"), _fresh(b), spec, ctx)
    assert m["off_policy/masked_frac"] == 0.0


@pytest.mark.parametrize("name", NAMES)
def test_a_truncated_row_contributes_no_gradient(name):
    b = make_batch(n_groups=3, g=4, seed=35, std="group")
    gen = torch.Generator().manual_seed(4)
    entropy = (2 * torch.rand(b.logp.shape, generator=gen, dtype=F64) * b.mask)
    truncated = torch.zeros(b.logp.shape[0], dtype=torch.bool)
    truncated[[1, 6]] = True
    x = b.logp.detach().clone().requires_grad_(True)
    ent = entropy + 1e-3 * x  # an entropy with a gradient, as with entropy_coef > 0
    batch = replace(b, logp=x, truncated=truncated, entropy=ent)
    spec = AlgorithmSpec(objective=name, mask_truncated=True, kl_coef=0.1, entropy_coef=0.05)
    loss, _ = objective_loss(get_objective(name), batch, spec, make_ctx(b))
    (g,) = torch.autograd.grad(loss, x)
    assert g[truncated].abs().max().item() == 0.0
    assert g[~truncated].abs().max().item() > 0.0
    spec_off = AlgorithmSpec(objective=name, kl_coef=0.1, entropy_coef=0.05)  # without it the row trains
    loss, _ = objective_loss(get_objective(name), replace(batch, entropy=entropy + 1e-3 * x), spec_off, make_ctx(b))
    (g,) = torch.autograd.grad(loss, x)
    assert g[truncated].abs().max().item() > 0.0


def test_top_entropy_quantile_trains_only_the_high_entropy_tokens():
    b = make_batch(n_groups=2, g=4, seed=36, std="group")
    gen = torch.Generator().manual_seed(5)
    entropy = torch.rand(b.logp.shape, generator=gen, dtype=F64) * b.mask
    real = b.mask != 0
    threshold = torch.quantile(entropy[real].float(), 0.7)  # top 30 %
    loss, g = _loss_grad("grpo", _fresh(b, entropy=entropy), top_entropy_quantile=0.3, eps_low=0.9, eps_high=9.0)
    high = (entropy >= threshold) & real
    signal = b.advantages[:, None].expand_as(high) != 0  # a group of equal rewards has no gradient anyway
    assert g[~high].abs().max().item() == 0.0 and (g[high & signal] != 0).all() and (high & signal).any()
    _, m = objective_loss(get_objective("grpo"), _fresh(b, entropy=entropy),
                          AlgorithmSpec(objective="grpo", top_entropy_quantile=0.3), make_ctx(b))
    assert m["entropy/trained_frac"] == pytest.approx(float(high.sum() / real.sum()))


def test_entropy_bonus_is_the_mean_token_entropy_and_adds_up_over_micro_batches():
    b = make_batch(n_groups=4, g=3, seed=37)
    gen = torch.Generator().manual_seed(6)
    entropy = 2 * torch.rand(b.logp.shape, generator=gen, dtype=F64) * b.mask
    ctx = make_ctx(b)
    loss0, _ = objective_loss(get_objective("apo"), _fresh(b), AlgorithmSpec(), ctx)
    loss1, m = objective_loss(get_objective("apo"), _fresh(b, entropy=entropy), AlgorithmSpec(entropy_coef=0.2), ctx)
    mean_entropy = float(entropy.sum() / b.mask.sum())
    assert m["entropy_bonus"] == pytest.approx(mean_entropy, rel=1e-12)
    assert (loss0 - loss1).item() == pytest.approx(0.2 * mean_entropy, rel=1e-10)
    total = 0.0
    for ids in (b.group_ids.unique()[:1], b.group_ids.unique()[1:]):  # micro-batches of 1 and 3 groups
        rows = torch.isin(b.group_ids, ids)
        part = LossBatch(b.logp.detach()[rows].requires_grad_(True), b.logp_old[rows], b.mask[rows],
                         b.advantages[rows], b.group_ids[rows], entropy=entropy[rows])
        total += objective_loss(get_objective("apo"), part, AlgorithmSpec(entropy_coef=0.2), ctx)[0].item()
    assert total == pytest.approx(loss1.item(), rel=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_micro_batch_losses_add_up_with_the_stabilizers_on(name):
    """Rollout correction, off-policy mask, truncated rows: still additive over micro-batches of whole groups."""
    b = make_batch(n_groups=6, g=3, t=8, seed=38, std="group")
    gen = torch.Generator().manual_seed(7)
    engine = b.logp_old + 0.3 * torch.randn(b.logp_old.shape, generator=gen, dtype=F64)
    truncated = torch.arange(b.logp.shape[0]) % 4 == 1
    full = replace(b, logp_engine=engine, truncated=truncated)
    tokens = float(b.mask[~truncated].sum())  # the loop leaves truncated rows' tokens out of the normaliser
    ctx = replace(make_ctx(b, max_new_tokens=10), total_tokens=tokens)
    spec = AlgorithmSpec(objective=name, kl_coef=0.1, mask_truncated=True, off_policy_mask_threshold=0.05,
                         rollout_correction={"mode": "token_mask", "clip_max": 1.3, "clip_min": 0.7})
    whole, _ = objective_loss(get_objective(name), full, spec, ctx)
    (g_whole,) = torch.autograd.grad(whole, b.logp)
    total, g_sum = torch.zeros((), dtype=F64), torch.zeros_like(b.logp)
    ids = b.group_ids.unique()
    for chunk in (ids[:2], ids[2:3], ids[3:]):
        rows = torch.isin(b.group_ids, chunk).nonzero().squeeze(1)
        logp = b.logp.detach()[rows].requires_grad_(True)
        part = LossBatch(logp, b.logp_old[rows], b.mask[rows], b.advantages[rows], b.group_ids[rows], b.logp_ref[rows],
                         logp_engine=engine[rows], truncated=truncated[rows])
        loss, _ = objective_loss(get_objective(name), part, spec, ctx)
        loss.backward()
        total, g_sum[rows] = total + loss.detach(), g_sum[rows] + logp.grad
    torch.testing.assert_close(total, whole.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_sum, g_whole, rtol=1e-10, atol=1e-14)


def test_kl_estimators_by_hand():
    # d = logp_ref − logp = [ln 2, −1]
    logp = torch.tensor([[-1.0, -1.0]], dtype=F64)
    b = LossBatch(logp, logp, torch.ones(1, 2, dtype=F64), torch.zeros(1, dtype=F64), torch.tensor([0]),
                  logp_ref=logp + torch.tensor([[math.log(2), -1.0]], dtype=F64))
    k1 = token_kl(b, F64, "k1")[0].tolist()
    k2 = token_kl(b, F64, "k2")[0].tolist()
    k3 = token_kl(b, F64, "k3")[0].tolist()
    assert k1 == pytest.approx([-math.log(2), 1.0])  # −d
    assert k2 == pytest.approx([math.log(2) ** 2 / 2, 0.5])  # d² / 2
    assert k3 == pytest.approx([2 - math.log(2) - 1, math.exp(-1) + 1 - 1])  # e^d − d − 1


# --------------------------------------------------------------------------------------------------
# the recipe: ranges, the rule in the message, unread fields


@pytest.mark.parametrize("algorithm, fragment", [
    ({"rollout_correction": {"clip_max": 0.5}}, "clip_max must be >= 1"),
    ({"rollout_correction": {"clip_min": 1.5}}, "clip_min must lie in [0, 1]"),
    ({"rollout_correction": {"mode": "token_mask", "clip_max": None}}, "needs clip_max or clip_min"),
    ({"rollout_correction": {"mode": "sometimes"}}, "rollout_correction.mode"),
    ({"off_policy_mask_threshold": -0.1}, "off_policy_mask_threshold"),
    ({"top_entropy_quantile": 1.5}, "top_entropy_quantile"),
    ({"entropy_coef": -0.1}, "entropy_coef"),
    ({"kl_estimator": "k4"}, "kl_estimator"),
    ({"objective": "sapo", "sapo_temperature_pos": 0}, "sapo_temperature_pos"),
    ({"kl_estimator": "k2"}, "algorithm.kl_estimator is set but kl_coef is 0"),
    ({"rollout_correction": {"mode": "off", "clip_max": 2.0}},
     "algorithm.rollout_correction.clip_max is set but rollout_correction.mode is off"),
    ({"objective": "grpo", "sapo_temperature_neg": 2.0},
     "algorithm.sapo_temperature_neg is set but objective 'grpo' does not use it"),
    ({"objective": "cispo", "eps_low": 0.1}, "algorithm.eps_low is set but objective 'cispo' does not use it"),
])
def test_bad_stabilizer_fields_are_one_line_errors(tmp_path, algorithm, fragment):
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(tiny_recipe(tmp_path, algorithm=algorithm))
    problems = e.value.problems
    assert len(problems) == 1 and "\n" not in problems[0] and fragment in problems[0], problems


def test_good_stabilizer_fields_validate(tmp_path):
    r = recipe_from_dict(tiny_recipe(tmp_path, algorithm={
        "objective": "sapo", "sapo_temperature_pos": 0.5, "kl_coef": 0.1, "kl_estimator": "k2",
        "rollout_correction": {"mode": "token_truncate", "clip_min": 0.5}, "off_policy_mask_threshold": 0.5,
        "mask_truncated": True, "entropy_coef": 0.01, "top_entropy_quantile": 0.2}))
    assert r.algorithm.rollout_correction.clip_max == 3.0
    assert recipe_from_dict(tiny_recipe(tmp_path)).algorithm.rollout_correction.mode is None  # resolved per backend


# --------------------------------------------------------------------------------------------------
# the loop on a real mismatch: engine log-probs from a perturbed copy of the policy

MODULE = "perturbed_engine_mod"
SOURCE = """
    import copy

    import torch

    from apo_cli.batching import completion_logprobs, pack
    from backends.cpu import CPUBackend
    from backends.options import BackendOptions


    class PerturbedOptions(BackendOptions):
        sigma: float = 0.0  # std of the noise added to every weight of the engine's copy


    class PerturbedBackend(CPUBackend):
        '''Samples with the policy, but reports the log-probs of a perturbed copy of it, as a separate
        engine (another dtype, other kernels, stale weights) would.'''

        name = "perturbed"
        options = PerturbedOptions

        def setup(self, model, tokenizer):
            model = super().setup(model, tokenizer)
            self.shadow = copy.deepcopy(model)
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in self.shadow.parameters():
                    p.add_(self.spec.sigma * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            return model

        def generate(self, prompts, params, *, streamer=None):
            groups = super().generate(prompts, params, streamer=streamer)
            flat = [(p, c) for p, group in zip(prompts, groups) for c in group]
            packed = pack([p for p, _ in flat], [c.ids for _, c in flat], self.tokenizer.pad_token_id)
            with torch.no_grad():
                logp, _ = completion_logprobs(self.shadow, packed)
            for k, (_, c) in enumerate(flat):
                c.logprobs = logp[k, : len(c.ids)].tolist()
            return groups
"""


@pytest.fixture
def perturbed(tmp_path, monkeypatch):
    install_plugin(monkeypatch, tmp_path / "site", {MODULE: SOURCE},
                   {"apo.backends": {"perturbed": f"{MODULE}:PerturbedBackend"}}, dist="perturbedpkg")
    yield
    uninstall_plugin([MODULE])


def _first_step(tmp_path, name, **algorithm) -> dict:
    from apo_cli.train import train_from_recipe

    d = tiny_recipe(tmp_path, name=name, run={"max_steps": 1}, checkpoint={"every": 1, "keep_last": 1},
                    backend=algorithm.pop("backend"), algorithm=algorithm)
    train_from_recipe(recipe_from_dict(d))
    return json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])


def test_a_bigger_perturbation_moves_the_ratios_and_masks_more(perturbed, tmp_path):
    rc = {"mode": "token_mask", "clip_max": 1.2, "clip_min": 0.8}
    rows = {s: _first_step(tmp_path, f"s{i}", backend={"kind": "perturbed", "sigma": s}, rollout_correction=rc)
            for i, s in enumerate([0.0, 0.02, 0.1])}
    ratio_max = [rows[s]["sampling/importance_ratio_max"] for s in sorted(rows)]
    masked = [rows[s]["sampling/importance_masked_frac"] for s in sorted(rows)]
    spread = [rows[s]["sampling/logprob_diff_mean"] for s in sorted(rows)]
    assert ratio_max[0] == pytest.approx(1.0, abs=1e-4) and masked[0] == 0.0  # no perturbation: ratio 1
    assert ratio_max[0] < ratio_max[1] < ratio_max[2], ratio_max
    assert masked[0] < masked[1] < masked[2], masked
    assert spread[0] < spread[1] < spread[2], spread
    assert all(math.isfinite(rows[s]["loss"]) for s in rows)
    print({s: (rows[s]["sampling/importance_ratio_mean"], ratio_max[i], masked[i])
           for i, s in enumerate(sorted(rows))}, file=sys.stderr)


def test_the_cpu_default_is_off_and_an_explicit_mode_applies(tmp_path):
    row = _first_step(tmp_path, "cpu_default", backend={"kind": "cpu"})
    assert "sampling/logprob_diff_mean" in row and not any(k.startswith("sampling/importance") for k in row)
    row = _first_step(tmp_path, "cpu_on", backend={"kind": "cpu"}, rollout_correction={"mode": "sequence_mask"},
                      entropy_coef=0.01, top_entropy_quantile=0.5, off_policy_mask_threshold=0.1)
    assert row["sampling/importance_masked_frac"] == 0.0  # the CPU engine is the policy: ratio 1 up to rounding
    assert row["sampling/importance_ratio_max"] == pytest.approx(1.0, abs=1e-4)
    assert 0 < row["entropy/trained_frac"] < 1 and row["entropy_bonus"] > 0 and row["grad_norm"] > 0
    assert row["off_policy/masked_frac"] == 0.0  # on-policy: no drift since sampling


def test_mask_truncated_in_the_loop_trains_nothing_when_every_completion_is_cut(tmp_path):
    # the tiny random model never stops within 8 tokens: every completion is truncated
    row = _first_step(tmp_path, "trunc", backend={"kind": "cpu"}, mask_truncated=True, kl_coef=0.1)
    assert row["completions/clipped_ratio"] == 1.0  # still counted in the metrics
    assert row["grad_norm"] == 0.0 and row["kl"] == 0.0
    row = _first_step(tmp_path, "no_trunc", backend={"kind": "cpu"}, kl_coef=0.1)
    assert row["completions/clipped_ratio"] == 1.0 and row["grad_norm"] > 0


def test_mask_truncated_leaves_the_truncated_tokens_out_of_the_token_normaliser(tmp_path):
    from types import SimpleNamespace

    from apo_cli.runtime.world import World
    from apo_cli.train.loss_inputs import loss_context

    ro = SimpleNamespace(completion_ids=[[1] * 3, [1] * 8, [1] * 5, [1] * 8], finish=["stop", "length", "stop", "length"])
    for drop, tokens in [(False, 24.0), (True, 8.0)]:
        recipe = recipe_from_dict(tiny_recipe(tmp_path, algorithm={"mask_truncated": drop}))
        trainer = SimpleNamespace(recipe=recipe, world=World(), G=4)
        ctx = loss_context(trainer, ro, [0, 1, 2, 3], 1.0, 0.5)
        assert (ctx.total_tokens, ctx.total_seqs, ctx.total_groups) == (tokens, 4, 1)
