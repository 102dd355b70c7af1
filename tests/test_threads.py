"""The CPU thread policy (apo_cli/runtime/threads.py): threads from the affinity mask, shared out
among the processes, explicit settings honoured, and OpenMP's idle threads asleep rather than spinning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from apo_cli.runtime.threads import (
    available_cores,
    configure_process,
    local_processes,
    share_env,
    torch_threads,
    user_threads,
)

needs_two_cores = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs an affinity mask of 2+ cores")


def _python(code: str, env: dict[str, str] | None = None) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS",
                                                              "WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK")}
    base["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", code], env={**base, **(env or {})}, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_threads_follow_the_affinity_mask_not_the_machine():
    assert available_cores() == len(os.sched_getaffinity(0))
    assert torch_threads(env={}) == available_cores()


def test_explicit_settings_win_in_order():
    env = {"OMP_NUM_THREADS": "3", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    assert torch_threads(5, env) == 5  # backend.threads
    assert torch_threads(None, env) == 3  # then OMP_NUM_THREADS
    assert user_threads({"OMP_NUM_THREADS": "4,2"}) == 4  # a nested list: its first level
    for bad in ("", "0", "-1", "many"):
        assert user_threads({"OMP_NUM_THREADS": bad}) is None


def test_threads_are_shared_out_among_the_local_processes():
    cores = available_cores()
    assert local_processes({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}) == 2
    assert local_processes({"LOCAL_WORLD_SIZE": "2"}) == 1  # not distributed (WORLD_SIZE 1): one process
    assert local_processes({"WORLD_SIZE": "x"}) == 1
    assert torch_threads(env={"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}) == max(1, cores // 2)
    assert torch_threads(env={"WORLD_SIZE": "64", "LOCAL_WORLD_SIZE": "64"}) == max(1, cores // 64)  # at least 1


def test_share_env_gives_each_job_its_share_and_keeps_the_users_choices():
    env = share_env(2, {"PATH": "/bin"})
    assert env["OMP_NUM_THREADS"] == str(max(1, available_cores() // 2))
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["PATH"] == "/bin"
    mine = share_env(2, {"OMP_NUM_THREADS": "7", "GOMP_SPINCOUNT": "1000"})
    assert mine["OMP_NUM_THREADS"] == "7" and "OMP_WAIT_POLICY" not in mine


def test_wait_policy_is_set_before_torch_only_and_never_over_the_users():
    import torch  # noqa: F401 - libgomp is loaded: too late to set its policy

    env: dict[str, str] = {}
    assert configure_process(env) is False and env == {}  # this process has torch imported already
    got = _python("import json, os; from apo_cli.runtime.threads import configure_process; "
                  "r = configure_process(); print(json.dumps([r, os.environ.get('OMP_WAIT_POLICY')]))")
    assert got == [True, "PASSIVE"]
    for var, value in (("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "100000")):
        got = _python("import json, os; from apo_cli.runtime.threads import configure_process; "
                      "r = configure_process(); print(json.dumps([r, os.environ.get('OMP_WAIT_POLICY')]))",
                      {var: value})
        assert got == [False, value if var == "OMP_WAIT_POLICY" else None]


def test_the_apo_command_sets_the_wait_policy_before_anything_imports_torch():
    code = ("import json, os, sys\nfrom apo_cli import main as m\nsys.argv = ['apo', '--version']\n"
            "try:\n    m.main()\nexcept SystemExit:\n    pass\n"
            "print(json.dumps([os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules]))")
    assert _python(code) == ["PASSIVE", False]


@needs_two_cores
def test_cpu_backend_takes_its_threads_from_the_affinity_mask():
    """Before: os.cpu_count() threads whatever the mask (2 on a process pinned to one core)."""
    code = ("import json, os\nos.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
            "import torch\nfrom backends.cpu import CPUBackend\nfrom backends.cpu_options import CPUBackendSpec\n"
            "CPUBackend(CPUBackendSpec())\nprint(json.dumps(torch.get_num_threads()))")
    assert _python(code) == 1


@needs_two_cores
def test_cpu_backend_honours_omp_num_threads_and_backend_threads():
    code = ("import json, torch\nfrom backends.cpu import CPUBackend\nfrom backends.cpu_options import CPUBackendSpec\n"
            "CPUBackend(CPUBackendSpec()); a = torch.get_num_threads()\n"
            "CPUBackend(CPUBackendSpec(threads=2)); b = torch.get_num_threads()\nprint(json.dumps([a, b]))")
    assert _python(code, {"OMP_NUM_THREADS": "1"}) == [1, 2]
