"""The GPU backend: what runs anywhere (on CPU), and the CUDA-only parts (marked ``gpu``).

On CPU the backend is built with the private ``_device="cpu"``: the ``rollout: hf`` path, the
autocast rule, the vLLM engine arguments and the FSDP2 helpers (two gloo processes) are checked
without a GPU. The ``gpu``-marked tests need CUDA and are deselected by default::

    python -m pytest -m gpu tests/test_gpu_backend.py

(benchmarks/gpu_check.sh runs them, then a short training run, on a GPU machine).
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch

from apo_cli.errors import BackendError
from apo_cli.recipe import GPUBackendSpec, LoraSpec
from backends import SamplingParams
from backends._optional import is_cuda_available, is_vllm_available, vllm_problem

needs_cuda = pytest.mark.skipif(not is_cuda_available(), reason="needs a CUDA device")


def tiny_policy(dtype: str = "float32"):
    from apo_cli.models import ensure_tiny, load_model, load_tokenizer

    path = str(ensure_tiny())
    return load_model(path, dtype=dtype), load_tokenizer(path)


def hf_backend(device: str | None = "cpu", **fields):
    from backends.gpu import GPUBackend

    return GPUBackend(GPUBackendSpec(rollout="hf", **fields), _device=device)


# -- anywhere -------------------------------------------------------------------------------------


def test_hf_rollout_is_the_cpu_backend_generate():
    """rollout: hf shares the CPU backend's generation code: same seed, same completions."""
    from backends.cpu import CPUBackend

    params = SamplingParams(n=3, max_new_tokens=10, seed=7, stop=("a",))
    gpu = hf_backend()
    model, tok = tiny_policy("bfloat16")  # bf16 weights: no autocast on either side
    gpu.setup(model, tok)
    prompts = [tok("12+3=").input_ids, tok("hello").input_ids]
    got = gpu.generate(prompts, params)
    cpu = CPUBackend(type("S", (), {"threads": torch.get_num_threads(), "dtype": "float32"})())
    cpu.setup(model, tok)
    want = cpu.generate(prompts, params)
    assert [[(c.ids, c.finish_reason, c.logprobs) for c in g] for g in got] == \
           [[(c.ids, c.finish_reason, c.logprobs) for c in g] for g in want]
    assert gpu.sync_weights() == 0.0  # the engine is the policy
    gpu.close()


def test_autocast_is_bf16_only_for_fp32_weights():
    backend = hf_backend()
    model, tok = tiny_policy("float32")
    backend.setup(model, tok)
    with backend.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    backend = hf_backend()
    model, tok = tiny_policy("bfloat16")
    backend.setup(model, tok)
    with backend.autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_engine_arguments_follow_the_spec():
    from backends.gpu.vllm_engine import engine_kwargs

    spec = GPUBackendSpec(gpu_memory_utilization=0.5, tensor_parallel_size=2, sleep_mode=True,
                          max_model_len=4096, enforce_eager=True)
    kw = engine_kwargs(spec, model_path="/m", tokenizer_path="/t", dtype="bfloat16", lora_rank=None,
                       sleep_mode=True, world_size=2)
    assert kw["model"] == "/m" and kw["tokenizer"] == "/t" and kw["dtype"] == "bfloat16"
    assert (kw["gpu_memory_utilization"], kw["tensor_parallel_size"], kw["max_model_len"]) == (0.5, 2, 4096)
    assert kw["enable_sleep_mode"] and kw["enforce_eager"] and kw["enable_prefix_caching"]
    assert kw["distributed_executor_backend"] == "external_launcher"  # torchrun: one shard per rank
    assert kw["logprobs_mode"] == "raw_logprobs"
    assert "enable_lora" not in kw
    kw = engine_kwargs(GPUBackendSpec(), model_path="/m", tokenizer_path="/m", dtype="bfloat16", lora_rank=12,
                       sleep_mode=False, world_size=1)
    assert kw["enable_lora"] and kw["max_lora_rank"] == 16 and "distributed_executor_backend" not in kw
    assert not kw["enable_sleep_mode"]
    with pytest.raises(BackendError, match="LoRA rank"):
        engine_kwargs(GPUBackendSpec(), model_path="/m", tokenizer_path="/m", dtype="bfloat16", lora_rank=1024,
                      sleep_mode=False, world_size=1)


def test_engine_model_path_of_a_lora_policy_is_its_base():
    from apo_cli.models import apply_lora, ensure_tiny
    from backends.gpu import _lora_rank, _model_path

    model, _ = tiny_policy()
    assert _model_path(model) == str(ensure_tiny()) and _lora_rank(model) is None
    lora = apply_lora(model, LoraSpec(r=4, alpha=8))
    assert _model_path(lora) == str(ensure_tiny()) and _lora_rank(lora) == 4


def test_tensor_parallel_without_torchrun_is_a_one_line_error(monkeypatch):
    import backends.gpu as gpu

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(gpu, "cuda_problem", lambda: None)  # the check comes before any CUDA call
    with pytest.raises(BackendError) as e:
        gpu.GPUBackend(GPUBackendSpec(rollout="hf", tensor_parallel_size=2))
    assert "torchrun --nproc-per-node=2" in str(e.value) and "\n" not in str(e.value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from apo_cli.models import build_char_tokenizer, tiny_config
    from apo_cli.runtime.world import World, init_process_group
    from apo_cli.runtime.fsdp import full_named_tensors, shard

    w = World.from_env()
    device = torch.device("cpu")
    init_process_group(w, "gloo")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(len(build_char_tokenizer())))
    full = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    shard(model, w, device)
    local = sum(p.to_local().numel() for p in model.parameters())
    with torch.no_grad():
        got = model(input_ids=ids).logits
    gathered = dict(full_named_tensors(model))
    ok = gathered.keys() == full.keys() and all(torch.equal(gathered[k], full[k]) for k in full)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"same_weights": ok, "same_logits": bool(torch.allclose(got, want, atol=1e-5)),
                       "local": local, "total": sum(p.numel() for p in full.values())}, f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_shard_and_gather_on_two_cpu_processes(tmp_path):
    """The multi-GPU pieces (FSDP2 sharding, full-tensor gather for the sync) on gloo/CPU."""
    import torch.multiprocessing as mp

    out = tmp_path / "fsdp.json"
    mp.start_processes(_fsdp_worker, args=(2, _free_port(), str(out)), nprocs=2, start_method="spawn")
    r = json.loads(out.read_text())
    assert r["same_weights"] and r["same_logits"]
    assert r["local"] < r["total"]  # rank 0 holds a shard, not the whole model


# -- CUDA only ------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_hf_rollout_on_cuda():
    backend = hf_backend(device=None)
    model, tok = tiny_policy("bfloat16")
    model = backend.setup(model, tok)
    assert next(model.parameters()).device.type == "cuda" and backend.device.type == "cuda"
    prompts = [tok("12+3=").input_ids, tok("hello").input_ids]
    out = backend.generate(prompts, SamplingParams(n=4, max_new_tokens=12, seed=3))
    assert len(out) == 2 and all(len(g) == 4 for g in out)
    for prompt, group in zip(prompts, out):
        for c in group:
            assert c.finish_reason in ("stop", "length") and len(c.logprobs) == len(c.ids)
            ids = torch.tensor([prompt + c.ids], device=backend.device)
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt):, None]).squeeze(-1).cpu()
            assert float((lp - torch.tensor(c.logprobs)).abs().max()) < 0.1  # bf16, cache vs no cache
    backend.close()


@pytest.mark.gpu
@needs_cuda
def test_autocast_on_cuda_gives_bf16_for_fp32_weights():
    backend = hf_backend(device=None)
    model, tok = tiny_policy("float32")
    model = backend.setup(model, tok)
    with backend.autocast():
        logits = model(input_ids=torch.tensor([[5, 6, 7]], device=backend.device)).logits
    assert logits.dtype == torch.bfloat16
    backend.close()


@pytest.mark.gpu
@needs_cuda
def test_training_loop_on_cuda_with_hf_rollouts(tmp_path):
    from apo_cli.recipe import recipe_from_dict
    from apo_cli.train import train_from_recipe
    from tests.helpers import tiny_recipe

    d = tiny_recipe(tmp_path)
    d["run"]["max_steps"] = 2
    d["backend"] = {"kind": "gpu", "rollout": "hf"}
    train_from_recipe(recipe_from_dict(d))
    rows = [json.loads(x) for x in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["time/sync"] == 0 for r in rows)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(not is_vllm_available(), reason=f"{vllm_problem()}")
def test_vllm_sleep_mode_gives_memory_back(tmp_path):
    """After a rollout the engine sleeps: its KV cache is freed and its weights are in CPU memory."""
    from apo_cli.models import build_char_tokenizer, load_tokenizer, tiny_config
    from backends.gpu import GPUBackend
    from transformers import AutoModelForCausalLM

    tok = build_char_tokenizer()
    cfg = tiny_config(len(tok), hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    backend = GPUBackend(GPUBackendSpec(rollout="vllm", gpu_memory_utilization=0.3, sleep_mode=True,
                                        max_model_len=256, enforce_eager=True))
    model = backend.setup(AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16),
                          load_tokenizer(str(tmp_path)))
    assert backend.engine.sleep_enabled
    free_awake = torch.cuda.mem_get_info()[0]
    backend.generate([tok("12+3=").input_ids], SamplingParams(n=2, max_new_tokens=8, seed=0))
    assert backend.engine.sleeping == {"weights", "kv_cache"}
    torch.cuda.empty_cache()
    free_asleep = torch.cuda.mem_get_info()[0]
    assert free_asleep - free_awake > 0.1 * torch.cuda.get_device_properties(0).total_memory
    backend.sync_weights()  # wakes the weights only
    assert backend.engine.sleeping == {"kv_cache"}
    out = backend.generate([tok("12+3=").input_ids], SamplingParams(n=2, max_new_tokens=8, seed=0))
    assert len(out[0]) == 2
    del model
    backend.close()
