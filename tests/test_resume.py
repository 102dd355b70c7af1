"""Resume at every boundary: the end of a data epoch, the end of the run, a changed recipe, a
corrupted or truncated checkpoint (fallback to the previous good one), a checkpoint named with
--resume-from, and the housekeeping that keeps one run's checkpoints and logs consistent."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from apo_cli.checkpoint import (
    SAFE_TO_CHANGE,
    RunLock,
    _prune,
    latest_good_checkpoint,
    list_checkpoints,
    verify_checkpoint,
)
from apo_cli.errors import CheckpointError, RunDirError
from apo_cli.metrics import truncate_jsonl_after
from apo_cli.recipe import recipe_from_dict
from apo_cli.train import train_from_recipe
from tests.helpers import tiny_recipe, write_recipe
from tests.test_faults import _one_error_line, _same_weights
from tests.test_train_loop import _metrics, _stable


def _ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step}"


# --------------------------------------------------------------------------------------------------
# The end of a data epoch


@pytest.mark.parametrize("limit", [8, 6], ids=["epoch_ends_with_the_step", "epoch_ends_inside_the_step"])
def test_resume_at_an_epoch_boundary_equals_straight_run(tmp_path, cli, limit):
    """8 rows, 4 prompts a step: step 2 ends exactly at the end of epoch 0 (with 6 rows, epoch 1
    starts inside step 2). The run is resumed from step 2 as if killed right after saving it."""
    d = tiny_recipe(tmp_path, "straight", run={"max_steps": 4}, data={"limit": limit},
                    checkpoint={"every": 1, "keep_last": 4})
    train_from_recipe(recipe_from_dict(d))
    straight, run = tmp_path / "straight", tmp_path / "cut"
    rows = _metrics(straight)
    assert rows[1]["epoch"] == (1.0 if limit == 8 else 4 / 3) and rows[2]["epoch"] > rows[1]["epoch"]
    shutil.copytree(straight, run)
    for step in (3, 4):
        shutil.rmtree(_ckpt(run, step))  # the kill came after step 2's checkpoint; the logs ran on
    res = cli("train", str(write_recipe(tmp_path, d)), "--resume", "--output-dir", str(run))
    assert res.exit_code == 0, res.output
    assert "at step 2" in res.output
    assert _stable(_metrics(run)) == _stable(rows)
    assert _same_weights(_ckpt(run, 4), _ckpt(straight, 4))
    state = json.loads((_ckpt(run, 4) / "trainer_state.json").read_text())
    assert state["data"] == json.loads((_ckpt(straight, 4) / "trainer_state.json").read_text())["data"]


def test_resume_from_names_a_checkpoint_of_another_run_dir(tmp_path, cli):
    """--resume-from into a new run directory continues that run there (a fork)."""
    d = tiny_recipe(tmp_path, "base", run={"max_steps": 3}, checkpoint={"every": 1, "keep_last": 3})
    train_from_recipe(recipe_from_dict(d))
    fork = tmp_path / "fork"
    res = cli("train", str(write_recipe(tmp_path, d)), "--resume-from", str(_ckpt(tmp_path / "base", 2)),
              "--output-dir", str(fork))
    assert res.exit_code == 0, res.output
    assert [r["step"] for r in _metrics(fork)] == [3]
    assert _same_weights(_ckpt(fork, 3), _ckpt(tmp_path / "base", 3))


# --------------------------------------------------------------------------------------------------
# The end of the run


def test_resume_of_a_finished_run_says_so_and_trains_nothing(tmp_path, cli):
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, "fin", run={"max_steps": 2}))
    assert cli("train", str(path)).exit_code == 0
    run = tmp_path / "fin"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    res = cli("train", str(path), "--resume")
    assert res.exit_code == 0, res.output
    assert "run fin is already finished (2/2 steps)" in res.output
    assert "step 1/" not in res.output
    after = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before  # nothing was written
    res = cli("train", str(path))  # without --resume: refused, the run is not overwritten
    assert res.exit_code == 1
    assert f"run directory {run} already holds a run of this recipe" in _one_error_line(res.output)


# --------------------------------------------------------------------------------------------------
# A changed recipe


def test_changed_recipe_is_refused_unless_the_changes_are_safe_and_allowed(tmp_path, cli):
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, "chg", run={"max_steps": 2}))
    assert cli("train", str(path)).exit_code == 0

    res = cli("train", str(path), "rollout.temperature=0.7", "--resume")
    assert res.exit_code == 1
    assert "cannot change on resume: rollout.temperature" in _one_error_line(res.output)

    res = cli("train", str(path), "run.max_steps=3", "logging.samples_per_step=2", "--resume")
    assert res.exit_code == 1
    line = _one_error_line(res.output)
    assert "differs from the run's in: logging.samples_per_step, run.max_steps" in line
    assert "--allow-recipe-change" in line

    res = cli("train", str(path), "rollout.temperature=0.7", "data.limit=5", "run.max_steps=3", "--resume",
              "--allow-recipe-change")
    assert res.exit_code == 1
    line = _one_error_line(res.output)
    assert "cannot change on resume: data.limit, rollout.temperature (and in run.max_steps, which may" in line

    res = cli("train", str(path), "run.max_steps=3", "checkpoint.keep_last=5", "--resume", "--allow-recipe-change")
    assert res.exit_code == 0, res.output
    assert [r["step"] for r in _metrics(tmp_path / "chg")] == [1, 2, 3]
    assert "max_steps: 3" in (tmp_path / "chg/recipe.yaml").read_text()


def _optimizer(ck: Path) -> dict:
    import torch

    return torch.load(ck / "optimizer.pt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("alone", [False, True], ids=["checkpoint_of_a_run", "checkpoint_alone"])
def test_resume_from_under_a_changed_lr_is_refused_unless_allowed_and_then_applied(tmp_path, cli, base_run, alone):
    """Before: the fork trained on at the checkpoint's LR (3e-3) while its recipe.yaml said 0.01."""
    base, recipe = base_run
    ck = _ckpt(base, 2)
    if alone:  # no recipe.yaml beside it: what the checkpoint itself records is compared
        ck = tmp_path / "step-2"
        shutil.copytree(_ckpt(base, 2), ck)
    fork = tmp_path / "fork"
    res = cli("train", str(recipe), "optim.lr=0.01", "optim.weight_decay=0.1", "--resume-from", str(ck),
              "--output-dir", str(fork))
    assert res.exit_code == 1
    line = _one_error_line(res.output)
    if alone:
        assert (f"checkpoint {ck} was trained with optim.lr=0.003, optim.weight_decay=0; the recipe says "
                f"optim.lr=0.01, optim.weight_decay=0.1") in line, line
    else:
        assert "the recipe differs from the run's in: optim.lr, optim.weight_decay" in line, line
    assert "--allow-recipe-change" in line
    assert not (fork / "recipe.yaml").exists()
    res = cli("train", str(recipe), "optim.lr=0.01", "optim.weight_decay=0.1", "--resume-from", str(ck),
              "--output-dir", str(fork), "--allow-recipe-change")
    assert res.exit_code == 0, res.output
    assert [(r["step"], r["learning_rate"]) for r in _metrics(fork)] == [(3, 0.01)]
    opt = _optimizer(_ckpt(fork, 3))
    assert [g["lr"] for g in opt["optimizer"]["param_groups"]] == [0.01]
    assert [g["weight_decay"] for g in opt["optimizer"]["param_groups"]] == [0.1]
    assert opt["lr_scheduler"]["base_lrs"] == [0.01]
    assert "lr: 0.01" in (fork / "recipe.yaml").read_text()
    assert not _same_weights(_ckpt(fork, 3), _ckpt(base, 3))  # trained at the new LR


def test_resume_under_a_changed_lr_applies_it_with_the_flag(tmp_path, cli, base_run):
    base, recipe = base_run
    run = tmp_path / "run"
    shutil.copytree(base, run)
    res = cli("train", str(recipe), "run.max_steps=4", "optim.lr=0.02", "optim.betas=[0.8,0.99]", "--resume",
              "--output-dir", str(run))
    assert res.exit_code == 1
    assert "differs from the run's in: optim.betas, optim.lr, run.max_steps" in _one_error_line(res.output)
    res = cli("train", str(recipe), "run.max_steps=4", "optim.lr=0.02", "optim.betas=[0.8,0.99]", "--resume",
              "--allow-recipe-change", "--output-dir", str(run))
    assert res.exit_code == 0, res.output
    assert [r["learning_rate"] for r in _metrics(run)] == [3e-3, 3e-3, 3e-3, 0.02]
    groups = _optimizer(_ckpt(run, 4))["optimizer"]["param_groups"]
    assert [(g["lr"], tuple(g["betas"])) for g in groups] == [(0.02, (0.8, 0.99))]


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grpo")
    d = tiny_recipe(tmp, "g", run={"max_steps": 1}, algorithm={"objective": "grpo"})
    train_from_recipe(recipe_from_dict(d))
    return tmp / "g"


@pytest.mark.parametrize("alone", [False, True], ids=["checkpoint_of_a_run", "checkpoint_alone"])
def test_a_grpo_checkpoint_never_resumes_into_an_apo_run(tmp_path, cli, base_run, grpo_run, alone, monkeypatch):
    """Before: accepted (the stored objective was never checked). Refused even with the flag."""
    ck = _ckpt(grpo_run, 1)
    if alone:
        ck = tmp_path / "step-1"
        shutil.copytree(_ckpt(grpo_run, 1), ck)
    monkeypatch.setattr("apo_cli.models.load_policy", lambda *a, **k: pytest.fail("model loaded"))
    res = cli("train", str(base_run[1]), "--resume-from", str(ck), "--output-dir", str(tmp_path / "apo"),
              "--allow-recipe-change")
    assert res.exit_code == 1
    line = _one_error_line(res.output)
    assert f"checkpoint {ck} was trained with algorithm.objective=grpo; the recipe's is apo" in line, line
    assert "set model.name_or_path to the checkpoint" in line


def test_applied_on_resume_names_optimizer_fields_only():
    from apo_cli.checkpoint import APPLIED_ON_RESUME

    fields = _leaf_paths(recipe_from_dict({"model": {"name_or_path": "m"}}).model_dump(mode="json"))
    assert set(APPLIED_ON_RESUME) <= fields and all(f.startswith("optim.") for f in APPLIED_ON_RESUME)
    assert not set(APPLIED_ON_RESUME) & set(SAFE_TO_CHANGE)


def _leaf_paths(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out |= _leaf_paths(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {prefix + k}
    return out


def test_safe_to_change_names_real_fields_that_do_not_change_the_computation():
    cpu = recipe_from_dict({"model": {"name_or_path": "m"}})
    gpu = recipe_from_dict({"model": {"name_or_path": "m"}, "backend": {"kind": "gpu"}})
    fields = _leaf_paths(cpu.model_dump(mode="json")) | _leaf_paths(gpu.model_dump(mode="json"))
    assert set(SAFE_TO_CHANGE) <= fields, set(SAFE_TO_CHANGE) - fields
    # what a run computes: the model, its data and rewards, sampling, the objective, the optimizer
    # and the seed; changing any of these mid-run would silently make a different run
    computing = ("model.", "data.", "rewards", "rollout.", "algorithm.", "run.seed", "backend.kind", "backend.dtype",
                 "backend.rollout", "backend.tensor_parallel_size", "backend.max_model_len", "logging.metrics_file")
    assert not [f for f in SAFE_TO_CHANGE if f.startswith(computing)]
    assert not [f for f in SAFE_TO_CHANGE if f.startswith("optim.") and f != "optim.max_consecutive_skips"]


# --------------------------------------------------------------------------------------------------
# Corrupted and truncated checkpoints


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished 3-step run with a checkpoint at every step."""
    tmp = tmp_path_factory.mktemp("base")
    d = tiny_recipe(tmp, "base", run={"max_steps": 3}, checkpoint={"every": 1, "keep_last": 3})
    train_from_recipe(recipe_from_dict(d))
    return tmp / "base", write_recipe(tmp, d)


def _flip_byte(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


CORRUPTIONS = {
    "weights_bit_flip": ("model.safetensors", _flip_byte),
    "optimizer_truncated": ("optimizer.pt", _truncate),
    "trainer_state_garbage": ("trainer_state.json", lambda f: f.write_text('{"step": 3, "data": ')),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupted_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, cli, base_run, kind):
    base, recipe = base_run
    run = tmp_path / "run"
    shutil.copytree(base, run)
    name, corrupt = CORRUPTIONS[kind]
    corrupt(_ckpt(run, 3) / name)
    res = cli("train", str(recipe), "--resume", "--output-dir", str(run))
    assert res.exit_code == 0, res.output
    assert f"checkpoint {_ckpt(run, 3)}: {name} is corrupted (checksum mismatch); falling back" in res.output
    assert f"resumed from {_ckpt(run, 2)} at step 2" in res.output
    assert _stable(_metrics(run)) == _stable(_metrics(base))
    assert _same_weights(_ckpt(run, 3), _ckpt(base, 3))
    verify_checkpoint(_ckpt(run, 3))


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_resume_from_a_corrupted_checkpoint_is_a_one_line_error(tmp_path, cli, base_run, kind, monkeypatch):
    base, recipe = base_run
    ck = tmp_path / "step-3"
    shutil.copytree(_ckpt(base, 3), ck)
    name, corrupt = CORRUPTIONS[kind]
    corrupt(ck / name)
    monkeypatch.setattr("apo_cli.models.load_policy", lambda *a, **k: pytest.fail("model loaded"))
    res = cli("train", str(recipe), "--resume-from", str(ck), "--output-dir", str(tmp_path / "new"))
    assert res.exit_code == 1
    assert _one_error_line(res.output) == f"error: checkpoint {ck}: {name} is corrupted (checksum mismatch)"


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_resume_with_no_intact_checkpoint_refuses_and_changes_nothing(tmp_path, cli, base_run):
    """Before: exit 0, a silent restart from step 0 that truncated the logs and deleted the (repairable)
    checkpoints of the later steps. Now: one line saying how to start over on purpose."""
    base, recipe = base_run
    run = tmp_path / "run"
    shutil.copytree(base, run)
    for step in (1, 2, 3):
        _truncate(_ckpt(run, step) / "model.safetensors")
    before = _snapshot(run)
    res = cli("train", str(recipe), "--resume", "--output-dir", str(run))
    assert res.exit_code == 1
    line = _one_error_line(res.output)
    assert line.startswith(f"error: cannot resume {run}: none of its 3 checkpoints can be resumed (the newest: "
                           f"checkpoint {_ckpt(run, 3)}: model.safetensors is corrupted (checksum mismatch))"), line
    assert f"to start over on purpose, move {run} away or train into a new --output-dir" in line
    assert _snapshot(run) == before  # logs, checkpoints and recipe untouched


def _rewrite_state(ck: Path, data: bytes | str) -> None:
    """Replace trainer_state.json and its checksum: the checkpoint verifies, its trainer state is bad."""
    import hashlib

    data = data.encode() if isinstance(data, str) else data
    (ck / "trainer_state.json").write_bytes(data)
    sums = json.loads((ck / "checksums.json").read_text())
    sums["trainer_state.json"] = hashlib.sha256(data).hexdigest()
    (ck / "checksums.json").write_text(json.dumps(sums))


def _state_with(base: Path, **changes) -> str:
    ts = json.loads((_ckpt(base, 3) / "trainer_state.json").read_text())
    for k, v in changes.items():
        if v is None:
            ts.pop(k)
        else:
            ts[k] = v
    return json.dumps(ts)


BAD_STATES = {
    "not_json": (lambda base: '{"step": 3, "data": ', "trainer_state.json is not valid JSON (line 1 column"),
    "not_utf8": (lambda base: b"\xff\xfe{", "cannot read trainer_state.json (not UTF-8 text)"),
    "a_list": (lambda base: "[3]", "trainer_state.json is not valid: a list, not a mapping"),
    "missing_data": (lambda base: _state_with(base, data=None), "trainer_state.json is not valid: missing data"),
    "negative_step": (lambda base: _state_with(base, step=-1), "trainer_state.json is not valid: step is -1, must be >= 0"),
    "step_a_string": (lambda base: _state_with(base, step="3"), "step is '3', not a whole number"),
    "step_past_the_end": (lambda base: _state_with(base, step=9), "step 9 is past max_steps 3"),
    "data_pos_negative": (lambda base: _state_with(base, data={"epoch": 0, "pos": -4}), "data.pos is -4, must be >= 0"),
}


@pytest.mark.parametrize("kind", list(BAD_STATES))
def test_invalid_trainer_state_falls_back_to_the_previous_checkpoint(tmp_path, cli, base_run, kind):
    """Checksums pass, the trainer state is not valid: skipped like a corrupted checkpoint (before: a
    traceback, or a negative step resumed that then wrote step--1 folders)."""
    base, recipe = base_run
    run = tmp_path / "run"
    shutil.copytree(base, run)
    make, text = BAD_STATES[kind]
    _rewrite_state(_ckpt(run, 3), make(base))
    res = cli("train", str(recipe), "--resume", "--output-dir", str(run))
    assert res.exit_code == 0, res.output
    assert f"checkpoint {_ckpt(run, 3)}: " in res.output and text in res.output, res.output
    assert f"resumed from {_ckpt(run, 2)} at step 2" in res.output
    assert _stable(_metrics(run)) == _stable(_metrics(base))
    assert [p.name for p in list_checkpoints(run)] == ["step-1", "step-2", "step-3"]


@pytest.mark.parametrize("kind", ["not_json", "negative_step", "missing_data"])
def test_resume_from_an_invalid_trainer_state_is_one_line_before_loading(tmp_path, cli, base_run, kind, monkeypatch):
    base, recipe = base_run
    ck = tmp_path / "step-3"
    shutil.copytree(_ckpt(base, 3), ck)
    make, text = BAD_STATES[kind]
    _rewrite_state(ck, make(base))
    monkeypatch.setattr("apo_cli.models.load_policy", lambda *a, **k: pytest.fail("model loaded"))
    res = cli("train", str(recipe), "--resume-from", str(ck), "--output-dir", str(tmp_path / "new"))
    assert res.exit_code == 1
    line = _one_error_line(res.output)
    assert line.startswith(f"error: checkpoint {ck}: ") and text in line, line
    assert not (tmp_path / "new").exists()


def test_no_valid_trainer_state_anywhere_refuses(tmp_path, cli, base_run):
    base, recipe = base_run
    run = tmp_path / "run"
    shutil.copytree(base, run)
    for step in (1, 2, 3):
        _rewrite_state(_ckpt(run, step), "[]")
    res = cli("train", str(recipe), "--resume", "--output-dir", str(run))
    assert res.exit_code == 1
    assert "none of its 3 checkpoints can be resumed" in _one_error_line(res.output)
    assert not list(run.rglob("step--*"))


@pytest.mark.parametrize("case,text", [
    ("no_sums", "is incomplete: checksums.json is missing"),
    ("sums_truncated", "checksums.json is corrupted"),
    ("sums_a_list", "checksums.json is corrupted (not a mapping"),
    ("sums_empty", "is incomplete: checksums.json lists no trainer_state.json, optimizer.pt, *.safetensors"),
    ("sums_escape", "names '../x', which is not a file of the checkpoint"),
    ("file_missing", "optimizer.pt is missing"),
    ("not_a_folder", "is not a folder"),
    ("does_not_exist", "does not exist"),
])
def test_verify_checkpoint_names_what_is_wrong(tmp_path, base_run, case, text):
    ck = tmp_path / "step-2"
    shutil.copytree(_ckpt(base_run[0], 2), ck)
    sums = ck / "checksums.json"
    if case == "no_sums":
        sums.unlink()
    elif case == "sums_truncated":
        _truncate(sums)
    elif case == "sums_a_list":
        sums.write_text("[1, 2]")
    elif case == "sums_empty":
        sums.write_text("{}")
    elif case == "sums_escape":
        sums.write_text(json.dumps({**json.loads(sums.read_text()), "../x": "0" * 64}))
    elif case == "file_missing":
        (ck / "optimizer.pt").unlink()
    elif case == "not_a_folder":
        shutil.rmtree(ck)
        ck.write_text("x")
    elif case == "does_not_exist":
        shutil.rmtree(ck)
    with pytest.raises(CheckpointError, match=None) as e:
        verify_checkpoint(ck)
    assert text in str(e.value) and str(ck) in str(e.value)


def test_checkpoint_from_another_model_does_not_fit(tmp_path, cli, base_run):
    """Intact checksums, wrong contents: a one-line error, not a traceback."""
    import hashlib

    import torch
    from safetensors.torch import save_file

    ck = tmp_path / "step-3"
    shutil.copytree(_ckpt(base_run[0], 3), ck)
    save_file({"model.embed_tokens.weight": torch.zeros(3, 3)}, str(ck / "model.safetensors"))
    sums = json.loads((ck / "checksums.json").read_text())
    sums["model.safetensors"] = hashlib.sha256((ck / "model.safetensors").read_bytes()).hexdigest()
    (ck / "checksums.json").write_text(json.dumps(sums))
    res = cli("train", str(base_run[1]), "--resume-from", str(ck), "--output-dir", str(tmp_path / "new"))
    assert res.exit_code == 1
    line = _one_error_line(res.output)
    assert f"checkpoint {ck}" in line and ("does not fit" in line or "size mismatch" in line), line


# --------------------------------------------------------------------------------------------------
# Housekeeping


def test_prune_drops_later_steps_of_an_abandoned_continuation_and_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4, 5):
        _ckpt(tmp_path, step).mkdir(parents=True)
        (_ckpt(tmp_path, step) / "checksums.json").write_text("{}")  # apo's manifest: apo's to prune
    (tmp_path / "checkpoints/step-0").mkdir()  # no manifest: not apo's, never removed
    _prune(tmp_path, 3, keep_last=2)  # step-3 was just written after resuming from step-2
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0", "step-2", "step-3"]


def test_checkpoints_are_ordinary_folders_not_private_temp_ones(base_run):
    import os
    import stat

    mask = os.umask(0)
    os.umask(mask)
    for ck in list_checkpoints(base_run[0]):
        assert stat.S_IMODE(ck.stat().st_mode) == 0o777 & ~mask


def test_truncate_jsonl_after_drops_later_steps_and_a_partial_last_line(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "rew')
    truncate_jsonl_after(f, 2)
    assert f.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert not list(tmp_path.glob(".*tmp"))


def test_one_run_dir_one_process(tmp_path, cli, base_run):
    run = tmp_path / "run"
    shutil.copytree(base_run[0], run)
    with RunLock(run):
        with pytest.raises(RunDirError, match="in use by another apo process"):
            RunLock(run).__enter__()
        res = cli("train", str(base_run[1]), "run.max_steps=4", "--resume", "--allow-recipe-change",
                  "--output-dir", str(run))
        assert res.exit_code == 1
        assert _one_error_line(res.output) == f"error: run directory {run} is in use by another apo process"
    assert latest_good_checkpoint(run).name == "step-3"


def test_resume_into_data_smaller_than_the_checkpoints_position_refuses(tmp_path, cli):
    """Before: a run whose data file was rewritten with fewer rows (the recipe unchanged) resumed at a
    position past its end and silently began a new epoch of other data. Now: one line, before any step."""
    data = tmp_path / "problems.jsonl"
    rows = [json.dumps({"prompt": f"What is {i} + 1?", "answer": str(i + 1)}) for i in range(40)]
    data.write_text("\n".join(rows) + "\n")
    d = tiny_recipe(tmp_path, "grown", run={"max_steps": 4}, checkpoint={"every": 3, "keep_last": 1})
    d["data"] = {"source": str(data)}
    recipe = write_recipe(tmp_path, d)
    d["run"]["max_steps"] = 3
    train_from_recipe(recipe_from_dict(d))  # stops at step 3: data position 12
    data.write_text("\n".join(rows[:8]) + "\n")
    run = tmp_path / "grown"
    before = (run / "metrics.jsonl").read_text()
    res = cli("train", str(recipe), "--resume", "--output-dir", str(run), "--allow-recipe-change")  # 3 -> 4 steps
    assert res.exit_code == 1, res.output
    line = _one_error_line(res.output)
    assert f"checkpoint {_ckpt(run, 3)} stopped at position 12 of its data" in line, line
    assert "this run has 8 training example(s)" in line
    assert (run / "metrics.jsonl").read_text() == before
