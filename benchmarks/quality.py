"""Learning curves of the objectives on one task: APO (guarded schedule), APO (reference schedule),
ADPO, GRPO and GSPO, each for the same steps × the same seeds, everything else equal.

Default (a few minutes on 2 CPU cores): the ``tiny-random`` model (2-layer Llama, character-level
tokenizer, initialised from the run seed) on builtin:arithmetic level 1 (``a ± b`` with one-digit
operands) with a *dense* reward, ``closeness`` (defined below): 1 − |answer − reference| / 10 for the
first integer of the completion, clipped at 0, and 0 with no integer. The random model scores ~0.12
at the start; always answering 0 scores 0.45 and the best constant answer (4) 0.51; more than that
needs the model to read the operands (the threshold, 0.55, is above every constant answer).
``--task frac_a`` (fraction of the letter 'a') is the trivial task of the loop tests; ``--task exact``
is exact match on the same problems (hardly learnable by this model).

``--scale``: SmolLM2-135M-Instruct on the same problems with exact match, in the quickstart's shape
(4 prompts × G = 8, 16 new tokens, lr 2e-5, 30 steps; about an hour per method and seed on 2 cores).

Printed: reward (mean ± std over seeds of the 20-step moving average) at several steps, the steps
to reach a threshold (per seed, through the moving average), the step-to-step reward noise (std of
the reward around its moving average over the second half, mean over seeds) and wall time. Written:
``quality.png`` (curves, mean ± std band over seeds) and ``quality.json`` (every step's reward).

Usage::

    APO_CACHE=/tmp/apocache python benchmarks/quality.py                  # default, tiny model
    APO_CACHE=/tmp/apocache python benchmarks/quality.py --steps 200 --seeds 0 1 2 --task frac_a
    APO_CACHE=/tmp/apocache python benchmarks/quality.py --scale          # SmolLM2-135M on arithmetic
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()

METHODS: dict[str, dict[str, Any]] = {
    "APO guarded": {"objective": "apo", "alpha": {"kind": "guarded"}},
    "APO reward_conf": {"objective": "apo", "alpha": {"kind": "reward_confidence"}},
    "ADPO": {"objective": "adpo"},
    "GRPO": {"objective": "grpo"},
    "GSPO": {"objective": "gspo"},
    # the z-loss forms (issue 15), in the off-policy regime where u moves (2 mini-batches per rollout;
    # at u = 0 alone the centred form has no gradient): --methods "APO 2mb" "APO 2mb z ref" "APO 2mb z centred"
    "APO 2mb": {"objective": "apo", "alpha": {"kind": "guarded"}, "mini_batches": 2},
    "APO 2mb z ref": {"objective": "apo", "alpha": {"kind": "guarded"}, "mini_batches": 2,
                      "z_loss_coef": 0.01, "z_loss_form": "reference"},
    "APO 2mb z centred": {"objective": "apo", "alpha": {"kind": "guarded"}, "mini_batches": 2,
                          "z_loss_coef": 0.01, "z_loss_form": "centred"},
}
DEFAULT_METHODS = ["APO guarded", "APO reward_conf", "ADPO", "GRPO", "GSPO"]


# --------------------------------------------------------------------------------------------------
# Rewards (loaded by the loop as 'benchmarks/quality.py:<name>')


def closeness(completions: list[str], answer: list[Any], **_: Any) -> list[float]:
    """1 − |first integer − reference| / 10, clipped at 0; 0 when the completion has no integer."""
    out = []
    for text, ref in zip(completions, answer):
        m = re.search(r"-?\d+", text)
        out.append(0.0 if m is None else max(0.0, 1.0 - abs(int(m.group()) - int(ref)) / 10))
    return out


def frac_a(completions: list[str], **_: Any) -> list[float]:
    """Fraction of the completion's characters that are 'a'."""
    return [c.count("a") / max(len(c), 1) for c in completions]


# --------------------------------------------------------------------------------------------------
# Runs


def settings(args: argparse.Namespace) -> dict[str, Any]:
    if args.scale:
        return {"model": "smollm2-135m-instruct", "reward": {"name": "exact_match"}, "group": 8, "prompts": 4,
                "max_new_tokens": 16, "lr": 2e-5, "micro": 16, "steps": args.steps or 30, "threshold": 0.5,
                "data": {"system_prompt": "Answer with the number only."},
                "task": "builtin:arithmetic level 1, exact match (SmolLM2-135M-Instruct, chat template)"}
    reward = {"closeness": f"{HERE}:closeness", "frac_a": f"{HERE}:frac_a", "exact": "exact_match"}[args.task]
    task = {"closeness": "builtin:arithmetic level 1, reward closeness = 1 - |answer - ref|/10 "
                         "(tiny-random, plain prompts)",
            "frac_a": "fraction of 'a' in the completion (tiny-random)",
            "exact": "builtin:arithmetic level 1, exact match (tiny-random)"}[args.task]
    frac = args.task == "frac_a"
    return {"model": "tiny-random", "reward": {"name": reward}, "group": 8, "prompts": 8,
            "max_new_tokens": 8 if frac else 3, "lr": args.lr or (1e-3 if frac else 3e-3), "micro": 64,
            "steps": args.steps or 500, "threshold": {"closeness": 0.55, "frac_a": 0.9, "exact": 0.1}[args.task],
            "data": {}, "task": task}


def recipe(method: str, seed: int, s: dict[str, Any], out_dir: Path, threads: int) -> dict[str, Any]:
    return {
        "run": {"name": "quality", "output_dir": str(out_dir), "max_steps": s["steps"], "seed": seed},
        "model": {"name_or_path": s["model"]},
        "data": {"source": "builtin:arithmetic", "task_kwargs": {"level": 1, "size": 2000}, **s["data"]},
        "rewards": [s["reward"]],
        "rollout": {"group_size": s["group"], "prompts_per_step": s["prompts"],
                    "max_new_tokens": s["max_new_tokens"]},
        "algorithm": METHODS[method],
        # micro-batches tile a mini-batch: at most the sequences of one (2 mini-batches: half a rollout)
        "optim": {"lr": s["lr"], "micro_batch_size": min(s["micro"], s["prompts"] // METHODS[method].get(
            "mini_batches", 1) * s["group"])},
        "checkpoint": {"every": s["steps"] + 1, "keep_last": 1},
        "logging": {"dashboard": "off", "samples_per_step": 0},
        "backend": {"kind": "cpu", "threads": threads},
    }


def run_one(method: str, seed: int, s: dict[str, Any], threads: int) -> tuple[list[float], float]:
    from apo_cli.recipe import recipe_from_dict
    from apo_cli.train import train_from_recipe

    quiet = contextlib.redirect_stderr(io.StringIO())  # the loop's closing 'done: ...' line, per run
    with tempfile.TemporaryDirectory(prefix="apo-quality-") as tmp, contextlib.redirect_stdout(io.StringIO()), quiet:
        t0 = time.perf_counter()
        train_from_recipe(recipe_from_dict(recipe(method, seed, s, Path(tmp) / "run", threads)))
        wall = time.perf_counter() - t0
        rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [float(r["reward"]) for r in rows], wall


# --------------------------------------------------------------------------------------------------
# Statistics


def moving_average(xs: list[float], k: int = 20) -> list[float]:
    return [statistics.fmean(xs[max(0, i - k + 1) : i + 1]) for i in range(len(xs))]


def mean_std(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{statistics.fmean(xs):.3f}±{statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"


def steps_to(curve: list[float], threshold: float) -> int | None:
    return next((i + 1 for i, v in enumerate(curve) if v >= threshold), None)


def noise(rewards: list[float]) -> float:
    """Std of the reward around its 20-step moving average, over the second half of the run."""
    ma = moving_average(rewards)
    half = len(rewards) // 2
    resid = [r - m for r, m in zip(rewards[half:], ma[half:])]
    return statistics.pstdev(resid) if len(resid) > 1 else float("nan")


def report(results: dict[str, dict[int, list[float]]], walls: dict[str, list[float]], s: dict[str, Any]) -> str:
    steps = s["steps"]
    marks = sorted({m for m in (25, 50, 100, 200, 300, 500, 1000) if m < steps} | {steps})
    if steps <= 40:
        marks = sorted({m for m in (5, 10, 20, 30) if m < steps} | {steps})
    head = f"{'method':18}" + "".join(f"{f'reward@{m}':>15}" for m in marks)
    to_head = f"steps to {s['threshold']}"
    head += f"{to_head:>16}{'noise':>8}{'s/run':>8}"
    lines = [head]
    for method, by_seed in results.items():
        curves = [moving_average(r) for r in by_seed.values()]
        cells = [mean_std([c[m - 1] for c in curves]) for m in marks]
        reached = [steps_to(c, s["threshold"]) for c in curves]
        hit = [x for x in reached if x is not None]
        to = f"{statistics.fmean(hit):.0f} ({len(hit)}/{len(reached)})" if hit else f"- (0/{len(reached)})"
        nz = statistics.fmean(noise(r) for r in by_seed.values())
        wall = f"{statistics.fmean(walls[method]):.0f}" if walls.get(method) else "-"
        lines.append(f"{method:18}" + "".join(f"{c:>15}" for c in cells) + f"{to:>16}{nz:>8.3f}{wall:>8}")
    return "\n".join(lines)


def plot(results: dict[str, dict[int, list[float]]], s: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for method, by_seed in results.items():
        curves = [moving_average(r) for r in by_seed.values()]
        n = min(map(len, curves))
        mean = [statistics.fmean(c[i] for c in curves) for i in range(n)]
        std = [statistics.stdev(c[i] for c in curves) if len(curves) > 1 else 0.0 for i in range(n)]
        x = list(range(1, n + 1))
        ax.plot(x, mean, label=method)
        ax.fill_between(x, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)], alpha=0.15)
    ax.axhline(s["threshold"], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("step")
    ax.set_ylabel("reward (20-step moving average)")
    ax.set_title(f"{s['task']}\n{len(next(iter(results.values())))} seeds, mean ± std", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="closeness", choices=["closeness", "frac_a", "exact"])
    ap.add_argument("--scale", action="store_true", help="SmolLM2-135M-Instruct on arithmetic with exact match")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default 500; 30 with --scale)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS), metavar="METHOD",
                    help=f"subset of: {', '.join(METHODS)}")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out-dir", default="runs/quality", help="where quality.png and quality.json go")
    ap.add_argument("--report", metavar="JSON",
                    help="only print the table and redraw the plot of a saved quality.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    s = settings(args)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        s = {**saved["settings"], "threshold": settings(args)["threshold"]} if not args.scale else saved["settings"]
        results = {m: {int(k): v for k, v in by_seed.items()} for m, by_seed in saved["rewards"].items()}
        print(f"task: {s['task']}\n" + report(results, saved.get("walls", {}), s))
        plot(results, s, out / "quality.png")
        return
    print(f"task: {s['task']}\n{len(args.methods)} methods x seeds {args.seeds} x {s['steps']} steps; "
          f"{s['prompts']} prompts x G={s['group']}, max_new_tokens {s['max_new_tokens']}, lr {s['lr']}, "
          f"threads {args.threads}, load average {os.getloadavg()[0]:.1f}", flush=True)
    results: dict[str, dict[int, list[float]]] = {m: {} for m in args.methods}
    walls: dict[str, list[float]] = {m: [] for m in args.methods}
    t0 = time.perf_counter()
    for seed in args.seeds:  # seed-major: an interrupted run still compares every method
        for method in args.methods:
            rewards, wall = run_one(method, seed, s, args.threads)
            results[method][seed] = rewards
            walls[method].append(wall)
            ma = moving_average(rewards)
            print(f"  {method:16} seed {seed}: final reward (20-step avg) {ma[-1]:.3f}, {wall:.0f} s", flush=True)
            (out / "quality.json").write_text(json.dumps({"settings": s, "seeds": args.seeds, "rewards": results,
                                                         "walls": walls}))
    print()
    print(report(results, walls, s))
    plot(results, s, out / "quality.png")
    print(f"\nwrote {out / 'quality.png'} and {out / 'quality.json'}; total {time.perf_counter() - t0:.0f} s, "
          f"load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
