"""A vLLM engine colocated with the policy, in the trainer's own process.

Colocated means: same process, same GPU(s). vLLM runs with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``
(and, under ``torchrun``, the ``external_launcher`` executor: one engine shard per rank), so the
engine's model is a Python object next to the policy and a weight sync is a tensor copy on the
device, not a trip through a socket.

One step, seen from the engine:

- ``generate``: wake (weights and KV cache), sample ``n = G`` completions per prompt with the
  engine's log-prob of each sampled token (``logprobs=0``, raw log-probs: before temperature and
  top-p/top-k, the same quantity the trainer computes), then ``sleep(level=1)`` so training gets
  the memory back (weights offloaded to CPU, KV cache freed; skipped where sleep mode is not
  available, e.g. vLLM on CPU).
- ``load_weights``: wake the weights only, load the policy's full weights in place (the worker's
  ``reload_weights`` where this vLLM has it, else the model's ``load_weights``), reset the prefix
  cache: cached prefixes were computed with the old weights.
- ``load_adapter``: a LoRA policy syncs its adapter only: saved to a temp folder, sent with the
  next requests under a new integer id (vLLM caches adapters by id, so a new id means a reload).

Sampling is seeded through the torch RNG of this process (``torch.manual_seed(seed)`` before each
rollout, as the CPU backend does), not with per-request seeds, which vLLM applies with a Python loop
over requests at every decoding step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from apo_cli.errors import BackendError
from backends import Completion, SamplingParams

_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted max_lora_rank values


def engine_kwargs(spec: Any, *, model_path: str, tokenizer_path: str, dtype: str, lora_rank: int | None,
                  sleep_mode: bool, world_size: int, seed: int = 0) -> dict[str, Any]:
    """The ``vllm.LLM`` arguments for a GPU backend spec (kept separate so it can be tested)."""
    kw: dict[str, Any] = dict(
        model=model_path,
        tokenizer=tokenizer_path,
        dtype=dtype,
        gpu_memory_utilization=spec.gpu_memory_utilization,
        tensor_parallel_size=spec.tensor_parallel_size,
        enable_sleep_mode=sleep_mode,
        max_model_len=spec.max_model_len,
        enforce_eager=spec.enforce_eager,
        enable_prefix_caching=True,
        seed=seed,
        logprobs_mode="raw_logprobs",  # log-probs of the model's own distribution (temperature 1)
    )
    if world_size > 1:
        # one engine shard per torchrun rank, in that rank's process (colocated tensor parallelism)
        kw["distributed_executor_backend"] = "external_launcher"
    if lora_rank is not None:
        rank = next((r for r in _LORA_RANKS if r >= lora_rank), None)
        if rank is None:
            raise BackendError(f"LoRA rank {lora_rank} is above vLLM's largest ({_LORA_RANKS[-1]})")
        kw.update(enable_lora=True, max_lora_rank=rank, max_loras=1)
    return kw


class VLLMEngine:
    """The rollout engine of the GPU backend. ``llm`` is the ``vllm.LLM``; everything else is state."""

    def __init__(self, kwargs: dict[str, Any]):
        # in-place weight sync needs the engine in this process (see the module docstring); vLLM
        # reads its environment when the engine is built, so this must come first
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM
        from vllm.engine.arg_utils import EngineArgs

        known = {f.name for f in dataclasses.fields(EngineArgs)}
        dropped = sorted(k for k in kwargs if k not in known)
        kwargs = {k: v for k, v in kwargs.items() if k in known}
        if dropped:  # cannot happen inside the supported window; say so rather than fail outside it
            warnings.warn(f"this vLLM does not take {', '.join(dropped)}; starting without", stacklevel=2)
        try:
            with _rng_preserved():  # vLLM seeds random/numpy/torch globally; the trainer owns those
                self.llm = LLM(**kwargs)
        except (ValueError, RuntimeError) as e:  # out of memory, bad max_model_len, unsupported model...
            raise BackendError(f"vLLM could not start: {_one_line(e)}",
                               hint="see backend.gpu_memory_utilization and backend.max_model_len") from e
        self.dropped_args = dropped
        self.sleep_enabled = bool(kwargs.get("enable_sleep_mode"))
        self.sleeping: set[str] = set()  # what sleep(level=1) released and wake has not restored yet
        self.lora_enabled = bool(kwargs.get("enable_lora"))
        self.lora_request: Any = None
        self._lora_id = 0
        self._lora_dirs: list[Path] = []
        self._lora_root: Path | None = None
        self._has_reload = all(self.llm.collective_rpc(_has_reload_weights))

    # -- rollout ----------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams, eos: list[int]) -> list[list[Completion]]:
        from vllm.inputs import TokensPrompt

        self.wake()
        if params.seed is not None:
            torch.manual_seed(params.seed)
        copies = params.n if params.greedy else 1  # vLLM refuses n > 1 when greedy: sample once, repeat
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
            sampling_params(dataclasses.replace(params, n=1) if copies > 1 else params, eos),
            use_tqdm=False,
            lora_request=self.lora_request,
        )
        groups = [[_completion(o) for o in sorted(r.outputs, key=lambda o: o.index)] for r in outputs]
        if copies > 1:
            groups = [[dataclasses.replace(g[0], ids=list(g[0].ids), logprobs=list(g[0].logprobs or []) or None)
                       for _ in range(copies)] for g in groups]
        return groups

    def sleep(self) -> None:
        if self.sleep_enabled and not self.sleeping:
            self.llm.sleep(level=1)  # weights to CPU memory, KV cache freed (and the prefix cache with it)
            self.sleeping = {"weights", "kv_cache"}

    def wake(self, tags: list[str] | None = None) -> None:
        """Restore ``tags`` (default: everything still asleep), naming each one once: some vLLM
        versions re-map memory that is already awake when asked for everything."""
        todo = sorted(self.sleeping if tags is None else self.sleeping & set(tags))
        if todo:
            self.llm.wake_up(todo)
            self.sleeping -= set(todo)

    # -- weight sync ------------------------------------------------------------------------------

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load full weights (Hugging Face names) in place; the engine keeps running."""
        self.wake(["weights"])  # the KV cache can stay freed until the next rollout
        if self._has_reload:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named_tensors})
        else:
            self.llm.apply_model(lambda model: model.load_weights(named_tensors))
        self.llm.reset_prefix_cache()

    def load_adapter(self, save_adapter) -> None:
        """Save the policy's LoRA adapter (``save_adapter(folder)``) and use it from the next rollout."""
        from vllm.lora.request import LoRARequest

        if self._lora_root is None:
            base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
            self._lora_root = Path(tempfile.mkdtemp(prefix="apo-lora-", dir=base))
        self._lora_id += 1
        folder = self._lora_root / f"v{self._lora_id}"
        save_adapter(folder)
        old = self.lora_request
        self.lora_request = LoRARequest(f"policy-v{self._lora_id}", self._lora_id, str(folder))
        if old is not None:
            try:
                self.llm.llm_engine.remove_lora(old.lora_int_id)
            except Exception:  # not loaded yet, or this vLLM has no remove_lora: the LRU cache evicts it
                pass
        self._lora_dirs.append(folder)
        while len(self._lora_dirs) > 2:  # the current adapter is read lazily by the next rollout: keep it
            shutil.rmtree(self._lora_dirs.pop(0), ignore_errors=True)
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        if self._lora_root is not None:
            shutil.rmtree(self._lora_root, ignore_errors=True)
            self._lora_root = None
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # best effort: the process may be exiting anyway
            pass
        del llm
        try:  # vLLM's process groups and cached memory, so that another engine can start in this process
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        except Exception:
            pass


@contextlib.contextmanager
def _rng_preserved():
    """Restore the Python, NumPy and torch (CPU and CUDA) random states after the block."""
    import random

    py = random.getstate()
    try:
        import numpy as np

        npy = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy comes with vLLM
        np, npy = None, None
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        if np is not None:
            np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _one_line(e: BaseException, limit: int = 300) -> str:
    """The useful line of an engine error (for pydantic's, the first problem's message)."""
    errors = getattr(e, "errors", None)
    if callable(errors):
        try:
            text = str(errors()[0]["msg"]).removeprefix("Value error, ")
        except Exception:
            text = str(e)
    else:
        text = str(e)
    line = (text.strip().splitlines() or [type(e).__name__])[0]
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _has_reload_weights(worker: Any) -> bool:
    return hasattr(worker, "reload_weights")


def sampling_params(params: SamplingParams, eos: list[int]):
    """vLLM sampling parameters for one rollout (the same for every prompt)."""
    from vllm import SamplingParams as VLLMSamplingParams

    greedy = params.greedy
    return VLLMSamplingParams(
        n=params.n,
        max_tokens=params.max_new_tokens,
        temperature=0.0 if greedy else params.temperature,
        top_p=1.0 if greedy else params.top_p,
        top_k=-1 if greedy or params.top_k <= 0 else params.top_k,  # -1: off, in every vLLM version
        stop=list(params.stop) or None,
        stop_token_ids=list(eos),
        include_stop_str_in_output=True,
        logprobs=0,  # the sampled token's log-prob only
        detokenize=bool(params.stop),  # text is needed only to find stop strings
        # stop strings are searched in the text with special tokens, as the CPU backend does
        skip_special_tokens=False,
        spaces_between_special_tokens=False,
    )


def _completion(out: Any) -> Completion:
    if out.finish_reason not in ("stop", "length"):
        raise BackendError(f"vLLM ended a completion with finish_reason={out.finish_reason!r}")
    ids = list(out.token_ids)
    logprobs = None
    if out.logprobs is not None:
        logprobs = [float(step[tok].logprob) for tok, step in zip(ids, out.logprobs)]
    return Completion(ids=ids, finish_reason="length" if out.finish_reason == "length" else "stop", logprobs=logprobs)
