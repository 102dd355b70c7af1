"""TensorBoard: event files under ``<run>/tb`` (scalars per step, the recipe and the samples as text)."""

from __future__ import annotations

from typing import Any

from apo_cli.tracking import SAMPLE_COLUMNS, TrackerContext, sample_rows


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, ctx: TrackerContext):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(ctx.run_dir / "tb"))
        self.state: dict[str, Any] = {"dir": str(ctx.run_dir / "tb")}
        if not ctx.saved:
            self.writer.add_text("recipe", "```yaml\n" + ctx.recipe_yaml + "\n```", 0)

    def log(self, step: int, metrics: dict[str, float], samples: list[dict[str, Any]]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        if samples:
            head = "| " + " | ".join(SAMPLE_COLUMNS) + " |\n|" + "---|" * len(SAMPLE_COLUMNS) + "\n"
            body = "".join("| " + " | ".join(_cell(c) for c in row) + " |\n" for row in sample_rows(samples))
            self.writer.add_text("samples", head + body, step)
        self.writer.flush()  # a kill loses nothing already logged

    def close(self) -> None:
        self.writer.close()


def _cell(value: Any) -> str:
    return " ".join(str(value).split()).replace("|", "\\|")


def open_tracker(ctx: TrackerContext) -> TensorBoardTracker:
    return TensorBoardTracker(ctx)
