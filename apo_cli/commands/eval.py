from __future__ import annotations

from apo_cli.commands._common import guarded
from apo_cli.errors import NotYetAvailable


@guarded
def eval_() -> None:
    """Score checkpoints on a dataset (not in this version yet)."""
    raise NotYetAvailable("'apo eval' is not available in this version yet")
