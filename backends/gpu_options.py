"""The GPU backend's recipe options (``backend: {kind: gpu, ...}``) and its registry entry.

Not inside the ``backends.gpu`` package, whose ``__init__`` imports torch: validating a recipe (even a
GPU one) imports this module only; the registry holds :data:`GPU`, a :class:`backends.BackendRef`
that imports ``backends.gpu`` when the backend is created.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from backends import BackendRef
from backends.options import BackendOptions

__all__ = ["GPU", "GPUBackendSpec"]


class GPUBackendSpec(BackendOptions):
    kind: Literal["gpu"] = "gpu"
    rollout: Literal["vllm", "hf"] = Field("vllm", description="Rollout engine: vllm, or transformers generate.")
    gpu_memory_utilization: float = Field(0.35, gt=0, le=0.95, description="vLLM: share of GPU memory for the engine.")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM: GPUs per engine; above 1 needs torchrun, and divides its number of processes.")
    sleep_mode: bool = Field(True, description="vLLM: free the KV cache while training, wake before rollouts.")
    max_model_len: int | None = Field(None, ge=16, description="vLLM: context length (default: the model's context length).")
    enforce_eager: bool = Field(False, description="vLLM: disable CUDA graphs.")


GPU = BackendRef("backends.gpu:GPUBackend", GPUBackendSpec)
