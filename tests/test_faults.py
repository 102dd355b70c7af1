"""Fault injection on the training loop: kills at random moments (also in the middle of a checkpoint
write), signals, full disks, non-finite gradients and misbehaving rewards. After each fault the run
either completes identically to an uninterrupted one (on CPU) or stops with one clear line, having
lost at most the steps since its last checkpoint and left no partial files behind.

Faults are injected with ``APO_FAULT_SLOW_CHECKPOINT`` (see apo_cli/checkpoint.py) in subprocesses
and with monkeypatches in-process.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from apo_cli.checkpoint import latest_good_checkpoint, list_checkpoints, verify_checkpoint
from apo_cli.errors import RewardError, TrainingError
from apo_cli.recipe import recipe_from_dict
from apo_cli.train import Trainer, train_from_recipe
from tests.helpers import FIXTURES, tiny_recipe, write_recipe
from tests.test_train_loop import _metrics, _stable

REPO = Path(__file__).parents[1]
TOY = FIXTURES / "toy_rewards.py"


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _first_difference(a: list[dict], b: list[dict]) -> str:
    """Where two metrics logs first differ (non-timing keys), for assertion messages."""
    a, b = _stable(a), _stable(b)
    for x, y in zip(a, b):
        diff = {k: (x.get(k), y.get(k)) for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)}
        if diff:
            return f"step {x.get('step')}: {diff}"
    return f"{len(a)} vs {len(b)} lines"


def _leftovers(run: Path) -> list[str]:
    """Partial files a failed or killed write may leave: temporary folders and files."""
    return sorted(str(p.relative_to(run)) for p in run.rglob(".*tmp*"))


def strip_reward_traceback(output: str) -> str:
    """Drop the block in which a failing reward's first traceback is printed, once, on purpose (the
    user's code is at fault there, and the traceback is what they need)."""
    return re.sub(r"reward \w+ failed on a call .*?\n(Traceback.*?\n)(  .*\n)*\S.*\n", "", output)


def _one_error_line(output: str, reward_traceback: bool = False) -> str:
    """The single `error:` line of a CLI failure, and no traceback (but a reward's, if allowed)."""
    if reward_traceback:
        output = strip_reward_traceback(output)
    assert "Traceback" not in output, output
    lines = [ln for ln in output.splitlines() if ln.startswith(("error:", "stopped:"))]
    assert len(lines) == 1, output
    return lines[0]


# --------------------------------------------------------------------------------------------------
# Kills at random points, a kill in the middle of a checkpoint write, SIGTERM, then --resume


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **extra}


def _logged(run: Path) -> int:
    """Complete metrics lines written so far."""
    path = run / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def _wait(cond, proc: subprocess.Popen, timeout: float = 180) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    return False


def _resumed_at(out: str) -> int:
    m = re.search(r"resumed from \S+ at step (\d+)", out)
    if m:
        return int(m.group(1))
    assert "starting from step 0" in out, out
    return 0


class _Run:
    """One `apo train` subprocess with its stdout/stderr captured in files under ``logs``."""

    n = 0

    def __init__(self, cmd: list[str], logs: Path, **env: str):
        _Run.n += 1
        self.out, self.err = logs / f"out{_Run.n}.txt", logs / f"err{_Run.n}.txt"
        with self.out.open("w") as o, self.err.open("w") as e:
            self.proc = subprocess.Popen(cmd, env=_env(**env), stdout=o, stderr=e)

    def kill(self, sig: int = signal.SIGKILL) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=120)

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()


@pytest.mark.slow
def test_random_kills_mid_checkpoint_kill_and_sigterm_then_resume_equal_straight_run(tmp_path):
    every, steps = 2, 12  # room after the kills: the SIGTERM must land before the last step
    sections = dict(run={"max_steps": steps}, checkpoint={"every": every, "keep_last": 2})
    train_from_recipe(recipe_from_dict(tiny_recipe(tmp_path, "straight", **sections)))
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "apo_cli", "train", str(write_recipe(tmp_path, tiny_recipe(tmp_path, "killed", **sections)))]
    rng = random.Random(20240611)  # the kill points are random but reproducible

    # 1. SIGKILL at a random moment after a random number of steps (maybe before any checkpoint)
    a = _Run(cmd, tmp_path)
    target = rng.randint(1, 4)
    assert _wait(lambda: _logged(run) >= target, a.proc), a.stderr()
    time.sleep(rng.uniform(0.0, 0.3))
    assert a.kill() == -signal.SIGKILL
    logged = _logged(run)

    # 2. resume, and SIGKILL in the middle of writing the first new checkpoint
    stale = set((run / "checkpoints").glob(".tmp-*"))
    b = _Run(cmd + ["--resume"], tmp_path, APO_FAULT_SLOW_CHECKPOINT="1.0")
    writing = lambda: [p for p in (run / "checkpoints").glob(".tmp-step-*") if p not in stale]  # noqa: E731
    assert _wait(lambda: bool(writing()), b.proc), b.stderr()
    resumed = _resumed_at(b.stdout())
    assert resumed <= logged <= resumed + every  # at most the steps since the last checkpoint are redone
    time.sleep(rng.uniform(0.0, 2.5))  # anywhere among the checkpoint's four files (>= 4 s in all)
    assert b.kill() == -signal.SIGKILL
    partial = writing()
    assert partial and not (partial[0] / "checksums.json").exists()  # the kill did land mid-write
    good = latest_good_checkpoint(run)
    good_step = int(good.name.split("-")[1]) if good is not None else 0
    for ckpt in list_checkpoints(run):
        verify_checkpoint(ckpt)  # the complete checkpoints were not touched by the interrupted write
    logged = _logged(run)

    # 3. resume; SIGTERM after a step: it saves and exits 143 with a message
    c = _Run(cmd + ["--resume"], tmp_path)
    assert _wait(lambda: "resumed from" in c.stdout() or "starting from" in c.stdout(), c.proc), c.stderr()
    resumed = _resumed_at(c.stdout())
    assert resumed == good_step and resumed <= logged <= resumed + every
    assert "removed the partial files" in c.stdout()
    assert _wait(lambda: _logged(run) > resumed, c.proc), c.stderr()
    assert c.kill(signal.SIGTERM) == 143, c.stdout() + c.stderr()
    m = re.search(r"stopped: SIGTERM: stopped at step (\d+); saved (\S+)", c.stderr())
    assert m, c.stderr()
    stopped = int(m.group(1))
    verify_checkpoint(run / f"checkpoints/step-{stopped}")
    assert not _leftovers(run)

    # 4. resume to the end: nothing redone after the SIGTERM save, result equals the straight run
    d = subprocess.run(cmd + ["--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert d.returncode == 0, d.stderr
    assert _resumed_at(d.stdout) == stopped, d.stdout
    assert _stable(_metrics(run)) == _stable(_metrics(tmp_path / "straight")), \
        _first_difference(_metrics(run), _metrics(tmp_path / "straight"))
    assert _same_weights(run / f"checkpoints/step-{steps}", tmp_path / f"straight/checkpoints/step-{steps}")
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == list(range(1, steps + 1))  # redone steps are logged once
    assert not _leftovers(run)
    assert [p.name for p in list_checkpoints(run)] == [f"step-{steps - every}", f"step-{steps}"]


# --------------------------------------------------------------------------------------------------
# Signals in-process: SIGINT saves and exits 130; a second signal aborts at once


def _signal_at(monkeypatch, step: int, sig: int, times: int = 1) -> None:
    original = Trainer.one_step

    def one_step(self):
        out = original(self)
        if self.step == step:
            for _ in range(times):
                os.kill(os.getpid(), sig)
        return out

    monkeypatch.setattr(Trainer, "one_step", one_step)


def test_sigint_finishes_the_step_saves_and_exits_130(tmp_path, cli, monkeypatch):
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, "int", run={"max_steps": 4}, checkpoint={"every": 10}))
    _signal_at(monkeypatch, 2, signal.SIGINT)
    handler = signal.getsignal(signal.SIGINT)
    res = cli("train", str(path))
    assert res.exit_code == 130
    line = _one_error_line(res.output)
    assert line.startswith("stopped: SIGINT: stopped at step 2; saved") and "--resume" in line
    verify_checkpoint(tmp_path / "int/checkpoints/step-2")
    assert [r["step"] for r in _metrics(tmp_path / "int")] == [1, 2]
    assert signal.getsignal(signal.SIGINT) is handler  # the loop put the handler back
    monkeypatch.undo()
    res = cli("train", str(path), "--resume")
    assert res.exit_code == 0, res.output
    assert "at step 2" in res.output
    assert [r["step"] for r in _metrics(tmp_path / "int")] == [1, 2, 3, 4]


def test_second_sigint_aborts_without_saving(tmp_path, cli, monkeypatch):
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, "int2", run={"max_steps": 4}, checkpoint={"every": 10}))
    _signal_at(monkeypatch, 1, signal.SIGINT, times=2)
    res = cli("train", str(path))
    assert res.exit_code == 130
    assert "interrupted" in res.output and "Traceback" not in res.output
    assert not list_checkpoints(tmp_path / "int2")


# --------------------------------------------------------------------------------------------------
# Disk full / unwritable while writing a checkpoint or the metrics


def _fail_from_call(n: int, exc: BaseException, real, inside: Path):
    """A stand-in for a writer: its n-th call writing under ``inside`` (and later ones) writes a
    partial file and raises ``exc``; other calls go to ``real``."""
    calls = {"n": 0}

    def fake(*args, **kwargs):
        candidates = [kwargs.get("dir"), *args, *kwargs.values()]  # mkdtemp(dir=...) or save(obj, path)
        target = next((Path(a) for a in candidates if isinstance(a, (str, Path))), None)
        if target is None or inside not in target.parents:
            return real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] < n:
            return real(*args, **kwargs)
        if not target.is_dir():
            target.write_bytes(b"partial")
        raise exc

    return fake


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _patch_torch_save(monkeypatch, exc, run):
    monkeypatch.setattr(torch, "save", _fail_from_call(2, exc, torch.save, run))


def _patch_safetensors(monkeypatch, exc, run):
    import transformers.modeling_utils as mu

    monkeypatch.setattr(mu, "safe_save_file", _fail_from_call(2, exc, mu.safe_save_file, run))


def _patch_tokenizer_save(monkeypatch, exc, run):
    from transformers import PreTrainedTokenizerBase

    fake = _fail_from_call(2, exc, PreTrainedTokenizerBase.save_pretrained, run)
    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", lambda self, d, **kw: fake(self, d, **kw))


def _patch_mkdtemp(monkeypatch, exc, run):
    import tempfile

    monkeypatch.setattr(tempfile, "mkdtemp", _fail_from_call(2, exc, tempfile.mkdtemp, run))


def _safetensor_error():
    from safetensors import SafetensorError

    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


# what a full disk really raises (checked on a 1 MiB tmpfs): safetensors -> SafetensorError,
# torch.save -> RuntimeError from its zip writer; plain writes -> OSError(ENOSPC)
_WROTE = "could not write checkpoint step-2 in {ck}: {why}; the previous checkpoints are intact"
WRITE_FAULTS = {
    "torch_save_enospc": (_patch_torch_save, _enospc, _WROTE, "No space left on device"),
    "torch_save_zip_writer": (
        _patch_torch_save, lambda: RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
        _WROTE, "RuntimeError: PytorchStreamWriter failed writing file data/0: file write failed"),
    "safetensors_disk_full": (_patch_safetensors, _safetensor_error, _WROTE,
                              "SafetensorError: Error while serializing: I/O error: No space left on device (os error 28)"),
    "tokenizer_permission": (_patch_tokenizer_save, lambda: PermissionError(errno.EACCES, os.strerror(errno.EACCES)),
                             _WROTE, "Permission denied"),
    "mkdtemp_read_only": (_patch_mkdtemp, lambda: OSError(errno.EROFS, os.strerror(errno.EROFS)),
                          "cannot write a checkpoint in {ck}: {why}", "Read-only file system"),
}


@pytest.mark.parametrize("fault", list(WRITE_FAULTS))
def test_checkpoint_write_failure_is_one_line_and_keeps_the_last_good_checkpoint(tmp_path, cli, monkeypatch, fault):
    from apo_cli.models import ensure_tiny

    patch, make_exc, expected, why = WRITE_FAULTS[fault]
    ensure_tiny(0)  # build the cached model before the writers are patched
    run = tmp_path / "full"
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, "full", run={"max_steps": 3}, checkpoint={"every": 1}))
    patch(monkeypatch, make_exc(), run)
    res = cli("train", str(path))
    assert res.exit_code == 1
    assert _one_error_line(res.output) == "error: " + expected.format(ck=run / "checkpoints", why=why)
    assert [p.name for p in list_checkpoints(run)] == ["step-1"]
    verify_checkpoint(run / "checkpoints/step-1")
    assert not _leftovers(run)


def test_metrics_write_failure_is_one_line_and_keeps_checkpoints(tmp_path, cli, monkeypatch):
    import apo_cli.metrics as metrics_mod

    class FullDiskOs:
        """``os`` as seen by apo_cli.metrics: the third fsync of the metrics file hits a full disk."""

        calls = 0

        def __getattr__(self, name):
            return getattr(os, name)

        def fsync(self, fd):
            FullDiskOs.calls += 1
            if FullDiskOs.calls >= 3:
                raise _enospc()
            os.fsync(fd)

    path = write_recipe(tmp_path, tiny_recipe(tmp_path, "mfull", run={"max_steps": 4}, checkpoint={"every": 1}))
    monkeypatch.setattr(metrics_mod, "os", FullDiskOs())
    res = cli("train", str(path))
    assert res.exit_code == 1
    line = _one_error_line(res.output)
    assert "metrics.jsonl" in line and "No space left on device" in line
    run = tmp_path / "mfull"
    verify_checkpoint(latest_good_checkpoint(run))
    assert latest_good_checkpoint(run).name == "step-2"
    assert not _leftovers(run)
    # once the disk has room again the run resumes from its last checkpoint
    monkeypatch.undo()
    res = cli("train", str(path), "--resume")
    assert res.exit_code == 0, res.output
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3, 4]


def test_full_disk_at_a_metrics_line_names_the_file(tmp_path, cli, monkeypatch):
    """A real full disk (/dev/full): the line's flush fails, and closing the file flushed the same
    line again. Before: the second failure replaced the first, "OSError: [Errno 28] No space left on
    device" without the file."""
    import apo_cli.metrics as metrics_mod

    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    run = tmp_path / "dfull"
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, "dfull", run={"max_steps": 2}))
    real = metrics_mod.open_append
    monkeypatch.setattr(metrics_mod, "open_append",
                        lambda p: open("/dev/full", "a", encoding="utf-8") if p.name == "metrics.jsonl" else real(p))
    res = cli("train", str(path))
    assert res.exit_code == 1
    assert _one_error_line(res.output) == f"error: cannot write {run / 'metrics.jsonl'}: No space left on device"


def test_torn_metrics_lines_are_counted_on_resume(tmp_path, cli):
    """Before: a torn line was dropped silently when the logs were cut back to the checkpoint."""
    import shutil

    path = write_recipe(tmp_path, tiny_recipe(tmp_path, "torn", run={"max_steps": 3}, checkpoint={"every": 2}))
    assert cli("train", str(path)).exit_code == 0
    run = tmp_path / "torn"
    shutil.rmtree(run / "checkpoints/step-3")  # killed after step 3's metrics line, before its checkpoint
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    lines[0] = lines[0][: len(lines[0]) // 2]  # and a line of the log torn
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    res = cli("train", str(path), "--resume")
    assert res.exit_code == 0, res.output
    assert "warning: metrics.jsonl: 1 torn or unreadable line dropped (line 1)" in res.output
    assert [r["step"] for r in _metrics(run)] == [2, 3]


def test_unwritable_output_dir_fails_before_loading_the_model(tmp_path, cli, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, "x", run={"output_dir": str(blocker / "run")}))
    monkeypatch.setattr("apo_cli.models.load_policy", lambda *a, **k: pytest.fail("model loaded"))
    res = cli("train", str(path))
    assert res.exit_code == 1
    line = _one_error_line(res.output)
    assert f"cannot create run directory {blocker / 'run'}" in line and "is a file" in line


# --------------------------------------------------------------------------------------------------
# Non-finite gradients


def _nan_grads(trainer: Trainer, steps: set[int]) -> None:
    """Make every gradient NaN during the given steps (the loss itself stays finite)."""
    def hook(grad):
        return grad * float("nan") if trainer.step in steps else grad

    for p in trainer.model.parameters():
        if p.requires_grad:
            p.register_hook(hook)


def test_nan_gradients_are_skipped_and_stop_the_run_with_a_checkpoint(tmp_path):
    d = tiny_recipe(tmp_path, "ngrad", run={"max_steps": 10}, optim={"max_consecutive_skips": 2},
                    checkpoint={"every": 10})
    t = Trainer(recipe_from_dict(d))
    _nan_grads(t, steps=set(range(3, 11)))
    after: dict[int, dict[str, torch.Tensor]] = {}
    one_step = t.one_step

    def recording_step():
        out = one_step()
        after[t.step] = {k: v.detach().clone() for k, v in t.model.state_dict().items()}
        return out

    t.one_step = recording_step
    with pytest.raises(TrainingError, match="2 optimizer steps in a row had a non-finite loss or gradient"):
        t.train()
    rows = _metrics(tmp_path / "ngrad")
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 2]
    assert rows[2]["grad_norm"] is None and rows[1]["grad_norm"] is not None
    assert not all(torch.equal(after[1][k], after[2][k]) for k in after[1])  # step 2 did update
    assert all(torch.equal(after[2][k], after[4][k]) for k in after[2])  # steps 3 and 4 changed nothing
    saved = tmp_path / "ngrad/checkpoints/step-4"
    verify_checkpoint(saved)
    w = _weights(saved)
    assert all(torch.isfinite(v).all() for v in w.values())
    assert all(torch.equal(w[k], after[2][k]) for k in w)  # the checkpoint holds the last good weights


def test_one_nan_gradient_step_is_skipped_and_the_run_goes_on(tmp_path):
    d = tiny_recipe(tmp_path, "nan1", run={"max_steps": 4}, checkpoint={"every": 10})
    t = Trainer(recipe_from_dict(d))
    _nan_grads(t, steps={2})
    t.train()
    rows = _metrics(tmp_path / "nan1")
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1]
    assert t.consecutive_skips == 0
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    for state in t.optimizer.state.values():
        assert all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v))


# --------------------------------------------------------------------------------------------------
# Rewards that raise, hang or return the wrong thing


def _reward(name: str, **spec) -> list[dict]:
    return [{"name": f"{TOY}:{name}", **spec}]


def test_reward_exceptions_are_isolated_to_their_samples_and_counted(tmp_path, capsys):
    d = tiny_recipe(tmp_path, "boom", run={"max_steps": 2}, rewards=_reward("explode_on_odd"), checkpoint={"every": 10})
    train_from_recipe(recipe_from_dict(d))
    rows = _metrics(tmp_path / "boom")
    errors = [r["rewards/explode_on_odd/errors"] for r in rows]
    assert sum(errors) > 0 and all(e % 4 == 0 for e in errors)  # whole groups of G=4 fail, the rest are scored
    assert all(r["rewards/explode_on_odd/errors"] == r["rewards/all_none"] for r in rows)
    assert "odd answers are not supported" in capsys.readouterr().err  # the first traceback, once


def test_reward_hangs_are_time_boxed_isolated_and_counted(tmp_path):
    d = tiny_recipe(tmp_path, "hang", run={"max_steps": 2}, rewards=_reward("hang_on_odd", timeout_s=0.3),
                    checkpoint={"every": 10})
    t0 = time.perf_counter()
    train_from_recipe(recipe_from_dict(d))
    assert time.perf_counter() - t0 < 25  # each hanging call costs its 0.3 s time box, not 30 s
    rows = _metrics(tmp_path / "hang")
    assert sum(r["rewards/hang_on_odd/timeouts"] for r in rows) > 0
    assert all(r["rewards/hang_on_odd/none_frac"] < 1 for r in rows)


# (the preflight runs each reward on a few rows before any model loads, so it is what reports these)
@pytest.mark.parametrize("name,text", [("wrong_type", "returned str"), ("wrong_length", "values for"),
                                       ("not_a_list", "returned 0.5"), ("always_nan", "finite float")])
def test_reward_returning_the_wrong_thing_stops_with_one_line(tmp_path, cli, name, text):
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, name, rewards=_reward(name)))
    res = cli("train", str(path))
    assert res.exit_code == 2  # found by the preflight before training: bad input (README: exit codes)
    line = _one_error_line(res.output)
    assert f"reward {name}" in line and text in line, line


def test_reward_failing_everywhere_after_two_steps_saves_them_and_resume_equals_straight_run(tmp_path, cli):
    budget = tmp_path / "budget.txt"
    budget.write_text("1000000")
    sections = dict(run={"max_steps": 4}, checkpoint={"every": 10},
                    rewards=_reward("frac_a_countdown", kwargs={"budget_file": str(budget)}))
    train_from_recipe(recipe_from_dict(tiny_recipe(tmp_path, "straight", **sections)))
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, "down", **sections))
    from apo_cli.preflight import run_preflight

    budget.write_text("1000000")
    run_preflight(recipe_from_dict(tiny_recipe(tmp_path, "down", **sections)))  # it calls the reward too
    used = 1000000 - int(budget.read_text())
    budget.write_text(str(8 + used))  # the preflight, two steps of 4 groups, then every call fails
    res = cli("train", str(path))
    assert res.exit_code == 1
    line = _one_error_line(res.output, reward_traceback=True)
    assert "reward frac_a_countdown failed on all 16 samples" in line and "service is down" in line
    assert "saved" in res.output and "the last completed step" in res.output
    run = tmp_path / "down"
    assert [p.name for p in list_checkpoints(run)] == ["step-2"]  # checkpoint.every=10: saved because of the error
    assert json.loads((run / "checkpoints/step-2/trainer_state.json").read_text())["step"] == 2
    budget.write_text("1000000")
    res = cli("train", str(path), "--resume")
    assert res.exit_code == 0, res.output
    assert _stable(_metrics(run)) == _stable(_metrics(tmp_path / "straight"))
    assert _same_weights(run / "checkpoints/step-4", tmp_path / "straight/checkpoints/step-4")


def test_reward_failing_at_the_first_step_saves_nothing(tmp_path, cli):
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, "first", rewards=_reward("explode")))
    res = cli("train", str(path))
    assert res.exit_code == 2  # the preflight's sample step finds it: bad input
    assert "reward explode failed on all 16 samples" in _one_error_line(res.output, reward_traceback=True)
    assert not list_checkpoints(tmp_path / "first")


def test_sigterm_while_loading_exits_143_with_a_message(tmp_path):
    """SIGTERM before the loop starts (data, rewards, model loading): one line, exit 143."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from tests.helpers import tiny_recipe, write_recipe

    path = write_recipe(tmp_path, tiny_recipe(tmp_path, "early"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-c",
                             "import time, apo_cli.train as t\n"
                             "orig = t.Trainer.__init__\n"
                             "def slow(self, *a, **k):\n    open(sys.argv[2] + '.loading', 'w').close()\n"
                             "    time.sleep(30)\n    orig(self, *a, **k)\n"
                             "t.Trainer.__init__ = slow\n"
                             "from apo_cli.main import main\nimport sys\nsys.argv = ['apo', 'train', sys.argv[1]]\nmain()\n",
                             str(path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    loading = Path(str(path) + ".loading")  # the run is being built (a fixed sleep could land in the imports)
    while not loading.exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "SIGTERM before training started" in err and "Traceback" not in err
