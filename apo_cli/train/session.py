"""What wraps the loop so that no finished step is lost: the run directory's lock, resuming (and
cutting the logs back to the checkpoint), signals, and saving before a failure.

- :class:`StopFlag`: the first SIGINT/SIGTERM/SIGHUP lets the step finish, then the loop saves and
  exits 130/143/129; a second one aborts at once, with the first one's code. :func:`during_setup`
  turns any of them while the run is being built into a one-line exit (nothing to save yet).
- :func:`start` (under the run lock): check the run directory again (apo_cli/checkpoint.py
  ``check_run_dir``: another trainer may have written it since the build checked it), remove apo's
  partial files of an interrupted checkpoint or log write, restore the checkpoint to resume from (the
  newest that verifies and whose trainer state is valid; a run whose checkpoints all fail is refused,
  never restarted), cut ``metrics.jsonl`` / ``samples.jsonl`` back to its step (the steps after it
  are redone and logged once; torn lines are dropped with a warning), write the resolved recipe.
- :func:`save_before_failure`: a step that failed before its update leaves the weights of the last
  completed step, which is checkpointed with the data position and RNG from before the failed step.
- :class:`RunLog` (:func:`run_log`, rank 0): each step's metrics row to ``metrics.jsonl`` and the
  trackers of ``logging.report_to`` (apo_cli/tracking/), its samples to ``samples.jsonl``; the peak
  FLOP/s of the device and the parameter counts behind ``perf/mfu`` to ``perf.json``.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from apo_cli.checkpoint import (
    RUN_FILES,
    atomic_write_text,
    check_run_dir,
    latest_good_checkpoint,
    list_checkpoints,
    remove_stale_temp,
)
from apo_cli.errors import ApoError, CheckpointError, RunDirError
from apo_cli.metrics import MetricsWriter, open_append, truncate_jsonl_after, why_not_written
from apo_cli.evaluation import drop_training_evals_after
from apo_cli.recipe_yaml import recipe_to_yaml
from apo_cli.runtime import signals
from apo_cli.tracking import check_installed, open_trackers
from apo_cli.train.state import verify_resumable


class StopFlag:
    """First SIGINT/SIGTERM/SIGHUP: finish the step, save, exit 130/143/129 (:meth:`reason`).
    Second: abort now, with the first one's code (apo_cli/runtime/signals.py)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] | None = None

    def __enter__(self):
        self._old = signals.set_handlers(self._handle)
        return self

    def __exit__(self, *exc):
        signals.restore(self._old)
        return False

    def _handle(self, signum, frame):
        first = self.signum
        if first is None:
            self.signum = signum
            if signals.is_hangup(signum):
                signals.leave_terminal()  # the terminal is gone: finishing the step must not fail on it
            signals.note(f"{signals.name(signum)}: finishing the step, then saving and stopping "
                         "(a second signal stops at once, without saving)")
            return
        again = "again" if signum == first else f"after {signals.name(first)}"
        signals.abort(signum, frame, f"{again}: aborted at once, without saving the step "
                                     "(--resume continues from the last checkpoint)", code_signum=first)

    @staticmethod
    def reason(signum: int) -> tuple[int, str]:
        """The exit code and the name of the signal that stopped the run."""
        return signals.exit_code(signum), signals.name(signum)


def during_setup(build):
    """Run ``build`` with SIGINT/SIGTERM/SIGHUP stopping at once with one line and exit 130/143/129
    (nothing is trained yet, nothing to save); also while a module imports (torch, a reward file)."""

    def handler(signum, frame):
        signals.abort(signum, frame, "before training started; nothing to save")

    old = signals.set_handlers(handler)
    try:
        return build()
    finally:
        signals.restore(old)


def start(trainer: Any) -> list[str]:
    """Under the run lock: check the run directory again, clean up after a killed run, restore the
    state to resume from, cut the logs back to it. Returns notes for the dashboard."""
    notes: list[str] = []
    world, run_dir = trainer.world, trainer.run_dir
    main = world.is_main
    with world.agree():
        if main:
            _check_again(trainer)
    trainer.resume = world.gather(trainer.resume)[0]
    if main and remove_stale_temp(run_dir, (*RUN_FILES, trainer.recipe.logging.metrics_file)):
        notes.append("removed the partial files of an interrupted checkpoint or log write")
    if trainer.resume:
        # both were verified already: the --resume-from one while building, the latest good one here
        ckpt = trainer.resume_from
        if ckpt is None:
            with world.agree():  # rank 0 verifies and chooses; every rank takes its choice
                ckpt = _checkpoint_to_resume(run_dir, notes) if main else None
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
        for name in (trainer.recipe.logging.metrics_file, "samples.jsonl"):
            torn = truncate_jsonl_after(run_dir / name, trainer.state.step)
            if torn:
                notes.append(f"warning: {name}: {len(torn)} torn or unreadable line{'s' * (len(torn) > 1)} "
                             f"dropped (line {', '.join(map(str, torn[:5]))}{', ...' if len(torn) > 5 else ''})")
        drop_training_evals_after(run_dir, trainer.state.step)  # evaluations of the steps to redo
        atomic_write_text(run_dir / "recipe.yaml", recipe_to_yaml(trainer.recipe))
    return notes


def _check_again(trainer: Any) -> None:
    """The run directory checks of the build, repeated under the lock: another trainer may have
    started or finished a run in it since (checkpoint.resume: auto then resumes that run)."""
    r, run_dir = trainer.recipe, trainer.run_dir
    if not trainer.resume and r.checkpoint.resume == "auto" and (run_dir / "recipe.yaml").is_file():
        trainer.resume = True
    check_run_dir(run_dir, r.model_dump(mode="json"), resume=trainer.resume,
                  allow_change=trainer.state.allow_recipe_change, resume_from=trainer.resume_from,
                  metrics_file=r.logging.metrics_file)


def _checkpoint_to_resume(run_dir: Path, notes: list[str]) -> Path | None:
    """The newest checkpoint that can be resumed (falling back past broken ones, each noted); None
    when there is none at all; a one-line error when there are some but none can be resumed."""
    skipped: list[str] = []
    ckpt = latest_good_checkpoint(run_dir, warn=skipped.append, check=verify_resumable)
    notes += skipped
    found = list_checkpoints(run_dir)
    if ckpt is None and found:
        newest = skipped[0].removesuffix("; falling back to the previous checkpoint") if skipped else ""
        raise CheckpointError(
            f"cannot resume {run_dir}: none of its {len(found)} checkpoint{'s' * (len(found) > 1)} can be resumed "
            f"(the newest: {newest}); nothing was changed",
            hint=f"to start over on purpose, move {run_dir} away or train into a new --output-dir")
    return ckpt


def save_before_failure(trainer: Any, trainer_state: dict[str, Any], rng: Any, *, dash) -> None:
    """A step failed before its update: checkpoint the last completed step (with the data position
    and RNG from before the failed step), unless it is saved already or the weights moved on."""
    done = int(trainer_state["step"])
    if trainer.phase != "rollout" or done <= trainer.last_saved:
        return
    trainer.state.step = done
    try:
        path = trainer.save(trainer_state, rng)
        trainer.finisher.wait()  # in place before the message says so (apo_cli/checkpoint_io.py)
    except ApoError as e:
        dash.message(f"could not save step {done} before stopping: {e}", "red")
        return
    dash.message(f"saved {path} (the last completed step) before stopping; resume with --resume", "yellow")


def append_samples(path: Path, samples: list[dict[str, Any]]) -> None:
    if not samples:
        return
    try:
        with open_append(path) as f:
            f.write("".join(json.dumps(s) + "\n" for s in samples))
    except OSError as e:
        raise RunDirError(f"cannot write {path}: {why_not_written(path, e)}") from None


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
