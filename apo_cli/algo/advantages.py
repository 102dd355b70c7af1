"""Group bookkeeping and group-relative advantages.

A rollout holds B prompts × G completions, flattened to N = B*G rows that may come in any order;
``group_ids`` [N] says which prompt each row answers. Everything that is computed *per group*
(advantages, the target q, the group softmax of the objectives, signals) first gathers the rows by
group id with :func:`group_order` — a stable sort by id, a check that every group present has the
same size, then a view ``[B, G]`` — so shuffling rows while keeping their ids changes nothing.

Advantages (APO_METHOD §1): ``A = R - mean_G(R)``, optionally divided by the group std (GRPO, TRL's
``scale_rewards="group"``), by the std of all rewards of the batch (``"batch"``), or not at all
(``"none"``: APO/ADPO reference and Dr.GRPO). The std is the unbiased one, as in TRL and verl.
"""

from __future__ import annotations

import torch
from torch import Tensor

ADVANTAGE_STD_MODES = ("none", "group", "batch")


def group_order(group_ids: Tensor, group_size: int | None = None) -> tuple[Tensor, int]:
    """The stable permutation that sorts rows by group id, and the common group size G.

    Args:
        group_ids: [N] integer group ids; every group present must have the same number of rows.
        group_size: the rollout's G, when known: every group id present must then have exactly G
            rows. Without it G is inferred from the rows, which cannot tell two groups of 6 each cut
            to 3 + 3 from whole groups of 3; the training loop always passes it.

    Returns:
        ``(order [N], G)`` such that ``x[order].view(N // G, G)`` is grouped ``[B, G]``.
    """
    ids = group_ids.reshape(-1)
    if ids.numel() == 0:
        raise ValueError("empty batch: no rows to group")
    order = torch.argsort(ids, stable=True)  # [N]
    uniq, counts = torch.unique_consecutive(ids[order], return_counts=True)  # [B]
    sizes = counts.tolist()
    if group_size is not None and (min(sizes) != group_size or max(sizes) != group_size):
        cut = [(int(g), int(c)) for g, c in zip(uniq.tolist(), sizes) if c != group_size]
        shown = ", ".join(f"group {g}: {c} rows" for g, c in cut[:4]) + (" ..." if len(cut) > 4 else "")
        raise ValueError(
            f"groups must be whole to take a group softmax: G = {group_size} rows per group, but {shown}"
        )
    if min(sizes) != max(sizes):
        raise ValueError(
            "groups must be whole and of equal size to take a group softmax; "
            f"found group sizes {sorted(set(sizes))} for {len(sizes)} groups"
        )
    return order, sizes[0]


def group_view(x: Tensor, group_ids: Tensor, group_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Gather ``x`` [N, ...] by group: returns ``(x_grouped [B, G, ...], order [N])``."""
    order, g = group_order(group_ids, group_size)
    return x[order].reshape(-1, g, *x.shape[1:]), order


def ungroup(x_grouped: Tensor, order: Tensor) -> Tensor:
    """Inverse of :func:`group_view`: ``[B, G, ...]`` back to ``[N, ...]`` in the original row order."""
    flat = x_grouped.reshape(-1, *x_grouped.shape[2:])  # [N, ...] in sorted order
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return flat[inverse]


@torch.no_grad()
def compute_advantages(
    rewards: Tensor, group_ids: Tensor, std: str = "none", eps: float = 1e-6
) -> tuple[Tensor, dict[str, float]]:
    """Group-centred advantages with optional std scaling.

    Args:
        rewards: [N] summed rewards.
        group_ids: [N] group of each row.
        std: ``"none"`` (centred only), ``"group"`` (÷ group std + eps), ``"batch"`` (÷ batch std + eps).
        eps: added to the std before dividing (``algorithm.advantage_eps``; verl 1e-6, TRL 1e-4).

    Returns:
        ``(advantages [N], stats)`` with TRL's ``reward`` (mean), ``reward_std`` (mean within-group
        std) and ``frac_reward_zero_std`` (fraction of groups whose rewards are all equal).
    """
    if std not in ADVANTAGE_STD_MODES:
        raise ValueError(f"unknown advantage std mode {std!r}; valid: {', '.join(ADVANTAGE_STD_MODES)}")
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32))  # [N]
    rg, order = group_view(r, group_ids)  # [B, G]
    std_g = rg.std(dim=-1, keepdim=True)  # [B, 1] unbiased
    adv = rg - rg.mean(dim=-1, keepdim=True)  # [B, G]
    if std == "group":
        adv = adv / (std_g + eps)
    elif std == "batch":
        adv = adv / (r.std() + eps)
    zero_std = torch.isclose(std_g, torch.zeros_like(std_g))  # [B, 1]
    stats = {
        "reward": float(r.mean()),
        "reward_std": float(std_g.mean()),
        "frac_reward_zero_std": float(zero_std.float().mean()),
    }
    return ungroup(adv, order), stats


@torch.no_grad()
def group_target(advantages: Tensor, group_ids: Tensor, beta_r: float) -> Tensor:
    """Target distribution ``q = softmax_G(A / beta_r)`` per group, returned per row [N], no grad."""
    ag, order = group_view(advantages, group_ids)  # [B, G]
    return ungroup(torch.softmax(ag / beta_r, dim=-1), order)
