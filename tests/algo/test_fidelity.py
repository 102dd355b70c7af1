"""Issue 15: the reference rule as the author's code runs it, no silently unread sub-fields, the
schedule end points, dropout and the anchor, the advantage epsilon, the z-loss centre, the paper
recipes, and the small ones (the gate in the schedule state, whole groups by id, the KL clamps, names)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from apo_cli.algo import (
    ALPHA_SCHEDULES,
    Signals,
    compute_advantages,
    group_order,
    loss_batch_signals,
    make_alpha_schedule,
)
from apo_cli.errors import RecipeError
from apo_cli.recipe import AlgorithmSpec, AlphaScheduleSpec, load_recipe, recipe_from_dict
from tests.helpers import tiny_recipe

from .conftest import make_batch, make_ctx, run_loss

ROOT = Path(__file__).resolve().parents[2]


def _sig(step=0, r=0.5, c=0.5) -> Signals:
    return Signals(step=step, reward=0.5, reward_signal=r, confidence=c, entropy_proxy=1 - c, calibration=0.5)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


# --------------------------------------------------------------------------------------------------
# 1. the reference rule's signal over the loss batch, alpha at every loss call


def test_loss_batch_signals_by_hand():
    ids = torch.tensor([0, 0, 1, 1])
    adv = torch.tensor([0.5, -0.5, 0.25, -0.25], dtype=torch.float64)
    # min/max over the whole loss batch (-0.5, 0.5), not per group: (A + .5) / 1 = [1, 0, .75, .25] -> 0.5
    now = torch.tensor([-1.0, -2.0, -1.0, -2.0], dtype=torch.float64) * math.log(16) / 4  # h = 1/4, 1/2
    old = torch.full((4,), -math.log(16) / 8, dtype=torch.float64)  # h = 1/8
    s = loss_batch_signals(3, torch.tensor([1.0, 0, 1, 0]), adv, ids, now, old, vocab_size=16)
    assert s.reward_signal == pytest.approx(0.5)
    assert s.confidence == pytest.approx(1 - 0.375)  # from the current policy's log-probs
    assert s.entropy_proxy == pytest.approx(0.125)  # from the rollout policy's (tau's a·h term)
    # per group the same rows give (1 + 0) / 2 and (1 + 0) / 2 = 0.5 too; one more row shows the difference
    ids3 = torch.tensor([0, 0, 0, 1, 1, 1])
    adv3 = torch.tensor([2 / 3, -1 / 3, -1 / 3, 1 / 3, 1 / 3, -2 / 3], dtype=torch.float64)
    s3 = loss_batch_signals(0, torch.zeros(6), adv3, ids3, torch.zeros(6), torch.zeros(6), 16)
    lo, hi = -2 / 3, 2 / 3
    assert s3.reward_signal == pytest.approx(float(((adv3 - lo) / (hi - lo)).mean()))  # 0.5, per group: (1/3 + 2/3)/2


def test_micro_batch_granularity_recomputes_alpha_and_tau_at_every_loss_call(tmp_path):
    """The reference: alpha and tau from the loss batch's rows, with the current policy's log-probs."""
    d = tiny_recipe(tmp_path, "mb", run={"max_steps": 2}, rollout={"group_size": 4, "prompts_per_step": 4},
                    optim={"micro_batch_size": 8},  # 2 groups per loss call, 2 loss calls per step
                    algorithm={"alpha": {"kind": "reward_confidence", "granularity": "micro_batch"},
                               "adaptive_tau": {"enabled": True}})
    from apo_cli.train import Trainer

    t = Trainer(recipe_from_dict(d))
    seen = []
    fn = t.objective.fn

    def spy(batch, spec, ctx):
        seen.append((batch.advantages.detach().double(), batch.logp.detach().double(), batch.logp_old.double(),
                     batch.mask.double(), batch.group_size, ctx.alpha, ctx.tau))
        return fn(batch, spec, ctx)

    t.objective = dataclasses.replace(t.objective, fn=spy)
    t.train()
    assert len(seen) == 4
    log_v = math.log(t.model.config.vocab_size)
    for adv, logp, old, mask, g, alpha, tau in seen:
        assert g == 4  # the loop tells the loss the rollout's G
        r = float(((adv - adv.min()) / (adv.max() - adv.min()).clamp(min=1e-6)).mean())
        n_tok = mask.sum(-1).clamp(min=1)
        c = 1 - float((-(logp * mask).sum(-1) / n_tok / log_v).clamp(0, 1).mean())
        h_old = float((-(old * mask).sum(-1) / n_tok / log_v).clamp(0, 1).mean())
        assert alpha == pytest.approx(0.9 - 0.55 * c * max(2 * r - 1, 0.0), abs=1e-9)
        assert tau == pytest.approx(min(max(0.5 * (1 + 0.2 * h_old + 0.5 * c * (1 - 2 * r)), 0.2), 1.5), abs=1e-9)
    rows = _metrics(tmp_path / "mb")
    assert [row["alpha/loss_batches"] for row in rows] == [2.0, 2.0]
    for row, pair in zip(rows, (seen[:2], seen[2:])):  # what was used is logged
        assert row["alpha"] == pytest.approx(sum(p[5] for p in pair) / 2)
        assert row["tau"] == pytest.approx(sum(p[6] for p in pair) / 2)
        assert (row["alpha/min"], row["alpha/max"]) == (min(p[5] for p in pair), max(p[5] for p in pair))


def test_step_granularity_is_the_default_and_computes_alpha_once_per_step(tmp_path):
    d = tiny_recipe(tmp_path, "st", run={"max_steps": 1}, optim={"micro_batch_size": 4},
                    algorithm={"alpha": {"kind": "reward_confidence"}})
    from apo_cli.train import Trainer

    t = Trainer(recipe_from_dict(d))
    alphas = []
    fn = t.objective.fn
    t.objective = dataclasses.replace(t.objective, fn=lambda b, s, c: (alphas.append(c.alpha), fn(b, s, c))[1])
    t.train()
    assert len(alphas) == 4 and len(set(alphas)) == 1
    assert "alpha/loss_batches" not in _metrics(tmp_path / "st")[0]


# --------------------------------------------------------------------------------------------------
# 2. no silently unread sub-field

_ALTERNATIVE = {"alpha_max": 0.8, "alpha_min": 0.5, "value": 0.5, "steps": 5, "ema": 0.5, "window": 4,
                "min_improvement": 0.1, "confidence_threshold": 0.9, "max_rate": 0.01, "smoothing": 0.9,
                "hysteresis": 0.0, "granularity": "micro_batch"}


def _dead_alpha_cases():
    from apo_cli.algo.spec import schedule_params

    return [(kind, f) for kind in ALPHA_SCHEDULES.builtins()
            for f in sorted(set(AlphaScheduleSpec.model_fields) - {"kind"} - schedule_params(kind))]


def test_the_dead_alpha_cases_are_the_forty_of_the_issue():
    assert set(_ALTERNATIVE) == set(AlphaScheduleSpec.model_fields) - {"kind"}
    assert len(_dead_alpha_cases()) == 40


@pytest.mark.parametrize("kind, field", _dead_alpha_cases(), ids=[f"{k}-{f}" for k, f in _dead_alpha_cases()])
def test_alpha_field_the_kind_never_reads_is_an_error(tmp_path, kind, field):
    d = tiny_recipe(tmp_path, algorithm={"alpha": {"kind": kind, field: _ALTERNATIVE[field]}})
    with pytest.raises(RecipeError, match=rf"algorithm\.alpha\.{field} is set but alpha kind '{kind}' does not use it"):
        recipe_from_dict(d)
    # restating the default is harmless (a dumped resolved recipe holds every field)
    default = AlphaScheduleSpec.model_fields[field].get_default()
    recipe_from_dict(tiny_recipe(tmp_path, algorithm={"alpha": {"kind": kind, field: default}}))


@pytest.mark.parametrize("field, value", [("a", 0.6), ("b", 0.1), ("tau_min", 0.3), ("tau_max", 1.0)])
def test_adaptive_tau_fields_need_it_enabled(tmp_path, field, value):
    with pytest.raises(RecipeError, match=rf"algorithm\.adaptive_tau\.{field} is set but adaptive_tau\.enabled is false"):
        recipe_from_dict(tiny_recipe(tmp_path, algorithm={"adaptive_tau": {field: value}}))
    recipe_from_dict(tiny_recipe(tmp_path, algorithm={"adaptive_tau": {"enabled": True, field: value}}))


def test_fields_that_need_another_setting_are_errors(tmp_path):
    with pytest.raises(RecipeError, match=r"algorithm\.advantage_eps is set but advantage_std is 'none'"):
        recipe_from_dict(tiny_recipe(tmp_path, algorithm={"advantage_eps": 1e-4}))  # apo: centred only
    recipe_from_dict(tiny_recipe(tmp_path, algorithm={"objective": "grpo", "advantage_eps": 1e-4}))
    recipe_from_dict(tiny_recipe(tmp_path, algorithm={"advantage_std": "group", "advantage_eps": 1e-4}))
    with pytest.raises(RecipeError, match=r"algorithm\.z_loss_form is set but z_loss_coef is 0"):
        recipe_from_dict(tiny_recipe(tmp_path, algorithm={"z_loss_form": "reference"}))
    recipe_from_dict(tiny_recipe(tmp_path, algorithm={"z_loss_form": "reference", "z_loss_coef": 0.01}))


def test_switching_the_alpha_kind_by_override_warns(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("model: {name_or_path: x}\nalgorithm:\n  alpha:\n    kind: guarded\n    ema: 0.5\n")
    r = load_recipe(path, ["algorithm.alpha.kind=reward_confidence"])
    assert r.algorithm.alpha.kind == "reward_confidence"
    err = capsys.readouterr().err
    assert "warning:" in err and "algorithm.alpha.ema is ignored: alpha kind 'reward_confidence'" in err
    assert "line 5" in err and "algorithm.alpha.kind switched by an override" in err
    path.write_text("model: {name_or_path: x}\nalgorithm:\n  alpha:\n    kind: reward_confidence\n    ema: 0.5\n")
    with pytest.raises(RecipeError, match="line 5.*algorithm.alpha.ema is set but alpha kind 'reward_confidence'"):
        load_recipe(path)


def test_a_third_party_kind_without_declared_params_is_not_checked(tmp_path):
    from apo_cli.algo.spec import schedule_params, unused_param_problems

    ALPHA_SCHEDULES.add("undeclared_kind", lambda spec, max_steps: make_alpha_schedule(spec.model_copy(
        update={"kind": "constant"}), max_steps))
    try:
        assert schedule_params("undeclared_kind") is None
        a = AlgorithmSpec(alpha=AlphaScheduleSpec(kind="undeclared_kind", ema=0.5))
        assert unused_param_problems(a) == []
    finally:
        ALPHA_SCHEDULES._entries.pop("undeclared_kind", None)
        ALPHA_SCHEDULES._loaded.pop("undeclared_kind", None)


# --------------------------------------------------------------------------------------------------
# 3. linear and cosine reach alpha_min on the last training step


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [1, 2, 4, 100])
def test_annealed_alpha_ends_exactly_at_alpha_min(kind, steps):
    sched = make_alpha_schedule(AlphaScheduleSpec(kind=kind), steps)  # length = run.max_steps
    alphas = [sched.step(_sig(step=i)) for i in range(steps)]  # the loop passes step - 1: 0 .. steps-1
    assert alphas[-1] == 0.35
    if steps > 1:
        assert alphas[0] == 0.9
    assert all(a >= b for a, b in zip(alphas, alphas[1:]))
    assert sched.step(_sig(step=steps + 5)) == 0.35  # past the end it stays there


def test_linear_alpha_of_a_run_ends_at_alpha_min(tmp_path):
    from apo_cli.train import train_from_recipe

    train_from_recipe(recipe_from_dict(tiny_recipe(tmp_path, "lin", algorithm={"alpha": {"kind": "linear"}})))
    alphas = [row["alpha"] for row in _metrics(tmp_path / "lin")]
    assert alphas == pytest.approx([0.9, 0.9 - 0.55 / 3, 0.9 - 1.1 / 3, 0.35]) and alphas[-1] == 0.35


# --------------------------------------------------------------------------------------------------
# 4. dropout and the anchor


@pytest.mark.parametrize("disable", [True, False])
def test_anchor_equals_the_policy_logprob_at_the_rollout_weights_with_dropout(tmp_path, disable):
    from apo_cli.train import Trainer
    from apo_cli.train.policy import Anchors

    d = tiny_recipe(tmp_path, "drop", run={"max_steps": 1},
                    model={"lora": {"r": 4, "alpha": 8, "dropout": 0.1}}, algorithm={"disable_dropout": disable})
    t = Trainer(recipe_from_dict(d))
    with torch.no_grad():  # LoRA starts with B = 0, where dropout on its input changes nothing: move it
        for name, p in t.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    assert t.model.training  # the policy trains in train mode (gradient checkpointing needs it)
    t.state.step = 1
    ro, _, _ = t.rollout()
    n = len(ro.rewards)
    anchors = Anchors(t.policy, t.world, ro.prompt_ids, ro.completion_ids, n)
    anchors.compute(list(range(n)))  # the no-grad anchor pass
    logp, _, _ = t.policy.logprobs(ro.prompt_ids, ro.completion_ids)  # the trained pass, same weights
    diff = max(float((logp[i, : len(ro.completion_ids[i])].detach() - anchors[i]).abs().max()) for i in range(n))
    if disable:
        assert diff < 1e-6  # u = 0 at the rollout weights
    else:
        assert diff > 1e-3  # kept on purpose: two passes at the same weights differ


def test_disable_dropout_zeroes_modules_and_functional_rates():
    from apo_cli.train.policy import disable_dropout

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention_dropout = 0.1
            self.drop = torch.nn.Dropout(0.2)

    m = torch.nn.Sequential(Attn(), torch.nn.Dropout(0.3))
    m.config = type("C", (), {"attention_dropout": 0.1, "hidden_dropout": 0.2})()
    assert disable_dropout(m) == 3
    assert m[0].attention_dropout == 0.0 and m[0].drop.p == 0.0 and m[1].p == 0.0
    assert m.config.attention_dropout == 0.0 and m.config.hidden_dropout == 0.0


# --------------------------------------------------------------------------------------------------
# 5. the advantage epsilon


def test_advantage_eps_of_a_near_tied_group():
    rewards = torch.tensor([0.0, 0.0, 0.0, 1e-5, 1e-5, 1e-5])
    ids = torch.zeros(6, dtype=torch.long)
    std = float(rewards.double().std())
    verl, _ = compute_advantages(rewards, ids, "group")  # default 1e-6 (verl)
    trl, _ = compute_advantages(rewards, ids, "group", 1e-4)  # TRL's
    assert float(verl.max()) == pytest.approx(5e-6 / (std + 1e-6), rel=1e-3)  # 0.77
    assert float(trl.max()) == pytest.approx(5e-6 / (std + 1e-4), rel=1e-3)  # 0.047
    assert float(verl.max()) > 0.7 and float(trl.max()) < 0.05


def test_the_recipes_advantage_eps_reaches_the_advantages(tmp_path, monkeypatch):
    import apo_cli.train.loop as loop
    from apo_cli.train import Trainer

    seen = []
    real = loop.compute_advantages
    monkeypatch.setattr(loop, "compute_advantages", lambda *a: (seen.append(a[3]), real(*a))[1])
    t = Trainer(recipe_from_dict(tiny_recipe(tmp_path, algorithm={"objective": "grpo", "advantage_eps": 1e-4})))
    t.state.step = 1
    t.rollout()
    assert seen == [1e-4]


def test_vs_trl_gives_apo_trls_epsilon():
    spec = importlib.util.spec_from_file_location("vs_trl_mod", ROOT / "benchmarks" / "vs_trl.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = type("A", (), {"model": "tiny-random", "steps": 1, "seed": 0, "group": 4, "prompts": 2, "max_new_tokens": 4,
                          "lr": 1e-5, "micro": 8, "threads": 1, "dtype": "float32"})()
    algo = mod.apo_recipe(args, Path("/tmp/x"))["algorithm"]
    assert mod.TRL_ADVANTAGE_EPS == 1e-4 and algo["advantage_eps"] == 1e-4 and algo["advantage_std"] == "group"
    assert "disable_dropout=True" in (ROOT / "benchmarks" / "vs_trl.py").read_text()


# --------------------------------------------------------------------------------------------------
# 6. the z-loss centre


def _on_policy_z(form: str, shift: float = 0.0, g: int = 6, tau: float = 0.5, z: float = 0.01):
    b = make_batch(n_groups=2, g=g, t=5, on_policy=True)
    b = dataclasses.replace(b, advantages=torch.zeros_like(b.advantages),  # q uniform: D has no gradient at u = 0
                            logp=(b.logp_old + shift).requires_grad_(True))
    loss, _ = run_loss("apo", b, make_ctx(b, tau=tau), z_loss_coef=z, z_loss_form=form)
    loss.backward()
    lengths = b.mask.sum(-1)
    per_row = b.logp.grad[:, 0] * lengths  # d loss / d (mean sequence log-prob), each row
    return float(loss.detach()), per_row


def test_reference_z_loss_pushes_every_sampled_completion_down_at_the_on_policy_point():
    g, tau, z = 6, 0.5, 0.01
    loss, per_row = _on_policy_z("reference", g=g, tau=tau, z=z)
    assert loss == pytest.approx(z * math.log(g) ** 2)
    # d/d seq_j = 2 z lse(u) p_j / tau / n_groups = 2 z log G / (G tau) / 2: positive, so descent lowers logp
    assert per_row.tolist() == pytest.approx([2 * z * math.log(g) / (g * tau) / 2] * (2 * g))


def test_centred_z_loss_is_zero_and_flat_at_u_zero_and_pulls_drift_back():
    assert AlgorithmSpec().z_loss_form == "centred"  # the default, from benchmarks/quality.py (docs/method.md)
    loss, per_row = _on_policy_z("centred")
    assert loss == pytest.approx(0.0, abs=1e-15)
    assert per_row.abs().max() < 1e-12
    g, tau, z, shift = 6, 0.5, 0.01, 0.1  # the whole group drifted up by 0.1 nats/token: u = 0.2 for all
    _, per_row = _on_policy_z("centred", shift=shift, g=g, tau=tau, z=z)
    assert per_row.tolist() == pytest.approx([2 * z * (shift / tau) / (g * tau) / 2] * (2 * g))


# --------------------------------------------------------------------------------------------------
# 7. the paper recipes as the author ran them


def _recipe(name: str):
    return load_recipe(ROOT / "recipes" / f"qwen3-1.7b-math-level3-{name}.yaml")


def test_paper_recipes_are_the_authors_run():
    apo, grpo, gspo = _recipe("apo"), _recipe("grpo"), _recipe("gspo")
    for r in (apo, grpo, gspo):
        assert r.optim.lr == 1e-6 and r.run.max_steps is None and r.run.epochs == 2
        assert r.data.source == "DigitalLearningGmbH/MATH-lighteval" and r.data.filters == {"level": "Level 3"}
    assert (apo.rollout.group_size, apo.rollout.prompts_per_step) == (6, 48)
    assert (apo.algorithm.alpha.kind, apo.algorithm.alpha.granularity) == ("reward_confidence", "micro_batch")
    assert apo.algorithm.adaptive_tau.enabled and apo.algorithm.z_loss_coef == 0.01
    assert apo.algorithm.z_loss_form == "reference"  # the author's form; apo's default is centred
    assert (gspo.rollout.group_size, gspo.rollout.prompts_per_step) == (6, 48)
    assert (gspo.algorithm.eps_low, gspo.algorithm.eps_high) == (0.2, 0.28)
    assert (grpo.rollout.group_size, grpo.rollout.prompts_per_step) == (8, 128)
    assert (grpo.algorithm.eps_low, grpo.algorithm.eps_high) == (0.2, 0.2)
    assert math.ceil(2 * 1600 / 48) in range(65, 72)  # "≈ 70 steps at 48 prompts" over ~1.6k problems


@pytest.mark.parametrize("name", ["apo", "grpo", "gspo"])
def test_paper_recipe_headers_name_their_sources(name):
    text = (ROOT / "recipes" / f"qwen3-1.7b-math-level3-{name}.yaml").read_text()
    header = text.split("\nrun:")[0]
    assert "[script]" in header and "[paper]" in header and "wzx111/MATH-lighteval-level-middlehigh" in header
    if name == "gspo":
        assert "3e-4 / 4e-4" in header and "GSPO paper" in text.split("eps_high")[0]


# --------------------------------------------------------------------------------------------------
# 8. the small ones


def test_reward_confidence_gate_is_in_the_schedule_state():
    spec = AlphaScheduleSpec(kind="reward_confidence")
    before = make_alpha_schedule(spec, 10)
    before.step(_sig(r=0.9, c=0.8))
    assert before.metrics()["alpha/gate"] == pytest.approx(0.8 * 0.8)
    after = make_alpha_schedule(spec, 10)
    after.load_state_dict(json.loads(json.dumps(before.state_dict())))  # a resume
    assert after.metrics() == before.metrics()


def test_groups_are_checked_by_id_against_the_known_group_size():
    ids = torch.tensor([4, 4, 4, 9, 9, 9])  # two groups of 6, each cut to 3 rows
    assert group_order(ids)[1] == 3  # inferring G cannot tell
    with pytest.raises(ValueError, match=r"G = 6 rows per group, but group 4: 3 rows, group 9: 3 rows"):
        group_order(ids, 6)
    b = make_batch(n_groups=2, g=6, shuffle=False)
    half = [0, 1, 2, 6, 7, 8]
    cut = dataclasses.replace(b, logp=b.logp[half], logp_old=b.logp_old[half], mask=b.mask[half],
                              advantages=b.advantages[half], group_ids=b.group_ids[half], logp_ref=None,
                              group_size=6)
    with pytest.raises(ValueError, match="groups must be whole"):
        run_loss("apo", cut, make_ctx(cut))


def test_the_kl_clamps_are_documented_in_the_recipe_reference():
    from apo_cli.algo.objectives import _KL_CLAMP, _LOG_RATIO_CLAMP

    desc = AlgorithmSpec.model_fields["kl_coef"].description
    assert f"±{_LOG_RATIO_CLAMP:g}" in desc and f"clamped at {_KL_CLAMP:g}" in desc and "verl" in desc
    assert "TRL clamps neither" in desc
    assert desc in (ROOT / "docs" / "recipe.md").read_text()


def test_readme_says_which_apo_this_is_and_links_the_method_decisions():
    readme = (ROOT / "README.md").read_text()
    top = " ".join(" ".join(readme.splitlines()[:12]).split())
    assert "apo_zero" in top and "Anchored Preference Optimization" in top
    objectives = readme.split("## The objectives")[1].split("\n## ")[0]
    assert "docs/method.md" in objectives
    method = (ROOT / "docs" / "method.md").read_text()
    for topic in ("granularity", "advantage_eps", "z_loss_form", "disable_dropout", "alpha_min"):
        assert topic in method, topic
