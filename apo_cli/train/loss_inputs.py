"""What the loss of one micro-batch gets from the rollout (step 4 of apo_cli/train/loop.py), and the
step's engine/trainer mismatch metrics.

- :func:`loss_context`: the normalisers of the whole mini-batch; with ``algorithm.mask_truncated``
  the tokens of truncated completions leave ``total_tokens`` (they leave the loss).
- :func:`loss_batch`: the :class:`LossBatch` of a micro-batch: the trained log-probs, the anchors
  (a row trained first at the rollout weights is anchored by this very forward), the reference
  log-probs (``kl_coef > 0``), and the inputs of the stabilizers (apo_cli/algo/stabilizers.py): the
  engine's log-probs when the engine is not the trainer (:func:`uses_engine_logprobs`), the
  truncated rows (``mask_truncated``), the policy's entropy (``entropy_coef`` / ``top_entropy_quantile``).
- :func:`mismatch_metrics`: ``sampling/logprob_diff_*`` (|engine − trainer| per token at the
  rollout weights) and, when the rollout correction is on, ``sampling/importance_ratio_mean`` /
  ``_max`` and ``sampling/importance_masked_frac`` over the step's rows.

The engine is *not the trainer* when the backend samples with a separate engine: ``backend.rollout:
vllm``. On the CPU backend and with ``rollout: hf`` the policy samples itself; its engine log-probs
come from the same weights (they differ by rounding only), so the default correction is off there.
A correction mode set in the recipe applies whatever the backend, as long as it returns log-probs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from apo_cli.algo.objectives import LossBatch, LossContext
from apo_cli.algo.stabilizers import correction_mode, importance_ratio, ratio_metrics
from apo_cli.errors import TrainingError
from apo_cli.runtime.world import shared

if TYPE_CHECKING:
    from apo_cli.recipe import Recipe
    from apo_cli.train.policy import Anchors
    from apo_cli.train.rollout import Rollout


def separate_engine(recipe: Recipe) -> bool:
    """Whether the backend samples with an engine other than the trained policy (``rollout: vllm``)."""
    return getattr(recipe.backend, "rollout", None) == "vllm"


def uses_engine_logprobs(recipe: Recipe) -> bool:
    """The losses get the engine's log-probs: a separate engine, or a correction mode set in the recipe."""
    return separate_engine(recipe) or recipe.algorithm.rollout_correction.mode not in (None, "off")


def _mode(recipe: Recipe) -> str:
    return correction_mode(recipe.algorithm, uses_engine_logprobs(recipe))


def loss_context(trainer: Any, ro: Rollout, rows: list[int], alpha: float, tau: float) -> LossContext:
    """Normalisers of the whole mini-batch: this rank's ``rows`` and the other ranks' (as many rows each)."""
    recipe, world = trainer.recipe, trainer.world
    drop = recipe.algorithm.mask_truncated
    tokens = sum(len(ro.completion_ids[i]) for i in rows if not (drop and ro.finish[i] == "length"))
    total_tokens = world.sum(tokens)
    return LossContext(alpha=alpha, tau=tau, total_groups=world.size * len(rows) // trainer.G,
                       total_seqs=world.size * len(rows), total_tokens=max(total_tokens, 1.0),
                       max_new_tokens=recipe.rollout.max_new_tokens)


def _engine_rows(ro: Rollout, chunk: list[int], old: torch.Tensor) -> torch.Tensor:
    """[n, T] the engine's log-probs of the chunk's rows; a row whose count does not match its tokens
    keeps the trainer's (ratio 1: nothing to correct)."""
    engine = old.clone()
    for k, i in enumerate(chunk):
        lp = ro.engine_logprobs[i]
        if len(lp) == len(ro.completion_ids[i]) and lp:
            engine[k, : len(lp)] = torch.tensor(lp, dtype=old.dtype, device=old.device)[: old.shape[1]]
    return engine


def loss_batch(trainer: Any, ro: Rollout, chunk: list[int], logp: torch.Tensor, ent: torch.Tensor | None,
               mask: torch.Tensor, anchors: Anchors) -> LossBatch:
    """The loss inputs of micro-batch ``chunk`` whose policy forward gave ``logp``, ``ent``, ``mask`` [n, T]."""
    recipe, policy = trainer.recipe, trainer.policy
    a = recipe.algorithm
    old = torch.zeros_like(logp)
    for k, i in enumerate(chunk):
        anchors.take(i, logp[k])  # first visit at the rollout weights: the anchor is this forward
        old[k, : anchors[i].shape[0]] = anchors[i][: logp.shape[1]]
    prompts, comps = [ro.prompt_ids[i] for i in chunk], [ro.completion_ids[i] for i in chunk]
    ref = policy.ref_logprobs(prompts, comps) if a.kl_coef > 0 else None
    engine = None
    if uses_engine_logprobs(recipe):
        if ro.engine_logprobs is not None:
            engine = _engine_rows(ro, chunk, old)
        elif a.rollout_correction.mode not in (None, "off"):
            raise shared(TrainingError(
                f"algorithm.rollout_correction.mode={a.rollout_correction.mode} needs the engine's log-probs, but "
                f"backend {recipe.backend.kind!r} returns none", hint="set algorithm.rollout_correction.mode: off"))
    truncated = torch.tensor([ro.finish[i] == "length" for i in chunk], device=logp.device) if a.mask_truncated else None
    wants_entropy = a.entropy_coef > 0 or a.top_entropy_quantile < 1
    device = policy.device
    return LossBatch(logp=logp, logp_old=old, mask=mask, advantages=ro.advantages[chunk].to(device),
                     group_ids=ro.group_ids[chunk].to(device), logp_ref=ref, group_size=trainer.G,
                     logp_engine=engine, truncated=truncated, entropy=ent if wants_entropy else None)


def mismatch_metrics(trainer: Any, ro: Rollout, anchors: dict[int, torch.Tensor]) -> dict[str, float]:
    """The step's engine/trainer mismatch over the rows this rank anchored, averaged over the ranks
    (``_max`` keys: the maximum)."""
    if ro.engine_logprobs is None or not anchors:
        return {}
    rows = [(i, a) for i, a in anchors.items() if len(ro.engine_logprobs[i]) == a.numel() and a.numel()]
    if not rows:
        return {}
    diffs = [(torch.tensor(ro.engine_logprobs[i], dtype=torch.float32) - a.float().cpu()).abs() for i, a in rows]
    d = torch.cat(diffs)
    out = {"sampling/logprob_diff_mean": float(d.mean()), "sampling/logprob_diff_max": float(d.max())}
    mode = _mode(trainer.recipe)
    if mode != "off":
        t = max(a.numel() for _, a in rows)
        old = torch.zeros(len(rows), t)
        engine = torch.zeros(len(rows), t)
        mask = torch.zeros(len(rows), t)
        for k, (i, a) in enumerate(rows):
            old[k, : a.numel()] = a.float().cpu()
            engine[k, : a.numel()] = torch.tensor(ro.engine_logprobs[i], dtype=torch.float32)
            mask[k, : a.numel()] = 1.0
        rc = trainer.recipe.algorithm.rollout_correction
        _, ratio, outside = importance_ratio(old, engine, mask, mode, rc.clip_min, rc.clip_max)
        out.update(ratio_metrics(ratio, outside, mask))
    return trainer.world.mean(out)
