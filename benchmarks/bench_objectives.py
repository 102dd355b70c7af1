"""How much an update costs in the algorithm core, next to the model it trains.

Times, on one rollout of the reference shape (48 prompts × G = 6 completions × 1280 tokens):

- each registered objective, forward + backward from token log-probs [288, 1280] (float32), with its
  metrics, plus the per-rollout work (advantages, signals, the alpha schedule, adaptive tau);
- forward + backward of a tiny Llama (hidden 256, 4 layers, vocab 1024) producing those log-probs.
  The model is run on ``--model-seqs`` sequences of the full 1280 tokens and scaled linearly to 288
  sequences (cost is linear in the number of sequences at fixed length), to keep the run short.

Prints the figures and the ratio objective / model (target: at most 1%). Usage::

    python benchmarks/bench_objectives.py [--device cpu|cuda] [--model-seqs 4] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from apo_cli.algo import (
    OBJECTIVES,
    LossBatch,
    LossContext,
    TauSchedule,
    compute_advantages,
    compute_signals,
    make_alpha_schedule,
    resolved,
    sequence_logprob,
)
from apo_cli.recipe import AdaptiveTauSpec, AlgorithmSpec, AlphaScheduleSpec

PROMPTS, G, T, VOCAB = 48, 6, 1280, 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn()`` in seconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rollout(device: torch.device):
    gen = torch.Generator().manual_seed(0)
    n = PROMPTS * G
    lengths = torch.randint(64, T + 1, (n,), generator=gen)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()  # [N, T]
    logp_old = -4.0 * torch.rand(n, T, generator=gen)  # [N, T]
    logp = (logp_old + 0.01 * torch.randn(n, T, generator=gen)).clamp(max=0)
    rewards = (torch.rand(n, generator=gen) > 0.5).float()  # [N]
    ids = torch.arange(PROMPTS).repeat_interleave(G)
    return [x.to(device) for x in (logp, logp_old, mask, rewards, ids)]


def bench_objectives(device: torch.device, repeats: int) -> dict[str, float]:
    logp0, logp_old, mask, rewards, ids = _rollout(device)
    out = {}
    for name in sorted(OBJECTIVES):
        spec = AlgorithmSpec(objective=name)
        alpha_spec, tau_spec = AlphaScheduleSpec(kind="guarded"), AdaptiveTauSpec(enabled=True)
        schedule = make_alpha_schedule(alpha_spec, max_steps=100)
        tau_schedule = TauSchedule(spec.tau, tau_spec)
        step = [0]

        def one_update() -> None:
            adv, _ = compute_advantages(rewards, ids, resolved(spec, "advantage_std"))
            seq_mean = sequence_logprob(logp_old, mask, "mean")
            sig = compute_signals(step[0], rewards, adv, ids, seq_mean, VOCAB, correct=rewards > 0.5)
            step[0] += 1
            alpha, tau = schedule.step(sig), tau_schedule.step(sig)
            logp = logp0.detach().requires_grad_(True)
            batch = LossBatch(logp, logp_old, mask, adv, ids, logp_ref=logp_old)
            ctx = LossContext(alpha, tau, PROMPTS, PROMPTS * G, float(mask.sum()), T)
            loss, _ = OBJECTIVES[name].fn(batch, spec, ctx)
            loss.backward()

        out[name] = _timed(one_update, device, repeats)
    return out


def bench_model(device: torch.device, seqs: int, repeats: int) -> float:
    """Forward + backward of the tiny Llama on ``seqs`` × T tokens, log-probs of the taken tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=T + 1)
    model = LlamaForCausalLM(cfg).to(device)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (seqs, T + 1), generator=gen).to(device)  # [S, T+1]

    def fwd_bwd() -> None:
        logits = model(tokens[:, :-1]).logits  # [S, T, V]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)  # [S, T]
        logp.mean().backward()
        model.zero_grad(set_to_none=True)

    return _timed(fwd_bwd, device, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model-seqs", type=int, default=4, help="sequences of 1280 tokens run through the model")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads for both measurements (on a shared machine, 1 avoids oversubscription)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"rollout: {PROMPTS} prompts x {G} completions x {T} tokens = {PROMPTS * G * T:,} token log-probs")

    objective = bench_objectives(device, args.repeats)
    model_part = bench_model(device, args.model_seqs, max(1, args.repeats // 2))
    scale = PROMPTS * G / args.model_seqs
    model_full = model_part * scale
    print(f"tiny Llama fwd+bwd: {model_part * 1e3:9.1f} ms on {args.model_seqs} x {T} tokens"
          f" -> {model_full:8.2f} s scaled x{scale:g} to {PROMPTS * G} sequences")
    print(f"{'objective':>10} {'loss+schedule ms':>17} {'ratio to model':>15}")
    for name, sec in objective.items():
        print(f"{name:>10} {sec * 1e3:17.2f} {sec / model_full:14.4%}")
    worst = max(objective.values()) / model_full
    print(f"worst ratio {worst:.4%} (target <= 1%): {'OK' if worst <= 0.01 else 'OVER'}")


if __name__ == "__main__":
    main()
