"""Custom rewards run in killable worker processes: a hang, a crash or an exit in a reward is that
call's None (counted), or one line naming the reward; never the trainer's end, never a thread left."""

from __future__ import annotations

import os
import re
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from apo_cli.data import Example
from apo_cli.errors import RewardError
from apo_cli.recipe import RewardSpec
from apo_cli.rewards import RewardSet
from tests.helpers import tiny_recipe, write_recipe

BAD = '''
import ctypes, os, re, sys, time

def _odd(answer):
    return int(answer[0]) % 2 == 1

def fine(completions, **_):
    return [float(len(c)) for c in completions]

def loop_on_odd(completions, answer, **_):
    while _odd(answer):
        pass
    return [1.0] * len(completions)

def regex_on_odd(completions, answer, **_):
    if _odd(answer):
        re.match(r"(a+)+$", "a" * 40 + "b")  # catastrophic backtracking: holds the GIL for ages
    return [1.0] * len(completions)

def segfault_on_odd(completions, answer, **_):
    if _odd(answer):
        ctypes.string_at(0)
    return [1.0] * len(completions)

def exit0_on_odd(completions, answer, **_):
    if _odd(answer):
        os._exit(0)
    return [1.0] * len(completions)

def sys_exit_on_odd(completions, answer, **_):
    if _odd(answer):
        sys.exit(3)
    return [1.0] * len(completions)

def always_segfault(completions, **_):
    ctypes.string_at(0)

def always_exit0(completions, **_):
    os._exit(0)

def exit0_in_training(completions, **_):
    if "Let me work through" not in completions[0]:  # not the preflight's test completions
        os._exit(0)
    return [float(len(c)) for c in completions]

def chatty(completions, **_):
    print("not protocol")  # stdout is not the protocol channel
    sys.stdin.read()  # and stdin is empty
    return [2.0] * len(completions)

def pid(completions, **_):
    return [float(os.getpid())] * len(completions)

def exit_on_import_check(completions, **_):
    return [1.0] * len(completions)
'''


@pytest.fixture
def bad(tmp_path):
    path = tmp_path / "bad_rewards.py"
    path.write_text(textwrap.dedent(BAD))
    return path


def _batch(answers: list[str], g: int = 2):
    """(prompts, completions, ids, examples): one group of ``g`` completions per answer."""
    prompts, completions, ids, examples = [], [], [], []
    for i, a in enumerate(answers):
        ex = Example(index=i, prompt=f"q{i}", answer=a, columns={})
        for j in range(g):
            prompts.append(ex.prompt)
            completions.append("x" * (j + 1))
            ids.append([1] * (j + 1))
            examples.append(ex)
    return prompts, completions, ids, examples


def _reward_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("apo-reward")]


@pytest.mark.parametrize(("fn", "kind", "why"), [
    ("loop_on_odd", "timeouts", "timed out after 0.5 s"),
    ("regex_on_odd", "timeouts", "timed out after 0.5 s"),
    ("segfault_on_odd", "errors", "crashed (its worker process was killed by SIGSEGV)"),
    ("exit0_on_odd", "errors", "crashed (its worker process exited with code 0)"),
    ("sys_exit_on_odd", "errors", "the reward called sys.exit(3)"),
])
def test_a_failing_call_is_that_groups_none_and_counted(bad, fn, kind, why, capsys):
    rs = RewardSet([RewardSpec(name=f"{bad}:{fn}", timeout_s=0.5)])
    t0 = time.monotonic()
    out = rs(*_batch(["2", "1", "4", "3", "6"]))  # groups 1 and 3 fail; a fresh worker takes the rest
    assert time.monotonic() - t0 < 15  # two time boxes and two worker starts, not a hang
    assert out.per_reward[fn] == [1.0, 1.0, None, None, 1.0, 1.0, None, None, 1.0, 1.0]
    assert out.metrics[f"rewards/{fn}/{kind}"] == 4.0
    assert why in capsys.readouterr().err  # the first failure is printed once
    assert not _reward_threads()  # nothing left running in this process
    again = rs(*_batch(["2"]))  # the set goes on working
    assert again.per_reward[fn] == [1.0, 1.0]
    rs.close()


@pytest.mark.parametrize(("fn", "why"), [
    ("always_segfault", "crashed (its worker process was killed by SIGSEGV)"),
    ("always_exit0", "crashed (its worker process exited with code 0)"),
])
def test_a_reward_crashing_on_every_call_is_one_error_naming_it(bad, fn, why):
    rs = RewardSet([RewardSpec(name=f"{bad}:{fn}")])
    with pytest.raises(RewardError, match=re.escape(f"reward {fn} failed on all 4 samples of this step: {why}")):
        rs(*_batch(["1", "2"]))


def test_the_reward_code_is_never_imported_in_the_calling_process(bad):
    rs = RewardSet([RewardSpec(name=f"{bad}:fine")])
    assert rs(*_batch(["1"])).per_reward["fine"] == [1.0, 2.0]
    assert not [m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == str(bad)]


def test_one_persistent_worker_per_reward(bad):
    rs = RewardSet([RewardSpec(name=f"{bad}:pid")])
    first = rs(*_batch(["1", "2", "3"])).per_reward["pid"]
    second = rs(*_batch(["1"])).per_reward["pid"]
    assert len(set(first + second)) == 1 and first[0] != os.getpid()
    worker = int(first[0])
    rs.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and Path(f"/proc/{worker}").exists():
        time.sleep(0.05)
    assert not Path(f"/proc/{worker}").exists()  # closed: the worker is gone


def test_prints_and_stdin_do_not_disturb_the_protocol(bad):
    out = RewardSet([RewardSpec(name=f"{bad}:chatty")])(*_batch(["1"]))
    assert out.per_reward["chatty"] == [2.0, 2.0]


def test_a_module_that_exits_on_import_is_one_error_naming_it(tmp_path):
    path = tmp_path / "exits.py"
    path.write_text("import os\nos._exit(0)\n")
    with pytest.raises(RewardError, match=r"exits.py:score'.*exited with code 0 while importing it"):
        RewardSet([RewardSpec(name=f"{path}:score")])
    path.write_text("import sys\nsys.exit('no GPU')\n")
    with pytest.raises(RewardError, match=r"exits.py:score.: importing it failed: SystemExit: no GPU"):
        RewardSet([RewardSpec(name=f"{path}:score")])


def test_kwargs_that_are_not_json_are_refused_naming_the_reward(bad):
    with pytest.raises(RewardError, match="reward fine: kwargs cannot be passed to its worker process"):
        RewardSet([RewardSpec(name=f"{bad}:fine", kwargs={"x": object()})])


def test_train_with_a_reward_that_exits_fails_with_one_line(cli, bad, tmp_path):
    """Before: os._exit(0) in a reward ended `apo train` with exit 0 and no checkpoint."""
    for fn, line in (("always_exit0", "error: rewards: reward always_exit0 failed on all 16 samples"),  # preflight
                     ("exit0_in_training", "error: reward exit0_in_training failed on all 16 samples")):
        d = tiny_recipe(tmp_path, fn, run={"max_steps": 2}, rewards=[{"name": f"{bad}:{fn}"}])
        res = cli("train", str(write_recipe(tmp_path, d)))
        assert res.exit_code != 0, res.output
        assert f"{line} of this step: crashed (its worker process exited with code 0)" in res.output
        assert "Traceback" not in res.output


def test_train_survives_a_reward_that_segfaults_on_some_groups(cli, bad, tmp_path):
    """Before: a segfaulting reward ended `apo train` with SIGSEGV and no line."""
    d = tiny_recipe(tmp_path, "run", run={"max_steps": 2}, rewards=[{"name": f"{bad}:segfault_on_odd"}])
    res = cli("train", str(write_recipe(tmp_path, d)))
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "checkpoints" / "step-2").is_dir()
    assert "rewards/segfault_on_odd/errors" in (tmp_path / "run" / "metrics.jsonl").read_text()
