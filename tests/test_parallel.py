"""Several processes under torchrun (apo_cli/runtime/), on CPU with gloo: the same loop as on
several GPUs, minus NCCL.

The strongest check: with the sampling replaced by a fixed function of the prompt
(fixtures/dp_driver.py), two processes must take exactly the step one process takes: same rewards,
alpha and loss, and the same weights up to float summation order. Checkpoints are the same files
whatever the number of processes, so a run resumes on another number of them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import FIXTURES, tiny_recipe, write_recipe

pytestmark = pytest.mark.slow

DRIVER = FIXTURES / "dp_driver.py"


def _run(args: list[str], nproc: int, cwd: Path, **env_vars: str) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    env = {**os.environ, "APO_DEBUG": "0", "PYTHONWARNINGS": "ignore", **env_vars}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step-{step}" / "model.safetensors"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(("error:", "stopped:"))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same recipe (2 mini-batches, 3 epochs: each rank trains other groups in each epoch, so its
    anchor rows are not its first-epoch rows) trained by one process and by two."""
    root = tmp_path_factory.mktemp("dp")
    out = {}
    for name, nproc in (("one", 1), ("two", 2)):
        d = tiny_recipe(root, name=name, optim={"micro_batch_size": 4}, algorithm={"mini_batches": 2, "epochs": 3})
        recipe = write_recipe(root, d, f"{name}.yaml")
        p = _run([str(DRIVER), "train", str(recipe)], nproc, root)
        assert p.returncode == 0, p.stderr[-3000:]
        out[name] = (root / name, recipe, p)
    return out


def test_two_processes_take_the_one_process_step(runs):
    one, _, _ = runs["one"]
    two, _, p = runs["two"]
    assert _max_diff(_weights(one, 4), _weights(two, 4)) < 1e-5  # tied weights saved once, as by one process
    m1, m2 = _metrics(one), _metrics(two)
    assert [m["step"] for m in m2] == [1, 2, 3, 4]  # rank 0 writes, once per step
    assert m1[0].keys() == m2[0].keys()
    for a, b in zip(m1, m2, strict=True):
        for key in ("reward", "reward_std", "alpha", "confidence", "rewards/frac_a/mean", "completions/mean_length"):
            assert b[key] == pytest.approx(a[key], abs=1e-6), key
        for key in ("loss", "grad_norm"):
            # after three updates the weights differ by float summation order (< 1e-5, checked
            # above); a step whose rewards are all 0 has a loss of ~3e-4 from the z-loss alone, whose
            # relative difference then reaches 2e-4 on AMD EPYC (AVX-512) while it stayed < 1e-4 on Intel
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-7), key
    assert sum(1 for m in m2 if m["grad_norm"] > 0) >= 2  # the comparison is of real updates
    assert len((two / "samples.jsonl").read_text().splitlines()) == 4
    assert p.stdout.count("done: 4 steps") == 1  # rank 0 alone reports


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_take_the_step_one_node_of_two_processes_takes(runs, tmp_path):
    """What a two-node run launches, on localhost: one torchrun per node, one process each, meeting
    through the c10d rendezvous (ranks are given by the rendezvous; RANK 0 writes wherever it lands).
    The same recipe as the standalone two-process run, the same weights and metrics."""
    import time
    import uuid

    import yaml

    two, recipe, _ = runs["two"]
    d = yaml.safe_load(recipe.read_text())
    d["run"].update(name="nodes", output_dir=str(tmp_path / "nodes"))
    nodes_recipe = write_recipe(tmp_path, d, "nodes.yaml")
    port, rdzv_id = _free_port(), f"apo-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "APO_DEBUG": "0", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", f"--node-rank={rank}",
         "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={rdzv_id}",
         str(DRIVER), "train", str(nodes_recipe)],
        cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        for rank in (0, 1)]
    deadline, outs = time.monotonic() + 300, []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic())))
    finally:
        for proc in procs:  # a node left waiting at the rendezvous (or hung) goes with its workers
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait(timeout=30)
    for proc, (_, stderr) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, stderr[-3000:]
    assert _max_diff(_weights(two, 4), _weights(tmp_path / "nodes", 4)) < 1e-5
    assert [m["step"] for m in _metrics(tmp_path / "nodes")] == [1, 2, 3, 4]  # written once, by rank 0
    assert sum(out.count("done: 4 steps") for out, _ in outs) == 1


def test_with_engine_logprobs_later_epochs_use_the_rollout_anchors(tmp_path):
    """Engine log-probs (as from vLLM or the CPU sampler): the first mini-batch anchors itself on the
    rank that trains each row, and a later epoch may hand those rows to another rank, which must
    get the anchors at the rollout weights, not take them at the updated ones."""
    weights = {}
    for name, nproc in (("lp1", 1), ("lp2", 2)):
        d = tiny_recipe(tmp_path, name=name, optim={"micro_batch_size": 4}, algorithm={"epochs": 2})
        recipe = write_recipe(tmp_path, d, f"{name}.yaml")
        p = _run([str(DRIVER), "train", str(recipe)], nproc, tmp_path, APO_TEST_ENGINE_LOGPROBS="1")
        assert p.returncode == 0, p.stderr[-3000:]
        weights[name] = _weights(tmp_path / name, 4)
        assert all("sampling/logprob_diff_max" in m for m in _metrics(tmp_path / name)[1:])
    assert _max_diff(weights["lp1"], weights["lp2"]) < 1e-5


def _resume_copy(src: Path, recipe: Path, dst: Path, keep: int) -> Path:
    """``src`` cut back to its step-``keep`` checkpoint, as a run killed after that step."""
    shutil.copytree(src, dst)
    for ckpt in (dst / "checkpoints").iterdir():
        if int(ckpt.name.split("-")[1]) > keep:
            shutil.rmtree(ckpt)
    text = recipe.read_text().replace(str(src), str(dst))
    (dst / "recipe.yaml").write_text((dst / "recipe.yaml").read_text().replace(str(src), str(dst)))
    out = dst.parent / f"{dst.name}.yaml"
    out.write_text(text)
    return out


@pytest.mark.parametrize("source,nproc", [("two", 1), ("one", 2)])
def test_a_run_resumes_on_another_number_of_processes(runs, source, nproc, tmp_path):
    src, recipe, _ = runs[source]
    resumed = _resume_copy(src, recipe, tmp_path / f"from-{source}", keep=2)
    p = _run([str(DRIVER), "train", str(resumed), "--resume"], nproc, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout + p.stderr
    assert _max_diff(_weights(src, 4), _weights(tmp_path / f"from-{source}", 4)) < 1e-5
    assert [m["step"] for m in _metrics(tmp_path / f"from-{source}")] == [1, 2, 3, 4]


def test_torchrun_with_real_sampling_and_a_kl_reference(tmp_path):
    """The CPU backend's own sampling on a sharded policy (gathered once per rollout), and a
    reference model sharded like the policy."""
    d = tiny_recipe(tmp_path, name="real", algorithm={"kl_coef": 0.05})
    recipe = write_recipe(tmp_path, d)
    p = _run(["-m", "apo_cli", "train", str(recipe)], 2, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    m = _metrics(tmp_path / "real")
    assert [x["step"] for x in m] == [1, 2, 3, 4]
    assert all("kl" in x for x in m)
    assert all(x["completions/mean_length"] > 0 for x in m)
    assert set(_weights(tmp_path / "real", 4)) == set(load_file(str(_single_checkpoint(tmp_path))))


def _single_checkpoint(tmp_path: Path) -> Path:
    """A one-process checkpoint of the same model, for its tensor names."""
    d = tiny_recipe(tmp_path, name="single", run={"max_steps": 1})
    recipe = write_recipe(tmp_path, d, "single.yaml")
    p = _run(["-m", "apo_cli", "train", str(recipe)], 1, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    return tmp_path / "single" / "checkpoints" / "step-1" / "model.safetensors"


def _reward_recipe(tmp_path: Path, name: str, reward: str) -> Path:
    d = tiny_recipe(tmp_path, name=name, rewards=[{"name": reward}], checkpoint={"every": 10})
    return write_recipe(tmp_path, d)


def test_a_reward_failing_on_one_rank_scores_none_as_in_one_process(tmp_path):
    """Rank 1's samples of steps 3-4 score None; rank 0's do not: the step goes on, as one process
    goes on when part of a step fails, and the failures are counted for the whole step."""
    recipe = _reward_recipe(tmp_path, "rf", f"{FIXTURES / 'rank_rewards.py'}:breaks_on_rank_1")
    p = _run(["-m", "apo_cli", "train", str(recipe)], 2, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    m = _metrics(tmp_path / "rf")
    assert [x["rewards/breaks_on_rank_1/errors"] for x in m] == [0, 0, 8, 8]
    assert [x["rewards/breaks_on_rank_1/none_frac"] for x in m] == [0, 0, 0.5, 0.5]
    assert "rank 1: reward breaks_on_rank_1 failed on a call" in p.stderr  # the failure names its rank


def test_a_broken_reward_on_one_rank_stops_every_rank_after_saving(tmp_path):
    recipe = _reward_recipe(tmp_path, "wl", f"{FIXTURES / 'rank_rewards.py'}:wrong_length_on_rank_1")
    p = _run(["-m", "apo_cli", "train", str(recipe)], 2, tmp_path)
    assert p.returncode == 1
    errors = _errors(p.stderr)
    assert errors == ["error: rank 1: reward wrong_length_on_rank_1 returned 3 values for 4 completions"], p.stderr[-3000:]
    assert [x["step"] for x in _metrics(tmp_path / "wl")] == [1, 2]
    assert sorted(c.name for c in (tmp_path / "wl" / "checkpoints").iterdir()) == ["step-2"]  # no step lost


def test_a_setup_failure_on_one_rank_is_reported_once_by_rank_0(tmp_path):
    recipe = _reward_recipe(tmp_path, "imp", f"{FIXTURES / 'rank1_import.py'}:frac_a")
    p = _run(["-m", "apo_cli", "train", str(recipe)], 2, tmp_path)
    assert p.returncode != 0
    errors = _errors(p.stderr)
    assert len(errors) == 1 and errors[0].startswith("error: rank 1: "), p.stderr[-3000:]
    assert "rank 1 lacks" in errors[0]


def test_prompts_that_do_not_split_over_the_processes_are_one_line(tmp_path):
    d = tiny_recipe(tmp_path, name="odd", rollout={"prompts_per_step": 3}, optim={"micro_batch_size": 4})
    recipe = write_recipe(tmp_path, d)
    p = _run(["-m", "apo_cli", "train", str(recipe)], 2, tmp_path)
    assert p.returncode != 0
    assert _errors(p.stderr) == ["error: rollout.prompts_per_step=3 must be a multiple of 2 (2 torchrun processes), "
                                 "so that every process trains as many whole groups; try 2 or 4"]
    assert not (tmp_path / "odd").exists()


def test_gpu_backend_with_hf_rollouts_under_torchrun(tmp_path):
    """The GPU backend's torchrun path (process group, FSDP2, the hf sampler on a sharded policy)
    run on the CPU, as the vllm-marked tests run its vLLM path."""
    driver = FIXTURES / "gpu_backend_dp_driver.py"
    p = _run([str(driver), "tiny-random", str(tmp_path), "1", "hf"], 2, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    m = _metrics(tmp_path / "hf-tp1")
    assert [x["step"] for x in m] == [1, 2, 3]
    assert all(x["time/sync"] == 0 for x in m)  # the policy samples itself: nothing to sync
    assert p.stdout.count("done: 3 steps") == 1


def test_ctrl_c_to_torchrun_finishes_the_step_and_saves_once(tmp_path):
    import signal
    import time

    d = tiny_recipe(tmp_path, name="int", run={"max_steps": 500}, checkpoint={"every": 1000})
    recipe = write_recipe(tmp_path, d)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "apo_cli", "train", str(recipe)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env={**os.environ, "APO_DEBUG": "0"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = tmp_path / "int" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C does to torchrun, which passes it on to its workers
    _, stderr = proc.communicate(timeout=120)
    lines = _errors(stderr)
    assert len(lines) == 1 and lines[0].startswith("stopped: SIGINT: stopped at step "), stderr[-3000:]
    step = int(lines[0].split("stopped at step ")[1].split(";")[0])
    assert [c.name for c in (tmp_path / "int" / "checkpoints").iterdir()] == [f"step-{step}"]
    assert len(metrics.read_text().splitlines()) == step  # every finished step logged once


def test_lora_under_torchrun_takes_the_one_process_step_and_resumes_on_any_number(tmp_path):
    """A LoRA policy sharded with FSDP2 (frozen base and adapter in the same units), with the KL
    reference being the policy with its adapter disabled; checkpoints hold the adapter only. The
    targets include the embeddings, whose LoRA tensors peft names differently."""
    runs = {}
    for name, nproc in (("l1", 1), ("l2", 2)):
        d = tiny_recipe(tmp_path, name=name, optim={"micro_batch_size": 4, "lr": 3e-2},
                        model={"lora": {"r": 4, "target_modules": ["q_proj", "v_proj", "embed_tokens"]}},
                        algorithm={"mini_batches": 2, "kl_coef": 0.05})
        recipe = write_recipe(tmp_path, d, f"{name}.yaml")
        p = _run([str(DRIVER), "train", str(recipe)], nproc, tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
        runs[name] = recipe
    adapter = lambda run: load_file(str(run / "checkpoints" / "step-4" / "adapter_model.safetensors"))  # noqa: E731
    a1, a2 = adapter(tmp_path / "l1"), adapter(tmp_path / "l2")
    assert not (tmp_path / "l2" / "checkpoints" / "step-4" / "model.safetensors").exists()
    assert any("lora_embedding_A" in k for k in a2)
    common = set(a1) & set(a2)  # a one-process save may add the frozen embedding weights
    assert {k for k in set(a1) ^ set(a2)} <= {k for k in a1 if k.endswith("base_layer.weight")}
    assert _max_diff({k: a1[k] for k in common}, {k: a2[k] for k in common}) < 1e-5
    assert max(float(t.abs().max()) for k, t in a2.items() if "lora_B" in k) > 1e-2  # the adapter was trained
    for src, nproc in (("l2", 1), ("l1", 2)):
        resumed = _resume_copy(tmp_path / src, runs[src], tmp_path / f"{src}-on-{nproc}", keep=2)
        p = _run([str(DRIVER), "train", str(resumed), "--resume"], nproc, tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
        a = adapter(tmp_path / f"{src}-on-{nproc}")
        assert _max_diff({k: a[k] for k in common}, {k: a2[k] for k in common}) < 1e-5
