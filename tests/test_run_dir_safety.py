"""Run directories hold one run, apo's own: a second trainer never trains into a run another one
wrote since it was built (the check is repeated under the run lock); a non-empty folder without an
apo run is refused; apo removes only files it wrote; the files it appends to are never symbolic
links (nothing is written outside the run directory); `apo eval` of a checkpoint pruned while it
waited says that it is gone."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from apo_cli.checkpoint import list_checkpoints, verify_checkpoint
from apo_cli.errors import RunDirError
from apo_cli.recipe import recipe_from_dict
from apo_cli.train import Trainer, train_from_recipe
from tests.helpers import tiny_recipe, write_recipe
from tests.test_faults import _one_error_line
from tests.test_train_loop import _metrics


def _snapshot(run: Path) -> dict[str, bytes]:
    """Every file of a folder (and every symbolic link, as its target), the lock aside."""
    out = {}
    for p in sorted(run.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(run))] = f"-> {os.readlink(p)}".encode()
        elif p.is_file() and p.name != ".lock":
            out[str(p.relative_to(run))] = p.read_bytes()
        elif p.is_dir():
            out[str(p.relative_to(run)) + "/"] = b""
    return out


# --------------------------------------------------------------------------------------------------
# 1. A second trainer, built while the folder was empty, finds a run there when it takes the lock


@pytest.mark.parametrize("same", [True, False], ids=["same_recipe", "another_recipe"])
def test_a_trainer_built_before_another_finished_does_not_train_over_its_run(tmp_path, same):
    """Before: both passed the check made while building, and the second trained over the finished run
    (recipe.yaml, metrics, checkpoints), both exiting 0."""
    first = tiny_recipe(tmp_path, "shared", run={"max_steps": 2})
    second = first if same else tiny_recipe(tmp_path, "shared", run={"max_steps": 2}, rollout={"temperature": 0.7})
    late = Trainer(recipe_from_dict(second))  # slow to load: built while the folder is still empty
    try:
        train_from_recipe(recipe_from_dict(first))
        run = tmp_path / "shared"
        before = _snapshot(run)
        what = "a run of this recipe" if same else "another recipe's run"
        with pytest.raises(RunDirError, match=f"already holds {what}"):
            late.train()
    finally:
        late.backend.close()
    assert _snapshot(run) == before


def test_with_resume_auto_the_late_trainer_resumes_the_run_it_finds(tmp_path):
    d = tiny_recipe(tmp_path, "auto", run={"max_steps": 2}, checkpoint={"resume": "auto"})
    late = Trainer(recipe_from_dict(d))
    try:
        train_from_recipe(recipe_from_dict(d))
        run = tmp_path / "auto"
        before = _snapshot(run)
        assert late.train() == run / "checkpoints/step-2"  # finished: nothing trained again
    finally:
        late.backend.close()
    assert _snapshot(run) == before


# --------------------------------------------------------------------------------------------------
# 2. Folders that are not apo's, and files apo did not write


def _users_folder(root: Path) -> Path:
    """A folder of someone's files, with names like those apo writes and removes."""
    (root / "checkpoints/step-9").mkdir(parents=True)
    (root / "checkpoints/step-9/weights.bin").write_bytes(b"mine")
    (root / "checkpoints/.tmp-scratch").mkdir()
    (root / "notes.txt").write_text("notes")
    (root / ".draft.tmp").write_text("draft")
    (root / "metrics.jsonl").write_text('{"step": 7}\n')
    return root


def test_a_non_empty_folder_without_a_run_is_refused_and_left_as_it_is(tmp_path, cli, monkeypatch):
    """Before: accepted; the run deleted .*.tmp files, checkpoints/.tmp-* and checkpoints/step-N, and
    rewrote metrics.jsonl."""
    d = tiny_recipe(tmp_path, "src", run={"max_steps": 1})
    train_from_recipe(recipe_from_dict(d))  # a checkpoint to fork from
    folder = _users_folder(tmp_path / "mine")
    before = _snapshot(folder)
    path = write_recipe(tmp_path, d)
    monkeypatch.setattr("apo_cli.models.load_policy", lambda *a, **k: pytest.fail("model loaded"))
    for extra in ([], ["--resume-from", str(tmp_path / "src/checkpoints/step-1")]):
        res = cli("train", str(path), "--output-dir", str(folder), *extra)
        assert res.exit_code == 1
        assert _one_error_line(res.output) == (
            f"error: run directory {folder} is not empty and holds no apo run (no recipe.yaml): .draft.tmp, "
            "checkpoints, metrics.jsonl and 1 more (choose a new or empty folder with run.output_dir / --output-dir)")
        assert _snapshot(folder) == before


def test_an_empty_folder_or_one_left_by_a_run_that_never_started_is_used(tmp_path, cli):
    empty, stub = tmp_path / "empty", tmp_path / "stub"
    empty.mkdir()
    stub.mkdir()
    (stub / ".lock").write_text("")
    (stub / ".recipe.yaml.tmp").write_text("half a rec")  # killed while writing its recipe
    for folder in (empty, stub):
        path = write_recipe(tmp_path, tiny_recipe(tmp_path, "y", run={"output_dir": str(folder), "max_steps": 1}))
        res = cli("train", str(path))
        assert res.exit_code == 0, res.output
        assert [r["step"] for r in _metrics(folder)] == [1]
    assert not (stub / ".recipe.yaml.tmp").exists()


def test_resuming_removes_apo_temporary_files_only(tmp_path, cli):
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, "own", run={"max_steps": 2}, checkpoint={"keep_last": 1}))
    assert cli("train", str(path)).exit_code == 0
    run = tmp_path / "own"
    _users_folder(tmp_path / "theirs")
    shutil.copytree(tmp_path / "theirs/checkpoints", run / "checkpoints", dirs_exist_ok=True)
    for name in ("notes.txt", ".draft.tmp"):
        shutil.copy(tmp_path / "theirs" / name, run / name)
    (run / "checkpoints/step-1").mkdir()  # below keep_last, but not apo's: never pruned
    (run / "checkpoints/step-1/mine.txt").write_text("mine")
    (run / ".metrics.jsonl.tmp").write_text("{")  # apo's: a kill in the middle of cutting the log
    (run / "checkpoints/.tmp-step-3-abcd").mkdir()  # apo's: a kill in the middle of a checkpoint
    theirs = {k: v for k, v in _snapshot(run).items()
              if k.startswith(("notes", ".draft", "checkpoints/step-1", "checkpoints/step-9", "checkpoints/.tmp-scratch"))}
    res = cli("train", str(path), "run.max_steps=4", "--resume", "--allow-recipe-change")
    assert res.exit_code == 0, res.output
    assert "removed the partial files of an interrupted checkpoint or log write" in res.output
    after = _snapshot(run)
    assert {k: after.get(k) for k in theirs} == theirs
    assert not (run / ".metrics.jsonl.tmp").exists() and not (run / "checkpoints/.tmp-step-3-abcd").exists()
    assert "checkpoints/step-9 is incomplete: checksums.json is missing; falling back" in res.output
    assert [p.name for p in list_checkpoints(run)] == ["step-1", "step-4", "step-9"]  # apo's step-2, 3 pruned
    verify_checkpoint(run / "checkpoints/step-4")


def test_a_checkpoint_is_never_written_over_a_folder_apo_did_not_write(tmp_path, cli):
    """Before: the folder was moved aside and deleted."""
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, "over", run={"max_steps": 1}))
    assert cli("train", str(path)).exit_code == 0
    run = tmp_path / "over"
    (run / "checkpoints/step-2").mkdir()
    (run / "checkpoints/step-2/mine.txt").write_text("mine")
    res = cli("train", str(path), "run.max_steps=2", "--resume", "--allow-recipe-change")
    assert res.exit_code == 1
    assert _one_error_line(res.output) == (
        f"error: cannot write checkpoint step-2: {run / 'checkpoints/step-2'} exists and is not an apo checkpoint "
        "(no checksums.json) (move it away, then resume with --resume)")
    assert (run / "checkpoints/step-2/mine.txt").read_text() == "mine"
    assert not list((run / "checkpoints").glob(".tmp-*"))


# --------------------------------------------------------------------------------------------------
# 10. Symbolic links among the files a run appends to


@pytest.mark.parametrize("name", ["metrics.jsonl", "samples.jsonl"])
def test_a_dangling_log_link_is_refused_and_nothing_is_written_outside(tmp_path, cli, name):
    """Before: the run wrote its lines through the link, outside the run directory."""
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, "ln", run={"max_steps": 1}))
    assert cli("train", str(path)).exit_code == 0
    run, outside = tmp_path / "ln", tmp_path / "elsewhere" / name
    outside.parent.mkdir()
    (run / name).unlink()
    (run / name).symlink_to(outside)
    before = _snapshot(run)
    res = cli("train", str(path), "run.max_steps=2", "--resume", "--allow-recipe-change")
    assert res.exit_code == 1
    assert _one_error_line(res.output) == (
        f"error: {run / name} is a symbolic link to a missing file ({outside}); apo writes only inside the run "
        "directory (remove the link)")
    assert not outside.exists()
    assert _snapshot(run) == before


def test_a_link_planted_after_the_checks_is_not_written_through(tmp_path):
    from apo_cli.metrics import MetricsWriter
    from apo_cli.train.session import append_samples

    outside = tmp_path / "outside.jsonl"
    for name in ("metrics.jsonl", "samples.jsonl"):
        (tmp_path / name).symlink_to(outside)
    w = MetricsWriter(tmp_path / "metrics.jsonl")
    with pytest.raises(RunDirError, match="metrics.jsonl: it is a symbolic link"):
        w.write({"step": 1})
    w.close()
    with pytest.raises(RunDirError, match="samples.jsonl: it is a symbolic link"):
        append_samples(tmp_path / "samples.jsonl", [{"step": 1}])
    assert not outside.exists()


# --------------------------------------------------------------------------------------------------
# 10. apo eval of a checkpoint pruned while it waited its turn


def test_eval_of_a_checkpoint_pruned_mid_evaluation_says_it_is_gone(tmp_path, cli, monkeypatch):
    """Before: "cannot load the tokenizer of '…/step-2': Repo id must be in the form …"."""
    import apo_cli.evaluation as ev

    d = tiny_recipe(tmp_path, "pr", run={"max_steps": 2},
                    data={"task_kwargs": {"level": 1, "size": 40}, "eval_fraction": 0.1}, rewards=[{"name": "exact_match"}])
    train_from_recipe(recipe_from_dict(d))
    run = tmp_path / "pr"
    real = ev.evaluate

    def prune_the_next(model, *a, **k):  # a training's keep_last removes step-2 while step-1 is evaluated
        shutil.rmtree(run / "checkpoints/step-2", ignore_errors=True)
        return real(model, *a, **k)

    monkeypatch.setattr(ev, "evaluate", prune_the_next)
    res = cli("eval", str(run), "-k", "1", "--limit", "2")
    assert res.exit_code == 1
    line = _one_error_line(res.output)
    assert line.startswith(f"error: checkpoint {(run / 'checkpoints/step-2').resolve()} is gone: it was removed "
                           "after apo eval listed it"), line
    assert "Repo id" not in res.output
    assert not (run / "eval.jsonl").exists() or all(
        json.loads(x).get("step") != 2 for x in (run / "eval.jsonl").read_text().splitlines())
