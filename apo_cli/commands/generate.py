from __future__ import annotations

from apo_cli.commands._common import guarded
from apo_cli.errors import NotYetAvailable


@guarded
def generate() -> None:
    """Sample completions from a checkpoint, a run, a hub id or a built-in model (not in this version yet)."""
    raise NotYetAvailable("'apo generate' is not available in this version yet")
