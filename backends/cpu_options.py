"""The CPU backend's recipe options (``backend: {kind: cpu, ...}``) and its registry entry.

Kept apart from :mod:`backends.cpu` (which imports torch) so that validating a recipe stays light:
the registry holds :data:`CPU`, a :class:`backends.BackendRef` that imports the backend class only
when the backend is created.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from backends import BackendRef
from backends.options import BackendOptions

__all__ = ["CPU", "CPUBackendSpec"]


class CPUBackendSpec(BackendOptions):
    kind: Literal["cpu"] = "cpu"
    threads: int | None = Field(None, ge=1, description=(
        "torch threads (default: OMP_NUM_THREADS when set, else the cores of the CPU affinity mask, shared "
        "out among the processes under torchrun; apo_cli/runtime/threads.py)."))
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Autocast dtype for generation and training forward passes."
    )


CPU = BackendRef("backends.cpu:CPUBackend", CPUBackendSpec)
