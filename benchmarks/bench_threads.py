"""The thread policy under contention: a decoding loop (and a training micro-step) beside busy processes.

Each configuration runs in its own process (OpenMP reads its environment when torch loads it):

- **before**: what apo did before ``apo_cli/runtime/threads.py``: ``torch.set_num_threads(os.cpu_count())``
  and libgomp's default waiting (idle threads spin ``GOMP_SPINCOUNT`` = 300 000 turns after each
  parallel region);
- **after**: the policy: threads from the affinity mask (``torch_threads()``) and ``configure_process()``
  before torch is imported (``GOMP_SPINCOUNT=30000``, huge pages, malloc keeping freed blocks);
- **after-1t**: the policy with one thread (``backend.threads: 1``);
- **passive**: the policy's threads with ``OMP_WAIT_POLICY=PASSIVE`` instead (an idle thread sleeps at
  once), the wait policy before the short spin.

By default the first three run (``--configs before,after,after-1t,passive`` for all four).

For each ``--contend`` level N, N busy processes (``python -c "while 1: pass"``) run beside; the
configurations alternate (before, after, ..., then reversed) for ``--rounds`` rounds so that drift in
the machine's load hits all alike, and every ratio is taken within one run. The work is the CPU
backend's own decoding loop (``backends.decoding.DecodingSampler``: P prompts × G samples ×
``--tokens`` new tokens) on a Llama model built from a config (no download), then one forward +
backward of the sampled sequences (the shape of a training micro-batch).

Usage::

    python benchmarks/bench_threads.py                          # --contend 0,1 --rounds 3
    python benchmarks/bench_threads.py --contend 0,1,2 --hidden 576 --layers 30 --vocab 49152   # SmolLM2-135M's shape
    python benchmarks/bench_threads.py --rounds 1 --reps 1 --tokens 4 --hidden 64 --layers 2   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("before", "after", "after-1t", "passive")


def child(args: argparse.Namespace) -> dict:
    from apo_cli.runtime.threads import configure_process, torch_threads

    if args.config == "passive":
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # before torch loads libgomp
    if args.config != "before":
        configure_process()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from backends import SamplingParams
    from backends.decoding import DecodingSampler

    threads = {"before": os.cpu_count() or 1, "after": torch_threads(), "after-1t": 1,
               "passive": torch_threads()}[args.config]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                      num_key_value_heads=max(1, args.hidden // 192), max_position_embeddings=256,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    tok = type("Tok", (), {"pad_token_id": 0, "eos_token_id": args.vocab - 1, "decode": lambda *a, **k: ""})()
    sampler = DecodingSampler(model, tok, torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False))
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, args.vocab - 1, (args.prompt_len,), generator=gen).tolist() for _ in range(args.prompts)]
    params = SamplingParams(n=args.group, max_new_tokens=args.tokens, temperature=1.0, seed=0)
    decode, train = [], []
    for rep in range(args.reps + 1):  # the first is a warm-up
        w0 = time.perf_counter()
        groups = sampler.generate(prompts, params)
        w1 = time.perf_counter()
        seqs = [p + c.ids for p, g in zip(prompts, groups) for c in g]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])  # [B*G, L]
        logits = model(input_ids=ids, use_cache=False).logits  # [B*G, L, V]
        torch.log_softmax(logits.float(), -1).gather(-1, ids[..., None]).mean().backward()
        model.zero_grad(set_to_none=True)
        w2 = time.perf_counter()
        if rep:
            decode.append(w1 - w0)
            train.append(w2 - w1)
    return {"config": args.config, "threads": threads, "decode_s": statistics.median(decode),
            "train_s": statistics.median(train),
            "wait_policy": os.environ.get("OMP_WAIT_POLICY") or (f"GOMP_SPINCOUNT={os.environ['GOMP_SPINCOUNT']}"
                                                                 if "GOMP_SPINCOUNT" in os.environ else "libgomp default")}


def run_config(config: str, args: argparse.Namespace) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, __file__, "--child", config] + [
        f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
        ("prompts", "group", "tokens", "prompt_len", "hidden", "layers", "vocab", "reps")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{config} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(n)]


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contend", default="0,1", help="busy processes beside, a comma-separated list of levels")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per level (configurations alternate)")
    ap.add_argument("--reps", type=int, default=3, help="measured repetitions per process (after a warm-up)")
    ap.add_argument("--configs", default=",".join(CONFIGS[:3]))
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=28)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--child", choices=CONFIGS, dest="config", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.config:
        print(json.dumps(child(args)))
        return
    configs = [c for c in args.configs.split(",") if c]
    levels = [int(x) for x in args.contend.split(",")]
    print(f"decode {args.prompts} prompts x G={args.group} x {args.tokens} tokens + forward/backward; Llama "
          f"hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; {os.cpu_count()} CPUs, affinity "
          f"{len(os.sched_getaffinity(0))}; load average {os.getloadavg()[0]:.1f}", flush=True)
    table: dict[tuple[int, str], list[dict]] = {}
    for n in levels:
        procs = busy(n)
        try:
            time.sleep(0.5 if n else 0)
            for r in range(args.rounds):
                for c in (configs if r % 2 == 0 else configs[::-1]):
                    res = run_config(c, args)
                    table.setdefault((n, c), []).append(res)
                    print(f"  busy {n} round {r + 1} {c:9} ({res['threads']} threads, {res['wait_policy']}): "
                          f"decode {res['decode_s']:.3f} s, train {res['train_s']:.3f} s", flush=True)
        finally:
            stop(procs)
    print(f"\n{'busy':>4} {'config':10}{'threads':>8}{'decode s':>10}{'train s':>10}{'decode / before':>17}"
          f"{'train / before':>16}")
    for n in levels:
        base = {k: statistics.median(x[k] for x in table[(n, configs[0])]) for k in ("decode_s", "train_s")}
        for c in configs:
            d = statistics.median(x["decode_s"] for x in table[(n, c)])
            t = statistics.median(x["train_s"] for x in table[(n, c)])
            print(f"{n:>4} {c:10}{table[(n, c)][0]['threads']:>8}{d:>10.3f}{t:>10.3f}{d / base['decode_s']:>16.2f}x"
                  f"{t / base['train_s']:>15.2f}x")
    print(f"load average now {os.getloadavg()[0]:.1f} (the figures are medians over {args.rounds} rounds; "
          "ratios < 1 mean faster than before)")


if __name__ == "__main__":
    main()
