"""Weights & Biases: offline under ``<run>/wandb`` unless you are logged in or set ``WANDB_MODE``.

The run id is kept in ``<run>/trackers.json``: a resumed training run continues the same W&B run
(online: resumed in place; offline: a second offline directory with the same id, which
``wandb sync`` appends to the run). Samples go to an incremental ``samples`` table.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from apo_cli.tracking import SAMPLE_COLUMNS, TrackerContext, sample_rows


def logged_in() -> bool:
    """An API key in the environment, or a netrc entry for the W&B host (what ``wandb login`` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        return netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbTracker:
    name = "wandb"

    def __init__(self, ctx: TrackerContext):
        import wandb

        self.wandb = wandb
        mode = os.environ.get("WANDB_MODE") or ("online" if logged_in() else "offline")
        run_id = ctx.saved.get("run_id") or secrets.token_hex(4)  # os.urandom: no global RNG drawn
        settings = wandb.Settings(console="off", silent=True, x_disable_stats=True, disable_git=True,
                                  save_code=False, x_save_requirements=False)
        self.run = wandb.init(project=ctx.project, name=ctx.run_name, id=run_id, resume="allow",
                              dir=str(ctx.run_dir), config=ctx.config, mode=mode, settings=settings)
        self.table: Any = None
        self.state: dict[str, Any] = {"run_id": run_id, "mode": mode, "dir": str(getattr(self.run, "dir", ""))}

    def log(self, step: int, metrics: dict[str, float], samples: list[dict[str, Any]]) -> None:
        data: dict[str, Any] = dict(metrics)
        if samples:
            if self.table is None:
                self.table = self.wandb.Table(columns=list(SAMPLE_COLUMNS), log_mode="INCREMENTAL")
            for row in sample_rows(samples):
                self.table.add_data(*row)
            data["samples"] = self.table
        self.run.log(data, step=step)

    def close(self) -> None:
        self.run.finish()


def open_tracker(ctx: TrackerContext) -> WandbTracker:
    return WandbTracker(ctx)
