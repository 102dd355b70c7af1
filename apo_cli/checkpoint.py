"""Run directories and crash-safe checkpoints.

A run directory holds::

    recipe.yaml              the resolved recipe the run was started with
    metrics.jsonl            one JSON object per step
    samples.jsonl            a few prompts/completions/rewards per step
    checkpoints/step-N/      Hugging Face format (model.safetensors or the LoRA adapter, tokenizer)
                             + trainer_state.json (step, data position, schedule states)
                             + optimizer.pt (optimizer, LR scheduler, RNG states; weights_only-safe)
                             + checksums.json (sha256 of every file, written last)

A checkpoint is written into a hidden temporary folder beside its final name and renamed into
place only when complete, so a kill at any moment leaves the previous checkpoints intact. A
checkpoint whose checksums do not match is reported and skipped in favour of the previous one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apo_cli.errors import CheckpointError, RunDirError

CKPT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
OPTIM_FILE = "optimizer.pt"
SUMS_FILE = "checksums.json"
_STEP_RE = re.compile(r"^step-(\d+)$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError when ``path`` is not a complete, intact checkpoint."""
    sums_path = path / SUMS_FILE
    if not sums_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {SUMS_FILE} is missing")
    try:
        sums = json.loads(sums_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {path}: {SUMS_FILE} is corrupted") from None
    for name, digest in sums.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        if _sha256(f) != digest:
            raise CheckpointError(f"checkpoint {path}: {name} is corrupted (checksum mismatch)")


def latest_good_checkpoint(run_dir: Path, warn=None) -> Path | None:
    """The newest checkpoint that verifies; ``warn(msg)`` is told about each one skipped."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            if warn is not None:
                warn(f"{e}; falling back to the previous checkpoint")
            continue
        return path
    return None


@dataclass
class CheckpointPayload:
    step: int
    model: Any  # has save_pretrained
    tokenizer: Any
    trainer_state: dict[str, Any]
    torch_state: dict[str, Any]  # optimizer, scheduler, rng


def write_checkpoint(run_dir: Path, payload: CheckpointPayload, keep_last: int) -> Path:
    """Write ``checkpoints/step-N`` atomically and prune to the newest ``keep_last``."""
    import torch

    root = Path(run_dir) / CKPT_DIR
    final = root / f"step-{payload.step}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{payload.step}-", dir=root))
    except OSError as e:
        raise CheckpointError(f"cannot write a checkpoint in {root}: {e.strerror or e}") from None
    try:
        payload.model.save_pretrained(tmp, safe_serialization=True)
        payload.tokenizer.save_pretrained(tmp)
        (tmp / STATE_FILE).write_text(json.dumps(payload.trainer_state, indent=1, sort_keys=True))
        torch.save(payload.torch_state, tmp / OPTIM_FILE)
        sums = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / SUMS_FILE).write_text(json.dumps(sums, indent=1))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise CheckpointError(
                f"could not write checkpoint step-{payload.step} in {root}: {e.strerror or e}; "
                "the previous checkpoints are intact"
            ) from None
        raise
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_trainer_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read {STATE_FILE} ({e})") from None


def read_torch_state(path: Path) -> dict[str, Any]:
    import torch

    try:
        return torch.load(path / OPTIM_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a corrupted file to the user
        raise CheckpointError(f"checkpoint {path}: cannot read {OPTIM_FILE} ({type(e).__name__})") from None


def load_weights_into(model: Any, path: Path) -> None:
    """Load a checkpoint's weights (full model or LoRA adapter) into an already built ``model``."""
    from safetensors.torch import load_file

    adapter = path / "adapter_model.safetensors"
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(adapter)))
        return
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"checkpoint {path} holds no model weights (*.safetensors)")
    state: dict[str, Any] = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # tied embeddings are saved once; anything else missing is a real mismatch
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit the model: {len(missing)} missing and {len(unexpected)} unexpected tensors"
        )


# --------------------------------------------------------------------------------------------------
# Run directory


def recipe_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths whose values differ between two recipe dumps."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += recipe_diff(a, b, path + ".")
        elif a != b:
            out.append(path)
    return out


# Fields that may change on --resume with --allow-recipe-change: they do not change what was
# computed so far, only how the rest of the run is run, logged or saved.
SAFE_TO_CHANGE = (
    "run.max_steps",
    "run.epochs",
    "checkpoint.",
    "logging.",
    "backend.threads",
    "optim.max_consecutive_skips",
)


def check_run_dir(run_dir: Path, recipe_dump: dict[str, Any], *, resume: bool, allow_change: bool) -> None:
    """Refuse to mix runs: a run dir holding another run needs --resume (same recipe) or a new dir."""
    import yaml

    existing = run_dir / "recipe.yaml"
    if not existing.is_file():
        if resume and not list_checkpoints(run_dir):
            raise RunDirError(f"nothing to resume in {run_dir}: it holds no run")
        return
    try:
        old = yaml.safe_load(existing.read_text()) or {}
    except yaml.YAMLError:
        raise RunDirError(f"{existing} is not valid YAML; move the run directory away or choose another") from None
    changed = [p for p in recipe_diff(old, recipe_dump) if p != "run.output_dir"]
    if not resume:
        what = "another recipe's run" if changed else "a run of this recipe"
        raise RunDirError(
            f"run directory {run_dir} already holds {what}",
            hint="use --resume to continue it, or set run.output_dir / --output-dir to a new folder",
        )
    if changed:
        unsafe = [p for p in changed if not _safe(p)]
        if unsafe or not allow_change:
            listed = ", ".join(changed)
            if not allow_change:
                raise RunDirError(
                    f"the recipe differs from the run's in: {listed}",
                    hint="resume with the same recipe, or pass --allow-recipe-change (safe fields only)",
                )
            raise RunDirError(f"these changed fields are not safe to change on resume: {', '.join(unsafe)}")


def _safe(path: str) -> bool:
    return any(path.startswith(s) if s.endswith(".") else path == s for s in SAFE_TO_CHANGE)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
