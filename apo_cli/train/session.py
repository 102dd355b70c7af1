"""What wraps the loop so that no finished step is lost: the run directory's lock, resuming (and
cutting the logs back to the checkpoint), signals, and saving before a failure.

- :class:`StopFlag`: the first SIGINT/SIGTERM lets the step finish, then the loop saves and exits
  130/143; a second one aborts at once. :func:`during_setup` turns a SIGTERM while the run is being
  built into a one-line exit 143 (nothing to save yet).
- :func:`start`: remove the partial files of an interrupted checkpoint or log write, restore the
  checkpoint to resume from, cut ``metrics.jsonl`` / ``samples.jsonl`` back to its step (the steps
  after it are redone and logged once), write the resolved recipe.
- :func:`save_before_failure`: a step that failed before its update leaves the weights of the last
  completed step, which is checkpointed with the data position and RNG from before the failed step.
- :class:`RunLog` (:func:`run_log`, rank 0): each step's metrics row to ``metrics.jsonl`` and the
  trackers of ``logging.report_to`` (apo_cli/tracking/), its samples to ``samples.jsonl``; the peak
  FLOP/s of the device and the parameter counts behind ``perf/mfu`` to ``perf.json``.
"""

from __future__ import annotations

import contextlib
import json
import signal
from pathlib import Path
from typing import Any

from apo_cli.checkpoint import atomic_write_text, latest_good_checkpoint, remove_stale_temp
from apo_cli.errors import EXIT_TERMINATED, ApoError, Interrupted, RunDirError
from apo_cli.metrics import MetricsWriter, truncate_jsonl_after
from apo_cli.evaluation import drop_training_evals_after
from apo_cli.recipe_yaml import recipe_to_yaml
from apo_cli.tracking import check_installed, open_trackers


class StopFlag:
    """First SIGINT/SIGTERM: finish the step, save, exit 130/143. Second: abort now."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum


def during_setup(build):
    """Run ``build`` with SIGTERM turned into a one-line exit 143 (nothing is trained yet, nothing to save)."""
    def handler(signum, frame):
        raise Interrupted("SIGTERM before training started; nothing to save", EXIT_TERMINATED)

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return build()
    try:
        return build()
    finally:
        signal.signal(signal.SIGTERM, old)


def start(trainer: Any) -> list[str]:
    """Clean up after a killed run, restore the state to resume from, cut the logs back to it.
    Returns notes for the dashboard."""
    notes = []
    world, run_dir = trainer.world, trainer.run_dir
    main = world.is_main
    if main and remove_stale_temp(run_dir):
        notes.append("removed the partial files of an interrupted checkpoint or log write")
    if trainer.resume:
        # both were verified already: the --resume-from one while building, the latest good one here
        ckpt = trainer.resume_from
        if ckpt is None:
            with world.agree():  # rank 0 verifies and chooses; every rank takes its choice
                ckpt = latest_good_checkpoint(run_dir, warn=notes.append) if main else None
            ckpt = world.gather(ckpt)[0]
        if ckpt is None:
            notes.append(f"no checkpoint in {run_dir}: starting from step 0")
        else:
            trainer.restore(Path(ckpt), verified=True)
            notes.append(f"resumed from {ckpt} at step {trainer.state.step}")
    if trainer.state.step >= trainer.state.max_steps:  # finished: leave the run directory as it is
        return notes
    if main:
        # lines of steps after the checkpoint are redone: drop them so each step is logged once
        truncate_jsonl_after(run_dir / trainer.recipe.logging.metrics_file, trainer.state.step)
        truncate_jsonl_after(run_dir / "samples.jsonl", trainer.state.step)
        drop_training_evals_after(run_dir, trainer.state.step)  # evaluations of the steps to redo
        atomic_write_text(run_dir / "recipe.yaml", recipe_to_yaml(trainer.recipe))
    return notes


def save_before_failure(trainer: Any, trainer_state: dict[str, Any], rng: Any, *, dash) -> None:
    """A step failed before its update: checkpoint the last completed step (with the data position
    and RNG from before the failed step), unless it is saved already or the weights moved on."""
    done = int(trainer_state["step"])
    if trainer.phase != "rollout" or done <= trainer.last_saved:
        return
    trainer.state.step = done
    try:
        path = trainer.save(trainer_state, rng)
    except ApoError as e:
        dash.message(f"could not save step {done} before stopping: {e}", "red")
        return
    dash.message(f"saved {path} (the last completed step) before stopping; resume with --resume", "yellow")


def append_samples(path: Path, samples: list[dict[str, Any]]) -> None:
    if not samples:
        return
    try:
        with path.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(s) + "\n" for s in samples))
    except OSError as e:
        raise RunDirError(f"cannot write {path}: {e.strerror or e}") from None


def make_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create run directory {run_dir}: {e.strerror or e}") from None


def check_trackers(recipe: Any) -> None:
    """A one-line error naming the extra to install when a tracker of logging.report_to is missing."""
    check_installed(recipe.logging.trackers())


class RunLog:
    """Rank 0's records of the run (see the module docstring)."""

    def __init__(self, trainer: Any, dash: Any):
        r, run_dir = trainer.recipe, trainer.run_dir
        info = trainer.perf.info()
        atomic_write_text(run_dir / "perf.json", json.dumps(info, indent=1) + "\n")
        if info["peak_flops"]:
            dash.message(f"peak {info['peak_flops'] / 1e9:.1f} GFLOP/s for perf/mfu: {info['peak_source']}", "dim")
        self.metrics = MetricsWriter(run_dir / r.logging.metrics_file)
        self.samples = run_dir / "samples.jsonl"
        self.trackers = open_trackers(r.logging.trackers(), run_dir, r, {"perf": info},
                                      lambda text: dash.message(text, "yellow"))

    def write(self, record: dict[str, Any], samples: list[dict[str, Any]]) -> None:
        self.metrics.write(record)  # first: a tracker's failure never costs a metrics line
        append_samples(self.samples, samples)
        if self.trackers is not None:
            self.trackers.write(record, samples)

    def close(self) -> None:
        self.metrics.close()
        if self.trackers is not None:
            self.trackers.close()


@contextlib.contextmanager
def run_log(trainer: Any, dash: Any):
    """The run's :class:`RunLog` on rank 0, None on the other ranks; closed at the end."""
    if not trainer.world.is_main:
        yield None
        return
    log = RunLog(trainer, dash)
    try:
        yield log
    finally:
        log.close()
