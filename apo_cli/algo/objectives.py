"""Objectives: pure functions ``(LossBatch, AlgorithmSpec, LossContext) -> (loss, metrics)`` in one registry.

Registered names (the training loop never special-cases one; it reads :class:`ObjectiveInfo`):

``apo`` — Alpha-divergence Preference Optimization (APO_METHOD §1-2, §4). Per completion the
  sequence log-prob (``logprob_reduction``: token ``mean`` = length-normalised, or ``sum``) under
  the policy and under the anchor (the rollout policy, no grad) gives the anchored logit
  ``u = clip(clip(logp - logp_anchor, ±clip_ratio) / tau, ±clip_u)``; per group (rows gathered by
  group id) ``p = softmax_G(u)`` and the target ``q = softmax_G(A / beta_r)`` (no grad; advantages
  centred, not std-scaled, by default). Loss = mean over groups of the Csiszár alpha-divergence
  ``D_alpha(q || p)``, alpha from the schedule (``LossContext.alpha``), tau possibly adapted
  (``LossContext.tau``). Optional: z-loss ``z_loss_coef * logsumexp_G(u)^2`` averaged over groups
  (a soft trust region on the drift of the whole group's likelihood, which the group softmax cannot
  see; §4 writes the square of the mean over groups, the mean of squares is used so that micro-batch
  losses stay additive — the two agree at u = 0 and in their gradient there); ``z_loss_form:
  centred`` (the default) uses ``(logsumexp_G(u) - log G)^2`` instead, zero and flat at u = 0 (the
  reference form, the author's, is smallest at u = -log G, so at u = 0 it lowers every sampled completion's log-prob by a
  gradient of ``2 z log G / (G tau)`` each, see docs/method.md) and the KL to a
  reference model (``kl_coef``, off by default). There is no "on-policy fix": at u = 0 the gradient is ``G^(alpha-1)/alpha (q_j^alpha - mean q^alpha) / tau`` per sample,
  not zero.
``adpo`` — the same with alpha fixed at 1: ``KL(q || p)``, i.e. the anchored cross-entropy of ADPO.
``grpo`` — token-level PPO-clip surrogate ``-min(r A, clip(r, 1-eps_low, 1+eps_high) A)`` with
  ``r = exp(logp_t - logp_old_t)``, group-std-normalised advantages, ``loss_aggregation``
  (default token_mean), optional KL aggregated the same way.
``dr_grpo`` — GRPO with Dr.GRPO defaults: centred advantages, constant normaliser.
``gspo`` — one ratio per sequence ``s = exp(mean_t(logp_t - logp_old_t))``, the same clipped
  surrogate per sequence with eps 3e-4 / 4e-4, mean over sequences; KL seq-mean-token-mean.
``cispo`` — MiniMax-M1: ``-sg(min(r, 1 + eps_high)) A logp_t`` per token (eps_high 4.0: cap 5),
  group-std advantages, token mean.
``sapo`` — soft adaptive gate ``-sigmoid(t (r - 1)) 4/t A`` per token, ``t`` the positive- or
  negative-advantage temperature (1.0 / 1.05, TRL's), group-std advantages, sequence-mean of token means.

The KL (``kl_coef > 0``) uses ``kl_estimator`` (k3 by default). The loss-side stabilizers
(apo_cli/algo/stabilizers.py: rollout correction, off-policy mask, truncated rows, entropy mask and
bonus) reach every objective as ``LossBatch.weights`` [N, T]: token objectives multiply each
token's policy term by it, gspo each sequence's term by its token mean, apo/adpo each completion's
gradient term (the divergence's value is unchanged); the KL is not weighted (as in TRL), only
restricted to ``LossBatch.loss_mask``.

Every loss is divided by the totals of the whole mini-batch (``LossContext``), so the losses of its
micro-batches add up to the loss of the mini-batch; metrics are means over the micro-batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from apo_cli.algo.aggregation import agg_loss, masked_mean
from apo_cli.algo.advantages import group_order
from apo_cli.registry import Registry

if TYPE_CHECKING:
    from apo_cli.algo.spec import AlgorithmSpec

# Below this alpha, expm1(alpha x) / alpha is replaced by its series x (1 + alpha x / 2): alpha*x
# could otherwise be subnormal and lose precision; the neglected term is O((alpha x)^2) ~ 1e-24.
_SERIES_BELOW = 1e-12
# log-ratio clamp before exp in the ratio losses (verl uses ±20), and k3 KL clamp (verl: 10).
_LOG_RATIO_CLAMP = 20.0
_KL_CLAMP = 10.0


# --------------------------------------------------------------------------------------------------
# Data passed by the training loop


@dataclass
class LossBatch:
    """One micro-batch of whole groups. Shapes: N sequences × T completion tokens."""

    logp: Tensor  # [N, T] policy log-probs of the completion tokens (requires grad)
    logp_old: Tensor  # [N, T] the same under the rollout policy (the anchor), no grad
    mask: Tensor  # [N, T] 1.0 on real completion tokens, 0.0 on padding
    advantages: Tensor  # [N] from compute_advantages
    group_ids: Tensor  # [N] long; every group present has all its members here
    logp_ref: Tensor | None = None  # [N, T] reference-model log-probs (KL when kl_coef > 0)
    group_size: int | None = None  # the rollout's G: each group id present must have exactly G rows here
    # inputs of the loss-side stabilizers (apo_cli/algo/stabilizers.py), None when not given
    logp_engine: Tensor | None = None  # [N, T] the rollout engine's log-probs, when it is not the trainer
    truncated: Tensor | None = None  # [N] bool: cut at max_new_tokens
    entropy: Tensor | None = None  # [N, T] policy token entropy (with grad when entropy_coef > 0)
    # set by stabilizers.prepare (objective_loss), honoured by every objective; None: all ones
    weights: Tensor | None = None  # [N, T] no grad: weight of each token's (completion's) policy term
    loss_mask: Tensor | None = None  # [N, T] tokens that stay in the KL (mask_truncated drops rows); None: mask


@dataclass
class LossContext:
    """Scalars of the current update: schedule values and the normalisers of the whole mini-batch."""

    alpha: float  # current alpha from the schedule (apo)
    tau: float  # effective tau (after adaptive tau)
    total_groups: int  # groups in the mini-batch
    total_seqs: int  # sequences in the mini-batch
    total_tokens: float  # real completion tokens in the mini-batch
    max_new_tokens: int  # Dr.GRPO constant normaliser


LossFn = Callable[[LossBatch, "AlgorithmSpec", LossContext], tuple[Tensor, dict[str, float]]]


@dataclass(frozen=True)
class ObjectiveInfo:
    """A registered objective: its function and what it reads from the recipe."""

    name: str
    fn: LossFn
    # AlgorithmSpec fields read, besides those every objective accepts (objective, mini_batches, epochs,
    # kl_coef, advantage_std)
    params: frozenset[str]
    defaults: dict[str, Any]  # values of fields left None in the recipe
    uses_alpha: bool  # True when LossContext.alpha matters (the alpha schedule runs)


OBJECTIVES: Registry[ObjectiveInfo] = Registry("objective", group="apo.objectives")
"""Every objective by name. A third-party package names an :class:`ObjectiveInfo` (built with
:func:`make_objective`) in the ``apo.objectives`` entry-point group (``myobj =
"my_pkg.losses:MY_OBJECTIVE"``), imported only when a recipe chooses it; code that trains in-process
can also call :func:`register_objective`."""


def make_objective(
    name: str, fn: LossFn, *, params: frozenset[str] | set[str], defaults: dict[str, Any] | None = None,
    uses_alpha: bool = False,
) -> ObjectiveInfo:
    """An :class:`ObjectiveInfo` (what an ``apo.objectives`` entry point names), not registered."""
    return ObjectiveInfo(name, fn, frozenset(params), dict(defaults or {}), uses_alpha)


def register_objective(
    name: str, *, params: frozenset[str] | set[str], defaults: dict[str, Any] | None = None, uses_alpha: bool = False
) -> Callable[[LossFn], LossFn]:
    """Decorator: add ``fn`` to :data:`OBJECTIVES` under ``name``."""

    def deco(fn: LossFn) -> LossFn:
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} is already registered")
        OBJECTIVES.add(name, make_objective(name, fn, params=params, defaults=defaults, uses_alpha=uses_alpha))
        return fn

    return deco


def get_objective(name: str) -> ObjectiveInfo:
    """The objective registered as ``name``; an unknown name is a KeyError listing the valid ones."""
    return OBJECTIVES.get(name)


def resolved(spec: AlgorithmSpec, field: str) -> Any:
    """``spec.<field>``, or the objective's default when the recipe left it None."""
    value = getattr(spec, field)
    if value is None:
        return get_objective(spec.objective).defaults.get(field)
    return value


# --------------------------------------------------------------------------------------------------
# The alpha-divergence


def _alpha_half(log_p: Tensor, log_q: Tensor, a: Tensor) -> Tensor:
    """``sum_i [a q_i + (1-a) p_i - q_i^a p_i^(1-a)] / (a (1-a))`` for ``0 <= a <= 1/2`` ("p-form").

    Written as ``sum_i p_i [expm1(x_i) - expm1(a x_i) / a] / (1 - a)`` with ``x = log q - log p``:
    no term is divided by a vanishing difference, so the value is exact down to a = 0, where it is
    ``sum_i [q_i - p_i + p_i log(p_i / q_i)]`` = KL(p || q). ``p e^x`` is formed as ``q`` (and
    ``p e^(a x)`` as ``q^a p^(1-a)``) once ``x`` is large, so nothing overflows.
    """
    x = log_q - log_p  # [..., G]
    p = log_p.exp()  # [..., G]
    p_em1 = torch.where(x < 1, p * torch.expm1(x.clamp(max=1)), log_q.exp() - p)  # p (e^x - 1)
    ax = a * x  # [..., G]
    p_em1_a = torch.where(ax < 1, p * torch.expm1(ax.clamp(max=1)), (log_p + ax).exp() - p)  # p (e^{ax} - 1)
    tiny = a < _SERIES_BELOW
    p_g = torch.where(tiny, p * x * (1 + a * x / 2), p_em1_a / torch.where(tiny, torch.ones_like(a), a))
    return ((p_em1 - p_g) / (1 - a)).sum(dim=-1)  # [...]


def alpha_divergence(log_q: Tensor, log_p: Tensor, alpha: float | Tensor) -> Tensor:
    """Csiszár alpha-divergence ``D_alpha(q || p)`` over the last dim, exact for alpha in [0, 1].

    ``D = (1 - sum_i q_i^alpha p_i^(1-alpha)) / (alpha (1 - alpha))``; alpha -> 1 gives KL(q || p)
    (mode covering), alpha -> 0 gives KL(p || q) (mode seeking), alpha = 1/2 gives 4 (1 - BC).

    It is evaluated as the extended divergence of positive measures,
    ``sum_i [alpha q_i + (1-alpha) p_i - q_i^alpha p_i^(1-alpha)] / (alpha (1-alpha))``, equal to
    the above for normalised inputs. In that form the 1/alpha and 1/(1-alpha) factors cancel inside
    each term, so the value and the gradient are exact and continuous on the closed interval (no
    switch to a KL approximation is needed); the p-form is used for alpha <= 1/2 and the mirrored
    q-form, ``D_alpha(q||p) = D_(1-alpha)(p||q)``, above. Its gradient is
    ``dD/dlog p_i = -(w_i - p_i) / alpha`` with ``w_i = q_i^alpha p_i^(1-alpha)``: it differs from
    the ``-w_i / alpha`` of APO_METHOD §2 only along ``p``, which ``log_softmax`` removes, so
    ``dD/du_j = -(w_j - W p_j) / alpha`` exactly.

    Args:
        log_q: [..., G] normalised log-probs of the target.
        log_p: [..., G] normalised log-probs of the model.
        alpha: float in [0, 1], or a tensor broadcastable to ``log_q.shape[:-1]``.

    Returns:
        [...] divergences.
    """
    if not isinstance(alpha, Tensor) and not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1] (got {alpha})")
    dtype = torch.promote_types(torch.promote_types(log_q.dtype, log_p.dtype), torch.float32)
    log_q, log_p = log_q.to(dtype), log_p.to(dtype)
    a = torch.as_tensor(alpha, dtype=dtype, device=log_p.device)[..., None]  # [..., 1]
    low = _alpha_half(log_p, log_q, a.clamp(max=0.5))  # [...] p-form
    high = _alpha_half(log_q, log_p, (1 - a).clamp(max=0.5))  # [...] q-form
    return torch.where(a[..., 0] <= 0.5, low, high)


# --------------------------------------------------------------------------------------------------
# Shared pieces


def sequence_logprob(logp: Tensor, mask: Tensor, reduction: str) -> Tensor:
    """Sequence log-prob [N] from token log-probs [N, T]: ``sum`` or length-normalised ``mean``.

    ``mask`` [N, T] is bool or 0/1; padding never contributes (even NaN or -inf there).
    """
    m = mask if mask.dtype == torch.bool else mask != 0  # [N, T]
    total = torch.where(m, logp, 0.0).sum(dim=-1)  # [N]
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / m.sum(dim=-1).clamp(min=1)
    raise ValueError(f"unknown logprob_reduction {reduction!r}; valid: mean, sum")


def anchored_logits(delta: Tensor, tau: float, clip_ratio: float, clip_u: float) -> Tensor:
    """``u = clip(clip(delta, ±clip_ratio) / tau, ±clip_u)`` for ``delta = logp - logp_anchor`` [N]."""
    return (delta.clamp(-clip_ratio, clip_ratio) / tau).clamp(-clip_u, clip_u)


def token_kl(batch: LossBatch, dtype: torch.dtype, estimator: str = "k3") -> Tensor:
    """Per-token estimator of KL(pi || ref) [N, T] with ``d = logp_ref - logp`` (0 on padding).

    ``k3``: ``exp(d) - d - 1``, d clamped to ±20 and the value at 10 (verl); ``k1``: ``-d``;
    ``k2``: ``d^2 / 2`` (neither exponentiates, so neither is clamped, as in verl).
    """
    if batch.logp_ref is None:
        raise ValueError("kl_coef > 0 needs reference log-probs (LossBatch.logp_ref is None)")
    d = (batch.logp_ref.to(dtype) - batch.logp.to(dtype)).masked_fill(batch.mask == 0, 0.0)  # [N, T]
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d.square()
    if estimator != "k3":
        raise ValueError(f"unknown kl_estimator {estimator!r}; valid: k1, k2, k3")
    d = d.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return (torch.exp(d) - d - 1).clamp(max=_KL_CLAMP)


def _add_kl(loss: Tensor, metrics: dict[str, float], batch: LossBatch, spec: AlgorithmSpec,
            ctx: LossContext, mode: str) -> Tensor:
    """``loss + kl_coef * agg(kl)`` when kl_coef > 0 (metric ``kl``: token mean over the micro-batch's
    tokens that stay in the loss). Not weighted by the stabilizers' weights (as in TRL)."""
    if spec.kl_coef <= 0:
        return loss
    kl = token_kl(batch, loss.dtype, spec.kl_estimator)  # [N, T]
    mask = batch.mask if batch.loss_mask is None else batch.loss_mask  # [N, T]
    metrics["kl"] = float(masked_mean(kl.detach(), mask))
    return loss + spec.kl_coef * agg_loss(
        kl, mask, mode, total_tokens=ctx.total_tokens, total_seqs=ctx.total_seqs,
        max_new_tokens=ctx.max_new_tokens,
    )


def _seq_weights(batch: LossBatch, dt: torch.dtype) -> Tensor | None:
    """Each completion's weight [N]: the token mean of ``batch.weights`` over its real tokens (TRL's
    effect on a sequence-level loss), or None when the stabilizers set none."""
    if batch.weights is None:
        return None
    m = batch.mask.to(dt)  # [N, T]
    return (batch.weights.to(dt) * m).sum(dim=-1) / m.sum(dim=-1).clamp(min=1)


def _weighted_tokens(per_token: Tensor, batch: LossBatch) -> Tensor:
    """A token-level policy term [N, T] times the stabilizers' weights (TRL multiplies the same way)."""
    return per_token if batch.weights is None else per_token * batch.weights.to(per_token.dtype)


def _floats(scalars: dict[str, Tensor]) -> dict[str, float]:
    """0-dim tensors to python floats with one device-to-host copy."""
    values = torch.stack([v.detach().to(torch.float64) for v in scalars.values()]).tolist()
    return dict(zip(scalars, values))


def _work_dtype(batch: LossBatch) -> torch.dtype:
    return torch.promote_types(batch.logp.dtype, torch.float32)


# --------------------------------------------------------------------------------------------------
# APO / ADPO


def _sample_weights(log_q: Tensor, u: Tensor, alpha: float) -> Tensor:
    """Effective per-sample weights ``-dD/du`` [B, G] (the coefficient of each sequence's gradient)."""
    with torch.enable_grad():
        u_ = u.detach().requires_grad_(True)
        d = alpha_divergence(log_q, torch.log_softmax(u_, dim=-1), alpha).sum()
        (grad,) = torch.autograd.grad(d, u_)
    return -grad


def _anchored_loss(batch: LossBatch, spec: AlgorithmSpec, ctx: LossContext, alpha: float
                   ) -> tuple[Tensor, dict[str, float]]:
    """Mean over groups of ``D_alpha(softmax(A/beta_r) || softmax(u))`` (+ z-loss, + KL)."""
    dt = _work_dtype(batch)
    real = batch.mask != 0  # [N, T]
    seq = sequence_logprob(batch.logp.to(dt), real, spec.logprob_reduction)  # [N]
    seq_old = sequence_logprob(batch.logp_old.to(dt), real, spec.logprob_reduction).detach()  # [N]
    if (w := _seq_weights(batch, dt)) is not None:  # completion j's gradient term times w_j; values unchanged
        seq = seq.detach() + w * (seq - seq.detach())
    delta = seq - seq_old  # [N]
    u = anchored_logits(delta, ctx.tau, spec.clip_ratio, spec.clip_u)  # [N]

    order, g = group_order(batch.group_ids, batch.group_size)
    u_g = u[order].view(-1, g)  # [B, G]
    a_g = batch.advantages.to(dt)[order].view(-1, g)  # [B, G]
    log_q = torch.log_softmax(a_g / spec.beta_r, dim=-1).detach()  # [B, G]
    log_p = torch.log_softmax(u_g, dim=-1)  # [B, G]

    div = alpha_divergence(log_q, log_p, alpha)  # [B]
    lse = torch.logsumexp(u_g, dim=-1)  # [B]
    # reference: lse^2, smallest at u = -log G; centred: (lse - log G)^2, zero and flat at u = 0
    centre = math.log(g) if spec.z_loss_form == "centred" else 0.0
    z = spec.z_loss_coef * (lse - centre).square()  # [B]
    loss = (div.sum() + z.sum()) / max(int(ctx.total_groups), 1)

    with torch.no_grad():
        w_sum = torch.logsumexp(alpha * log_q + (1 - alpha) * log_p, dim=-1).exp()  # [B] W
        clipped = (delta.abs() > spec.clip_ratio) | ((delta / ctx.tau).abs() > spec.clip_u)  # [N] a clip is active
        metrics = {"alpha": float(alpha), "tau": float(ctx.tau)} | _floats({
            "apo/divergence": div.mean(),
            "apo/W": w_sum.mean(),
            "apo/weight_std": _sample_weights(log_q, u_g, alpha).std(correction=0),
            "apo/u_abs_mean": u.abs().mean(),
            "apo/u_clip_frac": clipped.to(dt).mean(),
            "apo/logsumexp_u": lse.mean(),
            "apo/z_loss": z.mean(),
        })
    loss = _add_kl(loss, metrics, batch, spec, ctx, "token_mean")
    return loss, metrics


_ANCHORED_PARAMS = frozenset(
    {"tau", "beta_r", "clip_ratio", "clip_u", "z_loss_coef", "z_loss_form", "logprob_reduction", "adaptive_tau"}
)


@register_objective("apo", params=_ANCHORED_PARAMS | {"alpha"}, defaults={"advantage_std": "none"}, uses_alpha=True)
def apo_loss(batch: LossBatch, spec: AlgorithmSpec, ctx: LossContext) -> tuple[Tensor, dict[str, float]]:
    """APO: alpha-divergence in anchored coordinates, alpha from the schedule."""
    return _anchored_loss(batch, spec, ctx, float(ctx.alpha))


@register_objective("adpo", params=_ANCHORED_PARAMS, defaults={"advantage_std": "none"}, uses_alpha=False)
def adpo_loss(batch: LossBatch, spec: AlgorithmSpec, ctx: LossContext) -> tuple[Tensor, dict[str, float]]:
    """ADPO: APO at alpha = 1, the anchored cross-entropy KL(q || p)."""
    return _anchored_loss(batch, spec, ctx, 1.0)


# --------------------------------------------------------------------------------------------------
# Ratio losses: GRPO, Dr.GRPO, GSPO


def _clipped_surrogate(ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """PPO-clip ``max(-A r, -A clip(r, 1-eps_low, 1+eps_high))`` and TRL's low/high clip indicators."""
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps_low, 1 + eps_high))
    low = (ratio < 1 - eps_low) & (adv < 0)
    high = (ratio > 1 + eps_high) & (adv > 0)
    return loss, low, high


def _ratio_metrics(ratio: Tensor, low: Tensor, high: Tensor, mask: Tensor) -> dict[str, float]:
    """TRL's clip fractions and the mean ratio, over the real tokens (or sequences) of the micro-batch."""
    return _floats({
        "clip_ratio/low_mean": masked_mean(low.float(), mask),
        "clip_ratio/high_mean": masked_mean(high.float(), mask),
        "clip_ratio/region_mean": masked_mean((low | high).float(), mask),
        "ratio/mean": masked_mean(ratio.detach(), mask),
    })


def _token_log_ratio(batch: LossBatch, dt: torch.dtype) -> Tensor:
    """``logp - logp_old`` per token [N, T], 0 on padding, clamped before any exp."""
    lr = (batch.logp.to(dt) - batch.logp_old.to(dt).detach()).masked_fill(batch.mask == 0, 0.0)
    return lr.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)


def _grpo_loss(batch: LossBatch, spec: AlgorithmSpec, ctx: LossContext) -> tuple[Tensor, dict[str, float]]:
    """Token-level clipped surrogate, aggregated by ``loss_aggregation``."""
    dt = _work_dtype(batch)
    mode = resolved(spec, "loss_aggregation")
    ratio = _token_log_ratio(batch, dt).exp()  # [N, T]
    adv = batch.advantages.to(dt)[:, None]  # [N, 1]
    per_token, low, high = _clipped_surrogate(ratio, adv, resolved(spec, "eps_low"), resolved(spec, "eps_high"))
    loss = agg_loss(_weighted_tokens(per_token, batch), batch.mask, mode, total_tokens=ctx.total_tokens,
                    total_seqs=ctx.total_seqs, max_new_tokens=ctx.max_new_tokens)
    metrics = _ratio_metrics(ratio, low, high, batch.mask)
    return _add_kl(loss, metrics, batch, spec, ctx, mode), metrics


_GRPO_PARAMS = frozenset({"eps_low", "eps_high", "loss_aggregation"})


@register_objective(
    "grpo", params=_GRPO_PARAMS,
    defaults={"advantage_std": "group", "eps_low": 0.2, "eps_high": 0.2, "loss_aggregation": "token_mean"},
)
def grpo_loss(batch: LossBatch, spec: AlgorithmSpec, ctx: LossContext) -> tuple[Tensor, dict[str, float]]:
    """GRPO: token ratio, clip 0.2/0.2, group-std advantages, token-mean aggregation."""
    return _grpo_loss(batch, spec, ctx)


@register_objective(
    "dr_grpo", params=_GRPO_PARAMS,
    defaults={"advantage_std": "none", "eps_low": 0.2, "eps_high": 0.2, "loss_aggregation": "constant"},
)
def dr_grpo_loss(batch: LossBatch, spec: AlgorithmSpec, ctx: LossContext) -> tuple[Tensor, dict[str, float]]:
    """Dr.GRPO: GRPO without std scaling and with the constant (max_new_tokens) normaliser."""
    return _grpo_loss(batch, spec, ctx)


@register_objective(
    "gspo", params=frozenset({"eps_low", "eps_high"}),
    defaults={"advantage_std": "group", "eps_low": 3e-4, "eps_high": 4e-4},
)
def gspo_loss(batch: LossBatch, spec: AlgorithmSpec, ctx: LossContext) -> tuple[Tensor, dict[str, float]]:
    """GSPO: sequence ratio ``exp(mean_t log r_t)``, clipped surrogate per sequence, mean over sequences."""
    dt = _work_dtype(batch)
    lr = _token_log_ratio(batch, dt)  # [N, T]
    seq_lr = lr.sum(dim=-1) / batch.mask.to(dt).sum(dim=-1).clamp(min=1)  # [N]
    ratio = seq_lr.exp()  # [N]
    adv = batch.advantages.to(dt)  # [N]
    per_seq, low, high = _clipped_surrogate(ratio, adv, resolved(spec, "eps_low"), resolved(spec, "eps_high"))
    if (w := _seq_weights(batch, dt)) is not None:
        per_seq = per_seq * w
    loss = per_seq.sum() / max(int(ctx.total_seqs), 1)
    metrics = _ratio_metrics(ratio, low, high, torch.ones_like(ratio))
    return _add_kl(loss, metrics, batch, spec, ctx, "seq_mean_token_mean"), metrics


# --------------------------------------------------------------------------------------------------
# CISPO, SAPO


@register_objective(
    "cispo", params=frozenset({"eps_high", "loss_aggregation"}),
    defaults={"advantage_std": "group", "eps_high": 4.0, "loss_aggregation": "token_mean"},
)
def cispo_loss(batch: LossBatch, spec: AlgorithmSpec, ctx: LossContext) -> tuple[Tensor, dict[str, float]]:
    """CISPO (MiniMax-M1): ``-sg(min(r, 1 + eps_high)) A logp`` per token: the importance weight is
    clipped and detached, so every token keeps a gradient (none is dropped by a clip), token-mean."""
    dt = _work_dtype(batch)
    mode = resolved(spec, "loss_aggregation")
    real = batch.mask != 0  # [N, T]
    ratio = _token_log_ratio(batch, dt).exp()  # [N, T]
    cap = 1.0 + resolved(spec, "eps_high")
    weight = ratio.clamp(max=cap).detach()  # [N, T]
    adv = batch.advantages.to(dt)[:, None]  # [N, 1]
    per_token = -weight * adv * torch.where(real, batch.logp.to(dt), 0.0)  # [N, T]
    loss = agg_loss(_weighted_tokens(per_token, batch), batch.mask, mode, total_tokens=ctx.total_tokens,
                    total_seqs=ctx.total_seqs, max_new_tokens=ctx.max_new_tokens)
    high = (ratio > cap) & (adv > 0)  # TRL's cispo_clip_ratio
    metrics = _ratio_metrics(ratio, torch.zeros_like(high), high, batch.mask)
    return _add_kl(loss, metrics, batch, spec, ctx, mode), metrics


@register_objective(
    "sapo", params=frozenset({"sapo_temperature_pos", "sapo_temperature_neg", "loss_aggregation"}),
    defaults={"advantage_std": "group", "loss_aggregation": "seq_mean_token_mean"},
)
def sapo_loss(batch: LossBatch, spec: AlgorithmSpec, ctx: LossContext) -> tuple[Tensor, dict[str, float]]:
    """SAPO (soft adaptive policy optimization): ``-sigmoid(t (r - 1)) 4 / t * A`` per token, with
    ``t = sapo_temperature_pos`` where A > 0 and ``sapo_temperature_neg`` elsewhere: a smooth gate in
    place of the hard clip, whose gradient ``4 s (1 - s) r A`` is the policy gradient at r = 1 and
    fades as the ratio leaves 1 (the sooner the larger t). Sequence-mean of token means, as TRL."""
    dt = _work_dtype(batch)
    mode = resolved(spec, "loss_aggregation")
    ratio = _token_log_ratio(batch, dt).exp()  # [N, T]
    adv = batch.advantages.to(dt)[:, None]  # [N, 1]
    temp = torch.full_like(adv, spec.sapo_temperature_neg).masked_fill(adv > 0, spec.sapo_temperature_pos)  # [N, 1]
    gate = torch.sigmoid(temp * (ratio - 1))  # [N, T]
    per_token = -gate * 4 / temp * adv  # [N, T]
    loss = agg_loss(_weighted_tokens(per_token, batch), batch.mask, mode, total_tokens=ctx.total_tokens,
                    total_seqs=ctx.total_seqs, max_new_tokens=ctx.max_new_tokens)
    metrics = _floats({
        "ratio/mean": masked_mean(ratio.detach(), batch.mask),
        "sapo/gate_mean": masked_mean((4 * gate * (1 - gate)).detach(), batch.mask),  # 1 on-policy
    })
    return _add_kl(loss, metrics, batch, spec, ctx, mode), metrics
