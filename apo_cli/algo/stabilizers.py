"""Loss-side stabilizers applied around every objective (issue 16), and the loss entry point.

:func:`objective_loss` is what the training loop calls for one micro-batch: :func:`prepare` turns
the stabilizer inputs of the :class:`LossBatch` into per-token weights ``LossBatch.weights`` [N, T]
(no grad), the objective honours them (apo_cli/algo/objectives.py: token objectives multiply each
token's policy term, gspo each sequence's term by the token mean, apo/adpo each completion's
gradient term), then the entropy bonus is added. The weights are the product of:

1. **Rollout correction** (``algorithm.rollout_correction``; TRL 1.16 ``vllm_importance_sampling_*``):
   ``rho = exp(logp_old - logp_engine)``, the trainer's log-prob at the rollout weights over the
   engine's, per token (``token_*``) or one per completion from the summed difference
   (``sequence_*``); ``*_truncate`` clamps rho to ``[clip_min, clip_max]``, ``*_mask`` sets it to 0
   outside. Padding and tokens the engine could not score (NaN) have a difference of 0 (rho = 1),
   and the difference is clamped to ±20 before the exponential. Only when the batch carries the
   engine's log-probs (the loop gives them when the engine is not the trainer); mode ``null`` is
   then ``sequence_mask``, TRL's default.
2. **Off-policy sequence mask** (``algorithm.off_policy_mask_threshold``; DeepSeek-V3.2, TRL): a
   completion with ``A < 0`` whose token mean of ``logp_behaviour - logp`` (the current policy,
   detached) exceeds the threshold gets weight 0; ``logp_behaviour`` is the engine's log-probs when
   given, else ``logp_old``.
3. **Truncated completions** (``algorithm.mask_truncated``; TRL ``mask_truncated_completions``):
   rows cut at ``max_new_tokens`` get weight 0 and leave ``LossBatch.loss_mask`` (the KL and the
   entropy bonus); the loop leaves their tokens out of the token normaliser.
4. **High-entropy tokens** (``algorithm.top_entropy_quantile`` q < 1; TRL's rule): only tokens whose
   entropy is at or above the ``1 - q`` quantile of the micro-batch's loss tokens train.

The **entropy bonus** (``algorithm.entropy_coef`` c > 0; TRL's rule) subtracts ``c`` times the mean
entropy of the tokens that train (``loss_mask``, and the high-entropy tokens when q < 1); each
micro-batch's mean counts by its share of the mini-batch's loss tokens, so micro-batch losses add up.

With every stabilizer off (the defaults, or no engine log-probs) the batch passes unchanged.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from apo_cli.algo.aggregation import masked_mean

if TYPE_CHECKING:
    from apo_cli.algo.objectives import LossBatch, LossContext, ObjectiveInfo
    from apo_cli.algo.spec import AlgorithmSpec

_LOG_RATIO_CLAMP = 20.0


def correction_mode(spec: AlgorithmSpec, has_engine: bool) -> str:
    """The rollout-correction mode in force: the recipe's, or (null) sequence_mask with a separate engine, else off."""
    mode = spec.rollout_correction.mode
    if mode is None:
        return "sequence_mask" if has_engine else "off"
    return mode


def importance_ratio(logp_old: Tensor, logp_engine: Tensor, mask: Tensor, mode: str,
                     clip_min: float | None, clip_max: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """The rollout correction of TRL 1.16 (``vllm_importance_sampling_mode``).

    Args:
        logp_old: [N, T] the trainer's log-probs at the rollout weights.
        logp_engine: [N, T] the engine's log-probs of the same tokens.
        mask: [N, T] 1 on real completion tokens.
        mode: token_truncate, token_mask, sequence_truncate or sequence_mask.

    Returns:
        ``(weight [N, T], ratio, outside)``: the weight of each token (0 on padding); the raw ratio and
        whether it lies outside ``[clip_min, clip_max]``, both [N, T] (token modes) or [N, 1] (sequence).
    """
    if mode not in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"):
        raise ValueError(f"unknown rollout correction mode {mode!r}")
    dt = torch.promote_types(logp_old.dtype, torch.float32)
    real = mask != 0  # [N, T]
    diff = torch.where(real, logp_old.to(dt) - logp_engine.to(dt), 0.0).nan_to_num(nan=0.0)  # [N, T]
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)  # [N, 1]
    ratio = diff.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP).exp()
    outside = torch.zeros_like(ratio, dtype=torch.bool)
    if clip_min is not None:
        outside |= ratio < clip_min
    if clip_max is not None:
        outside |= ratio > clip_max
    weight = ratio.clamp(min=clip_min, max=clip_max) if mode.endswith("truncate") else ratio.masked_fill(outside, 0.0)
    return weight.expand(real.shape) * real.to(dt), ratio, outside  # [N, T]


def ratio_metrics(ratio: Tensor, outside: Tensor, mask: Tensor) -> dict[str, float]:
    """``sampling/importance_ratio_mean`` / ``_max`` of the raw ratio and ``sampling/importance_masked_frac``
    (the share outside [clip_min, clip_max]: set to 0 by *_mask, clamped by *_truncate), over the real
    tokens (token modes) or the completions (sequence modes)."""
    if ratio.shape[-1] == 1:
        flat, out = ratio.reshape(-1), outside.reshape(-1)
    else:
        real = mask != 0
        flat, out = ratio[real], outside[real]
    if flat.numel() == 0:
        return {}
    return {"sampling/importance_ratio_mean": float(flat.mean()), "sampling/importance_ratio_max": float(flat.max()),
            "sampling/importance_masked_frac": float(out.to(flat.dtype).mean())}


def off_policy_keep(advantages: Tensor, logp: Tensor, logp_behaviour: Tensor, mask: Tensor,
                    threshold: float) -> Tensor:
    """DeepSeek-V3.2's off-policy sequence mask (TRL ``get_off_policy_mask``): [N] 1.0 keep, 0.0 drop.

    Keep a completion when ``A >= 0`` or the token mean of ``logp_behaviour - logp`` (detached) is at
    most ``threshold``; tokens the behaviour policy could not score (NaN) count as 0.
    """
    m = mask.to(logp.dtype)  # [N, T]
    kl = torch.where(mask != 0, logp_behaviour.to(logp.dtype) - logp.detach(), 0.0).nan_to_num(nan=0.0)  # [N, T]
    avg = kl.sum(dim=-1) / m.sum(dim=-1).clamp(min=1.0)  # [N]
    return ((advantages >= 0) | (avg <= threshold)).to(logp.dtype)


def high_entropy_mask(entropy: Tensor, mask: Tensor, quantile: float) -> Tensor:
    """TRL's ``get_high_entropy_mask`` with threshold ``1 - top_entropy_quantile``: [N, T] bool, True on
    the real tokens whose entropy is at or above that quantile of the real tokens' entropies."""
    real = mask != 0
    values = entropy.detach()[real].float()
    if values.numel() == 0:
        return torch.zeros_like(real)
    threshold = torch.quantile(values, 1.0 - quantile)
    return (torch.where(real, entropy.detach(), 0.0) >= threshold) & real


def prepare(batch: LossBatch, spec: AlgorithmSpec) -> tuple[LossBatch, dict[str, float], Tensor | None]:
    """The batch with the stabilizers' ``weights`` and ``loss_mask`` set (unchanged when all are off),
    their metrics, and the entropy mask [N, T] (None when every token trains)."""
    dt = torch.promote_types(batch.logp.dtype, torch.float32)
    metrics: dict[str, float] = {}
    loss_mask, weights = None, None
    if spec.mask_truncated and batch.truncated is not None:
        loss_mask = batch.mask.to(dt) * (~batch.truncated.to(torch.bool, copy=False)).to(dt)[:, None]  # [N, T]
        weights = loss_mask
    mask = batch.mask if loss_mask is None else loss_mask  # [N, T]
    mode = correction_mode(spec, batch.logp_engine is not None)
    if mode != "off":
        if batch.logp_engine is None:
            raise ValueError(f"rollout correction {mode} needs the engine's log-probs (LossBatch.logp_engine is None)")
        rc = spec.rollout_correction
        rho, _, _ = importance_ratio(batch.logp_old, batch.logp_engine, batch.mask, mode, rc.clip_min, rc.clip_max)
        weights = rho if weights is None else weights * rho
    if spec.off_policy_mask_threshold is not None:
        behaviour = batch.logp_old if batch.logp_engine is None else batch.logp_engine
        keep = off_policy_keep(batch.advantages.to(dt), batch.logp.to(dt), behaviour, mask,
                               spec.off_policy_mask_threshold)  # [N]
        metrics["off_policy/masked_frac"] = float(1 - keep.mean())
        weights = keep[:, None] * (batch.mask.to(dt) if weights is None else weights)
    ent_mask = None
    if spec.top_entropy_quantile < 1.0:
        if batch.entropy is None:
            raise ValueError("top_entropy_quantile < 1 needs the policy entropy (LossBatch.entropy is None)")
        ent_mask = high_entropy_mask(batch.entropy, mask, spec.top_entropy_quantile)  # [N, T]
        metrics["entropy/trained_frac"] = float(masked_mean(ent_mask.to(dt), mask))
        weights = ent_mask.to(dt) * (batch.mask.to(dt) if weights is None else weights)
    if weights is None and loss_mask is None:
        return batch, metrics, None
    return replace(batch, weights=weights, loss_mask=loss_mask), metrics, ent_mask


def entropy_bonus(batch: LossBatch, ctx: LossContext, ent_mask: Tensor | None) -> Tensor:
    """Mean entropy of the micro-batch's tokens that train, times its share of the mini-batch's loss tokens."""
    if batch.entropy is None:
        raise ValueError("entropy_coef > 0 needs the policy entropy (LossBatch.entropy is None)")
    mask = batch.mask if batch.loss_mask is None else batch.loss_mask  # [N, T]
    real = mask != 0
    eff = real if ent_mask is None else real & ent_mask  # [N, T]
    ent = torch.where(eff, batch.entropy, 0.0)  # [N, T]
    mean = ent.sum() / eff.sum().clamp(min=1)
    return mean * real.sum() / max(float(ctx.total_tokens), 1.0)


def objective_loss(info: ObjectiveInfo, batch: LossBatch, spec: AlgorithmSpec, ctx: LossContext
                   ) -> tuple[Tensor, dict[str, float]]:
    """One micro-batch's loss and metrics: the stabilizers, objective ``info``, the entropy bonus."""
    batch, metrics, ent_mask = prepare(batch, spec)
    loss, m = info.fn(batch, spec, ctx)
    if spec.entropy_coef > 0:
        bonus = entropy_bonus(batch, ctx, ent_mask)
        metrics["entropy_bonus"] = float(bonus.detach())
        loss = loss - spec.entropy_coef * bonus.to(loss.dtype)
    return loss, {**m, **metrics}
