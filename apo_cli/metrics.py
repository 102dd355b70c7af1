"""Per-step metrics: JSON lines on disk, and readers for other commands (the trackers, TensorBoard
included, are apo_cli/tracking/)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, TextIO

from apo_cli.errors import RunDirError


def _clean(value: Any) -> Any:
    """JSON-safe scalars: NaN/inf become null (json.dumps would write invalid JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):
        return _clean(value.item())
    return value


class MetricsWriter:
    """Appends one JSON object per step; flushed and fsynced so a kill loses at most the current line."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fh: TextIO | None = None

    def truncate_after(self, step: int) -> None:
        """Drop lines of steps > ``step`` (they are redone after a resume)."""
        truncate_jsonl_after(self.path, step)

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: _clean(v) for k, v in record.items()}
        try:
            if self._fh is None:
                self._fh = self.path.open("a", encoding="utf-8")
            self._fh.write(json.dumps(clean) + "\n")
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as e:
            raise RunDirError(f"cannot write {self.path}: {e.strerror or e}") from None

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def truncate_jsonl_after(path: Path, step: int) -> None:
    """Keep only the lines of ``path`` whose ``step`` is <= ``step`` (and drop broken lines), atomically.

    A kill while a line was being appended leaves a partial last line; it is dropped here too.
    """
    path = Path(path)
    if not path.exists():
        return
    from apo_cli.checkpoint import atomic_write_text

    kept = [r for r in read_metrics(path, warn=None) if _step(r) <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def _step(record: dict[str, Any]) -> int:
    try:
        return int(record.get("step", 0))
    except (TypeError, ValueError):
        return 0


def read_metrics(path: Path, warn=print) -> list[dict[str, Any]]:
    """Read a metrics.jsonl; a truncated or broken line is skipped and ``warn`` is told its number."""
    out = []
    with Path(path).open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if warn is not None:
                    warn(f"{path}:{n}: skipping a truncated or malformed metrics line")
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out
