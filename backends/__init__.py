"""Rollout/compute engines behind one small Protocol, found through a lazy registry.

A backend owns *where* the policy runs and *how* completions are sampled. The training loop talks
to it on token ids only, through the members of :class:`Backend` (each documented there):

- ``name``, ``device`` (where the policy and its batches live), ``supports_torchrun``;
- ``join()``: join the torchrun process group (the loop calls it first, so that every later failure
  reaches all ranks);
- ``setup(model, tokenizer)``: take the policy (move it to the device, shard it, build an engine);
- ``autocast()``: the context the trainer's forward passes run in (the backend's compute dtype);
- ``generate(prompts, params, *, streamer=None)``: G completions per prompt, with finish reasons and
  the engine's log-probs of the sampled tokens; a transformers streamer, when given and the call
  samples one completion, is fed its tokens as they are drawn (``apo generate --stream``);
- ``sync_weights()``: make the engine sample from the policy's current weights (a no-op when the
  engine *is* the policy, as on CPU);
- ``close()``.

A backend that runs under ``torchrun`` sets ``supports_torchrun = True``; its ``setup`` shards the
policy (``apo_cli.runtime.fsdp``), and its ``generate`` samples the prompts of its own rank. Without
it, ``apo train`` under torchrun stops with one line.

``backends.base.BackendBase`` gives the optional members defaults (cpu device, no torchrun, no
autocast, nothing to sync or close); a third-party backend can subclass it and implement ``name``,
``setup`` and ``generate``. The KV-cache decoding loop of the CPU backend (and of the GPU backend's
``rollout: hf``) is ``backends.decoding.DecodingSampler``, usable by other backends as well.

Backends are registered by name in :data:`BACKENDS` (an ``apo_cli.registry.Registry``) as
``"module:attribute"`` strings imported only when chosen, so the CPU path never imports vLLM or CUDA
code. Third-party backends register through the ``apo.backends`` entry-point group, exactly like the
built-ins (see pyproject.toml); ``backend: {kind: NAME}`` in a recipe chooses one, and its other
keys are validated by the backend's options model (:mod:`backends.options`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from apo_cli.registry import Registry, UnknownName, load_target

if TYPE_CHECKING:  # torch is not imported by the registry
    import torch

__all__ = ["BACKENDS", "Backend", "BackendRef", "Completion", "SamplingParams", "BUILTIN_BACKENDS", "backend_names",
           "create_backend", "load_backend_class"]

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
    """What the training loop, ``apo generate`` and ``apo eval`` use of a backend (and nothing else).

    ``backends.base.BackendBase`` implements the optional members with defaults.
    """

    name: str
    """The name the backend is registered under (``backend: {kind: NAME}``)."""

    device: torch.device
    """Where the policy lives after ``setup``: the trainer puts its batches (and the reference model)
    there."""

    supports_torchrun: bool
    """Whether the backend runs as one of several ``torchrun`` processes (``join``, a sharded policy,
    each rank sampling its own prompts). False: ``apo train`` under torchrun stops with one line."""

    def join(self) -> None:
        """Under torchrun: join the process group (a no-op for one process, or once joined). The loop
        calls it before anything else can fail, so that a failure on one rank reaches all of them."""

    def setup(self, model: Any, tokenizer: Any) -> Any:
        """Take the policy; return it (possibly moved/wrapped/sharded) for the trainer to optimise."""

    def autocast(self) -> Any:
        """A fresh context manager for forward passes in the backend's compute dtype (the trainer's
        log-prob passes run in it; ``generate`` uses it itself). A ``nullcontext`` when none."""

    def generate(self, prompts: list[list[int]], params: SamplingParams, *,
                 streamer: Any = None) -> list[list[Completion]]:
        """Sample ``params.n`` completions for each prompt: result[i][j] is prompt i's j-th.

        ``streamer``: a transformers streamer (``put(ids)`` / ``end()``, e.g. ``TextStreamer`` with
        ``skip_prompt=True``), fed the prompt and then each token as it is sampled when the call
        samples exactly one completion. A backend that cannot stream (vLLM) ignores it; the caller
        then prints the returned completion whole.
        """

    def sync_weights(self) -> float:
        """Push the policy's current weights to the engine; return the seconds it took (0.0 when the
        engine is the policy)."""

    def close(self) -> None:
        """Release everything (the engine, the process group)."""


@dataclass(frozen=True)
class BackendRef:
    """A light registry entry for a backend: its options model now, its class (``"module:Class"``)
    imported only when the backend is created (see :mod:`backends.options`)."""

    target: str  # "module:Class" of the backend
    options: Any  # the options model (a backends.options.BackendOptions subclass)

    def load(self) -> type:
        return load_target(self.target)


BACKENDS: Registry[Any] = Registry("backend", group="apo.backends")
"""Every backend by name: a backend class or a :class:`BackendRef`, either way lazily imported. The
built-ins are registered exactly as an entry point of the ``apo.backends`` group would register them."""
BACKENDS.add("cpu", "backends.cpu_options:CPU")
BACKENDS.add("gpu", "backends.gpu_options:GPU")

BUILTIN_BACKENDS: tuple[str, ...] = tuple(BACKENDS.builtins())


def backend_names() -> list[str]:
    return BACKENDS.names()


def load_backend_class(name: str) -> type:
    from apo_cli.errors import BackendError

    try:
        entry = BACKENDS.get(name)
    except UnknownName as e:
        raise BackendError(str(e)) from None
    return entry.load() if isinstance(entry, BackendRef) else entry


# what a backend object must have from its construction on (``device`` may come with ``setup``)
REQUIRED_MEMBERS = ("name", "supports_torchrun", "join", "setup", "autocast", "generate", "sync_weights", "close")


def create_backend(spec: Any) -> Backend:
    """Instantiate the backend chosen by a recipe's ``backend`` section; a BackendError naming what
    is missing when the object does not implement the :class:`Backend` protocol."""
    from apo_cli.errors import BackendError

    cls = load_backend_class(spec.kind)
    backend = cls(spec)
    missing = [m for m in REQUIRED_MEMBERS if not hasattr(backend, m)]
    if missing:
        raise BackendError(f"backend {spec.kind!r} ({getattr(cls, '__qualname__', cls)}) lacks {', '.join(missing)} "
                           "of the Backend protocol; subclass backends.base.BackendBase for the defaults")
    return backend
