"""Which process this is under torchrun, read from the environment alone (no collective, no torch).

The error printer uses it to decide which rank speaks, so it sits below everything else."""

from __future__ import annotations

import os

_joined = False  # this process has joined the ranks' process group (it may be destroyed since)


def mark_joined() -> None:
    global _joined
    _joined = True


def other_rank() -> int | None:
    """This process's rank under torchrun when it is not rank 0, else None."""
    try:
        rank, size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        return None
    return rank if size > 1 and rank != 0 else None


def leaves_message_to_rank_0(error: BaseException) -> bool:
    """A rank other than 0 stays quiet about an error every rank raised: one shared through a
    collective, or one raised before the ranks could talk (the same recipe, data and model on every
    rank fail the same way). Anything else it prints itself, naming its rank."""
    if other_rank() is None:
        return False
    return bool(getattr(error, "shared", False)) or not _joined
