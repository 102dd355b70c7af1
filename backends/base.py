"""``BackendBase``: defaults for the optional parts of the :class:`backends.Backend` Protocol.

A third-party backend subclasses it, sets ``name`` and implements ``setup`` and ``generate`` (and
``close`` when it holds anything); the rest has defaults for a single-process backend whose engine
*is* the policy, on the CPU:

- ``device``: ``torch.device("cpu")`` (assign ``self.device`` to change it);
- ``supports_torchrun = False`` and ``join()``: nothing to join;
- ``autocast()``: no autocast (a ``nullcontext``);
- ``sync_weights()``: nothing to push, 0.0 seconds;
- ``close()``: nothing to release;
- ``peak_flops()`` (not part of the Protocol: asked for when present): None, the peak is unknown and
  ``perf/mfu`` is not logged.

Importing this module does not import torch (``device`` is built on first read).
"""

from __future__ import annotations

import abc
import contextlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from backends import Completion, SamplingParams

__all__ = ["BackendBase"]


class _CPUDevice:
    """``torch.device("cpu")`` as a class attribute that imports torch only when read. A non-data
    descriptor: ``self.device = ...`` in a subclass stores the instance's own device as usual."""

    def __get__(self, obj: Any, owner: type | None = None) -> torch.device:
        import torch

        return torch.device("cpu")


class BackendBase(abc.ABC):
    """A backend with the Protocol's defaults; see the module docstring and :class:`backends.Backend`."""

    name: str  # set by the subclass: the name it is registered under
    supports_torchrun: bool = False
    device: torch.device = _CPUDevice()  # type: ignore[assignment]

    def __init__(self, spec: Any):
        self.spec = spec  # the recipe's ``backend`` section

    def join(self) -> None:
        """Nothing to join: the backend runs as one process."""

    @abc.abstractmethod
    def setup(self, model: Any, tokenizer: Any) -> Any:
        """Take the policy; return it (possibly moved/wrapped) for the trainer to optimise."""

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Forward passes in the weights' own dtype: no autocast."""
        return contextlib.nullcontext()

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], params: SamplingParams, *,
                 streamer: Any = None) -> list[list[Completion]]:
        """Sample ``params.n`` completions for each prompt: result[i][j] is prompt i's j-th."""

    def sync_weights(self) -> float:
        """The engine is the policy: nothing to push."""
        return 0.0

    def close(self) -> None:
        """Nothing to release."""

    def peak_flops(self) -> tuple[float, str] | None:
        """(FLOP/s of one device, where the figure comes from) for ``perf/mfu``; None: unknown."""
        return None
