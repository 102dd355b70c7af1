"""Fixed-seed tiny runs whose metrics and weights were recorded before the training core was
redesigned (issue 13), so the redesign can be shown to change nothing.

``python -m tests.golden.runs --record`` writes ``tests/golden/train_golden-<processor>.json`` from the
code as it is; ``tests/test_golden.py`` reruns the same recipes and compares with the file of this
processor. Floating-point results depend on the processor's vector kernels, so each file records the
:func:`capability` it was made on and the comparison is exact (every metric value, every weight
tensor's bytes) on a processor of the same capability. Each file was recorded from the code before
the redesign (commit 8fe6e21, in a ``git worktree``), on the processor it names; that commit's script
writes ``train_golden.json`` with torch's capability alone, so the file is renamed to
:func:`record_path` and its ``capability`` set to :func:`capability`.

The runs fix the training phase's thread count at torch's (``OMP_NUM_THREADS``): the code before the
redesign had no thread governor. On Intel processors they run with ``MKL_CBWR=AUTO,STRICT``, as the
``apo`` command and the test suite do (apo_cli/runtime/threads.py), and their records were made so
(``MKL_CBWR=AUTO,STRICT python -m tests.golden.runs --record`` at 8fe6e21).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
RECORDS = sorted(HERE.glob("train_golden-*.json"))  # one per processor kind, each with its "capability"
TIMING_PREFIXES = ("time/", "step_time", "tokens_per_s", "perf/")  # perf/: throughput and MFU, timings too

_BASE = {
    "run": {"max_steps": 4},
    "algorithm": {"mini_batches": 2, "epochs": 2, "kl_coef": 0.05},
    "optim": {"micro_batch_size": 4},
    "checkpoint": {"every": 2, "keep_last": 4},
}
RUNS: dict[str, dict[str, Any]] = {
    "apo_kl": _BASE,
    "apo_kl_lora": {**_BASE, "model": {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}}},
    "grpo_kl": {**_BASE, "algorithm": {**_BASE["algorithm"], "objective": "grpo"}},
}
RESUMED = "apo_kl"  # also resumed from its step-2 checkpoint


def _stable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if not k.startswith(TIMING_PREFIXES)} for r in rows]


def _metrics(run: Path) -> list[dict[str, Any]]:
    return _stable([json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()])


def _weights(ckpt: Path) -> dict[str, str]:
    from safetensors.torch import load_file

    files = sorted(ckpt.glob("*.safetensors"))
    out = {}
    for f in files:
        for k, t in sorted(load_file(str(f)).items()):
            out[f"{f.name}:{k}"] = hashlib.sha256(t.contiguous().view(-1).numpy().tobytes()).hexdigest()
    return out


def _recipe(root: Path, name: str, sections: dict[str, Any]) -> dict[str, Any]:
    from tests.helpers import tiny_recipe

    return tiny_recipe(root, name, **sections)


def run_all(root: Path) -> dict[str, Any]:
    import os
    from unittest import mock

    import torch

    with mock.patch.dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())):  # no governor (module docstring)
        return _run_all(root)


def _run_all(root: Path) -> dict[str, Any]:
    from apo_cli.recipe import recipe_from_dict
    from apo_cli.train import train_from_recipe

    out: dict[str, Any] = {}
    for name, sections in RUNS.items():
        train_from_recipe(recipe_from_dict(_recipe(root, name, sections)))
        run = root / name
        out[name] = {"metrics": _metrics(run), "weights": {s: _weights(run / "checkpoints" / f"step-{s}") for s in (2, 4)}}
    # resume: the run killed after its step-2 checkpoint, continued with --resume
    cut = root / "resumed"
    shutil.copytree(root / RESUMED, cut)
    for step in (4,):
        shutil.rmtree(cut / "checkpoints" / f"step-{step}")
    d = _recipe(root, RESUMED, RUNS[RESUMED])
    d["run"]["output_dir"] = str(cut)
    train_from_recipe(recipe_from_dict(d), resume=True)
    out["resumed"] = {"metrics": _metrics(cut), "weights": {4: _weights(cut / "checkpoints" / "step-4")}}
    return json.loads(json.dumps(out))


def capability() -> str:
    """torch's version and CPU capability, the processor's vendor, and "AMX" where it has AMX: MKL
    picks other kernels on processors of the same capability (an AMD EPYC and an Intel Xeon with AMX,
    both AVX512, give other bits)."""
    import torch

    from apo_cli.runtime.threads import cpu_field, cpu_vendor

    flags = set(cpu_field("flags").split())
    amx = " AMX" if "amx_tile" in flags else ""
    return f"{torch.__version__} {torch.backends.cpu.get_cpu_capability()} {cpu_vendor() or 'unknown'}{amx}"


def record_path(cap: str) -> Path:
    return HERE / f"train_golden-{re.sub(r'[^a-z0-9]+', '-', cap.lower()).strip('-')}.json"


def main() -> None:
    if sys.argv[1:] != ["--record"]:
        raise SystemExit("usage: python -m tests.golden.runs --record")
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        runs = run_all(Path(tmp))
    path = record_path(capability())
    path.write_text(json.dumps({"capability": capability(), "runs": runs}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
