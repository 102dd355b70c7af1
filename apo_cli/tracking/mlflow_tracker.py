"""MLflow: a SQLite store under the run directory (``<run>/mlflow.db``, artifacts in
``<run>/mlartifacts``; the extra installs SQLAlchemy and Alembic for it) unless
``MLFLOW_TRACKING_URI`` is set (MLflow 3 refuses its old file store ``./mlruns`` unless
``MLFLOW_ALLOW_FILE_STORE=true``); experiment
``logging.project``, run ``run.name``. The resolved recipe is the run's parameters (flattened) and
its ``recipe.yaml`` artifact; samples go to the ``samples.json`` table. The run id and store are
kept in ``<run>/trackers.json``, so a resumed training run continues the same MLflow run.

MLflow metric names may not hold ``@``: ``eval/mean@4`` is logged as ``eval/mean_at_4``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import time
from typing import Any

from apo_cli.tracking import SAMPLE_COLUMNS, TrackerContext, sample_rows


def mlflow_key(key: str) -> str:
    return re.sub(r"[^/\w.\- :]", "_", key.replace("@", "_at_"))


def default_uri(run_dir) -> str:
    if importlib.util.find_spec("sqlalchemy") is None or importlib.util.find_spec("alembic") is None:
        raise ImportError("the local MLflow store needs sqlalchemy and alembic: pip install 'apo-cli[mlflow]'")
    return f"sqlite:///{(run_dir / 'mlflow.db').absolute()}"


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:6000]
    return out


class MlflowTracker:
    name = "mlflow"

    def __init__(self, ctx: TrackerContext):
        import logging

        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        # quiet: no progress bar for each samples-table append, no database-setup lines over the dashboard
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        for name in ("mlflow.store.db.utils", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)

        uri = ctx.saved.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(ctx.run_dir)
        self.client = MlflowClient(tracking_uri=uri)
        run_id = ctx.saved.get("run_id")
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
        else:
            exp = self.client.get_experiment_by_name(ctx.project)
            if exp is not None:
                exp_id = exp.experiment_id
            else:
                local = "MLFLOW_TRACKING_URI" not in os.environ
                exp_id = self.client.create_experiment(
                    ctx.project, artifact_location=(ctx.run_dir / "mlartifacts").absolute().as_uri() if local else None)
            run_id = self.client.create_run(exp_id, run_name=ctx.run_name, tags={"apo.run_dir": str(ctx.run_dir)}).info.run_id
            params = [Param(mlflow_key(k)[:250], v) for k, v in _flat(ctx.config).items()]
            for i in range(0, len(params), 100):
                self.client.log_batch(run_id, params=params[i : i + 100])
            self.client.log_text(run_id, ctx.recipe_yaml, "recipe.yaml")
        self.run_id = run_id
        self.state: dict[str, Any] = {"run_id": run_id, "tracking_uri": uri}

    def log(self, step: int, metrics: dict[str, float], samples: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(mlflow_key(k), v, now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])
        if samples:
            rows = sample_rows(samples)
            self.client.log_table(self.run_id, {c: [r[j] for r in rows] for j, c in enumerate(SAMPLE_COLUMNS)},
                                  "samples.json")

    def close(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")


def open_tracker(ctx: TrackerContext) -> MlflowTracker:
    return MlflowTracker(ctx)
