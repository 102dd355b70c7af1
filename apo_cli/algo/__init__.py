"""The algorithm core: pure tensor code, no model, no device assumptions.

- :mod:`~apo_cli.algo.objectives` — the objective registry (apo, adpo, grpo, gspo, dr_grpo, cispo,
  sapo) and the exact alpha-divergence;
- :mod:`~apo_cli.algo.stabilizers` — rollout correction, off-policy mask, truncated rows, entropy
  mask and bonus around every objective; :func:`objective_loss`, the loss of one micro-batch;
- :mod:`~apo_cli.algo.advantages` — group gathering, group-relative advantages, the target q;
- :mod:`~apo_cli.algo.aggregation` — token-mean / sequence-mean / constant loss aggregation;
- :mod:`~apo_cli.algo.schedules` — per-rollout signals, alpha schedules, adaptive tau.
"""

from apo_cli.algo.advantages import compute_advantages, group_order, group_target, group_view, ungroup
from apo_cli.algo.aggregation import AGGREGATIONS, agg_loss, masked_mean
from apo_cli.algo.objectives import (
    OBJECTIVES,
    LossBatch,
    LossContext,
    ObjectiveInfo,
    alpha_divergence,
    anchored_logits,
    get_objective,
    make_objective,
    register_objective,
    resolved,
    sequence_logprob,
    token_kl,
)
from apo_cli.algo.stabilizers import importance_ratio, objective_loss, prepare
from apo_cli.algo.schedules import (
    ALPHA_SCHEDULES,
    AlphaSchedule,
    LossBatchSchedule,
    Signals,
    TauSchedule,
    compute_signals,
    loss_batch_signals,
    make_alpha_schedule,
)

__all__ = [
    "AGGREGATIONS",
    "ALPHA_SCHEDULES",
    "OBJECTIVES",
    "AlphaSchedule",
    "LossBatch",
    "LossBatchSchedule",
    "LossContext",
    "ObjectiveInfo",
    "Signals",
    "TauSchedule",
    "agg_loss",
    "alpha_divergence",
    "anchored_logits",
    "compute_advantages",
    "compute_signals",
    "get_objective",
    "group_order",
    "group_target",
    "group_view",
    "importance_ratio",
    "loss_batch_signals",
    "make_alpha_schedule",
    "make_objective",
    "masked_mean",
    "objective_loss",
    "prepare",
    "register_objective",
    "resolved",
    "sequence_logprob",
    "token_kl",
    "ungroup",
]
