"""Rollout/compute engines behind one small Protocol, found through a lazy registry.

A backend owns *where* the policy runs and *how* completions are sampled. The training loop talks
to it on token ids only:

- ``setup(model, tokenizer)``: take the policy (move it to the device, build an engine);
- ``generate(prompts, params)``: G completions per prompt, with finish reasons and the engine's
  log-probs of the sampled tokens;
- ``sync_weights()``: make the engine sample from the policy's current weights (a no-op when the
  engine *is* the policy, as on CPU);
- ``release_memory()`` / ``close()``.

A backend that runs under ``torchrun`` sets ``supports_torchrun = True`` and has ``join()``, which
joins the process group (the loop calls it first, so that every later failure reaches all ranks);
its ``setup`` shards the policy (``apo_cli.runtime.fsdp``), and its ``generate`` samples the prompts of
its own rank. Without it, ``apo train`` under torchrun stops with one line.

Backends are registered by name as ``"module:Class"`` strings and imported only when chosen, so
the CPU path never imports vLLM or CUDA code. Third-party backends register through the
``apo.backends`` entry-point group, exactly like the built-ins (see pyproject.toml).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Literal, Protocol, runtime_checkable

__all__ = ["Backend", "Completion", "SamplingParams", "BUILTIN_BACKENDS", "backend_names", "create_backend"]

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    n: int  # completions per prompt (G)
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    stop: tuple[str, ...] = ()
    seed: int | None = None
    greedy: bool = False


@dataclass
class Completion:
    ids: list[int]  # completion token ids, without the prompt, EOS included when produced
    finish_reason: FinishReason  # "stop": EOS or a stop string; "length": hit max_new_tokens
    logprobs: list[float] | None = None  # the engine's log-prob of each sampled token
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    name: str

    def setup(self, model: Any, tokenizer: Any) -> Any:
        """Take the policy; return it (possibly moved/wrapped) for the trainer to optimise."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """Sample ``params.n`` completions for each prompt: result[i][j] is prompt i's j-th."""

    def sync_weights(self) -> float:
        """Push the policy's current weights to the engine; return the seconds it took."""

    def release_memory(self) -> None:
        """Free what the engine holds between rollouts (KV cache, caches)."""

    def close(self) -> None:
        """Release everything."""


BUILTIN_BACKENDS: dict[str, str] = {
    "cpu": "backends.cpu:CPUBackend",
    "gpu": "backends.gpu:GPUBackend",
}


def _registry() -> dict[str, str]:
    names = dict(BUILTIN_BACKENDS)
    try:
        for ep in entry_points(group="apo.backends"):
            names.setdefault(ep.name, ep.value)
    except Exception:  # a broken third-party distribution must not break the built-ins
        pass
    return names


def backend_names() -> list[str]:
    return sorted(_registry())


def load_backend_class(name: str) -> type:
    from apo_cli.errors import BackendError

    target = _registry().get(name)
    if target is None:
        raise BackendError(f"unknown backend {name!r}; available: {', '.join(backend_names())}")
    module_name, _, cls_name = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, cls_name)


def create_backend(spec: Any) -> Backend:
    """Instantiate the backend chosen by a recipe's ``backend`` section."""
    return load_backend_class(spec.kind)(spec)
