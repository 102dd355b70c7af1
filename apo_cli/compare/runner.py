"""The runs of a comparison: one ``python -m apo_cli train`` process per arm × seed.

- Each run is the normal train path on its own recipe file (``recipes/<arm>-s<seed>.yaml`` under the
  comparison's folder), so a run directory is exactly what `apo train` makes.
- A run whose directory holds the same recipe and its final checkpoint is finished: skipped. One that
  holds the same recipe and no final checkpoint was interrupted: resumed (``--resume``, from its latest
  good checkpoint). One whose recipe differs only in fields that are safe to change (``run.max_steps``
  to extend a comparison, ``eval``, logging) is resumed with ``--allow-recipe-change``; any other
  difference stops the comparison before it starts, naming the run and the fields.
- ``jobs`` processes run at once; each gets ``OMP_NUM_THREADS`` = the cores of this process's affinity
  mask // ``jobs`` (at least 1), which the CPU backend takes as its torch threads unless the recipe sets
  ``backend.threads`` (:func:`apo_cli.runtime.threads.share_env`). With one job the run's own output
  (its dashboard) is shown; with more each run writes ``logs/<arm>-s<seed>.log``.
- The runs are in their own sessions: SIGINT / SIGTERM to `apo compare` is passed on once to each
  running run (which finishes its step, saves and exits), and no new run starts; a second one is
  passed on again (the runs stop at once). On Linux a run also gets SIGTERM when `apo compare` itself
  is killed (``PR_SET_PDEATHSIG``), so no run trains on, orphaned. Either way, the same command
  again continues where the comparison stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from apo_cli.compare.plan import MANIFEST, Plan
from apo_cli.errors import EXIT_INTERRUPTED, EXIT_TERMINATED, ApoError, Interrupted, RunDirError

__all__ = ["Outcome", "RunState", "run_state", "run_plan", "write_plan"]


@dataclass
class RunState:
    state: str  # "new", "resume", "done"
    changed: list[str] = field(default_factory=list)  # safe fields that differ from the run's recipe


@dataclass
class Outcome:
    skipped: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # run -> why


def run_state(plan: Plan, arm: str, seed: int) -> RunState:
    """What the run directory holds for this run; RunDirError when it holds another recipe's run."""

    from apo_cli.checkpoint import SAFE_SECTIONS, SAFE_TO_CHANGE, recipe_diff
    from apo_cli.recipe_yaml import load_file

    run_dir = plan.run_dir(arm, seed)
    recipe = plan.recipes[(arm, seed)]
    existing = run_dir / "recipe.yaml"
    if not existing.is_file():
        return RunState("new")
    try:
        old = load_file(existing)
    except ValueError:  # not YAML, or over a recipe's caps
        old = None
    if not isinstance(old, dict):
        raise RunDirError(f"{existing} is not a recipe; move {run_dir} away or use another --output-dir")
    changed = [p for p in recipe_diff(old, recipe.model_dump(mode="json")) if p != "run.output_dir"]
    unsafe = [p for p in changed if p not in SAFE_TO_CHANGE and p not in SAFE_SECTIONS]
    if unsafe:
        raise RunDirError(f"{run_dir} holds a run of another recipe (it differs in {', '.join(unsafe)})",
                          hint="delete that run directory to redo it, or use another --output-dir / --name")
    steps = recipe.run.max_steps
    if not changed and steps is not None and (run_dir / "checkpoints" / f"step-{steps}").is_dir():
        return RunState("done")
    return RunState("resume", changed)


def write_plan(plan: Plan) -> None:
    """The manifest and every run's recipe file (rewritten each time: the same text when unchanged)."""
    import json

    from apo_cli.checkpoint import atomic_write_text
    from apo_cli.recipe_yaml import recipe_to_yaml
    from apo_cli.train.session import make_run_dir

    make_run_dir(plan.root / "recipes")
    atomic_write_text(plan.root / MANIFEST, json.dumps(plan.manifest(), indent=1) + "\n")
    for (arm, seed), recipe in plan.recipes.items():
        header = f"# apo compare: arm {arm}, seed {seed}. This run alone: apo train {plan.recipe_file(arm, seed)}\n" \
                 "# (with --resume to continue it)\n"
        atomic_write_text(plan.recipe_file(arm, seed), header + recipe_to_yaml(recipe))


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: a killed comparison may leave a run training
        pass


def _env(jobs: int) -> dict[str, str]:
    """The environment of each run: its share of the cores; this apo_cli first on the path."""
    from apo_cli.runtime.threads import share_env

    env = share_env(jobs)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    return env


class _Running:
    def __init__(self, key: str, cmd: list[str], env: dict[str, str], log: Path | None):
        self.key, self.t0, self.log = key, time.perf_counter(), log
        out: Any = None
        if log is not None:
            out = log.open("a", encoding="utf-8")
        try:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                         start_new_session=True, preexec_fn=_die_with_parent)
        finally:
            if out is not None:
                out.close()

    def last_line(self) -> str:
        if self.log is None or not self.log.is_file():
            return ""
        lines = [x for x in self.log.read_text(encoding="utf-8", errors="replace").splitlines() if x.strip()]
        return lines[-1].strip() if lines else ""


class _Signals:
    """SIGINT/SIGTERM while the runs train: stop starting runs, pass the signal on to the running ones."""

    def __init__(self, running: list[_Running]):
        self.running, self.signum, self._old = running, None, {}

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
        self.signum = signum
        for r in self.running:
            if r.proc.poll() is None:
                r.proc.send_signal(signum)


def _command(plan: Plan, arm: str, seed: int, st: RunState) -> list[str]:
    from apo_cli.trust import code_trusted

    cmd = [sys.executable, "-m", "apo_cli", "train", str(plan.recipe_file(arm, seed))]
    if code_trusted():  # the comparison's --trust-code (or APO_TRUST_CODE, which the run inherits)
        cmd.append("--trust-code")
    if st.state == "resume":
        cmd.append("--resume")
    if st.changed:
        cmd.append("--allow-recipe-change")
    return cmd


def run_plan(plan: Plan, states: dict[tuple[str, int], RunState], jobs: int, echo: Callable[[str], None]) -> Outcome:
    """Run what is not finished, ``jobs`` at a time; Interrupted when stopped by a signal."""
    out = Outcome()
    todo = []
    for arm, seed in plan.tasks():
        st = states[(arm, seed)]
        if st.state == "done":
            out.skipped.append(f"{arm}-s{seed}")
        else:
            todo.append((arm, seed, st))
    if out.skipped:
        echo(f"finished already, skipped: {', '.join(out.skipped)}")
    env = _env(jobs)
    running: list[_Running] = []
    total, started = len(todo), 0
    with _Signals(running) as sig:
        while (todo and sig.signum is None) or any(r.proc.poll() is None for r in running):
            while todo and sig.signum is None and sum(r.proc.poll() is None for r in running) < jobs:
                arm, seed, st = todo.pop(0)
                started += 1
                key = f"{arm}-s{seed}"
                log = plan.root / "logs" / f"{key}.log" if jobs > 1 else None
                if log is not None:
                    log.parent.mkdir(parents=True, exist_ok=True)
                how = "resuming" if st.state == "resume" else "starting"
                echo(f"[{started}/{total}] {how} {key}" + (f" (log: {log})" if log else "")
                     + (f"; changed: {', '.join(st.changed)}" if st.changed else ""))
                running.append(_Running(key, _command(plan, arm, seed, st), env, log))
            time.sleep(0.1)
            for r in [r for r in running if r.proc.poll() is not None]:
                running.remove(r)
                _finished(r, out, echo, stopping=sig.signum is not None)
    if sig.signum is not None:
        code = EXIT_TERMINATED if sig.signum == signal.SIGTERM else EXIT_INTERRUPTED
        left = total - len(out.finished)
        raise Interrupted(f"comparison stopped: {left} of {total} runs left to do; run the same command again "
                          "to continue (finished runs are skipped, interrupted ones resumed)", code)
    return out


def _finished(r: _Running, out: Outcome, echo: Callable[[str], None], *, stopping: bool) -> None:
    rc, wall = r.proc.returncode, time.perf_counter() - r.t0
    if rc == 0:
        out.finished.append(r.key)
        echo(f"{r.key}: done in {wall:.0f} s")
    elif not stopping:
        why = r.last_line() or f"exit {rc}"
        out.failed[r.key] = why + (f" (log: {r.log})" if r.log else "")
        echo(f"{r.key}: failed (exit {rc}) after {wall:.0f} s" + (f": {why}" if r.log else ""))


def failure(out: Outcome) -> ApoError:
    items = "; ".join(f"{k}: {v}" for k, v in out.failed.items())
    return ApoError(f"{len(out.failed)} run{'s' if len(out.failed) != 1 else ''} of the comparison failed: {items}")
