"""Several processes on one node, launched with ``torchrun``: what the loop and the backends share.

Data parallel, with the policy sharded by FSDP2. Every rank holds the same data order and takes
the same ``prompts_per_step`` prompts, then keeps its own contiguous block of them
(:meth:`World.shard`), samples their groups and scores them. The rollout is then gathered from all
ranks (:meth:`World.gather`), so everything that looks at the whole step (advantages, schedule
signals, alpha and tau, metrics, samples) is computed identically on every rank. Training splits
each mini-batch of whole groups into equal blocks, one per rank; loss normalisers are the totals of
the whole mini-batch, and each rank's loss is scaled by the world size because FSDP averages
gradients: one step with N ranks is the step one process would take on the same rollout.

Only rank 0 writes (metrics, samples, dashboard, checkpoints, the run lock). A checkpoint gathers
the full weights and optimizer state to rank 0 (``torch.distributed.checkpoint.state_dict``); on
resume rank 0 reads it and sends each tensor to the ranks, which keep their shards. Checkpoints are
the same files whatever the number of ranks, so a run can resume on another number of processes.

Errors: the ranks join before anything else, and every stretch of work that can fail on one rank
alone (building the run, a rollout and its rewards, a checkpoint write or read) ends in one
collective that hands its error to every rank (:meth:`World.agree`, :meth:`World.raise_if_any`),
so all ranks stop the same way and rank 0 prints the one line. A rank other than 0 prints only
errors the others cannot know of, naming itself.

Nothing here touches CUDA: the backend chooses the process group (NCCL on GPUs, gloo on CPU), and
the CPU backend runs this whole path (``torchrun --nproc-per-node=2 -m apo_cli train``) in the tests.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from apo_cli.errors import ApoError

__all__ = ["World", "PeerError", "init_process_group", "shard", "full_named_tensors", "gathered"]


class PeerError(ApoError):
    """Another rank failed; this rank stops the same way (rank 0 prints the other rank's message)."""

    shared = True

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @classmethod
    def from_env(cls) -> World:
        """What torchrun sets (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``); without it, one process."""
        try:
            return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                       int(os.environ.get("WORLD_SIZE", 1)))
        except ValueError:
            return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def shard(self, n: int) -> range:
        """This rank's contiguous block of ``n`` items (``n`` is a multiple of the world size, so
        every rank gets as many and runs as many forward passes on them)."""
        if n % self.size:
            raise ValueError(f"{n} items do not split over {self.size} ranks")
        per = n // self.size
        return range(self.rank * per, (self.rank + 1) * per)

    def part(self, items: list[Any]) -> list[Any]:
        """This rank's block of ``items`` (see :meth:`shard`)."""
        return [items[k] for k in self.shard(len(items))]

    # -- collectives (no-ops for one process) -----------------------------------------------------

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def all_true(self, flag: bool) -> bool:
        return all(self.gather(bool(flag)))

    def max(self, value: int) -> int:
        return max(self.gather(int(value)))

    def mean(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each key averaged over the ranks that report it (``.../max`` keys: the maximum)."""
        if self.size == 1:
            return dict(metrics)
        out: dict[str, float] = {}
        parts = self.gather(metrics)
        for key in dict.fromkeys(k for p in parts for k in p):
            vals = [float(p[key]) for p in parts if key in p]
            out[key] = max(vals) if key.endswith("_max") or key.endswith("/max") else sum(vals) / len(vals)
        return out

    def raise_if_any(self, error: BaseException | None) -> None:
        """Collective: when any rank passes an error, every rank raises. The rank that failed raises
        its own error; the others a :class:`PeerError` with its message and exit code. Both are
        marked ``shared``: every rank knows, rank 0 prints the one line."""
        if self.size == 1:
            if error is not None:
                raise error
            return
        if error is None:
            status = None
        else:
            code = error.exit_code if isinstance(error, ApoError) else 1
            text = str(error) if isinstance(error, ApoError) else f"{type(error).__name__}: {error}"
            status = (text.splitlines()[0] if text else type(error).__name__, code)
        statuses = self.gather(status)
        first = next(((k, s) for k, s in enumerate(statuses) if s is not None), None)
        if first is None:
            return
        if error is not None:
            raise shared(error)
        k, (text, code) = first
        raise PeerError(f"rank {k}: {text}" if k else text, code)

    @contextmanager
    def agree(self) -> Iterator[None]:
        """Run the block on every rank and end with one collective: if it raised anywhere, it
        raises everywhere (see :meth:`raise_if_any`), so no rank waits for one that has stopped."""
        if self.size == 1:
            yield
            return
        error = None
        try:
            yield
        except Exception as e:  # noqa: BLE001 - handed to every rank
            error = e
        self.raise_if_any(error)

    @contextmanager
    def on_main(self, cm: Any) -> Iterator[None]:
        """Enter the context manager ``cm`` on rank 0 only; a failure to enter stops every rank."""
        if self.size == 1:
            with cm:
                yield
            return
        error = None
        if self.is_main:
            try:
                cm.__enter__()
            except ApoError as e:
                error = e
        self.raise_if_any(error)
        try:
            yield
        finally:
            if self.is_main:
                cm.__exit__(None, None, None)


def shared(error: BaseException) -> BaseException:
    """Mark ``error`` as raised by every rank at the same point (decided together), so that only
    rank 0 prints it."""
    try:
        error.shared = True  # type: ignore[attr-defined]
    except AttributeError:
        pass
    return error


def other_rank() -> int | None:
    """This process's rank under torchrun when it is not rank 0, else None."""
    w = World.from_env()
    return w.rank if w.size > 1 and w.rank != 0 else None


def leaves_message_to_rank_0(error: BaseException) -> bool:
    """A rank other than 0 stays quiet about an error every rank raised: one shared through a
    collective, or one raised before the ranks could talk (the same recipe, data and model on every
    rank fail the same way). Anything else it prints itself, naming its rank."""
    if other_rank() is None:
        return False
    return bool(getattr(error, "shared", False)) or not _joined


COLLECTIVE_TIMEOUT_S = 1800  # how long a rank waits for the others (a slow rollout or reward on one rank)
_joined = False  # this process has joined the ranks' process group (it may be destroyed since)


def init_process_group(world: World, backend: str, **kwargs: Any) -> None:
    """Join the ranks; ``backend`` is the collective library, chosen by the rollout backend (gloo on CPU)."""
    import datetime

    import torch.distributed as dist

    if world.size <= 1 or dist.is_initialized():
        return
    global _joined
    kwargs.setdefault("timeout", datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    dist.init_process_group(backend, rank=world.rank, world_size=world.size, **kwargs)
    _joined = True


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# -- FSDP2 ------------------------------------------------------------------------------------------


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The repeated blocks of a Hugging Face model (the classes it names in ``_no_split_modules``)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def check_shardable(model: Any) -> list[torch.nn.Module]:
    """The model's decoder layers (FSDP2's units); BackendError when it names none."""
    from apo_cli.errors import BackendError

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
