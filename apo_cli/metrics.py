"""Per-step metrics: JSON lines on disk, and readers for other commands (the trackers, TensorBoard
included, are apo_cli/tracking/)."""

from __future__ import annotations

import errno
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


def open_append(path: Path) -> TextIO:
    """``path`` opened to append text; never through a symbolic link (OSError ELOOP), so a dangling
    or planted link cannot make a run write outside its directory."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    return os.fdopen(fd, "a", encoding="utf-8")


def why_not_written(path: Path, e: OSError) -> str:
    """Why ``path`` could not be written, for a one-line error."""
    if e.errno == errno.ELOOP or Path(path).is_symlink():
        return "it is a symbolic link (apo writes only inside the run directory)"
    return e.strerror or str(e)


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
                self._fh = open_append(self.path)
            self._fh.write(json.dumps(clean) + "\n")
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as e:
            self.close()  # the unwritten line must not be flushed again (and fail again, unnamed) on close
            raise RunDirError(f"cannot write {self.path}: {why_not_written(self.path, e)}") from None

    def close(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            try:
                fh.close()
            except OSError:  # a line that could not be written (a full disk): its write already failed, named
                pass


def truncate_jsonl_after(path: Path, step: int) -> list[int]:
    """Keep only the lines of ``path`` whose ``step`` is <= ``step``, atomically; return the numbers
    of the broken lines dropped too (a kill while a line was appended leaves a partial last one)."""
    path = Path(path)
    if not path.exists():
        return []
    from apo_cli.checkpoint import atomic_write_text

    torn: list[int] = []
    rows = read_metrics(path, warn=None, broken=torn)
    kept = [r for r in rows if _step(r) <= step]
    if not torn and len(kept) == len(rows):  # nothing to drop: leave the file as it is
        return []
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return torn


def _step(record: dict[str, Any]) -> int:
    try:
        return int(record.get("step", 0))
    except (TypeError, ValueError):
        return 0


def read_metrics(path: Path, warn=print, broken: list[int] | None = None) -> list[dict[str, Any]]:
    """Read a metrics.jsonl; a truncated or broken line is skipped, ``warn`` is told its number and
    ``broken`` gets it."""
    out = []
    with Path(path).open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                rec = None
            if not isinstance(rec, dict):
                if warn is not None:
                    warn(f"{path}:{n}: skipping a truncated or malformed metrics line")
                if broken is not None:
                    broken.append(n)
                continue
            out.append(rec)
    return out
