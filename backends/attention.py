"""Attention of the CPU backend: in no-grad forwards, grouped keys and values are read in place.

A grouped-query model has fewer key/value heads than query heads (SmolLM2-135M: 3 for 9, Qwen2.5:
2 for 14). Whenever a mask is passed (left-padded prompts: every rollout with prompts of several
lengths), transformers' ``sdpa`` attention copies each key/value head once per query head of its
group (``repeat_kv``) before calling ``scaled_dot_product_attention``, because CUDA's fused kernels
take no mask with ``enable_gqa``. PyTorch's CPU flash kernel does: it reads the group's head where
the copy would be. A SmolLM2 decoding step then skips two copies of the whole cache per layer and
the kernel runs on a third of the keys' memory (measured: 0.63 → 0.28 ms a call at 32 rows ×
30 keys).

The outputs are the same bits (the same products and sums on the same values,
``tests/test_backend_protocol.py``); the gradients are not (the kernel's backward adds the query
heads of a group in another order than autograd's backward of the copy), so with gradient enabled
(the trained forward), a dropout, a position bias, no mask or one key/value head per query head,
this is transformers' ``sdpa`` unchanged.

:func:`use_grouped_attention` switches a model that runs ``sdpa`` to it (``config._attn_implementation``,
under the name :data:`NAME` in transformers' ``AttentionInterface``, with ``sdpa``'s masks); the CPU
backend calls it in ``setup``, and off the CPU it is ``sdpa`` again. A model whose attention is not
called through ``AttentionInterface``, or whose code branches on the name ``sdpa`` (Falcon), keeps ``sdpa``. The name is not saved: a
checkpoint's ``config.json`` has no attention implementation.
"""

from __future__ import annotations

import inspect
import re
import sys
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["NAME", "grouped_sdpa", "use_grouped_attention"]

NAME = "apo_grouped_sdpa"


def grouped_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' ``sdpa_attention_forward`` with ``enable_gqa`` where it gives the same bits."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (torch.is_grad_enabled() or attention_mask is None or dropout or query.device.type != "cpu"
            or getattr(module, "num_key_value_groups", 1) <= 1 or kwargs.get("position_bias") is not None
            or kwargs.get("output_attentions")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def use_grouped_attention(model: Any) -> bool:
    """Give ``model`` :func:`grouped_sdpa` if it runs transformers' ``sdpa`` attention; returns whether it did."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    can_set = getattr(model, "_can_set_attn_implementation", None)  # False: attention outside AttentionInterface
    if (can_set is not None and not can_set()) or _special_cases_sdpa(model):
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, grouped_sdpa)  # idempotent
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the masks sdpa gets (without it, transformers builds none)
    model.set_attn_implementation(NAME)
    return config._attn_implementation == NAME


def _special_cases_sdpa(model: Any) -> bool:
    """Whether the model's modeling code does something of its own when its attention is named ``sdpa``
    (Falcon, GLM-5): another name would change more than the attention call."""
    base = getattr(model, "get_base_model", None)
    module = sys.modules.get(type(base() if callable(base) else model).__module__)
    try:
        code = inspect.getsource(module) if module is not None else ""
    except (OSError, TypeError):
        return True
    return re.search(r"""_attn_implementation\s*[!=]=\s*["']sdpa["']""", code) is not None
