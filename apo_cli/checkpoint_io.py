"""Finishing checkpoints off the training step's critical path.

:func:`apo_cli.checkpoint.write_checkpoint` writes a checkpoint in two parts:

1. **the files** (weights, tokenizer, trainer state, optimizer state) into the checkpoint's temporary
   folder, on the caller's thread: they hold *this* step's state, which the next step changes;
2. **the finish**: fsync every file, its sha256 into ``checksums.json`` (written last), rename the
   folder into place, prune. This part reads only the files on disk; it is the expensive one (the
   sha256 of the weights and of the optimizer state, twice their size: about 1.6 GB for a 135M
   model in fp32, seconds per checkpoint on a CPU).

A :class:`CheckpointFinisher` runs the finish in a background thread while training goes on, and
keeps the guarantees of the synchronous write: a checkpoint is in place only when complete (a
kill before the rename leaves the temporary folder, which a resume removes, and the previous
checkpoints intact: they are pruned only after the rename, in the same thread); at most one finish
is in flight and the next checkpoint waits for it, so checkpoints land and are pruned in order;
leaving the finisher's ``with`` block (the end of training, an error, a signal) waits for the finish,
and a failed finish is raised there or at the next checkpoint, as the same one-line
:class:`~apo_cli.errors.CheckpointError` a synchronous write raises. Outside its ``with`` block a
finisher runs each finish at once (a caller that saves and then reads its checkpoint sees it).

:func:`fsync_and_hash` is the finish's file work: each file fsynced and hashed on its own thread
(``os.fsync`` and ``hashlib`` release the GIL), so the disk flush of one file overlaps the hashing
of another.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

__all__ = ["CheckpointFinisher", "fsync_and_hash", "sha256_file"]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_and_hash_one(path: Path) -> str:
    with Path(path).open("rb") as f:
        os.fsync(f.fileno())
    return sha256_file(path)


def fsync_and_hash(files: list[Path], workers: int | None = None) -> dict[str, str]:
    """``{file name: sha256}`` of ``files``, each fsynced first, the files on parallel threads
    (largest first, so the longest one starts at once)."""
    if not files:
        return {}
    order = sorted(files, key=lambda p: Path(p).stat().st_size, reverse=True)
    workers = workers or min(len(order), 4)
    if workers <= 1 or len(order) == 1:
        digests = [_fsync_and_hash_one(p) for p in order]
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="apo-hash") as pool:
            digests = list(pool.map(_fsync_and_hash_one, order))
    by_path = {Path(p).name: d for p, d in zip(order, digests)}
    return {Path(p).name: by_path[Path(p).name] for p in files}  # in the caller's order


class CheckpointFinisher:
    """Runs checkpoint finishes in a background thread inside its ``with`` block (see the module
    docstring); one finish at a time."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._active = False

    def run(self, finish: Callable[[], None]) -> None:
        """Wait for the previous finish (raising its error), then run ``finish``: in the background
        inside the ``with`` block, at once outside it."""
        self.wait()
        if not self._active:
            finish()
            return

        def target() -> None:
            try:
                finish()
            except BaseException as e:  # noqa: BLE001 - raised on the training thread by wait()
                self._error = e

        # not a daemon: an interpreter that exits without waiting still lets the checkpoint land
        self._thread = threading.Thread(target=target, name="apo-checkpoint-finish", daemon=False)
        self._thread.start()

    @property
    def pending(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """Block until the finish in flight (if any) is done; raise the error it ended with."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def __enter__(self) -> CheckpointFinisher:
        self._active = True
        return self

    def __exit__(self, *exc) -> bool:
        self._active = False
        self.wait()  # a failed finish is the news: the checkpoint a message may name is not there
        return False
