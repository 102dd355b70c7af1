"""A tied input embedding whose backward touches only the rows the batch used (CPU).

SmolLM2, Qwen2.5-0.5B and other small models tie the input embedding to the output head: one
[vocab, hidden] weight (49152 × 576 for SmolLM2). PyTorch's dense embedding backward fills a zero
tensor of that whole shape and adds the batch's rows into it, for every forward pass; autograd then
adds it to the head's gradient. With shared prompts a micro-batch has two forward passes, so a step
of two micro-batches fills and adds four 113 MB tensors: about 7 % of a SmolLM2 step on two cores.

:func:`row_gradient_embedding` gives the embedding a backward that sums the gradient of each used
row into a small [rows, hidden] buffer and returns it as a coalesced sparse tensor; autograd adds it
into the head's dense gradient row by row. The sums are made exactly as the dense backward makes
them (from zero, in the order the tokens occur, skipping ``padding_idx``), and the head's gradient
of a row plus the row's sum is the same one addition, so the gradient is the same bit for bit
(``tests/test_golden.py`` checks weights and metrics) and ``.grad`` stays dense (the fused AdamW
needs it). ``nn.Embedding(sparse=True)`` is not used: it returns one row per token, which autograd
adds into the dense gradient one at a time, in another order than the dense sum (not bit-equal).

Switched on only where it pays and is safe: the CPU, a tied and trainable ``nn.Embedding`` without
``max_norm``/``scale_grad_by_freq``, an unsharded model. An untied embedding would get a sparse
``.grad``, which the fused AdamW refuses.
"""

from __future__ import annotations

from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F

from apo_cli.runtime.fsdp import is_sharded

__all__ = ["row_gradient_embedding"]


class _RowGradientEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.shape, ctx.padding_idx = weight.shape, padding_idx
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        (ids,) = ctx.saved_tensors
        flat, rows = ids.reshape(-1), grad.reshape(-1, ctx.shape[1])
        if ctx.padding_idx is not None:  # the dense backward leaves the padding row's gradient at zero
            keep = flat != ctx.padding_idx
            flat, rows = flat[keep], rows[keep]
        used, where = torch.unique(flat, return_inverse=True)  # sorted rows; each token's row among them
        sums = rows.new_zeros((used.numel(), ctx.shape[1])).index_add_(0, where, rows)  # in token order
        return None, torch.sparse_coo_tensor(used[None], sums, ctx.shape, is_coalesced=True,
                                             check_invariants=False), None


def _forward(self: torch.nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled() or not self.weight.requires_grad:
        return F.embedding(ids, self.weight, self.padding_idx)
    return _RowGradientEmbedding.apply(ids, self.weight, self.padding_idx)


def row_gradient_embedding(model: Any, device: torch.device) -> bool:
    """Give ``model``'s tied input embedding the row-sparse backward (see the module docstring) where
    it applies; returns whether it did."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is getattr(emb, "weight", None)
    if (device.type != "cpu" or is_sharded(model) or type(emb) is not torch.nn.Embedding or not tied
            or emb.max_norm is not None or emb.scale_grad_by_freq or emb.sparse or not emb.weight.requires_grad):
        return False
    emb.forward = MethodType(_forward, emb)
    return True
