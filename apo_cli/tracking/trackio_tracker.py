"""Trackio: its local store (``TRACKIO_DIR``, by default under the Hugging Face cache), project
``logging.project``, run ``run.name``; a resumed training run continues the Trackio run of that
name. Samples go to a ``samples`` table."""

from __future__ import annotations

import contextlib
import io
from typing import Any

from apo_cli.tracking import SAMPLE_COLUMNS, TrackerContext, sample_rows


class TrackioTracker:
    name = "trackio"

    def __init__(self, ctx: TrackerContext):
        import trackio

        self.trackio = trackio
        name = ctx.saved.get("run_name") or ctx.run_name
        with contextlib.redirect_stdout(io.StringIO()):  # its banner would break the dashboard
            self.run = trackio.init(project=ctx.project, name=name, config=ctx.config,
                                    resume="allow" if ctx.saved else "never", embed=False,
                                    auto_log_cpu=False, auto_log_gpu=False)
        self.state: dict[str, Any] = {"run_name": self.run.name, "project": ctx.project}

    def log(self, step: int, metrics: dict[str, float], samples: list[dict[str, Any]]) -> None:
        data: dict[str, Any] = dict(metrics)
        if samples:
            data["samples"] = self.trackio.Table(columns=list(SAMPLE_COLUMNS), data=sample_rows(samples))
        self.run.log(data, step=step)

    def close(self) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            self.trackio.finish()  # this run (the current one), flushed; not finished again at exit


def open_tracker(ctx: TrackerContext) -> TrackioTracker:
    return TrackioTracker(ctx)
