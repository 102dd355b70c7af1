"""Signals to a real `apo train` process at real moments (apo_cli/runtime/signals.py).

Each test starts `python -m apo_cli train` on the tiny recipe in a subprocess of its own session (so
that a signal can go to the whole process group, as a terminal's Ctrl-C does, reward workers
included) and times its signal by what the process has done: a module it has imported (``-X
importtime`` prints each one as it completes), a reward call that waits on a file, a line on
stderr. Nothing waits for a fixed time.

- Ctrl-C while torch or numpy imports: ``interrupted``, exit 130; never a traceback, a SystemError,
  a SIGABRT/SIGSEGV, an interrupt swallowed by the import (the run went on), or an ImportError.
- SIGHUP is treated like SIGTERM: the step finishes, the run saves and exits 129; also when the
  terminal itself hangs up (a pseudo-terminal whose other end closes, as an SSH session does), after
  which writing to it fails.
- A second SIGTERM aborts at once without saving and exits 143 (the first signal's code), not 130.
- SIGTERM while a reward module imports: ``stopped: SIGTERM before training started``, exit 143.
"""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from apo_cli.checkpoint import list_checkpoints, verify_checkpoint
from tests.helpers import tiny_recipe, write_recipe

REPO = Path(__file__).parents[1]
DEADLINE_S = 180  # what a step of the tiny model may take on a loaded machine, many times over


def _env(**extra: str) -> dict[str, str]:
    # APO_TRUST_CODE: the tiny recipe's reward is a file of ours (the opt-in for user code)
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "APO_TRUST_CODE": "1", **extra}


def _wait_for(cond, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


GATED = '''
import time
from pathlib import Path


def gated(completions, gate, **_):
    """frac_a; while the file gate/arm exists, first says so (gate/waiting), then waits for gate/go."""
    gate = Path(gate)
    if (gate / "arm").exists() and not (gate / "go").exists():
        (gate / "waiting").touch()
        deadline = time.monotonic() + 600
        while not (gate / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    return [c.count("a") / max(len(c), 1) for c in completions]
'''


class _Train:
    """`apo train` of the tiny recipe (the reward waits on ``gate``) in a new session; stderr to a file."""

    def __init__(self, tmp_path: Path, name: str, *, steps: int = 4, reward_source: str = GATED,
                 stdio=None, preexec_fn=None, **sections):
        self.gate = tmp_path / f"gate-{name}"
        self.gate.mkdir()
        reward = tmp_path / f"rewards_{name}.py"
        reward.write_text(textwrap.dedent(reward_source))
        recipe = tiny_recipe(tmp_path, name, run={"max_steps": steps}, checkpoint={"every": 100},
                             rewards=[{"name": f"{reward}:gated", "kwargs": {"gate": str(self.gate)},
                                       "timeout_s": 600}], **sections)
        self.run_dir = tmp_path / name
        self.err_path = tmp_path / f"{name}.err"
        cmd = [sys.executable, "-m", "apo_cli", "train", str(write_recipe(tmp_path, recipe, f"{name}.yaml"))]
        if stdio is None:
            with self.err_path.open("w") as err:
                self.proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=err,
                                             start_new_session=True, cwd=tmp_path)
        else:
            self.proc = subprocess.Popen(cmd, env=_env(), stdin=stdio, stdout=stdio, stderr=stdio,
                                         start_new_session=True, preexec_fn=preexec_fn, cwd=tmp_path)

    def err(self) -> str:
        return self.err_path.read_text() if self.err_path.exists() else ""

    def steps_logged(self) -> int:
        path = self.run_dir / "metrics.jsonl"
        return path.read_text().count("\n") if path.exists() else 0

    def signal(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)  # the whole group, as a terminal does

    def wait_for(self, cond, what: str) -> None:
        _wait_for(cond, self.proc, what)

    def finish(self) -> int:
        try:
            return self.proc.wait(timeout=DEADLINE_S)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)


def _stop_line(err: str) -> str:
    assert "Traceback" not in err and "SystemError" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith(("stopped:", "interrupted", "error:"))]
    assert len(lines) == 1, err
    return lines[0]


# --------------------------------------------------------------------------------------------------
# Ctrl-C while torch and numpy import


# modules completed early in, in the middle of and late in the import of numpy and of torch (with its
# extension torch._C): an interrupt in each of these once gave an ImportError traceback, was swallowed
# (training went on), or ended the process with SIGABRT
IMPORT_MOMENTS = ["numpy._core._exceptions", "numpy._core._multiarray_umath", "torch._rocm_init",
                  "torch.ao.nn.intrinsic.qat.modules.conv_fused"]


@pytest.mark.parametrize("module", IMPORT_MOMENTS)
def test_ctrl_c_while_torch_imports_says_interrupted_and_exits_130(tmp_path, module):
    run_dir = tmp_path / "imp"
    recipe = write_recipe(tmp_path, tiny_recipe(tmp_path, "imp"))
    proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "apo_cli", "train", str(recipe)],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=tmp_path)
    try:
        seen = False
        for line in proc.stderr:
            if line.startswith("import time:") and line.rstrip().endswith(" " + module):
                os.killpg(proc.pid, signal.SIGINT)  # the moment that module is imported: mid-import of its package
                seen = True
                break
        rest = proc.stderr.read()
        rc = proc.wait(timeout=DEADLINE_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert seen, f"{module} was never imported; pick another moment"
    err = "\n".join(ln for ln in rest.splitlines() if not ln.startswith("import time:"))
    assert rc == 130, err
    assert _stop_line(err) == "interrupted", err
    assert not (run_dir / "metrics.jsonl").exists()  # stopped there: the run did not go on


# --------------------------------------------------------------------------------------------------
# SIGHUP: like SIGTERM


def test_sighup_finishes_the_step_saves_and_exits_129(tmp_path):
    t = _Train(tmp_path, "hup")
    t.wait_for(lambda: t.steps_logged() >= 1, "step 1")
    (t.gate / "arm").touch()  # step 2's reward waits
    t.wait_for(lambda: (t.gate / "waiting").exists(), "step 2's reward call")
    t.signal(signal.SIGHUP)
    t.wait_for(lambda: "SIGHUP: finishing the step" in t.err(), "the note that the step finishes")
    (t.gate / "go").touch()
    assert t.finish() == 129, t.err()
    line = _stop_line(t.err())
    assert line.startswith(f"stopped: SIGHUP: stopped at step 2; saved {t.run_dir / 'checkpoints/step-2'}"), line
    verify_checkpoint(t.run_dir / "checkpoints/step-2")
    assert t.steps_logged() == 2
    assert not [p for p in t.run_dir.rglob("*") if ".tmp" in p.name]


def test_terminal_hangup_saves_and_exits_129(tmp_path):
    """The run's terminal goes away (the master side of its pseudo-terminal closes, as when an SSH
    session drops): the kernel sends SIGHUP, and writing to the terminal fails (EIO) from then on."""
    import fcntl
    import select
    import termios
    import threading

    master, slave = pty.openpty()

    def controlling_terminal() -> None:  # in the child, a new session's leader: the pty becomes its terminal
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    t = _Train(tmp_path, "tty", stdio=slave, preexec_fn=controlling_terminal,
               logging={"dashboard": "auto"})  # auto: the rich dashboard, as on a real terminal
    os.close(slave)
    done = threading.Event()

    def drain() -> None:  # read what the run shows, so that the terminal's buffer never fills
        while not done.is_set():
            if select.select([master], [], [], 0.05)[0]:
                try:
                    os.read(master, 65536)
                except OSError:
                    return

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        t.wait_for(lambda: t.steps_logged() >= 1, "step 1")
        (t.gate / "arm").touch()  # step 2's reward waits
        t.wait_for(lambda: (t.gate / "waiting").exists(), "step 2's reward call")
    finally:
        done.set()
        reader.join()
        os.close(master)  # the hang-up: SIGHUP to the run, which is in step 2's reward call
    (t.gate / "go").touch()
    assert t.finish() == 129
    verify_checkpoint(t.run_dir / "checkpoints/step-2")
    assert t.steps_logged() == 2


# --------------------------------------------------------------------------------------------------
# A second SIGTERM; SIGTERM while a reward module imports


def test_second_sigterm_aborts_at_once_and_exits_143(tmp_path):
    t = _Train(tmp_path, "term2")
    t.wait_for(lambda: t.steps_logged() >= 1, "step 1")
    (t.gate / "arm").touch()  # step 2's reward waits, and is never let go
    t.wait_for(lambda: (t.gate / "waiting").exists(), "step 2's reward call")
    t.signal(signal.SIGTERM)
    t.wait_for(lambda: "SIGTERM: finishing the step" in t.err(), "the note that the step finishes")
    t.signal(signal.SIGTERM)
    assert t.finish() == 143, t.err()
    line = _stop_line(t.err())
    assert line.startswith("stopped: SIGTERM again: aborted at once, without saving"), line
    assert not list_checkpoints(t.run_dir) and t.steps_logged() == 1  # step 2 neither saved nor logged


def test_ctrl_c_then_sigterm_keeps_the_first_signals_code(tmp_path):
    t = _Train(tmp_path, "int-term")
    t.wait_for(lambda: t.steps_logged() >= 1, "step 1")
    (t.gate / "arm").touch()
    t.wait_for(lambda: (t.gate / "waiting").exists(), "step 2's reward call")
    t.signal(signal.SIGINT)
    t.wait_for(lambda: "SIGINT: finishing the step" in t.err(), "the note that the step finishes")
    t.signal(signal.SIGTERM)
    assert t.finish() == 130, t.err()
    assert _stop_line(t.err()).startswith("stopped: SIGTERM after SIGINT: aborted at once"), t.err()


IMPORT_WAITS = GATED + '''

_gate = Path(__file__).with_name("gate-imp-reward")
(_gate / "waiting").touch()  # importing this module takes until the test lets it go
_deadline = time.monotonic() + 600
while not (_gate / "go").exists() and time.monotonic() < _deadline:
    time.sleep(0.01)
'''


def test_sigterm_while_a_reward_module_imports_exits_143(tmp_path):
    t = _Train(tmp_path, "imp-reward", reward_source=IMPORT_WAITS)
    t.wait_for(lambda: (t.gate / "waiting").exists(), "the reward module's import")
    t.signal(signal.SIGTERM)
    rc = t.finish()
    (t.gate / "go").touch()
    assert rc == 143, t.err()
    assert _stop_line(t.err()) == "stopped: SIGTERM before training started; nothing to save", t.err()
