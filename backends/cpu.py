"""CPU backend: the policy samples its own rollouts with a KV-cache decoding loop, and trains with
PyTorch on the CPU.

The engine *is* the policy, so ``sync_weights`` has nothing to do. The policy's no-grad forwards
(sampling, reference and anchor passes) read a grouped-query model's keys in place
(``backends.attention``: the same bits, without transformers' per-head copies). ``generate`` is
``backends.decoding.DecodingSampler`` (a plain decoding loop with exactly the recipe's sampling and
vLLM-like engine log-probs; see that module), run under the backend's autocast; a sharded policy
(under ``torchrun``: gloo, FSDP2) is gathered once around each call, so no collective runs per token.

Nothing here imports vLLM or CUDA; the GPU backend's ``rollout: hf`` runs the same sampler on its device.
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Any

import torch

from apo_cli.runtime.fsdp import gathered, shard
from apo_cli.runtime.threads import ThreadGovernor, torch_threads, user_threads
from apo_cli.runtime.world import World, destroy_process_group, init_process_group
from backends import Completion, SamplingParams
from backends.attention import use_grouped_attention
from backends.decoding import DecodingSampler

__all__ = ["CPUBackend"]


class CPUBackend:
    """The ``backends.Backend`` Protocol on the CPU (every member implemented here)."""

    name = "cpu"
    supports_torchrun = True  # several processes: gloo, the policy sharded with FSDP2 (apo_cli/runtime/)
    device: torch.device

    def __init__(self, spec: Any):
        self.spec = spec
        self.model: Any = None
        self.tokenizer: Any = None
        self.device = torch.device("cpu")
        self.world = World.from_env()
        self._sampler: DecodingSampler | None = None  # built by setup
        # backend.threads, else OMP_NUM_THREADS, else the affinity mask's cores shared out (runtime/threads.py);
        # in that last case the training phase's count follows the cores other processes leave free
        requested = getattr(spec, "threads", None)
        torch.set_num_threads(torch_threads(requested))
        self._governor = (ThreadGovernor(torch.get_num_threads())
                          if not requested and user_threads() is None else None)
        self.autocast_dtype = torch.bfloat16 if getattr(spec, "dtype", "float32") == "bfloat16" else None

    # -- Protocol ---------------------------------------------------------------------------------

    def join(self) -> None:
        """Under torchrun: join the other processes (gloo)."""
        init_process_group(self.world, "gloo")

    def setup(self, model: Any, tokenizer: Any) -> Any:
        self.model = model.to(self.device)
        use_grouped_attention(self.model)  # no-grad forwards read grouped keys in place (backends/attention.py)
        if self.world.distributed:
            self.join()  # a no-op once joined
            self.model = shard(self.model, self.world, self.device)
        self.tokenizer = tokenizer
        self._sampler = DecodingSampler(self.model, tokenizer, self.device, self.autocast)
        return self.model

    def autocast(self):
        """Context for forward passes (generation and training) in the backend's compute dtype."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=self.autocast_dtype)

    def generate(self, prompts: list[list[int]], params: SamplingParams, *,
                 streamer: Any = None) -> list[list[Completion]]:
        """``params.n`` completions per prompt; ``streamer`` is fed when exactly one is sampled."""
        if not prompts:
            return []
        if self._sampler is None:
            raise RuntimeError("CPUBackend.generate called before setup")
        if self._governor is None:
            with gathered(self.model):  # a sharded policy: full weights once, then no collective per token
                return self._sampler.generate(prompts, params, streamer)
        # once per step: sampling at the full count (its small-batch kernels' last bits depend on the
        # thread count), then the training phase at the count the cores free now allow (its kernels'
        # do not: tests/test_threads.py)
        train_threads = self._governor.update()
        torch.set_num_threads(self._governor.ceiling)
        try:
            with gathered(self.model):
                return self._sampler.generate(prompts, params, streamer)
        finally:
            torch.set_num_threads(train_threads)

    def sync_weights(self) -> float:
        return 0.0  # the engine is the policy

    def close(self) -> None:
        self.model = None
        self._sampler = None
        if self.world.distributed:
            destroy_process_group()

    # -- beyond the Protocol ----------------------------------------------------------------------

    def threads(self) -> int:
        """torch's intra-op threads of the training phase (``perf/threads``)."""
        return torch.get_num_threads()

    def peak_flops(self) -> tuple[float, str]:
        """FLOP/s of this process's threads in the compute dtype, from a short matmul calibration
        (once per process, on its own generator: the global RNG is not drawn from)."""
        dtype = self.autocast_dtype or torch.float32
        return calibrate_matmul(torch.get_num_threads(), dtype)


@functools.lru_cache(maxsize=None)
def calibrate_matmul(threads: int, dtype: torch.dtype, n: int = 1024, budget_s: float = 0.25) -> tuple[float, str]:
    """The best of a few n×n matmuls (at least 3, for about ``budget_s``), as (FLOP/s, description)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    torch.mm(a, b)  # warm-up
    best, start, runs = 0.0, time.perf_counter(), 0
    while runs < 3 or (time.perf_counter() - start < budget_s and runs < 50):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2.0 * n**3 / max(time.perf_counter() - t0, 1e-9))
        runs += 1
    name = str(dtype).removeprefix("torch.")
    return best, f"CPU matmul calibration ({n}x{n} {name}, {threads} threads, best of {runs})"
