"""Objectives by hand (arithmetic in comments) and against independent loop implementations."""

from __future__ import annotations

import math

import pytest
import torch

from apo_cli.algo import LossBatch, LossContext, alpha_divergence, get_objective
from apo_cli.recipe import AlgorithmSpec

from .conftest import make_batch, make_ctx, run_loss

LN3 = math.log(3.0)
F64 = torch.float64


def _two_member_group(**over) -> LossBatch:
    """One group, G = 2, one token each.

    logp_old = [-1, -1]; logp = [-1 - ln3/2, -1 + ln3/2]  -> with tau = 1, u = [-ln3/2, +ln3/2]
    -> p = softmax(u) = [1, 3] / 4.   advantages = [+1/2, -1/2] with beta_r = 1/ln 3
    -> A / beta_r = [+ln3/2, -ln3/2] -> q = [3, 1] / 4.
    """
    kw = dict(
        logp=torch.tensor([[-1 - LN3 / 2], [-1 + LN3 / 2]], dtype=F64, requires_grad=True),
        logp_old=torch.tensor([[-1.0], [-1.0]], dtype=F64),
        mask=torch.ones(2, 1, dtype=F64),
        advantages=torch.tensor([0.5, -0.5], dtype=F64),
        group_ids=torch.tensor([0, 0]),
        logp_ref=torch.tensor([[-1.0], [-1.0]], dtype=F64),
    )
    kw.update(over)
    return LossBatch(**kw)


def _ctx(alpha=0.5, tau=1.0, groups=1, seqs=2, tokens=2.0, max_new=1) -> LossContext:
    return LossContext(alpha=alpha, tau=tau, total_groups=groups, total_seqs=seqs, total_tokens=tokens,
                       max_new_tokens=max_new)


APO_KW = dict(beta_r=1 / LN3, logprob_reduction="sum")


def test_apo_by_hand_alpha_half():
    b = _two_member_group()
    loss, m = run_loss("apo", b, _ctx(alpha=0.5), **APO_KW)
    # S = sum sqrt(q p) = sqrt(3/16) + sqrt(3/16) = sqrt(3)/2;  D = (1 - S) / (1/2 * 1/2) = 4 - 2 sqrt(3)
    assert loss.item() == pytest.approx(4 - 2 * math.sqrt(3), rel=1e-13)  # 0.5358983848622454
    assert m["apo/W"] == pytest.approx(math.sqrt(3) / 2, rel=1e-13)
    assert m["alpha"] == 0.5 and m["tau"] == 1.0
    assert m["apo/u_abs_mean"] == pytest.approx(LN3 / 2, rel=1e-13)
    loss.backward()
    # w = sqrt(q p) = [sqrt3/4, sqrt3/4], W p = sqrt3/2 * [1/4, 3/4] = [sqrt3/8, 3 sqrt3/8]
    # dD/du = -(w - W p) / alpha = -[sqrt3/8, -sqrt3/8] / (1/2) = [-sqrt3/4, +sqrt3/4];  du/dlogp = 1/tau = 1
    want = torch.tensor([[-math.sqrt(3) / 4], [math.sqrt(3) / 4]], dtype=F64)
    torch.testing.assert_close(b.logp.grad, want, rtol=1e-12, atol=1e-14)
    # weights -dD/du = [+0.4330, -0.4330]: population std 0.4330
    assert m["apo/weight_std"] == pytest.approx(math.sqrt(3) / 4, rel=1e-12)


def test_apo_by_hand_other_alphas_and_adpo():
    # alpha = 0.9: S = (3/4)^0.9 (1/4)^0.1 + (1/4)^0.9 (3/4)^0.1 = 0.6268... + 0.2999... ; D = (1 - S) / 0.09
    s = 0.75**0.9 * 0.25**0.1 + 0.25**0.9 * 0.75**0.1
    loss, _ = run_loss("apo", _two_member_group(), _ctx(alpha=0.9), **APO_KW)
    assert loss.item() == pytest.approx((1 - s) / 0.09, rel=1e-12)
    # alpha = 0: KL(p || q) = 1/4 ln(1/3) + 3/4 ln 3 = ln3 / 2 = 0.5493061443340549
    loss, _ = run_loss("apo", _two_member_group(), _ctx(alpha=0.0), **APO_KW)
    assert loss.item() == pytest.approx(LN3 / 2, rel=1e-13)
    # adpo ignores ctx.alpha: KL(q || p) = 3/4 ln 3 + 1/4 ln(1/3) = ln3 / 2
    b = _two_member_group()
    loss, m = run_loss("adpo", b, _ctx(alpha=0.123), **APO_KW)
    assert loss.item() == pytest.approx(LN3 / 2, rel=1e-13) and m["alpha"] == 1.0
    loss.backward()
    # anchored cross-entropy gradient: (p - q) / tau = [1/4 - 3/4, 3/4 - 1/4] = [-1/2, +1/2]
    torch.testing.assert_close(b.logp.grad, torch.tensor([[-0.5], [0.5]], dtype=F64))


def test_apo_tau_mean_reduction_and_group_normaliser():
    """Two tokens per sequence with mean reduction, tau = 2, and the group counted among 4 in the mini-batch."""
    b = _two_member_group(
        # each token moves by the same amount as before, so the token mean moves by ±ln3/2 ... times 2
        logp=torch.tensor([[-1 - LN3, -1 - LN3], [-1 + LN3, -1 + LN3]], dtype=F64, requires_grad=True),
        logp_old=torch.full((2, 2), -1.0, dtype=F64),
        mask=torch.ones(2, 2, dtype=F64),
        logp_ref=None,
    )
    # delta = mean_t(logp - logp_old) = [-ln3, +ln3]; u = delta / tau = [-ln3/2, +ln3/2]: same p as before
    loss, _ = run_loss("apo", b, _ctx(alpha=0.5, tau=2.0, groups=4, tokens=4.0), beta_r=1 / LN3)
    assert loss.item() == pytest.approx((4 - 2 * math.sqrt(3)) / 4, rel=1e-13)  # divided by 4 groups


def test_apo_clips():
    # delta = [-ln3/2, +ln3/2] = ±0.549; clip_ratio 0.2 -> u = ±0.2; p = softmax([-0.2, 0.2]) = [1, e^0.4] / (1 + e^0.4)
    b = _two_member_group()
    loss, m = run_loss("apo", b, _ctx(alpha=1.0), clip_ratio=0.2, **APO_KW)
    p = torch.tensor([1.0, math.exp(0.4)], dtype=F64) / (1 + math.exp(0.4))
    q = torch.tensor([0.75, 0.25], dtype=F64)
    assert loss.item() == pytest.approx(float((q * (q / p).log()).sum()), rel=1e-13)
    assert m["apo/u_clip_frac"] == 1.0
    loss.backward()
    assert torch.all(b.logp.grad == 0)  # both logits sit on the clip: no gradient
    # clip_u 0.1 after /tau: u = ±0.1
    loss, _ = run_loss("apo", _two_member_group(), _ctx(alpha=1.0), clip_u=0.1, **APO_KW)
    p = torch.tensor([1.0, math.exp(0.2)], dtype=F64) / (1 + math.exp(0.2))
    assert loss.item() == pytest.approx(float((q * (q / p).log()).sum()), rel=1e-13)


def test_apo_z_loss_and_kl_by_hand():
    # z = z_coef * logsumexp(u)^2, logsumexp(±ln3/2) = ln(3^-1/2 + 3^1/2) = ln(4/sqrt3) = 0.8369882167858358
    loss0, _ = run_loss("apo", _two_member_group(), _ctx(alpha=0.5), **APO_KW)
    loss, m = run_loss("apo", _two_member_group(), _ctx(alpha=0.5), z_loss_coef=0.1, z_loss_form="reference", **APO_KW)
    z = 0.1 * math.log(4 / math.sqrt(3)) ** 2  # 0.07005492...
    assert loss.item() - loss0.item() == pytest.approx(z, rel=1e-12) and m["apo/z_loss"] == pytest.approx(z)
    # the centred form (the default since issue 15): 0.1 * (logsumexp(u) - ln 2)^2
    loss_c, m_c = run_loss("apo", _two_member_group(), _ctx(alpha=0.5), z_loss_coef=0.1, **APO_KW)
    z_c = 0.1 * (math.log(4 / math.sqrt(3)) - math.log(2)) ** 2
    assert loss_c.item() - loss0.item() == pytest.approx(z_c, rel=1e-10) and m_c["apo/z_loss"] == pytest.approx(z_c)
    # k3 with d = logp_ref - logp = [+ln3/2, -ln3/2]: e^d - d - 1 = [sqrt3 - ln3/2 - 1, 1/sqrt3 + ln3/2 - 1]
    #   = [0.18274, 0.12666]; token mean over the 2 tokens = (sqrt3 + 1/sqrt3 - 2) / 2 = 0.1547005
    k3 = (math.sqrt(3) + 1 / math.sqrt(3) - 2) / 2
    loss, m = run_loss("apo", _two_member_group(), _ctx(alpha=0.5), kl_coef=0.5, **APO_KW)
    assert loss.item() - loss0.item() == pytest.approx(0.5 * k3, rel=1e-12) and m["kl"] == pytest.approx(k3)


@pytest.mark.parametrize("alpha", [0.0, 1e-6, 0.35, 0.9, 1.0])
def test_on_policy_gradient_closed_form(alpha):
    """At u = 0: d loss / d logp_j = -G^(alpha-1)/alpha (q_j^alpha - mean q^alpha) / tau  (one group, sum, 1 token).

    At alpha = 0 this is the limit -(log q_j - mean log q) / (G tau) = -(A_j - mean A) / (G beta_r tau).
    """
    g, tau, beta_r = 5, 0.7, 0.3
    gen = torch.Generator().manual_seed(7)
    adv = torch.randn(g, generator=gen, dtype=F64)
    adv = adv - adv.mean()
    old = -torch.rand(g, 1, generator=gen, dtype=F64)
    b = LossBatch(old.clone().requires_grad_(True), old, torch.ones(g, 1, dtype=F64), adv,
                  torch.zeros(g, dtype=torch.long))
    loss, _ = run_loss("apo", b, _ctx(alpha=alpha, tau=tau, seqs=g, tokens=g), beta_r=beta_r, logprob_reduction="sum")
    loss.backward()
    log_q = torch.log_softmax(adv / beta_r, 0)
    if alpha == 0.0:
        weight = (log_q - log_q.mean()) / g
    else:
        qa = (alpha * log_q).exp()
        weight = g ** (alpha - 1) / alpha * (qa - qa.mean())
    torch.testing.assert_close(b.logp.grad[:, 0], -weight / tau, rtol=1e-9, atol=1e-12)
    assert b.logp.grad.abs().sum() > 0  # not zero: no "on-policy fix" is needed


# --------------------------------------------------------------------------------------------------
# Ratio losses by hand


def _ratio_batch() -> LossBatch:
    """Two sequences of a group, T = 2; the second is one token long.

    seq 0 (A = +1): ratios [1.5, 0.9];  seq 1 (A = -1): ratio [0.5], then padding.
    """
    old = torch.tensor([[-1.0, -2.0], [-1.0, -1.0]], dtype=F64)
    new = old + torch.tensor([[math.log(1.5), math.log(0.9)], [math.log(0.5), 0.0]], dtype=F64)
    return LossBatch(new.clone().requires_grad_(True), old, torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=F64),
                     torch.tensor([1.0, -1.0], dtype=F64), torch.tensor([4, 4]))


@pytest.mark.parametrize(
    "mode, want",
    [
        # token losses: seq 0: -min(1.5, clip 1.2) = -1.2 ; -min(0.9, 0.9) = -0.9 ; seq 1: -min(-0.5, -0.8) = +0.8
        ("token_mean", (-1.2 - 0.9 + 0.8) / 3),  # / 3 tokens = -0.43333
        ("seq_mean_token_mean", ((-1.2 - 0.9) / 2 + 0.8) / 2),  # (-1.05 + 0.8) / 2 = -0.125
        ("constant", (-1.2 - 0.9 + 0.8) / (2 * 4)),  # / (2 seqs x max_new_tokens 4) = -0.1625
    ],
)
def test_grpo_by_hand(mode, want):
    b = _ratio_batch()
    loss, m = run_loss("grpo", b, _ctx(tokens=3.0, max_new=4), loss_aggregation=mode)
    assert loss.item() == pytest.approx(want, rel=1e-12)
    # clipped tokens: low (r < 0.8, A < 0): 1 of 3 ; high (r > 1.2, A > 0): 1 of 3
    assert m["clip_ratio/low_mean"] == pytest.approx(1 / 3) and m["clip_ratio/high_mean"] == pytest.approx(1 / 3)
    assert m["clip_ratio/region_mean"] == pytest.approx(2 / 3)
    loss.backward()
    # only the unclipped token (seq 0, t 1) has a gradient: d(-A r)/dlogp = -A r = -0.9, times its weight
    weight = {"token_mean": 1 / 3, "seq_mean_token_mean": 1 / 4, "constant": 1 / 8}[mode]
    want_grad = torch.tensor([[0.0, -0.9 * weight], [0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(b.logp.grad, want_grad, rtol=1e-12, atol=1e-15)


def test_dr_grpo_defaults_to_constant_normaliser():
    loss, _ = run_loss("dr_grpo", _ratio_batch(), _ctx(tokens=3.0, max_new=4))
    assert loss.item() == pytest.approx((-1.2 - 0.9 + 0.8) / 8, rel=1e-12)
    assert AlgorithmSpec(objective="dr_grpo").advantage_std is None  # resolved: "none"
    assert get_objective("dr_grpo").defaults["advantage_std"] == "none"


def test_gspo_by_hand():
    # seq 0 (A=+1): s = exp(mean(ln1.5, ln0.9)) = sqrt(1.35) = 1.16190 > 1 + 4e-4 -> clipped: loss -1.0004
    # seq 1 (A=-1): s = exp(ln 1.0001) = 1.0001, inside [1 - 3e-4, 1 + 4e-4]: loss -min(-1.0001, -1.0001) = 1.0001
    b = _ratio_batch()
    with torch.no_grad():
        b.logp[1, 0] = b.logp_old[1, 0] + math.log(1.0001)
    loss, m = run_loss("gspo", b, _ctx(tokens=3.0))
    assert loss.item() == pytest.approx((-1.0004 + 1.0001) / 2, rel=1e-9)  # -0.00015
    assert m["clip_ratio/high_mean"] == 0.5 and m["clip_ratio/low_mean"] == 0.0
    loss.backward()
    # d/dlogp of (-A s)/2 for seq 1 = (+1) * s * (1/len=1) / 2 = 1.0001/2 on its one token; seq 0 clipped
    torch.testing.assert_close(b.logp.grad, torch.tensor([[0.0, 0.0], [1.0001 / 2, 0.0]], dtype=F64))


# --------------------------------------------------------------------------------------------------
# Vectorised vs independent loops on random batches (many groups, padding, shuffled rows)


def _loop_apo(b: LossBatch, ctx: LossContext, alpha: float, beta_r: float, reduction: str, clip_ratio=5.0,
              clip_u=10.0) -> torch.Tensor:
    groups: dict[int, list[int]] = {}
    for i, gid in enumerate(b.group_ids.tolist()):
        groups.setdefault(gid, []).append(i)
    total = b.logp.new_zeros(())
    for rows in groups.values():
        u, a = [], []
        for i in rows:
            n = int(b.mask[i].sum())
            s, s_old = b.logp[i, :n].sum(), b.logp_old[i, :n].sum()
            if reduction == "mean":
                s, s_old = s / n, s_old / n
            u.append(((s - s_old).clamp(-clip_ratio, clip_ratio) / ctx.tau).clamp(-clip_u, clip_u))
            a.append(b.advantages[i])
        p = torch.softmax(torch.stack(u), 0)
        q = torch.softmax(torch.stack(a) / beta_r, 0)
        if alpha == 1.0:  # ADPO: KL(q || p)
            total = total + (q * (q / p).log()).sum()
        else:  # textbook formula
            total = total + (1 - (q**alpha * p ** (1 - alpha)).sum()) / (alpha * (1 - alpha))
    return total / ctx.total_groups


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    "name, alpha, reduction", [("apo", 0.35, "mean"), ("apo", 0.9, "sum"), ("apo", 0.6, "mean"), ("adpo", 1.0, "mean")]
)
def test_anchored_vectorised_matches_loop(seed, name, alpha, reduction):
    b = make_batch(n_groups=6, g=5, t=9, seed=seed)
    ctx = make_ctx(b, alpha=alpha, tau=0.5)
    loss, _ = run_loss(name, b, ctx, beta_r=0.4, logprob_reduction=reduction, clip_ratio=0.5)
    (grad,) = torch.autograd.grad(loss, b.logp)
    want = _loop_apo(b, ctx, alpha, 0.4, reduction, clip_ratio=0.5)
    (want_grad,) = torch.autograd.grad(want, b.logp)
    torch.testing.assert_close(loss, want, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(grad, want_grad, rtol=1e-9, atol=1e-13)


def _loop_ratio(b: LossBatch, eps_low: float, eps_high: float, sequence_level: bool) -> list[torch.Tensor]:
    """Per-sequence lists of per-token (GRPO) or one per-sequence (GSPO) surrogate losses, from the definitions."""
    out = []
    for i in range(b.logp.shape[0]):
        n, a = int(b.mask[i].sum()), b.advantages[i]
        lr = b.logp[i, :n] - b.logp_old[i, :n]
        r = lr.mean().exp()[None] if sequence_level else lr.exp()  # GSPO: exp(mean_t(logp - logp_old))
        out.append(-torch.minimum(r * a, r.clamp(1 - eps_low, 1 + eps_high) * a))
    return out


@pytest.mark.parametrize("seed", range(3))
def test_grpo_matches_definition(seed):
    b = make_batch(n_groups=5, g=4, t=8, seed=seed, std="group")
    ctx = make_ctx(b, max_new_tokens=12)
    per_seq = _loop_ratio(b, 0.2, 0.28, sequence_level=False)
    want = {
        "token_mean": sum(x.sum() for x in per_seq) / ctx.total_tokens,
        "seq_mean_token_mean": sum(x.mean() for x in per_seq) / ctx.total_seqs,
        "constant": sum(x.sum() for x in per_seq) / (ctx.total_seqs * 12),
    }
    runs = [("grpo", mode, {"loss_aggregation": mode}) for mode in want] + [("dr_grpo", "constant", {})]
    for name, mode, kw in runs:
        w = want[mode]
        loss, _ = run_loss(name, b, ctx, eps_high=0.28, **kw)
        torch.testing.assert_close(loss, w, rtol=1e-12, atol=1e-14)
        g1, g2 = torch.autograd.grad(loss, b.logp)[0], torch.autograd.grad(w, b.logp, retain_graph=True)[0]
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("seed", range(3))
def test_gspo_matches_definition_with_default_eps(seed):
    b = make_batch(n_groups=5, g=4, t=8, seed=seed, std="group")
    with torch.no_grad():  # keep sequence ratios near 1 so that both clipped and unclipped cases occur
        gen = torch.Generator().manual_seed(seed)
        b.logp.copy_(b.logp_old + 8e-4 * torch.randn(b.logp.shape[0], 1, generator=gen, dtype=F64)
                     + 1e-4 * torch.randn(b.logp.shape, generator=gen, dtype=F64))
    ctx = make_ctx(b)
    loss, m = run_loss("gspo", b, ctx)  # defaults eps_low 3e-4, eps_high 4e-4
    want = torch.cat(_loop_ratio(b, 3e-4, 4e-4, sequence_level=True)).sum() / ctx.total_seqs
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-15)
    assert 0 < m["clip_ratio/region_mean"] < 1
    g1 = torch.autograd.grad(loss, b.logp)[0]
    g2 = torch.autograd.grad(want, b.logp)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-14)


def test_apo_float32_inputs_give_float32_loss_close_to_float64():
    b64 = make_batch(n_groups=4, g=6, t=10, seed=11)
    b32 = LossBatch(b64.logp.detach().float().requires_grad_(True), b64.logp_old.float(), b64.mask.float(),
                    b64.advantages.float(), b64.group_ids, b64.logp_ref.float())
    l64, _ = run_loss("apo", b64, make_ctx(b64, alpha=0.4))
    l32, _ = run_loss("apo", b32, make_ctx(b32, alpha=0.4))
    assert l32.dtype == torch.float32
    assert l32.item() == pytest.approx(l64.item(), rel=1e-5)
    assert alpha_divergence(torch.zeros(1, 2), torch.zeros(1, 2), 0.3).dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# CISPO and SAPO by hand (the two-sequence batch above: ratios [1.5, 0.9] with A = +1, [0.5] with A = -1)


def test_cispo_by_hand():
    b = _ratio_batch()
    loss, m = run_loss("cispo", b, _ctx(tokens=3.0))  # cap 1 + 4 = 5: no ratio is capped
    # -w A logp: seq 0: -1.5 (-1 + ln1.5) = 0.891802, -0.9 (-2 + ln0.9) = 1.894825; seq 1: +0.5 (-1 + ln0.5) = -0.846574
    want = (-1.5 * (-1 + math.log(1.5)) - 0.9 * (-2 + math.log(0.9)) + 0.5 * (-1 + math.log(0.5))) / 3
    assert loss.item() == pytest.approx(want, rel=1e-12)  # token mean over the 3 tokens = 0.646684
    assert m["clip_ratio/high_mean"] == 0.0 and m["clip_ratio/low_mean"] == 0.0
    loss.backward()
    # the weight is detached: d/dlogp = -w A / 3 on every token, none dropped
    torch.testing.assert_close(b.logp.grad, torch.tensor([[-1.5 / 3, -0.9 / 3], [0.5 / 3, 0.0]], dtype=F64))
    b = _ratio_batch()
    loss, m = run_loss("cispo", b, _ctx(tokens=3.0), eps_high=0.2)  # cap 1.2: token (0, 0) weighs 1.2, not 1.5
    loss.backward()
    torch.testing.assert_close(b.logp.grad, torch.tensor([[-1.2 / 3, -0.9 / 3], [0.5 / 3, 0.0]], dtype=F64))
    assert m["clip_ratio/high_mean"] == pytest.approx(1 / 3)  # r 1.5 > 1.2 with A > 0


def test_sapo_by_hand():
    b = _ratio_batch()
    loss, m = run_loss("sapo", b, _ctx(tokens=3.0))  # t+ = 1.0 (seq 0), t- = 1.05 (seq 1)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # per token -sigmoid(t (r - 1)) 4 / t A: seq 0: -4 s(0.5) = -2.4490, -4 s(-0.1) = -1.9000; seq 1: +4 s(-0.525) / 1.05
    tok0 = [-4 * sig(0.5), -4 * sig(-0.1)]
    tok1 = 4 * sig(1.05 * -0.5) / 1.05
    assert loss.item() == pytest.approx((sum(tok0) / 2 + tok1) / 2, rel=1e-12)  # seq-mean of token means
    loss.backward()
    # d/dlogp = -4 s (1 - s) r A, weighted 1/4 (seq 0: 2 tokens, 2 seqs) and 1/2 (seq 1)
    gate = lambda s, r, a: -4 * s * (1 - s) * r * a  # noqa: E731
    want = [[gate(sig(0.5), 1.5, 1) / 4, gate(sig(-0.1), 0.9, 1) / 4], [gate(sig(-0.525), 0.5, -1) / 2, 0.0]]
    torch.testing.assert_close(b.logp.grad, torch.tensor(want, dtype=F64), rtol=1e-12, atol=1e-15)
    assert m["sapo/gate_mean"] == pytest.approx((4 * sig(0.5) * sig(-0.5) + 4 * sig(-0.1) * sig(0.1)
                                                 + 4 * sig(-0.525) * sig(0.525)) / 3)


def _loop_cispo_sapo(b: LossBatch, name: str, cap: float, t_pos: float, t_neg: float) -> list[torch.Tensor]:
    """Per-sequence token losses of CISPO / SAPO from their definitions, one sequence at a time."""
    out = []
    for i in range(b.logp.shape[0]):
        n, a = int(b.mask[i].sum()), b.advantages[i]
        logp = b.logp[i, :n]
        r = (logp - b.logp_old[i, :n]).exp()
        if name == "cispo":
            out.append(-torch.clamp(r, max=cap).detach() * a * logp)
        else:
            t = t_pos if a > 0 else t_neg
            out.append(-torch.sigmoid(t * (r - 1)) * 4 / t * a)
    return out


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name", ["cispo", "sapo"])
def test_cispo_sapo_vectorised_match_loop(name, seed):
    b = make_batch(n_groups=5, g=4, t=8, seed=seed, std="group")
    ctx = make_ctx(b, max_new_tokens=12)
    per_seq = _loop_cispo_sapo(b, name, cap=1.3, t_pos=0.8, t_neg=1.7)
    kw = {"eps_high": 0.3} if name == "cispo" else {"sapo_temperature_pos": 0.8, "sapo_temperature_neg": 1.7}
    for mode, want in [("token_mean", sum(x.sum() for x in per_seq) / ctx.total_tokens),
                       ("seq_mean_token_mean", sum(x.mean() for x in per_seq) / ctx.total_seqs),
                       ("constant", sum(x.sum() for x in per_seq) / (ctx.total_seqs * 12))]:
        loss, _ = run_loss(name, b, ctx, loss_aggregation=mode, **kw)
        torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-14)
        g1 = torch.autograd.grad(loss, b.logp)[0]
        g2 = torch.autograd.grad(want, b.logp, retain_graph=True)[0]
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-14)


# --------------------------------------------------------------------------------------------------
# Equality with TRL 1.16 (trl/trainer/grpo_trainer.py, GRPOTrainer._compute_loss and the importance
# sampling of _generate_and_score_completions), transcribed here as reference functions: one process,
# one micro-batch, gradient accumulation 1, use_bias_correction_kl=False (apo does not multiply the KL
# by the policy ratio; docs/method.md).


def _trl_is_ratio(old, sampling, mask, mode, clip_min, clip_max):
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    if mode in ("sequence_mask", "sequence_truncate"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode in ("sequence_truncate", "token_truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    lo = clip_min if clip_min is not None else -math.inf
    hi = clip_max if clip_max is not None else math.inf
    return ratio.masked_fill((ratio < lo) | (ratio > hi), value=0.0)


def _trl_high_entropy_mask(entropies, mask, threshold):
    local = entropies[mask.bool()].float()
    thr = torch.quantile(local, threshold)
    return ((entropies * mask.float()) >= thr) & mask.bool()


def _trl_off_policy_mask(advantages, logp, sampling, mask, threshold):
    kl = torch.nan_to_num(sampling - logp.detach(), nan=0.0)
    avg = (kl * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (avg <= threshold)).to(dtype=mask.dtype)


def _trl_loss(loss_type, logp, old, mask, adv, *, level="token", eps_low=0.2, eps_high=0.2, max_len=None,
              is_ratio=None, sampling=None, opsm=None, entropies=None, top_q=1.0, entropy_coef=0.0, beta=0.0,
              ref=None, t_pos=1.0, t_neg=1.05):
    adv = adv.unsqueeze(1)
    entropy_mask = _trl_high_entropy_mask(entropies, mask, 1 - top_q) if top_q < 1.0 else None
    if opsm is not None:
        off_mask = _trl_off_policy_mask(adv, logp, sampling if sampling is not None else old, mask, opsm)
    log_ratio = logp - old
    if level == "token":
        liw = log_ratio
    else:
        liw = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(liw)
    if beta != 0.0:
        kl = torch.exp(ref - logp) - (ref - logp) - 1
    if loss_type == "cispo":
        per = -torch.clamp(coef_1, max=eps_high).detach() * adv * logp
    elif loss_type == "sapo":
        # TRL passes python floats (a float32 result); the tensors' dtype here, for a 1e-12 comparison
        temps = torch.where(adv > 0, torch.tensor(t_pos, dtype=adv.dtype), torch.tensor(t_neg, dtype=adv.dtype))
        per = -torch.sigmoid(temps * (coef_1 - 1)) * 4 / temps * adv
    else:
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        per = -torch.min(coef_1 * adv, coef_2 * adv)
    if opsm is not None:
        per = per * off_mask
    if entropy_mask is not None:
        per = per * entropy_mask
    if is_ratio is not None:
        per = per * is_ratio
    if beta != 0.0:
        per = per + beta * kl
    if loss_type in ("grpo", "sapo"):
        loss = ((per * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "dr_grpo":
        loss = (per * mask).sum() / (per.size(0) * max_len)
    else:  # bnpo, and cispo/dapo with num_items_in_batch = the batch's tokens
        loss = (per * mask).sum() / mask.sum().clamp(min=1.0)
    if entropy_coef:
        eff = mask if entropy_mask is None else mask * entropy_mask
        loss = loss - entropy_coef * (entropies * eff).sum() / eff.sum().clamp(min=1.0)
    return loss


# ours -> TRL: (objective, recipe fields, TRL loss_type, TRL arguments)
_VS_TRL = [
    ("grpo", {"loss_aggregation": "seq_mean_token_mean"}, "grpo", {}),
    ("grpo", {}, "bnpo", {}),
    ("dr_grpo", {}, "dr_grpo", {"max_len": 9}),
    ("gspo", {}, "grpo", {"level": "sequence", "eps_low": 3e-4, "eps_high": 4e-4}),
    ("cispo", {}, "cispo", {"eps_high": 5.0}),
    ("sapo", {}, "sapo", {}),
]
_STABILIZERS = {
    "none": {},
    "token_truncate": {"rollout_correction": {"mode": "token_truncate", "clip_max": 1.3, "clip_min": 0.8}},
    "token_mask": {"rollout_correction": {"mode": "token_mask", "clip_max": 1.3, "clip_min": 0.8}},
    "sequence_truncate": {"rollout_correction": {"mode": "sequence_truncate", "clip_max": 1.5, "clip_min": 0.6}},
    "sequence_mask": {"rollout_correction": {"mode": "sequence_mask", "clip_max": 1.5}},
    "off_policy_mask": {"off_policy_mask_threshold": 0.05},
    "off_policy_mask_engine": {"off_policy_mask_threshold": 0.05, "rollout_correction": {"mode": "off"}},
    "entropy": {"top_entropy_quantile": 0.4, "entropy_coef": 0.1},
    "kl_all": {"kl_coef": 0.05, "rollout_correction": {"mode": "token_mask", "clip_max": 1.2},
               "off_policy_mask_threshold": 0.0, "top_entropy_quantile": 0.7, "entropy_coef": 0.02},
}


@pytest.mark.parametrize("stab", sorted(_STABILIZERS))
@pytest.mark.parametrize("ours, fields, trl_type, trl_kw", _VS_TRL, ids=[f"{o}-{t}" for o, _, t, _ in _VS_TRL])
def test_equals_trl_on_identical_tensors(ours, fields, trl_type, trl_kw, stab):
    from dataclasses import replace

    from apo_cli.algo import objective_loss

    b = make_batch(n_groups=3, g=4, t=6, seed=21, std="group")
    gen = torch.Generator().manual_seed(5)
    engine = b.logp_old + 0.15 * torch.randn(b.logp_old.shape, generator=gen, dtype=F64)
    entropy = 2 * torch.rand(b.logp.shape, generator=gen, dtype=F64) * b.mask
    extra = _STABILIZERS[stab]
    with_engine = "rollout_correction" in extra and extra["rollout_correction"]["mode"] != "off" \
        or stab == "off_policy_mask_engine"
    spec = AlgorithmSpec(objective=ours, **fields, **extra)
    batch = replace(b, logp_engine=engine if with_engine else None, entropy=entropy)
    ctx = make_ctx(b, max_new_tokens=9)
    loss, _ = objective_loss(get_objective(ours), batch, spec, ctx)

    rc = spec.rollout_correction
    is_ratio = None
    if with_engine and rc.mode != "off":
        is_ratio = _trl_is_ratio(b.logp_old, engine, b.mask, rc.mode, rc.clip_min, rc.clip_max)
    want = _trl_loss(trl_type, b.logp, b.logp_old, b.mask, b.advantages, is_ratio=is_ratio,
                     sampling=engine if with_engine else None, opsm=spec.off_policy_mask_threshold,
                     entropies=entropy, top_q=spec.top_entropy_quantile, entropy_coef=spec.entropy_coef,
                     beta=spec.kl_coef, ref=b.logp_ref, **trl_kw)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-14)
    g_ours = torch.autograd.grad(loss, b.logp)[0]
    g_trl = torch.autograd.grad(want, b.logp)[0] * b.mask
    torch.testing.assert_close(g_ours, g_trl, rtol=1e-10, atol=1e-14)
