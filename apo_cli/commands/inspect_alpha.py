from __future__ import annotations

from apo_cli.commands._common import guarded
from apo_cli.errors import NotYetAvailable


@guarded
def inspect_alpha() -> None:
    """Alpha, reward and confidence trajectories of runs (not in this version yet)."""
    raise NotYetAvailable("'apo inspect-alpha' is not available in this version yet")
