"""The CPU backend's grouped attention against transformers' ``sdpa`` in rollouts of prompts of several lengths.

With prompts of several lengths the sampler passes a padding mask, and transformers' ``sdpa`` then
copies a grouped-query model's keys and values once per query head (``repeat_kv``) in every layer
of every decoding step; apo's CPU backend reads them in place (``backends/attention.py``). This
samples ``--prompts`` prompts of different lengths × ``--group`` completions of ``--max-new-tokens``
tokens, alternating the two attentions ``--rounds`` times each in one process, and prints the
median wall and CPU seconds of each and whether the completions and their log-probs are the same
bit for bit. (Prompts of one length need no mask; then the two are the same code.)

Usage::

    APO_CACHE=/tmp/apocache python benchmarks/bench_attention.py --model smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apo_cli.runtime.threads import configure_process  # noqa: E402  (before torch, as the apo command)

configure_process()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args()

    import torch

    from apo_cli.models import load_model, load_tokenizer, quiet_transformers, resolve_model_path
    from apo_cli.recipe import CPUBackendSpec
    from backends import SamplingParams
    from backends.attention import NAME
    from backends.cpu import CPUBackend

    quiet_transformers()
    path = resolve_model_path(args.model, 0)
    model, tok = load_model(path, dtype="float32"), load_tokenizer(path)
    backend = CPUBackend(CPUBackendSpec(threads=args.threads))
    backend.setup(model, tok)
    if model.config._attn_implementation != NAME:
        raise SystemExit(f"{args.model}: the CPU backend left its attention as {model.config._attn_implementation!r}")
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    gen = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().weight.shape[0]
    prompts = [torch.randint(3, vocab, (20 + 8 * i,), generator=gen).tolist() for i in range(args.prompts)]

    def rollout(kind: str, seed: int) -> tuple[float, float, list]:
        model.set_attn_implementation(NAME if kind == "grouped" else "sdpa")
        params = SamplingParams(n=args.group, max_new_tokens=args.max_new_tokens, seed=seed)
        w, c = time.perf_counter(), time.process_time()
        out = backend.generate(prompts, params)
        return time.perf_counter() - w, time.process_time() - c, [(x.ids, x.logprobs) for g in out for x in g]

    rollout("sdpa", 0)  # warm-up
    wall: dict[str, list[float]] = {"sdpa": [], "grouped": []}
    cpu: dict[str, list[float]] = {"sdpa": [], "grouped": []}
    same = True
    for r in range(args.rounds):
        outs = {}
        for kind in (("sdpa", "grouped") if r % 2 == 0 else ("grouped", "sdpa")):
            w, c, outs[kind] = rollout(kind, seed=r)
            wall[kind].append(w)
            cpu[kind].append(c)
        same = same and outs["sdpa"] == outs["grouped"]
    print(f"{args.model} ({model.config.num_attention_heads} query heads, {groups} per key/value head): "
          f"{args.prompts} prompts of {', '.join(str(len(p)) for p in prompts)} tokens x {args.group}, "
          f"{args.max_new_tokens} new tokens, {args.threads} threads, {args.rounds} rounds each, alternating")
    for kind, label in (("sdpa", "transformers' sdpa (repeat_kv)"), ("grouped", "grouped, in place (apo)")):
        print(f"  {label:32s} {statistics.median(wall[kind]):.3f} s wall, {statistics.median(cpu[kind]):.3f} s CPU "
              f"(medians; wall {', '.join(f'{x:.2f}' for x in wall[kind])})")
    s, g = statistics.median(wall["sdpa"]), statistics.median(wall["grouped"])
    print(f"  {100 * (s - g) / s:.1f} % less wall time; completions and log-probs equal bit for bit: {same}")


if __name__ == "__main__":
    main()
