"""One node, several GPUs, launched with ``torchrun``: the pieces the GPU backend needs.

- ``World.from_env()`` reads ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` (set by torchrun; absent: one
  process, one GPU).
- ``init_process_group`` joins the ranks (NCCL on CUDA, gloo on CPU for tests).
- ``shard`` applies FSDP2 (``fully_shard``) to every decoder layer and then to the root, so each
  rank holds 1/world of the parameters, gradients and optimizer state.
- ``full_named_tensors`` yields the policy's weights one at a time as full tensors (an all-gather
  per DTensor, every rank in the same order): what the colocated vLLM shard of each rank loads.

Status: ``shard`` and ``full_named_tensors`` are tested on CPU with two gloo processes
(tests/test_gpu_backend.py); nothing here has run on more than one GPU. See docs/gpu.md.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @classmethod
    def from_env(cls) -> World:
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                   int(os.environ.get("WORLD_SIZE", 1)))


def init_process_group(world: World, device: torch.device) -> None:
    import torch.distributed as dist

    if world.size <= 1 or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=world.rank, world_size=world.size,
                            device_id=device if device.type == "cuda" else None)


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The repeated blocks of a Hugging Face model (the classes it names in ``_no_split_modules``)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def shard(model: Any, world: World, device: torch.device) -> Any:
    """FSDP2 over all ranks: each decoder layer is one unit, the rest (embeddings, head) the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world.size,))
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layer class in _no_split_modules")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_named_tensors(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full tensor)`` for every entry of the state dict, gathered one at a time.

    Every rank must consume the whole iterator (each DTensor is an all-gather)."""
    from torch.distributed.tensor import DTensor

    for name, tensor in model.state_dict().items():
        yield name, tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
