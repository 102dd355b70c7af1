"""Fixed-seed tiny runs whose metrics and weights were recorded before the training core was
redesigned (issue 13), so the redesign can be shown to change nothing.

``python -m tests.golden.runs --record`` writes ``tests/golden/train_golden.json`` from the code as
it is; ``tests/test_golden.py`` reruns the same recipes and compares. Floating-point results depend
on the processor's vector kernels, so the file records the torch CPU capability it was made on and
the comparison is exact (every metric value, every weight tensor's bytes) on a processor of the same
capability.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
GOLDEN = HERE / "train_golden.json"
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
    import torch

    return f"{torch.__version__} {torch.backends.cpu.get_cpu_capability()}"


def main() -> None:
    if sys.argv[1:] != ["--record"]:
        raise SystemExit("usage: python -m tests.golden.runs --record")
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        runs = run_all(Path(tmp))
    GOLDEN.write_text(json.dumps({"capability": capability(), "runs": runs}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    main()
