"""Experiment trackers: every metrics row, the samples and the run's config also go to the trackers
named in ``logging.report_to`` (TensorBoard, Weights & Biases, MLflow, Trackio).

- Each tracker is an optional extra (``pip install 'apo-cli[wandb]'``), imported only when named;
  a missing one is a one-line error before anything is loaded (:func:`check_installed`).
- The metric names are those of ``metrics.jsonl``, the step is the x-axis, the resolved recipe is
  the run's config (with the throughput calibration), the run name is ``run.name``, the logged
  samples go to a table where the tracker has one.
- Local by default: W&B runs offline unless you are logged in (``WANDB_API_KEY`` or a netrc entry)
  or set ``WANDB_MODE``; MLflow writes a store under the run directory unless
  ``MLFLOW_TRACKING_URI`` is set; Trackio uses its local store (``TRACKIO_DIR``).
- ``<run>/trackers.json`` keeps each tracker's run id and the last step it was sent, so ``--resume``
  continues the same tracker runs, and the steps redone after a resume (already sent before the
  kill; on CPU the redone step is the same) are not sent twice.
- A tracker that fails (disk, network, a server) is reported once and gets nothing more in this run;
  training goes on and ``metrics.jsonl`` has every step.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apo_cli.errors import ApoError, UsageError

STATE_FILE = "trackers.json"
# tracker -> (module that implements it, the imports that must succeed, the extra that installs them);
# MLflow's local SQLite store needs SQLAlchemy and Alembic (not with a MLFLOW_TRACKING_URI of your own)
TRACKERS: dict[str, tuple[str, str, str]] = {
    "tensorboard": ("apo_cli.tracking.tensorboard_tracker", "tensorboard", "tensorboard"),
    "wandb": ("apo_cli.tracking.wandb_tracker", "wandb", "wandb"),
    "mlflow": ("apo_cli.tracking.mlflow_tracker", "mlflow sqlalchemy alembic", "mlflow"),
    "trackio": ("apo_cli.tracking.trackio_tracker", "trackio", "trackio"),
}
SAMPLE_COLUMNS = ("step", "prompt", "completion", "reward", "finish_reason")


@dataclass
class TrackerContext:
    """What a tracker is opened with."""

    run_dir: Path
    run_name: str
    project: str
    config: dict[str, Any]  # the resolved recipe (and the perf calibration)
    recipe_yaml: str
    saved: dict[str, Any] = field(default_factory=dict)  # this tracker's entry of trackers.json (empty: a new run)


def check_installed(names: list[str]) -> None:
    """A one-line UsageError naming the extra of the first named tracker that is not installed."""
    import os

    for name in names:
        _, modules, extra = TRACKERS[name]
        needed = modules.split()[:1] if name == "mlflow" and os.environ.get("MLFLOW_TRACKING_URI") else modules.split()
        missing = [m for m in needed if importlib.util.find_spec(m) is None]
        if missing:
            what = "it is" if missing[0] == name else f"{', '.join(missing)} (which it needs) is"
            raise UsageError(f"logging.report_to names {name}, but {what} not installed: "
                             f"pip install 'apo-cli[{extra}]'")


def numeric(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics row (NaN/None and non-numbers left out), without ``step``."""
    out = {}
    for k, v in record.items():
        if k == "step" or isinstance(v, bool) or not isinstance(v, int | float):
            continue
        if v == v and v not in (float("inf"), float("-inf")):
            out[k] = float(v)
    return out


def sample_rows(samples: list[dict[str, Any]]) -> list[list[Any]]:
    return [[s.get(c) for c in SAMPLE_COLUMNS] for s in samples]


@contextlib.contextmanager
def own_rng():
    """Tracker libraries may draw from the global generators: the training streams stay untouched."""
    import sys

    import torch

    state, np = random.getstate(), sys.modules.get("numpy")
    np_state = np.random.get_state() if np is not None else None
    try:
        with torch.random.fork_rng():
            yield
    finally:
        random.setstate(state)
        if np_state is not None:
            np.random.set_state(np_state)


class Trackers:
    """The named trackers of one run (rank 0 only); see the module docstring."""

    def __init__(self, names: list[str], ctx: TrackerContext, warn: Callable[[str], None]):
        self.warn = warn
        self.path = ctx.run_dir / STATE_FILE
        self.state: dict[str, dict[str, Any]] = _read_state(self.path)
        self.active: list[Any] = []
        self._state_failed = False
        for name in names:
            saved = self.state.setdefault(name, {})
            try:
                with own_rng():
                    module = importlib.import_module(TRACKERS[name][0])
                    tracker = module.open_tracker(TrackerContext(**{**vars(ctx), "saved": dict(saved)}))
            except ImportError as e:  # installed but broken
                raise UsageError(f"logging.report_to: {name} cannot be imported ({e}): "
                                 f"pip install 'apo-cli[{TRACKERS[name][2]}]'") from None
            except Exception as e:  # noqa: BLE001 - a tracker never stops training
                warn(f"{name}: could not start ({_one_line(e)}); training goes on without it "
                     f"(metrics.jsonl has every step)")
                continue
            saved.update(tracker.state)
            self.active.append(tracker)
        self._save()

    def write(self, record: dict[str, Any], samples: list[dict[str, Any]]) -> None:
        step = int(record["step"])
        values = numeric(record)
        for t in list(self.active):
            entry = self.state[t.name]
            if step <= int(entry.get("step", 0)):
                continue  # sent before a kill and redone after the resume: not twice
            try:
                with own_rng():
                    t.log(step, values, samples)
            except Exception as e:  # noqa: BLE001 - a tracker never stops training
                self.warn(f"{t.name} failed at step {step} ({_one_line(e)}): it gets nothing more in this run; "
                          f"metrics.jsonl has every step")
                self._drop(t)
                continue
            entry["step"] = step
            entry.update(t.state)
        self._save()

    def close(self) -> None:
        for t in list(self.active):
            try:
                with own_rng():
                    t.close()
            except Exception as e:  # noqa: BLE001
                self.warn(f"{t.name} failed while closing ({_one_line(e)})")
        self.active = []
        self._save()

    def _drop(self, t: Any) -> None:
        self.active.remove(t)
        with contextlib.suppress(Exception):
            t.close()

    def _save(self) -> None:
        from apo_cli.checkpoint import atomic_write_text

        try:
            atomic_write_text(self.path, json.dumps(self.state, indent=1, sort_keys=True) + "\n")
        except ApoError as e:
            if not self._state_failed:
                self.warn(f"{e}: a resume may send some steps to the trackers again")
            self._state_failed = True


def _read_state(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def open_trackers(names: list[str], run_dir: Path, recipe: Any, extra_config: dict[str, Any],
                  warn: Callable[[str], None]) -> Trackers | None:
    """The trackers of ``logging.report_to`` (None when there are none)."""
    if not names:
        return None
    from apo_cli.recipe_yaml import recipe_to_yaml

    config = {**recipe.model_dump(mode="json"), **extra_config}
    ctx = TrackerContext(run_dir=run_dir, run_name=recipe.run.name, project=recipe.logging.project, config=config,
                         recipe_yaml=recipe_to_yaml(recipe))
    return Trackers(names, ctx, warn)
