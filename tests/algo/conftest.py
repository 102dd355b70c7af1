"""Builders shared by the algorithm tests: random grouped batches with padding, contexts, specs."""

from __future__ import annotations

import torch

from apo_cli.algo import LossBatch, LossContext, compute_advantages, get_objective
from apo_cli.recipe import AlgorithmSpec


def make_batch(
    n_groups: int = 3,
    g: int = 4,
    t: int = 7,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    on_policy: bool = False,
    shuffle: bool = True,
    std: str = "none",
) -> LossBatch:
    """A micro-batch of whole groups with ragged lengths, rows in random order, logp requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    n = n_groups * g
    lengths = torch.randint(1, t + 1, (n,), generator=gen)
    lengths[0] = t  # at least one full-length row
    mask = (torch.arange(t)[None, :] < lengths[:, None]).to(dtype)  # [N, T]
    logp_old = -3.0 * torch.rand(n, t, generator=gen, dtype=dtype)  # [N, T]
    shift = 0.0 if on_policy else 0.4 * torch.randn(n, 1, generator=gen, dtype=dtype) + 0.2 * torch.randn(
        n, t, generator=gen, dtype=dtype
    )
    logp = (logp_old + shift).clamp(max=0.0)
    logp_ref = (logp_old + 0.3 * torch.randn(n, t, generator=gen, dtype=dtype)).clamp(max=0.0)
    group_ids = torch.arange(n_groups).repeat_interleave(g) * 7 + 3  # non-contiguous ids
    rewards = torch.randint(0, 3, (n,), generator=gen).to(dtype) / 2
    if shuffle:
        perm = torch.randperm(n, generator=gen)
        mask, logp_old, logp, logp_ref, group_ids, rewards = (
            x[perm] for x in (mask, logp_old, logp, logp_ref, group_ids, rewards)
        )
    adv, _ = compute_advantages(rewards, group_ids, std)
    return LossBatch(
        logp=logp.clone().requires_grad_(True),
        logp_old=logp_old,
        mask=mask,
        advantages=adv.to(dtype),
        group_ids=group_ids,
        logp_ref=logp_ref,
    )


def make_ctx(
    batch: LossBatch, *, alpha: float = 0.7, tau: float = 0.5, max_new_tokens: int | None = None
) -> LossContext:
    """Normalisers of ``batch`` taken as the whole mini-batch."""
    return LossContext(
        alpha=alpha,
        tau=tau,
        total_groups=int(torch.unique(batch.group_ids).numel()),
        total_seqs=int(batch.mask.shape[0]),
        total_tokens=float(batch.mask.sum()),
        max_new_tokens=int(max_new_tokens or batch.mask.shape[1]),
    )


def run_loss(name: str, batch: LossBatch, ctx: LossContext, **spec_kwargs):
    spec = AlgorithmSpec(objective=name, **spec_kwargs)
    return get_objective(name).fn(batch, spec, ctx)

