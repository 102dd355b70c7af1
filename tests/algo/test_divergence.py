"""alpha_divergence: exact values (mpmath), gradients (finite differences, closed forms), continuity."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch

from apo_cli.algo import alpha_divergence

ALPHAS = [0.0, 1e-8, 1e-3, 0.1, 0.35, 0.5, 0.9, 1 - 1e-3, 1 - 1e-8, 1.0]


def _random_pair(b: int = 6, g: int = 5, seed: int = 0, q_scale: float = 2.0):
    gen = torch.Generator().manual_seed(seed)
    log_q = torch.log_softmax(q_scale * torch.randn(b, g, generator=gen, dtype=torch.float64), -1)
    u = torch.randn(b, g, generator=gen, dtype=torch.float64)
    return log_q, u


def _mp_divergence(log_q, log_p, alpha: float) -> float:
    """Reference at 60 digits: normalise in mp precision, then the textbook formula or its KL limit."""
    with mpmath.workdps(60):
        q = [mpmath.exp(mpmath.mpf(float(v))) for v in log_q]
        p = [mpmath.exp(mpmath.mpf(float(v))) for v in log_p]
        sq, sp = sum(q), sum(p)
        q, p = [v / sq for v in q], [v / sp for v in p]
        a = mpmath.mpf(alpha)
        if a == 0:
            return float(sum(pi * mpmath.log(pi / qi) for pi, qi in zip(p, q)))  # KL(p||q)
        if a == 1:
            return float(sum(qi * mpmath.log(qi / pi) for pi, qi in zip(p, q)))  # KL(q||p)
        return float((1 - sum(qi**a * pi ** (1 - a) for pi, qi in zip(p, q))) / (a * (1 - a)))


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("q_scale", [0.3, 2.0, 8.0])
def test_matches_mpmath(alpha, q_scale):
    log_q, u = _random_pair(q_scale=q_scale, seed=int(q_scale * 10))
    log_p = torch.log_softmax(u, -1)
    got = alpha_divergence(log_q, log_p, alpha)  # [B]
    want = torch.tensor([_mp_divergence(log_q[i], log_p[i], alpha) for i in range(len(got))], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)


def test_named_special_cases():
    # q = [3/4, 1/4], p = [1/4, 3/4]
    log_q = torch.tensor([[0.75, 0.25]], dtype=torch.float64).log()
    log_p = torch.tensor([[0.25, 0.75]], dtype=torch.float64).log()
    # alpha = 1/2: 4 (1 - BC), BC = 2 sqrt(3/16) = sqrt(3)/2  ->  4 - 2 sqrt(3) = 0.5358983848622454
    assert alpha_divergence(log_q, log_p, 0.5).item() == pytest.approx(4 - 2 * math.sqrt(3), rel=1e-14)
    # alpha = 1: KL(q||p) = 3/4 ln 3 + 1/4 ln(1/3) = ln(3)/2 = 0.5493061443340549
    assert alpha_divergence(log_q, log_p, 1.0).item() == pytest.approx(math.log(3) / 2, rel=1e-14)
    # alpha = 0: KL(p||q) = 1/4 ln(1/3) + 3/4 ln 3 = ln(3)/2
    assert alpha_divergence(log_q, log_p, 0.0).item() == pytest.approx(math.log(3) / 2, rel=1e-14)
    # q = p: zero for every alpha, exactly
    for a in ALPHAS:
        assert alpha_divergence(log_q, log_q, a).item() == 0.0


def _u_grad(log_q, u, alpha):
    u = u.clone().requires_grad_(True)
    alpha_divergence(log_q, torch.log_softmax(u, -1), alpha).sum().backward()
    return u.grad


@pytest.mark.parametrize("alpha", ALPHAS)
def test_gradcheck_finite_differences(alpha):
    log_q, u = _random_pair(b=3, g=4, seed=1)
    f_u = lambda u: alpha_divergence(log_q, torch.log_softmax(u, -1), alpha)  # noqa: E731
    assert torch.autograd.gradcheck(f_u, (u.clone().requires_grad_(True),), eps=1e-6, atol=1e-8)
    # free coordinates too (log p not renormalised): the extended divergence is smooth there as well
    log_p = torch.log_softmax(u, -1).clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda lp: alpha_divergence(log_q, lp, alpha), (log_p,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("alpha", [1e-8, 1e-3, 0.1, 0.35, 0.5, 0.9, 1 - 1e-8, 1.0])
def test_closed_form_gradients(alpha):
    log_q, u = _random_pair(seed=2)
    log_p = torch.log_softmax(u, -1)
    p, x = log_p.exp(), log_q - log_p
    w = (alpha * log_q + (1 - alpha) * log_p).exp()  # w_i = q_i^a p_i^(1-a) = p_i e^(a x_i)
    # The closed forms, written without cancellation for small alpha: with g_i = expm1(a x_i)/a,
    #   (w_j - W p_j)/a = p_j (g_j - sum_i p_i g_i)   and   (w_i - p_i)/a = p_i g_i.
    g = torch.expm1(alpha * x) / alpha
    # dD/du_j = -(w_j - W p_j) / alpha   (APO_METHOD §2)
    want_u = -p * (g - (p * g).sum(-1, keepdim=True))
    torch.testing.assert_close(_u_grad(log_q, u, alpha), want_u, rtol=1e-9, atol=1e-14)
    # dD/dlog p_i = -w_i/alpha (§2) up to a multiple of p, which log_softmax annihilates: here -(w_i - p_i)/alpha
    lp = log_p.clone().requires_grad_(True)
    alpha_divergence(log_q, lp, alpha).sum().backward()
    torch.testing.assert_close(lp.grad, -p * g, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(lp.grad - p / alpha, -w / alpha, rtol=1e-6, atol=1e-12)
    # the surrogate -(1/alpha) sum_i sg(w_i) log p_i has the same u-gradient (fine for moderate alpha)
    if alpha >= 1e-3:
        u2 = u.clone().requires_grad_(True)
        (-(w * torch.log_softmax(u2, -1)).sum() / alpha).backward()
        torch.testing.assert_close(u2.grad, want_u, rtol=1e-9, atol=1e-12)


def test_gradient_at_alpha_zero_is_reverse_kl_gradient():
    log_q, u = _random_pair(seed=3)
    log_p = torch.log_softmax(u, -1)
    p, x = log_p.exp(), log_q - log_p
    # d KL(p||q) / du_j = p_j (log p_j - log q_j - KL) = -p_j (x_j - E_p[x])
    want = -p * (x - (p * x).sum(-1, keepdim=True))
    torch.testing.assert_close(_u_grad(log_q, u, 0.0), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "below, above",
    [
        (0.9999e-12, 1.0001e-12),  # series expm1(a x)/a ~ x (1 + a x / 2) below 1e-12
        (math.nextafter(0.5, 0.0), math.nextafter(0.5, 1.0)),  # p-form below 1/2, q-form above
        (1 - 1.0001e-12, 1 - 0.9999e-12),  # the series again, in 1 - alpha
    ],
)
def test_continuous_across_switch_points(below, above):
    """Around each switch point alpha moves by <= 2e-16: the true change of D is ~1e-16, a jump would show."""
    log_q, u = _random_pair(seed=4)
    log_p = torch.log_softmax(u, -1)
    d_lo, d_hi = alpha_divergence(log_q, log_p, below), alpha_divergence(log_q, log_p, above)
    torch.testing.assert_close(d_lo, d_hi, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(_u_grad(log_q, u, below), _u_grad(log_q, u, above), rtol=1e-9, atol=1e-13)


def test_approaches_kl_limits_smoothly():
    log_q, u = _random_pair(seed=5)
    log_p = torch.log_softmax(u, -1)
    for end, eps_list in ((0.0, [1e-6, 1e-9, 1e-14]), (1.0, [-1e-6, -1e-9, -1e-14])):
        at_end = alpha_divergence(log_q, log_p, end)
        for eps in eps_list:
            near = alpha_divergence(log_q, log_p, end + eps)
            # first-order: |D(end + eps) - D(end)| = O(|eps|), with an O(1) coefficient here
            assert (near - at_end).abs().max().item() < 50 * abs(eps) + 1e-14


def test_float32_extremes_are_finite():
    """Tiny targets (A/beta_r spans 300) and clipped logits in float32: no overflow, no NaN."""
    log_q = torch.log_softmax(torch.tensor([[300.0, 0.0, -5.0, 1.0]]), -1)
    u = torch.tensor([[-10.0, 10.0, 0.0, 3.0]], requires_grad=True)
    for a in ALPHAS:
        d = alpha_divergence(log_q, torch.log_softmax(u, -1), a)
        (grad,) = torch.autograd.grad(d.sum(), u)
        assert torch.isfinite(d).all() and (d >= 0).all() and torch.isfinite(grad).all(), a


def test_tensor_alpha_per_group_matches_floats():
    log_q, u = _random_pair(b=4, seed=6)
    log_p = torch.log_softmax(u, -1)
    alphas = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=torch.float64)
    got = alpha_divergence(log_q, log_p, alphas)
    want = torch.stack([alpha_divergence(log_q[i], log_p[i], float(a)) for i, a in enumerate(alphas)])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_rejects_alpha_outside_unit_interval():
    log_q, u = _random_pair()
    with pytest.raises(ValueError, match="alpha must lie in"):
        alpha_divergence(log_q, torch.log_softmax(u, -1), 1.5)
