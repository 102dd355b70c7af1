"""Peak dense bf16 tensor throughput of known GPUs (FLOP/s, without sparsity), for ``perf/mfu``.

Matched against the device name (``NVIDIA H100 80GB HBM3``, ``NVIDIA A100-SXM4-80GB``) in order: the
first entry whose every word is a word of the name wins, so the more specific names come first. Figures: the vendors' data sheets, dense
(half the "with sparsity" numbers); an unknown GPU gives None (set ``APO_PEAK_FLOPS`` instead).
"""

from __future__ import annotations

TFLOPS = 1e12
PEAKS: tuple[tuple[str, float], ...] = (
    ("GB200", 2500 * TFLOPS),
    ("B200", 2250 * TFLOPS),
    ("B100", 1750 * TFLOPS),
    ("H200", 989.4 * TFLOPS),
    ("GH200", 989.4 * TFLOPS),
    ("H100 NVL", 835.5 * TFLOPS),
    ("H100 PCIe", 756.5 * TFLOPS),
    ("H100", 989.4 * TFLOPS),  # SXM
    ("H800", 989.4 * TFLOPS),
    ("H20", 148 * TFLOPS),
    ("A100", 312 * TFLOPS),
    ("A800", 312 * TFLOPS),
    ("L40S", 362.05 * TFLOPS),
    ("L40", 181.05 * TFLOPS),
    ("L4", 121 * TFLOPS),
    ("A10G", 70 * TFLOPS),
    ("A10", 125 * TFLOPS),
    ("A40", 149.7 * TFLOPS),
    ("RTX 6000 Ada", 364.2 * TFLOPS),
    ("RTX A6000", 154.8 * TFLOPS),
    ("RTX 5090", 209.5 * TFLOPS),
    ("RTX 4090", 165.2 * TFLOPS),
    ("RTX 3090", 71 * TFLOPS),
    ("MI300X", 1307.4 * TFLOPS),
    ("MI250X", 383 * TFLOPS),
)


def peak_for(device_name: str) -> float | None:
    """The table's peak for a device name, or None."""
    words = set(device_name.replace("-", " ").upper().split())
    for key, peak in PEAKS:
        if set(key.upper().split()) <= words:
            return peak
    return None
