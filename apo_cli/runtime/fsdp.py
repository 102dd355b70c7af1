"""FSDP2 helpers: shard the policy over the ranks, gather it for sampling, and move the full
weights and optimizer state in and out of checkpoints (rank 0 holds the full copies)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from apo_cli.errors import BackendError

if TYPE_CHECKING:
    from apo_cli.runtime.world import World



def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The repeated blocks of a Hugging Face model (the classes it names in ``_no_split_modules``)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def check_shardable(model: Any) -> list[torch.nn.Module]:
    """The model's decoder layers (FSDP2's units); BackendError when it names none."""
    layers = decoder_layers(model)
    if not layers:
        raise BackendError(f"{type(model).__name__} names no decoder layer class in _no_split_modules; "
                           "it cannot be sharded over several processes")
    return layers


def shard(model: Any, world: World, device: torch.device) -> Any:
    """FSDP2 over all ranks: each decoder layer is one unit, the rest (embeddings, head) the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layers = check_shardable(model)
    mesh = init_device_mesh(device.type, (world.size,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: Any) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _fsdp_modules(model: Any) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered(model: Any) -> Iterator[None]:
    """Full weights on every rank for the duration (an FSDP2 policy; otherwise nothing happens).

    Every unit is all-gathered once, in the same order on every rank, and stays gathered through
    all forwards inside: no collective runs per forward, so ranks may run different numbers of
    decoding steps. Resharded (the full copies freed) on the way out."""
    modules = _fsdp_modules(model) if is_sharded(model) else []
    if not modules:
        yield
        return
    for m in modules:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
            # back to what fully_shard set: reshard after forward, except the root, whose weights
            # stay gathered from forward to backward
            m.set_reshard_after_forward(m is not model, recurse=False)


def full_named_tensors(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full tensor)`` for every entry of the state dict, gathered one at a time.

    Every rank must consume the whole iterator (each DTensor is an all-gather)."""
    from torch.distributed.tensor import DTensor

    for name, tensor in model.state_dict().items():
        yield name, tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


# -- checkpoint state of a sharded policy -----------------------------------------------------------


def _options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(model: Any) -> dict[str, torch.Tensor]:
    """Collective: the full weights on rank 0 (CPU tensors), an empty dict elsewhere."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options(cpu_offload=True))
    # a tied weight (lm_head = embeddings) is saved once, as save_pretrained does for an unsharded model
    own = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in state.items() if k in own}


def full_trainable_state(model: Any, *, everywhere: bool = False) -> dict[str, torch.Tensor]:
    """Collective: the full tensors of the trainable parameters (a LoRA adapter), by name. On rank 0
    (CPU copies) and an empty dict elsewhere, or on every rank (on the device) with ``everywhere``."""
    from torch.distributed.tensor import DTensor

    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        full = p.detach().full_tensor() if isinstance(p, DTensor) else p.detach()
        if everywhere:
            out[name] = full
        elif not (torch.distributed.is_initialized() and torch.distributed.get_rank() != 0):
            out[name] = full.cpu()
    return out


def adapter_names(model: Any, saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A saved PEFT adapter (``adapter_model.safetensors``) keyed by the model's parameter names.

    The names come from peft itself (``get_peft_model_state_dict`` on the trainable parameters,
    matched back by identity), so every adapter kind maps: linear and embedding LoRA, DoRA. Frozen
    embedding weights a one-process save may add (``*.base_layer.weight``) are skipped. ValueError
    for a tensor the model does not have, or one it has that the file lacks."""
    from peft import get_peft_model_state_dict

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    name_of = {id(p): n for n, p in trainable.items()}
    keyed = get_peft_model_state_dict(model, state_dict=trainable, save_embedding_layers=False)
    by_saved = {k: name_of[id(t)] for k, t in keyed.items() if id(t) in name_of}
    unknown = [k for k in saved if k not in by_saved and not k.endswith("base_layer.weight")]
    missing = [k for k in by_saved if k not in saved]
    if unknown:
        raise ValueError(f"{len(unknown)} adapter tensors the model does not have (first: {unknown[0]})")
    if missing:
        raise ValueError(f"the adapter lacks {len(missing)} of the model's tensors (first: {missing[0]})")
    return {by_saved[k]: v for k, v in saved.items() if k in by_saved}


def full_optimizer_state(model: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Collective: the full optimizer state keyed by parameter name on rank 0, empty elsewhere."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))


def load_full_model_state(model: Any, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Collective: rank 0 passes the full weights (read from the checkpoint), the other ranks an
    empty dict; each keeps its shard (the full copy lives in rank 0's memory only). Returns the
    missing and unexpected names on rank 0, as ``load_state_dict(strict=False)`` does."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    result = set_model_state_dict(model, state, options=_options(strict=False, broadcast_from_rank0=True))
    return list(result.missing_keys), list(result.unexpected_keys)


def is_named_optimizer_state(state: dict[str, Any]) -> bool:
    """True for the parameter-name-keyed format :func:`full_optimizer_state` writes."""
    groups = state.get("param_groups") or [{}]
    return any(isinstance(p, str) for g in groups for p in g.get("params", []))


def named_optimizer_state(model: Any, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` in the parameter-name format, whichever format it was saved in."""
    return state if is_named_optimizer_state(state) else _name_optimizer_state(model, optimizer, state)


def load_optimizer_state(model: Any, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load either format (one process: ``optimizer.state_dict()``; several: parameter names) into
    this run's optimizer, sharded or not, so a checkpoint resumes on any number of processes.
    Sharded: collective; rank 0 passes the state (named: :func:`named_optimizer_state`), the other
    ranks an empty dict."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if is_sharded(model):
        # not strict: a parameter that never had a gradient has no state (as in optimizer.state_dict())
        set_optimizer_state_dict(model, optimizer, state, options=_options(broadcast_from_rank0=True, strict=False))
    elif is_named_optimizer_state(state):
        set_optimizer_state_dict(model, optimizer, state, options=_options())
    else:
        optimizer.load_state_dict(state)


def _name_optimizer_state(model: Any, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """``optimizer.state_dict()`` (integer ids in parameter order) keyed by parameter name instead."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    if len(order) != sum(len(g["params"]) for g in state["param_groups"]):
        raise ValueError(f"the checkpoint's optimizer holds {sum(len(g['params']) for g in state['param_groups'])} "
                         f"parameters, this run's {len(order)}")
    named_state = {order[int(i)]: s for i, s in state["state"].items()}
    groups = [{**g, "params": [order[int(i)] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": named_state, "param_groups": groups}


def clip_grad_norm(model: Any, max_norm: float | None) -> float:
    """Clip the gradients of ``model``'s parameters to ``max_norm`` (None: only measure) and return
    the total norm before clipping; sharded, the norm of all shards together."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
