"""The CPU thread policy (apo_cli/runtime/threads.py): threads from the affinity mask, shared out
among the processes, explicit settings honoured, and OpenMP's idle threads asleep rather than spinning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from apo_cli.runtime.threads import (
    SPIN_COUNT,
    ThreadGovernor,
    available_cores,
    configure_process,
    cpu_vendor,
    local_processes,
    reproducible_mkl,
    share_env,
    torch_threads,
    user_threads,
)

# MKL_CBWR as configure_process() sets it on this machine's processor: AUTO,STRICT on Intel, else unset
INTEL_MKL = "AUTO,STRICT" if cpu_vendor() == "GenuineIntel" else None

needs_two_cores = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs an affinity mask of 2+ cores")


def _python(code: str, env: dict[str, str] | None = None) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS",
                                                              "MKL_CBWR", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK")}
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
    assert env["GOMP_SPINCOUNT"] == SPIN_COUNT and env["THP_MEM_ALLOC_ENABLE"] == "1" and env["PATH"] == "/bin"
    assert env.get("MKL_CBWR") == INTEL_MKL  # on Intel only
    mine = share_env(2, {"OMP_NUM_THREADS": "7", "OMP_WAIT_POLICY": "ACTIVE", "THP_MEM_ALLOC_ENABLE": "0",
                         "MKL_CBWR": "COMPATIBLE"})
    assert mine["OMP_NUM_THREADS"] == "7" and "GOMP_SPINCOUNT" not in mine and mine["OMP_WAIT_POLICY"] == "ACTIVE"
    assert mine["THP_MEM_ALLOC_ENABLE"] == "0" and mine["MKL_CBWR"] == "COMPATIBLE"


def test_mkl_is_made_reproducible_on_intel_only_and_never_over_the_users(tmp_path, monkeypatch):
    for vendor, want in (("GenuineIntel", "AUTO,STRICT"), ("AuthenticAMD", None)):
        info = tmp_path / f"{vendor}.txt"
        info.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: fpu avx2\n")
        assert cpu_vendor(str(info)) == vendor
        monkeypatch.setattr("apo_cli.runtime.threads.cpu_vendor", lambda v=vendor: v)
        env: dict[str, str] = {}
        reproducible_mkl(env)
        assert env.get("MKL_CBWR") == want
        mine = {"MKL_CBWR": "COMPATIBLE"}
        reproducible_mkl(mine)
        assert mine == {"MKL_CBWR": "COMPATIBLE"}
    assert cpu_vendor(str(tmp_path / "missing")) == ""


_POLICY = ("import json, os; from apo_cli.runtime.threads import configure_process; r = configure_process(); "
           "print(json.dumps([r] + [os.environ.get(v) for v in "
           "('GOMP_SPINCOUNT', 'OMP_WAIT_POLICY', 'THP_MEM_ALLOC_ENABLE', 'MKL_CBWR')]))")


def test_process_policy_is_set_before_torch_only_and_never_over_the_users():
    import torch  # noqa: F401 - libgomp is loaded: too late to set its policy

    env: dict[str, str] = {}
    assert configure_process(env) is False and env == {}  # this process has torch imported already
    assert _python(_POLICY) == [True, SPIN_COUNT, None, "1", INTEL_MKL]
    assert _python(_POLICY, {"OMP_WAIT_POLICY": "ACTIVE"}) == [False, None, "ACTIVE", "1", INTEL_MKL]
    assert _python(_POLICY, {"GOMP_SPINCOUNT": "100000"}) == [False, "100000", None, "1", INTEL_MKL]
    assert _python(_POLICY, {"THP_MEM_ALLOC_ENABLE": "0", "MKL_CBWR": "AVX2"}) == [True, SPIN_COUNT, None, "0", "AVX2"]


def test_the_apo_command_sets_the_policy_before_anything_imports_torch():
    code = ("import json, os, sys\nfrom apo_cli import main as m\nsys.argv = ['apo', '--version']\n"
            "try:\n    m.main()\nexcept SystemExit:\n    pass\n"
            "print(json.dumps([os.environ.get('GOMP_SPINCOUNT'), os.environ.get('THP_MEM_ALLOC_ENABLE'), "
            "os.environ.get('MKL_CBWR'), 'torch' in sys.modules]))")
    assert _python(code) == [SPIN_COUNT, "1", INTEL_MKL, False]


# Training steps (forward, backward, AdamW) of a small Llama built from a config: the minor page
# faults of three steps after two warm-up steps. Its vocabulary makes blocks over glibc's largest
# mmap threshold (32 MiB): logits of 123 MB, an embedding gradient of 41 MB. With glibc's and torch's
# defaults the large blocks a step frees go back to the kernel, and the next step faults them in
# again 4 KB page by 4 KB page (~500 000 faults here); with configure_process() the next step reuses
# them (~3 000; ~18 000 when only the mmap threshold was raised to 32 MiB).
_REFAULTS = """
import json, resource, sys
from apo_cli.runtime.threads import configure_process
if sys.argv[1] == "policy":
    assert configure_process()
import torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
m = LlamaForCausalLM(LlamaConfig(vocab_size=40000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
ids = torch.randint(0, 40000, (16, 48))
def step():
    m(input_ids=ids, labels=ids).loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
step(); step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0))
"""


def _refaults(mode: str) -> int:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("MALLOC_", "THP_")) and k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    base["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", _REFAULTS, mode], env=base, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_a_training_step_reuses_the_memory_the_last_one_freed():
    default, kept = _refaults("default"), _refaults("policy")
    assert default > 100_000  # before: every step faults its freed blocks in again, page by page
    assert kept < default / 50, (kept, default)


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


def _busy_core() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while 1: pass"])


def test_governor_counts_other_processes_load_from_proc_stat(tmp_path):
    """A fake /proc/stat: both cores busy while this process sleeps means 2 cores of other load (1
    thread: the floor); nothing busy means all threads back; an unreadable file leaves the count."""
    stat = tmp_path / "stat"
    line = "cpu{} {} 0 0 {} 0 0 0 0 0 0\n"
    stat.write_text("cpu 0 0 0 0 0 0 0 0 0 0\n" + line.format(0, 0, 0) + line.format(1, 0, 0))
    gov = ThreadGovernor(2, cpus={0, 1}, stat_path=str(stat))
    assert gov.update() == 2  # too soon: no interval yet
    time.sleep(0.6)
    ticks = int(0.6 * os.sysconf("SC_CLK_TCK"))
    stat.write_text("cpu 0 0 0 0 0 0 0 0 0 0\n" + line.format(0, ticks, 0) + line.format(1, ticks, 0)
                    + line.format(2, 10**6, 0))  # cpu2 is outside the mask: not counted
    assert gov.update() == 1 and gov.other_load > 1.5
    time.sleep(0.6)
    stat.write_text("cpu 0 0 0 0 0 0 0 0 0 0\n" + line.format(0, ticks, ticks) + line.format(1, ticks, ticks))
    assert gov.update() == 2 and gov.other_load < 0.2
    stat.unlink()
    time.sleep(0.6)
    assert gov.update() == 2


@needs_two_cores
def test_governor_gives_a_core_taken_by_another_process_back():
    """Before: the threads stayed at the mask's 2 beside a busy process, and every parallel region
    waited for the thread that was not running (SmolLM2: 8 s -> 42 s a step)."""
    cpus = set(sorted(os.sched_getaffinity(0))[:2])
    busy = _busy_core()
    try:
        os.sched_setaffinity(busy.pid, cpus)
        gov = ThreadGovernor(2, cpus=cpus)
        time.sleep(1.5)
        assert gov.update() == 1, gov.other_load
    finally:
        busy.kill()
        busy.wait()


@needs_two_cores
def test_the_governed_thread_count_changes_no_result(tmp_path, cli, monkeypatch):
    """The governor changes the training phase's threads between steps, so a seeded run must not
    depend on them: the same run trained with 1 and with 2 threads (sampling at the full count) gives
    the same metrics and weights, bit for bit (a model wide enough that torch splits its kernels; on
    an Intel Xeon with AMX MKL's products need MKL_CBWR, which the apo command and tests/conftest.py set)."""
    import torch
    from transformers import AutoModelForCausalLM

    from apo_cli.models import build_char_tokenizer, tiny_config
    from tests.golden.runs import _metrics, _weights
    from tests.helpers import tiny_recipe, write_recipe

    tok = build_char_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(len(tok), hidden_size=384, intermediate_size=1024,
                                                         num_attention_heads=6, num_key_value_heads=2))
    folder = tmp_path / "model"
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the governor runs only when nothing fixes the count
    monkeypatch.setattr("apo_cli.runtime.threads.available_cores", lambda: 2)
    before, out, seen = torch.get_num_threads(), {}, []
    try:
        for threads in (1, 2):
            monkeypatch.setattr(ThreadGovernor, "update", lambda self, n=threads: n)
            d = tiny_recipe(tmp_path, f"t{threads}", model={"name_or_path": str(folder)}, run={"max_steps": 3},
                            checkpoint={"every": 3, "keep_last": 1})
            res = cli("train", str(write_recipe(tmp_path, d, f"r{threads}.yaml")))
            assert res.exit_code == 0, res.output
            run = tmp_path / f"t{threads}"
            raw = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            seen.append({r["perf/threads"] for r in raw})
            out[threads] = _metrics(run), _weights(run / "checkpoints" / "step-3")  # all but timings
    finally:
        torch.set_num_threads(before)
    assert seen == [{1.0}, {2.0}]  # the training phases did run with 1 and with 2 threads
    from tests.test_faults import _first_difference

    assert out[1][0] == out[2][0], _first_difference(out[1][0], out[2][0])
    assert out[1][1] == out[2][1] and out[1][1]
