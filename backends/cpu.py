"""CPU backend: transformers ``generate`` on the policy itself, PyTorch training on the CPU.

The engine *is* the policy, so ``sync_weights`` has nothing to do and the engine's log-probs are
the policy's own (computed from the raw logits of each decoding step, temperature 1, as vLLM
reports them). Generation uses the KV cache and left padding; prompts are repeated G times by
``num_return_sequences``. Stop strings are applied here, on decoded text, so that the returned ids
end exactly where the stop string ends and no padding token is ever mistaken for an EOS.

Nothing here imports vLLM or CUDA.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from backends import Completion, SamplingParams


class CPUBackend:
    name = "cpu"

    def __init__(self, spec: Any):
        self.spec = spec
        self.model: Any = None
        self.tokenizer: Any = None
        self.device = torch.device("cpu")
        threads = getattr(spec, "threads", None) or os.cpu_count() or 1
        torch.set_num_threads(threads)
        self.autocast_dtype = torch.bfloat16 if getattr(spec, "dtype", "float32") == "bfloat16" else None

    # -- Protocol ---------------------------------------------------------------------------------

    def setup(self, model: Any, tokenizer: Any) -> Any:
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        return self.model

    def autocast(self):
        """Context for forward passes (generation and training) in the backend's compute dtype."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=self.autocast_dtype)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        if not prompts:
            return []
        tok, model = self.tokenizer, self.model
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos_ids(model, tok)[0]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # [B, P] left-padded
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention[i, width - len(p) :] = 1
        kwargs: dict[str, Any] = dict(
            max_new_tokens=params.max_new_tokens,
            num_return_sequences=params.n,
            pad_token_id=pad_id,
            eos_token_id=eos_ids(model, tok),
            return_dict_in_generate=True,
            output_logits=True,
            use_cache=True,
        )
        if params.greedy:
            kwargs.update(do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(
                do_sample=True,
                temperature=params.temperature,
                top_p=params.top_p if params.top_p < 1 else None,
                top_k=params.top_k if params.top_k > 0 else None,
            )
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=tok)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        was_training = model.training
        model.eval()
        try:
            with self.autocast():
                out = model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        finally:
            model.train(was_training)
        gen = out.sequences[:, width:]  # [B*G, T]
        logprobs = _sampled_logprobs(out.logits, gen)  # [B*G, T]
        del out
        stops = set(eos_ids(model, tok))
        result: list[list[Completion]] = []
        for i in range(len(prompts)):
            row: list[Completion] = []
            for j in range(params.n):
                k = i * params.n + j
                ids = gen[k].tolist()
                n_keep, reason = _cut(ids, stops, params.stop, tok)
                row.append(Completion(ids=ids[:n_keep], finish_reason=reason, logprobs=logprobs[k, :n_keep].tolist()))
            result.append(row)
        return result

    def sync_weights(self) -> float:
        return 0.0  # the engine is the policy

    def release_memory(self) -> None:
        import gc

        gc.collect()

    def close(self) -> None:
        self.model = None


def eos_ids(model: Any, tok: Any) -> list[int]:
    """Every token id that ends a completion: the generation config's EOS ids and the tokenizer's."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for v in (gen_eos if isinstance(gen_eos, list) else [gen_eos]) + [tok.eos_token_id]:
        if isinstance(v, int) and v not in ids:
            ids.append(v)
    return ids


def _sampled_logprobs(step_logits: tuple[torch.Tensor, ...], gen: torch.Tensor) -> torch.Tensor:
    """Log-prob of each sampled token under the raw logits of its step. Returns [B*G, T]."""
    out = torch.zeros(gen.shape, dtype=torch.float32)
    for t, logits in enumerate(step_logits):  # logits: [B*G, V]
        lp = torch.log_softmax(logits.float(), dim=-1)
        out[:, t] = lp.gather(-1, gen[:, t : t + 1]).squeeze(-1)
    return out


def _cut(ids: list[int], stops: set[int], stop_strings: tuple[str, ...], tok: Any) -> tuple[int, str]:
    """How many tokens of ``ids`` belong to the completion, and why it ended."""
    eos_at = next((i for i, t in enumerate(ids) if t in stops), None)
    limit = len(ids) if eos_at is None else eos_at
    if stop_strings:
        text = tok.decode(ids[:limit], skip_special_tokens=False)
        hits = [text.find(s) + len(s) for s in stop_strings if s and s in text]
        if hits:
            end_char = min(hits)
            # smallest prefix of tokens whose text reaches the end of the first stop string
            for n in range(1, limit + 1):
                if len(tok.decode(ids[:n], skip_special_tokens=False)) >= end_char:
                    return n, "stop"
    if eos_at is not None:
        return eos_at + 1, "stop"
    return len(ids), "length"
