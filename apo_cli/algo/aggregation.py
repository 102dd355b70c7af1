"""Loss aggregation: how a per-token loss [N, T] becomes one number (verl's ``agg_loss``).

One mode string, three modes; the normalisers are those of the whole *mini-batch* (not of the
micro-batch being computed), so that summing the aggregated losses of the micro-batches of a
mini-batch gives exactly the loss of the mini-batch computed at once (gradient accumulation
invariance):

- ``token_mean``:          sum of all token losses / total tokens of the mini-batch (DAPO, TRL default);
- ``seq_mean_token_mean``: mean over sequences of each sequence's token mean (original GRPO);
- ``constant``:            sum of all token losses / (sequences × max_new_tokens) (Dr.GRPO: no
                           length bias, the normaliser does not depend on the batch).
"""

from __future__ import annotations

from torch import Tensor

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "constant")


def agg_loss(
    values: Tensor,
    mask: Tensor,
    mode: str,
    *,
    total_tokens: float,
    total_seqs: int,
    max_new_tokens: int,
) -> Tensor:
    """Aggregate ``values`` [N, T] over the real tokens ``mask`` [N, T] (1.0 real, 0.0 padding).

    Padding never contributes, even when ``values`` holds inf or NaN there.
    """
    m = mask.to(values.dtype)  # [N, T]
    v = values.masked_fill(m == 0, 0.0)  # [N, T]
    if mode == "token_mean":
        return v.sum() / max(float(total_tokens), 1.0)
    if mode == "seq_mean_token_mean":
        per_seq = v.sum(dim=-1) / m.sum(dim=-1).clamp(min=1.0)  # [N]
        return per_seq.sum() / max(int(total_seqs), 1)
    if mode == "constant":
        return v.sum() / max(int(total_seqs) * int(max_new_tokens), 1)
    raise ValueError(f"unknown loss aggregation {mode!r}; valid: {', '.join(AGGREGATIONS)}")


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over ``mask`` (same shape); 0 when the mask is empty. For metrics."""
    m = mask.to(values.dtype)
    return values.masked_fill(m == 0, 0.0).sum() / m.sum().clamp(min=1.0)
