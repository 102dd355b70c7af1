"""The process world: which rank this is, and the collectives the loop runs (no-ops in one process).


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

from apo_cli.errors import ApoError
from apo_cli.runtime import ranks

__all__ = ["World", "PeerError", "shared", "init_process_group", "destroy_process_group"]



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

    def exchange(self, local: dict[Any, Any], device: Any) -> dict[Any, Any]:
        """Every rank's ``local`` entries (tensors), merged in rank order, on ``device`` on every
        rank; in one process ``local`` itself."""
        if self.size == 1:
            return local
        out: dict[Any, Any] = {}
        for part in self.gather({k: t.cpu() for k, t in local.items()}):
            out.update({k: t.to(device) for k, t in part.items()})
        return out

    def sum(self, value: float) -> float:
        """``value`` added up over the ranks."""
        return float(sum(self.gather(value))) if self.size > 1 else float(value)

    def backward(self, loss: Any) -> None:
        """``loss.backward()`` for a loss that is this rank's share of a sum over all ranks: FSDP
        averages gradients over the ranks, so the loss is scaled by their number first."""
        (loss * self.size if self.size > 1 else loss).backward()

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


COLLECTIVE_TIMEOUT_S = 1800  # how long a rank waits for the others (a slow rollout or reward on one rank)


def init_process_group(world: World, backend: str, **kwargs: Any) -> None:
    """Join the ranks; ``backend`` is the collective library, chosen by the rollout backend (gloo on CPU)."""
    import datetime

    import torch.distributed as dist

    if world.size <= 1 or dist.is_initialized():
        return
    kwargs.setdefault("timeout", datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    dist.init_process_group(backend, rank=world.rank, world_size=world.size, **kwargs)
    ranks.mark_joined()


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


