"""Checkpoints finished in the background (apo_cli/checkpoint_io.py): the step goes on while the
checksums and the rename run, and every guarantee of the synchronous write still holds."""

from __future__ import annotations

import hashlib
import threading

import pytest
import torch

import apo_cli.checkpoint as ck
from apo_cli.checkpoint import CheckpointPayload, list_checkpoints, read_weights, verify_checkpoint, write_checkpoint
from apo_cli.checkpoint_io import CheckpointFinisher, fsync_and_hash
from apo_cli.errors import CheckpointError
from tests.helpers import tiny_recipe


@pytest.fixture(scope="module")
def tiny():
    from apo_cli.models import ensure_tiny, load_model, load_tokenizer

    path = str(ensure_tiny(0))
    return load_model(path, dtype="float32"), load_tokenizer(path)


def _payload(tiny, step: int) -> CheckpointPayload:
    model, tok = tiny
    return CheckpointPayload(step, model, tok, {"step": step}, {"optimizer": {"state": {}, "param_groups": []}})


def _gate(monkeypatch):
    """fsync_and_hash of the checkpoint writer held until the returned event is set."""
    go, started = threading.Event(), threading.Event()
    real = ck.fsync_and_hash

    def held(files):
        started.set()
        assert go.wait(60)
        return real(files)

    monkeypatch.setattr(ck, "fsync_and_hash", held)
    return go, started


def test_fsync_and_hash_is_sha256_of_each_file_in_order(tmp_path):
    files = []
    for i, size in enumerate((10, 3 << 20, 0, 70_000)):
        p = tmp_path / f"f{i}"
        p.write_bytes(bytes((i * 7 + j) % 251 for j in range(size)))
        files.append(p)
    got = fsync_and_hash(files)
    assert list(got) == [p.name for p in files]
    assert got == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    assert fsync_and_hash(files, workers=1) == got


def test_background_finish_keeps_the_state_of_its_step_and_lands_on_exit(tmp_path, tiny, monkeypatch):
    model, _ = tiny
    write_checkpoint(tmp_path, _payload(tiny, 1), keep_last=1)  # synchronous: no finisher
    go, started = _gate(monkeypatch)
    name = next(iter(model.state_dict()))
    saved = model.state_dict()[name].clone()
    with CheckpointFinisher() as fin:
        final = write_checkpoint(tmp_path, _payload(tiny, 2), keep_last=1, finisher=fin)
        assert started.wait(60) and fin.pending
        # the caller goes on: the checkpoint is not in place yet, the previous one is untouched
        assert [p.name for p in list_checkpoints(tmp_path)] == ["step-1"] and not final.exists()
        verify_checkpoint(tmp_path / "checkpoints/step-1")
        with torch.no_grad():
            model.state_dict()[name].add_(1.0)  # the next step changes the weights in place
        go.set()
    assert not fin.pending
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-2"]  # in place, step-1 pruned after it
    verify_checkpoint(final)
    assert torch.equal(read_weights(final)[name], saved)  # the state of step 2, not what came after
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    with torch.no_grad():
        model.state_dict()[name].copy_(saved)


def test_outside_its_block_a_finisher_finishes_at_once(tmp_path, tiny):
    final = write_checkpoint(tmp_path, _payload(tiny, 3), keep_last=2, finisher=CheckpointFinisher())
    verify_checkpoint(final)


def test_a_failed_background_finish_is_one_checkpoint_error_and_leaves_nothing(tmp_path, tiny, monkeypatch):
    write_checkpoint(tmp_path, _payload(tiny, 1), keep_last=2)

    def broken(files):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "fsync_and_hash", broken)
    with pytest.raises(CheckpointError) as e:
        with CheckpointFinisher() as fin:
            write_checkpoint(tmp_path, _payload(tiny, 2), keep_last=2, finisher=fin)
    assert str(e.value) == (f"could not write checkpoint step-2 in {tmp_path / 'checkpoints'}: No space left on device; "
                            "the previous checkpoints are intact")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-1"]
    verify_checkpoint(tmp_path / "checkpoints/step-1")
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_the_next_checkpoint_raises_a_failed_finish_before_writing(tmp_path, tiny, monkeypatch):
    calls = []
    real = ck.fsync_and_hash

    def first_fails(files):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")
        return real(files)

    monkeypatch.setattr(ck, "fsync_and_hash", first_fails)
    with CheckpointFinisher() as fin:
        write_checkpoint(tmp_path, _payload(tiny, 1), keep_last=2, finisher=fin)
        with pytest.raises(CheckpointError, match="could not write checkpoint step-1 .*Input/output error"):
            write_checkpoint(tmp_path, _payload(tiny, 2), keep_last=2, finisher=fin)
        assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # step 2 was not started
        write_checkpoint(tmp_path, _payload(tiny, 2), keep_last=2, finisher=fin)  # the error was raised once
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-2"]


def test_training_finishes_its_checkpoints_in_the_background_and_in_place_at_the_end(tmp_path, monkeypatch):
    from apo_cli.recipe import recipe_from_dict
    from apo_cli.train import train_from_recipe

    threads: list[str] = []
    real = ck.fsync_and_hash

    def recording(files):
        threads.append(threading.current_thread().name)
        return real(files)

    monkeypatch.setattr(ck, "fsync_and_hash", recording)
    last = train_from_recipe(recipe_from_dict(tiny_recipe(tmp_path, "bg", run={"max_steps": 3},
                                                          checkpoint={"every": 1, "keep_last": 2})))
    assert threads == ["apo-checkpoint-finish"] * 3
    assert last == tmp_path / "bg/checkpoints/step-3"
    assert [p.name for p in list_checkpoints(tmp_path / "bg")] == ["step-2", "step-3"]
    for p in list_checkpoints(tmp_path / "bg"):
        verify_checkpoint(p)
    assert not list((tmp_path / "bg/checkpoints").glob(".tmp-*"))
