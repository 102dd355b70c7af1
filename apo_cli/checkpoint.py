"""Run directories and crash-safe checkpoints.

A run directory holds::

    recipe.yaml              the resolved recipe the run was started with
    metrics.jsonl            one JSON object per step
    samples.jsonl            a few prompts/completions/rewards per step
    checkpoints/step-N/      Hugging Face format (model.safetensors or the LoRA adapter, tokenizer)
                             + trainer_state.json (step, data position, schedule states)
                             + optimizer.pt (optimizer, LR scheduler, RNG states; weights_only-safe)
                             + checksums.json (sha256 of every file, written last)
    .lock                    flock held by the training process (one process per run directory)

Whose files: apo writes into a folder only when it is new, empty, or holds an apo run (its
``recipe.yaml``); a non-empty folder without one is refused, naming it. It removes only what it
wrote: its own temporary names (``.<file>.tmp`` of the files above, ``checkpoints/.tmp-step-*``) and
checkpoints holding its manifest (``checksums.json``). The files it appends to (metrics, samples,
evaluations, the lock) must not be symbolic links, so nothing is written outside the run directory.

A checkpoint is written into a hidden temporary folder beside its final name (every file fsynced)
and renamed into place only when complete, so a kill at any moment leaves the previous checkpoints
intact; a temporary folder left by a kill is removed when the run is resumed. A checkpoint whose
checksums do not match is reported and skipped in favour of the previous one. A failed write (disk
full, permissions) removes its temporary folder and raises :class:`CheckpointError`.

Checkpoints form one timeline: writing ``step-N`` removes any ``step-M`` with M > N (left by a run
that was resumed from an earlier or a fallback checkpoint), then prunes to the newest ``keep_last``.

Fault injection (tests only): ``APO_FAULT_SLOW_CHECKPOINT=<seconds>`` sleeps that long after each
file of a checkpoint is written, so a test can kill the process in the middle of a write.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apo_cli.checkpoint_io import CheckpointFinisher, fsync_and_hash
from apo_cli.errors import CheckpointError, RunDirError

CKPT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
OPTIM_FILE = "optimizer.pt"
SUMS_FILE = "checksums.json"
TMP_PREFIX = ".tmp-"
_STEP_RE = re.compile(r"^step-(\d+)$")
_REQUIRED = (STATE_FILE, OPTIM_FILE)


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
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a folder")
    sums_path = path / SUMS_FILE
    if not sums_path.is_file():
        hint = "it is a run directory: use --resume" if (path / CKPT_DIR).is_dir() else None
        raise CheckpointError(f"checkpoint {path} is incomplete: {SUMS_FILE} is missing", hint=hint)
    try:
        sums = json.loads(sums_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {path}: {SUMS_FILE} is corrupted") from None
    if not isinstance(sums, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in sums.items()):
        raise CheckpointError(f"checkpoint {path}: {SUMS_FILE} is corrupted (not a mapping of file names to digests)")
    for name in sums:
        if Path(name).name != name or name in (".", ".."):
            raise CheckpointError(f"checkpoint {path}: {SUMS_FILE} names {name!r}, which is not a file of the checkpoint")
    missing = [n for n in _REQUIRED if n not in sums] + ([] if any(n.endswith(".safetensors") for n in sums)
                                                         else ["*.safetensors"])
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: {SUMS_FILE} lists no {', '.join(missing)}")
    for name, digest in sums.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        if _sha256(f) != digest:
            raise CheckpointError(f"checkpoint {path}: {name} is corrupted (checksum mismatch)")


def is_apo_checkpoint(path: Path) -> bool:
    """A ``step-N`` folder apo wrote (it holds apo's manifest), which apo may replace or prune."""
    return (Path(path) / SUMS_FILE).is_file() and not Path(path).is_symlink()


def latest_good_checkpoint(run_dir: Path, warn=None, check=None) -> Path | None:
    """The newest checkpoint that verifies (``check``, default :func:`verify_checkpoint`); ``warn(msg)``
    is told about each one skipped."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            (check or verify_checkpoint)(path)
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
    weights: dict[str, Any] | None = None  # the full weights when ``model`` holds only a shard (FSDP2)


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step-{step}"


def write_checkpoint(run_dir: Path, payload: CheckpointPayload, keep_last: int,
                     finisher: CheckpointFinisher | None = None) -> Path:
    """Write ``checkpoints/step-N`` atomically, drop later steps and prune to the newest ``keep_last``.

    The files are written here; their fsync and checksums, the rename and the pruning go through
    ``finisher`` when given (in the background inside its ``with`` block: apo_cli/checkpoint_io.py)."""
    import torch

    if finisher is not None:
        finisher.wait()  # the previous checkpoint lands (or its failure is raised) before this one starts
    root = Path(run_dir) / CKPT_DIR
    final = checkpoint_path(run_dir, payload.step)
    if (final.exists() or final.is_symlink()) and not is_apo_checkpoint(final):  # never replace what apo did not write
        raise CheckpointError(f"cannot write checkpoint step-{payload.step}: {final} exists and is not an apo "
                              f"checkpoint (no {SUMS_FILE})", hint="move it away, then resume with --resume")
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}step-{payload.step}-", dir=root))
        os.chmod(tmp, _dir_mode())  # mkdtemp makes it private (0700); a checkpoint is an ordinary folder
    except OSError as e:
        raise CheckpointError(f"cannot write a checkpoint in {root}: {e.strerror or e}") from None

    def write_files() -> None:
        if payload.weights is None:
            payload.model.save_pretrained(tmp, safe_serialization=True)
        else:
            payload.model.save_pretrained(tmp, safe_serialization=True, state_dict=payload.weights)
        _fault_pause()
        payload.tokenizer.save_pretrained(tmp)
        _fault_pause()
        (tmp / STATE_FILE).write_text(json.dumps(payload.trainer_state, indent=1, sort_keys=True))
        _fault_pause()
        torch.save(payload.torch_state, tmp / OPTIM_FILE)
        _fault_pause()

    def finish() -> None:  # reads only the files: may run while the next step changes the state
        sums = fsync_and_hash([p for p in sorted(tmp.iterdir()) if p.is_file()])
        (tmp / SUMS_FILE).write_text(json.dumps(sums, indent=1))
        _fsync_file(tmp / SUMS_FILE)
        _fsync_dir(tmp)
        _replace_dir(tmp, final)
        _fsync_dir(root)

    def guarded(part) -> None:
        try:
            part()
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, Exception):
                # disk full surfaces as OSError, SafetensorError or RuntimeError (torch's zip writer)
                why = e.strerror if isinstance(e, OSError) and e.strerror else _one_line(e)
                raise CheckpointError(f"could not write checkpoint step-{payload.step} in {root}: {why}; "
                                      "the previous checkpoints are intact") from None
            raise

    def finish_and_prune() -> None:
        guarded(finish)
        _prune(run_dir, payload.step, keep_last)

    guarded(write_files)
    if finisher is not None:
        finisher.run(finish_and_prune)
    else:
        finish_and_prune()
    return final


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first, never left half-deleted."""
    old = None
    if final.exists():
        old = final.with_name(f"{TMP_PREFIX}old-{final.name}-{os.getpid()}")
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _prune(run_dir: Path, step: int, keep_last: int) -> None:
    found = [p for p in list_checkpoints(run_dir) if is_apo_checkpoint(p)]  # never a folder apo did not write
    later = [p for p in found if _step_of(p) > step]  # an abandoned continuation of this run
    earlier = [p for p in found if _step_of(p) <= step]
    for old in later + earlier[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _dir_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def _step_of(path: Path) -> int:
    return int(path.name.split("-", 1)[1])


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _fault_pause() -> None:
    """Test hook: APO_FAULT_SLOW_CHECKPOINT=<seconds> widens the window in which a kill lands mid-write."""
    delay = os.environ.get("APO_FAULT_SLOW_CHECKPOINT")
    if delay:
        time.sleep(float(delay))


# the files apo writes in a run directory (besides checkpoints/ and the trackers' folders); the
# appended ones must not be symbolic links (see check_run_files)
RUN_FILES = ("recipe.yaml", "metrics.jsonl", "samples.jsonl", "eval.jsonl", "perf.json", "trackers.json")
APPENDED = ("samples.jsonl", "eval.jsonl", ".lock")


def temp_name(name: str) -> str:
    """The temporary file :func:`atomic_write_text` writes ``name`` through."""
    return f".{name}.tmp"


def remove_stale_temp(run_dir: Path, names: tuple[str, ...] = RUN_FILES) -> list[Path]:
    """Remove the temporary files and folders a killed run left behind (apo's own names only: the
    temporary files of ``names`` and the checkpoints' temporary folders); return what was removed."""
    run_dir = Path(run_dir)
    root = run_dir / CKPT_DIR
    stale = [p for pat in (f"{TMP_PREFIX}step-*", f"{TMP_PREFIX}old-step-*") for p in root.glob(pat)] \
        if root.is_dir() and not root.is_symlink() else []
    stale += [p for n in names if (p := run_dir / temp_name(n)).is_file() and not p.is_symlink()]
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


class RunLock:
    """An exclusive lock on a run directory for the life of a training process (POSIX flock).

    Two processes training into one run directory would interleave metrics and checkpoints; the
    second gets a RunDirError. The kernel drops the lock when its process dies, even on SIGKILL.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking
            return self
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:
            if self.path.is_symlink():
                raise RunDirError(f"{self.path} is a symbolic link; apo writes only inside the run directory "
                                  "(remove the link)") from None
            raise RunDirError(f"cannot write in run directory {self.path.parent}: {e.strerror or e}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            self._fd = None
            raise RunDirError(f"run directory {self.path.parent} is in use by another apo process") from None
        return self

    def __exit__(self, *exc) -> bool:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock
            self._fd = None
        return False


def _fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


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
    """The checkpoint's trainer state as written (apo_cli/train/state.py validates it)."""
    try:
        text = (path / STATE_FILE).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else "not UTF-8 text"
        raise CheckpointError(f"checkpoint {path}: cannot read {STATE_FILE} ({why})") from None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        what = f"line {e.lineno} column {e.colno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else "nested too deeply"
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} is not valid JSON ({what})") from None


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
        try:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, load_file(str(adapter)))
        except (RuntimeError, ValueError, OSError) as e:  # shape mismatch, unreadable file
            raise CheckpointError(f"checkpoint {path} does not fit the model: {' '.join(str(e).split())[:200]}") from None
        return
    state = read_weights(path)
    check_fit(path, model, state)
    try:
        model.load_state_dict(state, strict=False)
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} does not fit the model: {' '.join(str(e).split())[:200]}") from None


def read_weights(path: Path) -> dict[str, Any]:
    """A checkpoint's full weights (every ``model*.safetensors``), on the CPU."""
    from safetensors.torch import load_file

    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"checkpoint {path} holds no model weights (*.safetensors)")
    state: dict[str, Any] = {}
    try:
        for f in files:
            state.update(load_file(str(f)))
    except (RuntimeError, ValueError, OSError) as e:  # unreadable file
        raise CheckpointError(f"checkpoint {path} does not fit the model: {' '.join(str(e).split())[:200]}") from None
    return state


def check_fit(path: Path, model: Any, state: dict[str, Any], *, partial: bool = False) -> None:
    """CheckpointError unless ``state`` has the model's tensors with their shapes (a tied output
    head may be absent: it is saved once; with ``partial``, any may be: an adapter). Shapes of a
    sharded model are its full shapes."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [] if partial else [k for k in own if k not in state and not k.endswith("lm_head.weight")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit the model: {len(missing)} missing and {len(unexpected)} unexpected tensors"
        )
    for k, v in state.items():
        if tuple(v.shape) != own[k]:
            raise CheckpointError(f"checkpoint {path} does not fit the model: {k} has shape {tuple(v.shape)}, "
                                  f"the model's is {own[k]}")


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
# computed so far, only how long the rest of the run is and how it is run, logged or saved.
# Besides these, only the optimizer's APPLIED_ON_RESUME may change; everything else (model, data,
# rewards, rollout, algorithm, the LR schedule, seed, dtypes) changes the run itself and is refused
# even with the flag. logging.metrics_file is not here: a new name would
# split one run's metrics over two files.
SAFE_TO_CHANGE = (
    "run.max_steps", "run.epochs", "checkpoint.every", "checkpoint.keep_last", "checkpoint.resume",
    "logging.tensorboard", "logging.report_to", "logging.project", "logging.dashboard", "logging.samples_per_step",
    "eval.every", "eval.k", "eval.limit", "eval.temperature", "eval.max_new_tokens", "eval.split",
    "backend.threads", "backend.gpu_memory_utilization", "backend.sleep_mode", "optim.max_consecutive_skips",
)


# Fields --allow-recipe-change applies to a resumed optimizer: the checkpoint's values are replaced by
# the recipe's (apo_cli/train/state.py), so the run trains on with what its recipe.yaml says.
APPLIED_ON_RESUME = ("optim.lr", "optim.betas", "optim.weight_decay", "optim.grad_clip")

# what names a new run started from another run's checkpoint (--resume-from into a new folder)
FORK_FIELDS = ("run.output_dir", "run.name")


def check_run_dir(run_dir: Path, recipe_dump: dict[str, Any], *, resume: bool, allow_change: bool,
                  resume_from: Path | None = None, metrics_file: str = "metrics.jsonl") -> None:
    """Refuse to mix runs, or to write into a folder that is not apo's (see the module docstring).

    A run directory holding a run needs --resume (with its recipe, or the changes allowed) or a new
    folder. ``resume_from`` (a checkpoint named on the command line) may start a new run directory
    from it, under the recipe of the checkpoint's own run. The trainer checks again under the run
    lock (apo_cli/train/session.py): another process may have written the folder since.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} is a file, not a folder")
    check_run_files(run_dir, metrics_file)
    existing = run_dir / "recipe.yaml"
    if not existing.is_file():
        if resume and resume_from is None:
            if not list_checkpoints(run_dir):
                raise RunDirError(f"nothing to resume in {run_dir}: it holds no run",
                                  hint="drop --resume to start it, or point run.output_dir / --output-dir at the run")
            return  # checkpoints without their recipe.yaml: each is verified before it is resumed
        _refuse_foreign(run_dir, metrics_file)
        source = _source_run_recipe(resume_from)
        if source is not None:  # a fork goes on under the recipe its checkpoint was trained with
            _check_changes(source, _read_run_recipe(source), recipe_dump, allow_change, ignore=FORK_FIELDS)
        return
    old = _read_run_recipe(existing)
    if not resume:
        changed = [p for p in recipe_diff(old, recipe_dump) if p != "run.output_dir"]
        what = "another recipe's run" if changed else "a run of this recipe"
        raise RunDirError(
            f"run directory {run_dir} already holds {what}",
            hint="use --resume to continue it, or set run.output_dir / --output-dir to a new folder",
        )
    _check_changes(existing, old, recipe_dump, allow_change, ignore=("run.output_dir",))


def check_run_files(run_dir: Path, metrics_file: str = "metrics.jsonl") -> None:
    """RunDirError when a file apo appends to is a symbolic link (it would write outside the run directory)."""
    for name in (metrics_file, *APPENDED):
        p = Path(run_dir) / name
        if p.is_symlink():
            what = "a symbolic link to a missing file" if not p.exists() else "a symbolic link"
            raise RunDirError(f"{p} is {what} ({os.readlink(p)}); apo writes only inside the run directory",
                              hint="remove the link")


def _refuse_foreign(run_dir: Path, metrics_file: str) -> None:
    """RunDirError naming the folder when it holds anything but what a run that never started leaves."""
    if not run_dir.is_dir():
        return
    own = {".lock"} | {temp_name(n) for n in (*RUN_FILES, metrics_file)}
    foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in own)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise RunDirError(f"run directory {run_dir} is not empty and holds no apo run (no recipe.yaml): {shown}",
                          hint="choose a new or empty folder with run.output_dir / --output-dir")


def _source_run_recipe(ckpt: Path | None) -> Path | None:
    """The recipe.yaml of the run a checkpoint folder belongs to (``<run>/checkpoints/step-N``), if any."""
    if ckpt is None:
        return None
    ckpt = Path(ckpt).absolute()
    source = ckpt.parent.parent / "recipe.yaml"
    return source if ckpt.parent.name == CKPT_DIR and source.is_file() else None


def _read_run_recipe(path: Path) -> dict[str, Any]:

    from apo_cli.recipe_yaml import load_file

    try:
        old = load_file(path) or {}
    except ValueError as e:  # not YAML, or over a recipe's caps (an alias bomb, a huge file)
        raise RunDirError(f"{e}; move the run directory away or choose another") from None
    if not isinstance(old, dict):
        raise RunDirError(f"{path} is not a recipe; move the run directory away or choose another")
    return old


def _check_changes(existing: Path, old: dict[str, Any], new: dict[str, Any], allow_change: bool,
                   ignore: tuple[str, ...]) -> None:
    """Resuming under a changed recipe: refused for fields that change the run itself; the others
    need --allow-recipe-change (and are then applied)."""
    changed = [p for p in recipe_diff(old, new) if p not in ignore]
    unsafe = [p for p in changed if not _safe(p)]
    if unsafe:
        safe = [p for p in changed if _safe(p)]
        also = f" (and in {', '.join(safe)}, which may change with --allow-recipe-change)" if safe else ""
        hint = f"resume with the run's recipe, saved as {existing}, or start a new run directory"
        if "algorithm.objective" in unsafe:
            hint += " (to train a new run from a checkpoint's weights, set model.name_or_path to the checkpoint)"
        raise RunDirError(
            f"the recipe differs from the run's in fields that cannot change on resume: {', '.join(unsafe)}{also}",
            hint=hint,
        )
    if changed and not allow_change:
        raise RunDirError(
            f"the recipe differs from the run's in: {', '.join(changed)}",
            hint="pass --allow-recipe-change to go on with the new values (these may change)",
        )


# whole sections that may appear on resume (a run started before the section existed): every field safe
SAFE_SECTIONS = ("eval",)


def _safe(path: str) -> bool:
    return path in SAFE_TO_CHANGE or path in APPLIED_ON_RESUME or path in SAFE_SECTIONS


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``path`` through a fsynced temporary file beside it; RunDirError (nothing left) on failure."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if tmp.is_file():
            tmp.unlink()
        raise RunDirError(f"cannot write {path}: {e.strerror or e}") from None
