"""Packing prompt+completion token ids into padded batches, and per-token log-probs of completions.

Layout of a packed micro-batch (prompts left-padded, completions right-padded)::

    [pad pad p p p | c c c pad]
    [pad p p p p p | c c pad pad]
               P_max   T_max

so every completion starts at column P_max and the model only has to return the last T_max + 1
logits (``logits_to_keep``). Position ids follow the attention mask, exactly as ``generate`` does
with left padding, so the trainer's log-probs match the sampler's.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch


@dataclass
class Packed:
    input_ids: torch.Tensor  # [n, P+T]
    attention_mask: torch.Tensor  # [n, P+T]
    position_ids: torch.Tensor  # [n, P+T]
    targets: torch.Tensor  # [n, T] completion token ids (pad where mask is 0)
    mask: torch.Tensor  # [n, T] float, 1 on completion tokens

    @property
    def completion_width(self) -> int:
        return self.targets.shape[1]

    def to(self, device: torch.device | str) -> Packed:
        return Packed(*(t.to(device, non_blocking=True) for t in
                        (self.input_ids, self.attention_mask, self.position_ids, self.targets, self.mask)))


def pack(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> Packed:
    n = len(prompts)
    p_max = max(len(p) for p in prompts)
    t_max = max(1, max(len(c) for c in completions))
    ids = torch.full((n, p_max + t_max), pad_id, dtype=torch.long)
    attn = torch.zeros((n, p_max + t_max), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids[i, p_max - len(p) : p_max] = torch.tensor(p, dtype=torch.long)
        attn[i, p_max - len(p) : p_max] = 1
        if c:
            ids[i, p_max : p_max + len(c)] = torch.tensor(c, dtype=torch.long)
            attn[i, p_max : p_max + len(c)] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    targets = ids[:, p_max:]
    mask = attn[:, p_max:].float()
    return Packed(ids, attn, pos, targets, mask)


def completion_logprobs(
    model,
    packed: Packed,
    *,
    autocast: AbstractContextManager | None = None,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of each completion token under ``model``: ([n, T], entropy [n, T] or None).

    Gradient flows when called outside ``torch.no_grad``. Entropy is computed without gradient.
    """
    t = packed.completion_width
    with autocast or nullcontext():
        out = model(
            input_ids=packed.input_ids,
            attention_mask=packed.attention_mask,
            position_ids=packed.position_ids,
            logits_to_keep=t + 1,
            use_cache=False,
        )
    logits = out.logits[:, :-1, :].float()  # [n, T, V]: position k predicts completion token k
    lse = torch.logsumexp(logits, dim=-1)  # [n, T]
    tok = logits.gather(-1, packed.targets.unsqueeze(-1)).squeeze(-1)  # [n, T]
    logp = (tok - lse) * packed.mask
    entropy = None
    if with_entropy:
        with torch.no_grad():
            probs = torch.softmax(logits.detach(), dim=-1)
            entropy = (lse.detach() - (probs * logits.detach()).sum(-1)) * packed.mask
    return logp, entropy
