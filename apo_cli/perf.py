"""Throughput and MFU of each training step (the ``perf/*`` metrics).

**Tokens per second**, each over its own phase (``time/rollout``: sampling and scoring;
``time/train``: the log-prob passes and the updates):

- ``perf/rollout/prompt_tokens_per_s``: the step's prompt tokens, each prompt counted once (it is
  prefilled once for its G completions); ``perf/rollout/completion_tokens_per_s``: every sampled token;
- ``perf/train/prompt_tokens_per_s`` and ``perf/train/completion_tokens_per_s``: the tokens the
  updates ran forward and backward, over all epochs (a micro-batch runs each prompt once for its group).

**MFU** (``perf/mfu``) = the training phase's FLOPs / (``time/train`` × the device's peak × processes).
FLOPs of one forward over a group (prompt P once, completions T_j): ``2·N_fwd·(P + ΣT_j)`` for the
weights plus the causal attention term ``2·L·d·P² + Σ_j 4·L·d·(P·T_j + T_j²/2)`` (L layers, d = heads ×
head size); a training pass is the forward, the backward to the activations (as much again) and the
weight gradients of the trained parameters: ``(4·N_fwd + 2·N_trained)`` per token, which is the
usual ``6·N`` when every parameter is trained (LoRA: N_trained is the adapter), and three times the
attention term. ``N_fwd`` counts the weights a forward multiplies by (an input embedding that is not
tied to the output head is a lookup and is left out). Counted: every epoch's update passes, the KL
reference's forward, and the no-grad anchor pass where the step takes one. The peak comes from the
backend (``peak_flops()``: a table of GPUs, bf16 dense; on CPU a short matmul calibration at start-up,
recorded in ``<run>/perf.json``), or from ``APO_PEAK_FLOPS`` (FLOP/s) when set.

``perf/threads`` (CPU backend): torch's intra-op threads during the step; unless ``backend.threads``
or ``OMP_NUM_THREADS`` fixes it, it follows the cores other processes leave free
(``apo_cli.runtime.threads.ThreadGovernor``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FlopModel:
    fwd_params: int  # weights a forward multiplies by
    trained_params: int
    layers: int
    attn_width: int  # heads × head size (0: attention not counted)

    @classmethod
    def of(cls, model: Any) -> FlopModel:
        params = list(model.parameters())
        total = sum(p.numel() for p in params)
        trained = sum(p.numel() for p in params if p.requires_grad)
        emb, head = _weight(model, "get_input_embeddings"), _weight(model, "get_output_embeddings")
        if emb is not None and emb is not head:
            total -= emb.numel()
        cfg = getattr(model, "config", None)
        layers = int(getattr(cfg, "num_hidden_layers", 0) or 0)
        heads = int(getattr(cfg, "num_attention_heads", 0) or 0)
        head_dim = getattr(cfg, "head_dim", None) or (int(getattr(cfg, "hidden_size", 0) or 0) // max(heads, 1))
        return cls(total, trained, layers, heads * int(head_dim))

    def forward(self, prompt: int, completions: list[int]) -> tuple[float, float]:
        """(weight FLOPs, attention FLOPs) of one forward over a group: its prompt once, then each completion."""
        linear = 2.0 * self.fwd_params * (prompt + sum(completions))
        attn = 2.0 * self.layers * self.attn_width * prompt**2
        attn += sum(4.0 * self.layers * self.attn_width * (prompt * t + t * t / 2) for t in completions)
        return linear, attn

    def train(self, prompt: int, completions: list[int]) -> float:
        linear, attn = self.forward(prompt, completions)
        return linear * (4 * self.fwd_params + 2 * self.trained_params) / (2 * max(self.fwd_params, 1)) + 3 * attn


def _weight(model: Any, getter: str) -> Any:
    try:
        module = getattr(model, getter)()
    except (AttributeError, NotImplementedError, TypeError):
        return None
    return getattr(module, "weight", None)


def device_peak(backend: Any) -> tuple[float, str] | None:
    """(FLOP/s, where it comes from) of one device of ``backend``, or None when unknown."""
    env = os.environ.get("APO_PEAK_FLOPS")
    if env:
        try:
            return float(env), "APO_PEAK_FLOPS"
        except ValueError:
            from apo_cli.errors import UsageError

            raise UsageError(f"APO_PEAK_FLOPS={env!r} is not a number of FLOP/s (e.g. 9.89e14)") from None
    fn = getattr(backend, "peak_flops", None)
    return fn() if callable(fn) else None


class Perf:
    """The perf/* metrics of a run's steps (see the module docstring)."""

    def __init__(self, model: Any, backend: Any, recipe: Any, world_size: int = 1):
        self.flops = FlopModel.of(model)
        self.peak = device_peak(backend)
        self._threads = getattr(backend, "threads", None)  # a CPU backend's thread count, step by step
        self.recipe, self.world_size = recipe, world_size
        self.shared = not getattr(recipe.model, "gradient_checkpointing", False)  # prompts run once per group

    def info(self) -> dict[str, Any]:
        """What ``<run>/perf.json`` and the trackers' config record."""
        f = self.flops
        return {"peak_flops": None if self.peak is None else self.peak[0],
                "peak_source": None if self.peak is None else self.peak[1],
                "trained_params": f.trained_params, "forward_params": f.fwd_params, "layers": f.layers,
                "attention_width": f.attn_width}

    def metrics(self, prompt_ids: list[list[int]], completion_ids: list[list[int]], group_size: int,
                engine_logprobs: bool, times: dict[str, float]) -> dict[str, float]:
        a = self.recipe.algorithm
        groups = [(len(prompt_ids[g]), [len(c) for c in completion_ids[g : g + group_size]])
                  for g in range(0, len(prompt_ids), group_size)]
        prompt_once = sum(p for p, _ in groups)
        completion = sum(sum(ts) for _, ts in groups)
        train_prompt = prompt_once if self.shared else prompt_once * group_size
        fwd = sum(sum(self.flops.forward(p, ts)) for p, ts in groups)
        flops = a.epochs * sum(self.flops.train(p, ts) for p, ts in groups)
        if a.kl_coef > 0:
            flops += a.epochs * fwd  # the reference's forward in every update pass
        if not engine_logprobs:
            flops += fwd  # every row anchored by a no-grad pass first
        elif a.mini_batches > 1 or a.epochs > 1:
            flops += fwd * (1 - 1 / a.mini_batches)  # the rows not trained first
        t_roll, t_train = max(times["time/rollout"], 1e-9), max(times["time/train"], 1e-9)
        out = {
            "perf/rollout/prompt_tokens_per_s": prompt_once / t_roll,
            "perf/rollout/completion_tokens_per_s": completion / t_roll,
            "perf/train/prompt_tokens_per_s": a.epochs * train_prompt / t_train,
            "perf/train/completion_tokens_per_s": a.epochs * completion / t_train,
            "perf/train/flops_per_s": flops / t_train,  # all processes together
        }
        if callable(self._threads):
            out["perf/threads"] = float(self._threads())
        if self.peak is not None and self.peak[0] > 0:
            out["perf/mfu"] = flops / (t_train * self.peak[0] * self.world_size)
        return out
