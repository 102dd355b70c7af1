"""Packing prompt+completion token ids into padded batches, and per-token log-probs of completions.

Layout of a packed micro-batch (prompts left-padded, completions right-padded)::

    [pad pad p p p | c c c pad]
    [pad p p p p p | c c pad pad]
               P_max   T_max

so every completion starts at column P_max and the model only has to return the last T_max + 1
logits (``logits_to_keep``). Position ids follow the attention mask, exactly as the sampler does
with left padding, so the trainer's log-probs match the sampler's.

**Shared prompts.** A micro-batch holds whole groups: G completions of each prompt. Instead of running
every prompt G times, :func:`completion_logprobs` runs each distinct prompt once (its KV cache, with
gradient, and the logits of its last token, which predict the first completion token), repeats that
cache to the rows of its group, and runs the completions on top of it. The values and gradients are
those of the packed forward (the same attention over the same keys; gradients from the G rows of a
group add up in the shared prompt pass) at (P + G·T)/(G·(P + T)) of its token cost. The packed
forward is used when no prompt repeats, or when gradient checkpointing is on (a checkpointed layer
does not use a KV cache).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

# Set to False to force the packed forward everywhere (benchmarks compare the two).
SHARE_PROMPTS = True


@dataclass
class Packed:
    input_ids: torch.Tensor  # [n, P+T]
    attention_mask: torch.Tensor  # [n, P+T]
    position_ids: torch.Tensor  # [n, P+T]
    targets: torch.Tensor  # [n, T] completion token ids (pad where mask is 0)
    mask: torch.Tensor  # [n, T] float, 1 on completion tokens
    prompt_index: torch.Tensor  # [n] long: the distinct prompt (row of the prompt_* tensors) of each row
    prompt_ids: torch.Tensor  # [u, P] the distinct prompts, left-padded like input_ids[:, :P]
    prompt_mask: torch.Tensor  # [u, P]

    @property
    def completion_width(self) -> int:
        return self.targets.shape[1]

    @property
    def shares_prompts(self) -> bool:
        return self.prompt_ids.shape[0] < self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> Packed:
        return Packed(*(t.to(device, non_blocking=True) for t in
                        (self.input_ids, self.attention_mask, self.position_ids, self.targets, self.mask,
                         self.prompt_index, self.prompt_ids, self.prompt_mask)))


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
    distinct: dict[tuple[int, ...], int] = {}  # prompt -> its number among the distinct prompts
    index, first_rows = [], []
    for i, p in enumerate(prompts):
        key = tuple(p)
        if key not in distinct:
            distinct[key] = len(distinct)
            first_rows.append(i)
        index.append(distinct[key])
    rows = torch.tensor(first_rows, dtype=torch.long)
    return Packed(ids, attn, pos, targets, mask, torch.tensor(index, dtype=torch.long),
                  ids[rows, :p_max], attn[rows, :p_max])


def completion_logprobs(
    model,
    packed: Packed,
    *,
    autocast: AbstractContextManager | None = None,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of each completion token under ``model``: ([n, T], entropy [n, T] or None).

    Gradient flows when called outside ``torch.no_grad``. The entropy (from the same logits, no extra
    forward) is computed without gradient unless ``entropy_grad`` (an entropy bonus trains on it).
    """
    with autocast or nullcontext():
        if SHARE_PROMPTS and packed.shares_prompts and not getattr(model, "is_gradient_checkpointing", False):
            logits = _shared_prompt_logits(model, packed)
        else:
            out = model(
                input_ids=packed.input_ids,
                attention_mask=packed.attention_mask,
                position_ids=packed.position_ids,
                logits_to_keep=packed.completion_width + 1,
                use_cache=False,
            )
            logits = out.logits[:, :-1, :]  # position k predicts completion token k
    logits = logits.float()  # [n, T, V]
    lse = torch.logsumexp(logits, dim=-1)  # [n, T]
    tok = logits.gather(-1, packed.targets.unsqueeze(-1)).squeeze(-1)  # [n, T]
    logp = (tok - lse) * packed.mask
    entropy = None
    if with_entropy and entropy_grad:
        entropy = (lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)) * packed.mask  # [n, T]
    elif with_entropy:
        with torch.no_grad():
            probs = torch.softmax(logits.detach(), dim=-1)
            entropy = (lse.detach() - (probs * logits.detach()).sum(-1)) * packed.mask
    return logp, entropy


def _shared_prompt_logits(model, packed: Packed) -> torch.Tensor:
    """Logits [n, T, V] predicting each completion token, each distinct prompt run once."""
    t = packed.completion_width
    prompt_pos = (packed.prompt_mask.cumsum(-1) - 1).clamp(min=0)  # [u, P]
    out = model(input_ids=packed.prompt_ids, attention_mask=packed.prompt_mask, position_ids=prompt_pos,
                use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1:, :].index_select(0, packed.prompt_index)  # [n, 1, V]: predicts completion token 0
    if t == 1:
        return first
    cache = out.past_key_values
    cache.batch_select_indices(packed.prompt_index)  # [u, ...] -> [n, ...], differentiable
    prompt_mask = packed.prompt_mask.index_select(0, packed.prompt_index)  # [n, P]
    start = prompt_mask.sum(-1, keepdim=True)  # [n, 1] position of completion token 0
    steps = torch.arange(t - 1, device=start.device)  # the last completion token predicts nothing
    rest = model(
        input_ids=packed.targets[:, : t - 1],  # [n, T-1]
        attention_mask=torch.cat([prompt_mask, packed.mask[:, : t - 1].to(prompt_mask.dtype)], dim=1),
        position_ids=start + steps,  # [n, T-1]
        past_key_values=cache,
        use_cache=True,
    )
    return torch.cat([first, rest.logits], dim=1)  # [n, T, V]
