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

**No padding in the completions' pass.** There, the linear layers and the head run on the real
tokens only (``_RealRows``: ~15 % of the pass is padding with 16-token completions of mean length
14); log-probs and entropies are computed on those rows and laid out [n, T] again. On the CPU: the
same bits, values and gradients, as the padded pass (tests/test_batching_padding.py,
tests/test_golden.py). On CUDA the same computation, but cuBLAS chooses its kernels by shape, so the
last bits may differ from those of a padded pass.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

# Set to False to force the packed forward everywhere (benchmarks compare the two).
SHARE_PROMPTS = True
# Set to False to run the completions' pass on the padded layout (tests compare the two).
PADDING_FREE = True


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
    if SHARE_PROMPTS and packed.shares_prompts and not getattr(model, "is_gradient_checkpointing", False):
        logp, entropy = _shared_prompt_logprobs(model, packed, autocast or nullcontext(), with_entropy, entropy_grad)
    else:
        with autocast or nullcontext():
            out = model(
                input_ids=packed.input_ids,
                attention_mask=packed.attention_mask,
                position_ids=packed.position_ids,
                logits_to_keep=packed.completion_width + 1,
                use_cache=False,
            )
            logits = out.logits[:, :-1, :]  # position k predicts completion token k
        logp, entropy = _token_logprobs(logits, packed.targets, with_entropy, entropy_grad)
    logp = logp * packed.mask
    return logp, None if entropy is None else entropy * packed.mask


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor, with_entropy: bool,
                    entropy_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of ``targets`` [...] under ``logits`` [..., V], and the entropy (or None); each row of
    the last dimension on its own, so any selection of rows gives the same bits for those rows."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    entropy = None
    if with_entropy and entropy_grad:
        entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    elif with_entropy:
        with torch.no_grad():
            detached = logits.detach()
            entropy = lse.detach() - (torch.softmax(detached, dim=-1) * detached).sum(-1)
    return logp, entropy


def _shared_prompt_logprobs(model, packed: Packed, autocast: AbstractContextManager, with_entropy: bool,
                            entropy_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`completion_logprobs` with each distinct prompt run once, and the completions' pass
    free of padding: its linear layers and the head run on the real tokens only (:class:`_RealRows`)."""
    n, t = packed.targets.shape
    prompt_pos = (packed.prompt_mask.cumsum(-1) - 1).clamp(min=0)  # [u, P]
    with autocast:
        out = model(input_ids=packed.prompt_ids, attention_mask=packed.prompt_mask, position_ids=prompt_pos,
                    use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1, :].index_select(0, packed.prompt_index)  # [n, V]: predicts completion token 0
    parts = [(torch.arange(n, device=first.device) * t,  # flat index of token 0 of each row in [n, T]
              *_token_logprobs(first, packed.targets[:, 0], with_entropy, entropy_grad))]
    if t > 1:
        cache = out.past_key_values
        cache.batch_select_indices(packed.prompt_index)  # [u, ...] -> [n, ...], differentiable
        prompt_mask = packed.prompt_mask.index_select(0, packed.prompt_index)  # [n, P]
        start = prompt_mask.sum(-1, keepdim=True)  # [n, 1] position of completion token 0
        steps = torch.arange(t - 1, device=start.device)  # the last completion token predicts nothing
        rest_mask = packed.mask[:, : t - 1]  # [n, T-1]: the inputs that are real tokens
        real = rest_mask.reshape(-1).nonzero().squeeze(-1)  # [R] flat indices into [n, T-1]
        with autocast, _RealRows(model, (n, t - 1), real) as rows:
            rest = model(
                input_ids=packed.targets[:, : t - 1],  # [n, T-1]
                attention_mask=torch.cat([prompt_mask, rest_mask.to(prompt_mask.dtype)], dim=1),
                position_ids=start + steps,  # [n, T-1]
                past_key_values=cache,
                use_cache=True,
            )
            logits = rest.logits.reshape(-1, rest.logits.shape[-1])  # [R, V] when the head ran on real rows only
        del rest
        if not rows.packed_head and real.numel() != logits.shape[0]:
            logits = logits.index_select(0, real)
        # input k of a row predicts its completion token k + 1: flat index r of [n, T-1] -> r + r // (T-1) + 1 of [n, T]
        at = real + real.div(t - 1, rounding_mode="floor") + 1
        parts.append((at, *_token_logprobs(logits, packed.targets.reshape(-1).index_select(0, at), with_entropy,
                                           entropy_grad)))
    at = torch.cat([a for a, _, _ in parts])
    # the other places are filled as the padded layout's x * 0 gives: -0.0 for a log-prob (x <= 0), +0.0 for an entropy
    logp = parts[0][1].new_full((n * t,), -0.0).index_put((at,), torch.cat([lp for _, lp, _ in parts])).view(n, t)
    if parts[0][2] is None:
        return logp, None
    entropy = parts[0][2].new_zeros(n * t).index_put((at,), torch.cat([e for _, _, e in parts])).view(n, t)
    return logp, entropy


class _RealRows:
    """Within the context, each ``nn.Linear`` of ``model`` whose input is laid out ``shape`` (+ features)
    runs on the ``rows`` (flat indices) only, and its output is spread back with zeros elsewhere; the
    output embedding (the head) returns its [rows, V] logits without spreading (``packed_head``).

    A linear layer's output rows do not depend on the other rows, and the padding's rows carry no
    gradient (no real token attends to them, no loss reads them), so the real rows' values and every
    gradient are those of the padded pass; only the padding's own values change (zeros). Norms,
    attention and the residual stream still see the padded layout (a sum over rows, such as a norm
    weight's gradient, would not give the same bits over fewer rows). The inputs of layers that read
    the same tensor (query, key and value) are gathered once, except beside LoRA adapters.

    tests/test_golden.py (APO, GRPO, LoRA) and tests/test_batching_padding.py hold it to the bits of the
    padded pass."""

    def __init__(self, model, shape: tuple[int, int], rows: torch.Tensor):
        self.model, self.shape, self.rows = model, tuple(shape), rows
        self.full = shape[0] * shape[1]
        self.packed_head = False
        self._hooks: list = []
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (input, its real rows): one slot
        self._share = True  # one gather for the layers that read the same input (not beside LoRA adapters)
        self._active: set[int] = set()

    def __enter__(self) -> _RealRows:
        if not PADDING_FREE or self.rows.numel() == self.full:  # no padding: nothing to skip
            return self
        get_head = getattr(self.model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        adapters = False
        for module in self.model.modules():
            adapters = adapters or isinstance(getattr(module, "lora_A", None), torch.nn.Module)  # peft's LoRA
            if isinstance(module, torch.nn.Linear):
                self._hooks.append(module.register_forward_pre_hook(self._gather))
                self._hooks.append(module.register_forward_hook(self._spread if module is not head else self._keep))
        # beside an adapter (LoRA), an input's gradient adds those of the base layers and of the adapters
        # in one order; one gather for several base layers would add theirs first (other last bits)
        self._share = not adapters
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._last = None

    def _gather(self, module, args):
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or tuple(x.shape[:2]) != self.shape:
            return None
        if self._last is None or self._last[0] is not x or not self._share:
            self._last = (x, x.reshape(self.full, x.shape[-1]).index_select(0, self.rows))
        self._active.add(id(module))
        return (self._last[1], *args[1:])

    def _spread(self, module, args, out):
        if id(module) not in self._active:
            return None
        self._active.discard(id(module))
        full = out.new_zeros((self.full, out.shape[-1])).index_copy(0, self.rows, out)
        return full.view(*self.shape, out.shape[-1])

    def _keep(self, module, args, out):
        if id(module) not in self._active:
            return None
        self._active.discard(id(module))
        self.packed_head = True
        return out

