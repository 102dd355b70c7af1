"""What the training loop costs on top of the model work it has to do.

One apo step (``Trainer.one_step``: rollout, rewards, advantages, schedule signals, the update, the
metrics line) is timed against a hand-written step on a second copy of the same model, with the same
shape (P prompts × G completions, ``max_new_tokens``, micro-batch size):

- **raw generate**: ``model.generate(num_return_sequences=G, do_sample=True, use_cache=True)``
  on the left-padded prompts (transformers' own sampling loop, no engine log-probs);
- **raw train**: per micro-batch one padded forward of prompt + completion with ``logits_to_keep``,
  a policy-gradient loss on the completion tokens, backward; then one AdamW step.

The two run alternately (loop, raw, loop, raw, ...) after one warm-up step each, so load from other
processes hits both alike. Wall and CPU seconds (``time.process_time``: all threads of this process,
the figure that other processes' load disturbs least) are reported as medians over the measured
steps, with the loop's own split (rollout / train). Target: loop ≤ 1.2 × (raw generate + raw train).
The loop can come out *below* the raw step: its sampler prefills each prompt once for its G
completions, and its trainer runs each prompt once per micro-batch (see backends/cpu.py and
apo_cli/batching.py).

Usage::

    APO_CACHE=/tmp/apocache python benchmarks/bench_loop.py --model smollm2-135m-instruct --steps 4
    python benchmarks/bench_loop.py --model tiny-random --steps 10 --threads 1

The shape defaults are recipes/quickstart.yaml's (4 prompts × G = 8, 16 new tokens, micro-batch 16,
APO with the guarded schedule, exact match on builtin:arithmetic level 1).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

SYSTEM = "Answer with the number only."


def recipe_dict(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    chat = args.model != "tiny-random"
    return {
        "run": {"name": "bench-loop", "output_dir": str(out_dir), "max_steps": 10_000, "seed": args.seed},
        "model": {"name_or_path": args.model},
        "data": {"source": "builtin:arithmetic", "task_kwargs": {"level": 1, "size": 2000},
                 **({"system_prompt": SYSTEM} if chat else {})},
        "rewards": [{"name": "exact_match"}],
        "rollout": {"group_size": args.group, "prompts_per_step": args.prompts, "max_new_tokens": args.max_new_tokens,
                    "temperature": 1.0},
        "algorithm": {"objective": args.objective},
        "optim": {"lr": 1e-5, "micro_batch_size": args.micro},
        "checkpoint": {"every": 10_000, "keep_last": 1},
        "logging": {"dashboard": "off", "samples_per_step": 0},
        "backend": {"kind": "cpu", "threads": args.threads, "dtype": args.dtype},
    }


class RawStep:
    """The hand-written baseline: transformers generate + padded forward/backward + AdamW."""

    def __init__(self, trainer, args: argparse.Namespace):
        from apo_cli.models import load_policy

        self.args = args
        self.model, self.tok, _ = load_policy(trainer.recipe.model, seed=args.seed)
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-5)
        self.pad = self.tok.pad_token_id
        self.eos = trainer.tok.eos_token_id
        self.autocast = trainer.backend.autocast
        self.prompts = []  # token ids of the trainer's own rendered prompts, cycled
        add_special = not bool(getattr(self.tok, "chat_template", None))
        for ex in trainer.examples[: 64]:
            self.prompts.append(self.tok(trainer.render(ex), add_special_tokens=add_special).input_ids)
        self.k = 0

    def _batch(self) -> list[list[int]]:
        out = [self.prompts[(self.k + i) % len(self.prompts)] for i in range(self.args.prompts)]
        self.k += self.args.prompts
        return out

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        self.model.eval()
        with self.autocast():
            seq = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=None,
                                      top_p=None, max_new_tokens=self.args.max_new_tokens, use_cache=True,
                                      num_return_sequences=self.args.group, pad_token_id=self.pad,
                                      eos_token_id=self.eos)
        self.model.train()
        comps = []
        for row in seq[:, width:].tolist():
            n = row.index(self.eos) + 1 if self.eos in row else len(row)
            comps.append(row[:n])
        return [p for p in prompts for _ in range(self.args.group)], comps

    def train(self, prompts: list[list[int]], comps: list[list[int]]) -> None:
        total = max(1, sum(map(len, comps)))
        adv = torch.randn(len(comps))
        self.opt.zero_grad(set_to_none=True)
        for s in range(0, len(comps), self.args.micro):
            ps, cs = prompts[s : s + self.args.micro], comps[s : s + self.args.micro]
            p_max, t_max = max(map(len, ps)), max(1, max(map(len, cs)))
            ids = torch.full((len(ps), p_max + t_max), self.pad, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for i, (p, c) in enumerate(zip(ps, cs)):
                ids[i, p_max - len(p) : p_max + len(c)] = torch.tensor(p + c)
                attn[i, p_max - len(p) : p_max + len(c)] = 1
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            with self.autocast():
                logits = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=t_max + 1,
                                    use_cache=False).logits[:, :-1].float()  # [m, T, V]
            logp = torch.log_softmax(logits, -1).gather(-1, ids[:, p_max:, None]).squeeze(-1)  # [m, T]
            loss = -(adv[s : s + len(ps), None] * logp * attn[:, p_max:]).sum() / total
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()

    def step(self) -> tuple[float, float, float, float, int]:
        """(wall, cpu, generate wall, train wall, completion tokens)"""
        w0, c0 = time.perf_counter(), time.process_time()
        prompts, comps = self.generate(self._batch())
        w1 = time.perf_counter()
        self.train(prompts, comps)
        w2 = time.perf_counter()
        return w2 - w0, time.process_time() - c0, w1 - w0, w2 - w1, sum(map(len, comps))


def loop_step(trainer) -> tuple[float, float, float, float, int]:
    """(wall, cpu, rollout wall, train wall, completion tokens) of one apo step"""
    w0, c0 = time.perf_counter(), time.process_time()
    record, _ = trainer.one_step()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    tokens = round(record["completions/mean_length"] * trainer.G * trainer.recipe.rollout.prompts_per_step)
    return wall, cpu, record["time/rollout"], record["time/train"], tokens


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny-random", help="tiny-random or smollm2-135m-instruct (or any model id)")
    ap.add_argument("--steps", type=int, default=4, help="measured steps of each (after one warm-up step each)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="backend autocast dtype")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--objective", default="apo")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from apo_cli.recipe import recipe_from_dict
    from apo_cli.train import Trainer

    with tempfile.TemporaryDirectory(prefix="apo-bench-loop-") as tmp:
        trainer = Trainer(recipe_from_dict(recipe_dict(args, Path(tmp) / "run")))
        trainer.run_dir.mkdir(parents=True, exist_ok=True)
        raw = RawStep(trainer, args)
        torch.set_num_threads(args.threads)
        print(f"model {args.model}, {args.prompts} prompts x G={args.group}, max_new_tokens {args.max_new_tokens}, "
              f"micro-batch {args.micro}, objective {args.objective}, dtype {args.dtype}, threads {args.threads}, "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
        loop_step(trainer), raw.step()  # warm-up
        loops, raws = [], []
        for i in range(args.steps):
            loops.append(loop_step(trainer))
            raws.append(raw.step())
            print(f"  step {i + 1}: loop {loops[-1][0]:.2f} s (cpu {loops[-1][1]:.2f})  raw {raws[-1][0]:.2f} s "
                  f"(cpu {raws[-1][1]:.2f})", flush=True)
    lw, lc = med([x[0] for x in loops]), med([x[1] for x in loops])
    rw, rc = med([x[0] for x in raws]), med([x[1] for x in raws])
    print(f"\n{'':22}{'wall s/step':>12}{'cpu s/step':>12}{'tokens/step':>12}{'split (wall)':>32}")
    print(f"{'apo loop':22}{lw:12.3f}{lc:12.3f}{med([x[4] for x in loops]):12.0f}"
          f"{f'rollout {med([x[2] for x in loops]):.2f} + train {med([x[3] for x in loops]):.2f}':>32}")
    print(f"{'raw generate + train':22}{rw:12.3f}{rc:12.3f}{med([x[4] for x in raws]):12.0f}"
          f"{f'generate {med([x[2] for x in raws]):.2f} + train {med([x[3] for x in raws]):.2f}':>32}")
    print(f"loop / raw: wall {lw / rw:.2f}x, cpu {lc / rc:.2f}x (target <= 1.20); "
          f"load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
