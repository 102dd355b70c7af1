"""Learning curves of the objectives on one task: APO (guarded schedule), APO (reference schedule),
ADPO, GRPO and GSPO, each for the same steps × the same seeds, everything else equal — a thin user
of ``apo compare``: this script writes the task's recipe and names the arms; `apo compare` runs them
(each an ordinary run directory, resumable) and reports.

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

Printed: `apo compare`'s report (per method, mean ± std over seeds of the final reward, steps to the
threshold through the 20-step moving average, step-to-step noise, length, time; each method's
difference from the first with a bootstrap interval; the curves). Written under ``--out-dir``: the
run directories, ``quality.png`` (curves), ``quality.json`` (everything) and ``quality.csv`` (the
table). Interrupted, the same command continues where it stopped.

Methods (``--methods``, any subset; the first is the baseline of the differences): the five above;
the z-loss forms of issue 15 in the off-policy regime where u moves (2 mini-batches per rollout; at
u = 0 alone the centred form has no gradient): "APO 2mb", "APO 2mb z ref", "APO 2mb z centred"; and
DAPO's dynamic sampling (groups without reward spread resampled): "APO dynamic", "GRPO dynamic", "GSPO dynamic".
A new method is one entry of ``METHODS``: an objective and `apo compare --set` fields.

Usage::

    APO_CACHE=/tmp/apocache python benchmarks/quality.py                  # default, tiny model
    APO_CACHE=/tmp/apocache python benchmarks/quality.py --steps 200 --seeds 0 1 2 --task frac_a
    APO_CACHE=/tmp/apocache python benchmarks/quality.py --scale          # SmolLM2-135M on arithmetic
    python benchmarks/quality.py --report runs/quality                    # re-print a saved comparison
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]

# method -> (objective, {dotted field: value} set for that arm only)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "APO guarded": ("apo", {"algorithm.alpha.kind": "guarded"}),
    "APO reward_conf": ("apo", {"algorithm.alpha.kind": "reward_confidence"}),
    "ADPO": ("adpo", {}),
    "GRPO": ("grpo", {}),
    "GSPO": ("gspo", {}),
    "APO 2mb": ("apo", {"algorithm.mini_batches": 2}),
    "APO 2mb z ref": ("apo", {"algorithm.mini_batches": 2, "algorithm.z_loss_coef": 0.01,
                              "algorithm.z_loss_form": "reference"}),
    "APO 2mb z centred": ("apo", {"algorithm.mini_batches": 2, "algorithm.z_loss_coef": 0.01,
                                  "algorithm.z_loss_form": "centred"}),
    "APO dynamic": ("apo", {"rollout.dynamic_sampling.enabled": True}),
    "GRPO dynamic": ("grpo", {"rollout.dynamic_sampling.enabled": True}),
    "GSPO dynamic": ("gspo", {"rollout.dynamic_sampling.enabled": True}),
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
# The task and the arms


def settings(args: argparse.Namespace) -> dict[str, Any]:
    if args.scale:
        return {"model": "smollm2-135m-instruct", "reward": {"name": "exact_match"}, "group": 8, "prompts": 4,
                "max_new_tokens": 16, "lr": args.lr or 2e-5, "micro": 16, "steps": args.steps or 30,
                "threshold": 0.5, "data": {"system_prompt": "Answer with the number only."},
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


def recipe(s: dict[str, Any], threads: int | None) -> dict[str, Any]:
    """The task's recipe, every arm's starting point (objective apo, guarded schedule: the defaults)."""
    backend: dict[str, Any] = {"kind": "cpu"} | ({"threads": threads} if threads else {})
    return {
        "run": {"name": "quality", "max_steps": s["steps"], "seed": 0},
        "model": {"name_or_path": s["model"]},
        "data": {"source": "builtin:arithmetic", "task_kwargs": {"level": 1, "size": 2000}, **s["data"]},
        "rewards": [s["reward"]],
        "rollout": {"group_size": s["group"], "prompts_per_step": s["prompts"], "max_new_tokens": s["max_new_tokens"]},
        "optim": {"lr": s["lr"], "micro_batch_size": min(s["micro"], s["prompts"] * s["group"])},
        "checkpoint": {"every": max(10, s["steps"] // 5), "keep_last": 1},  # resumable, at little cost
        "logging": {"dashboard": "off", "samples_per_step": 0},
        "backend": backend,
    }


def arm_name(method: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", method.strip()).lower()


def compare_args(methods: list[str], s: dict[str, Any]) -> list[str]:
    """`apo compare` options for the methods: --objectives NAME=OBJECTIVE,... and each arm's --set."""
    out = ["--objectives", ",".join(f"{arm_name(m)}={METHODS[m][0]}" for m in methods)]
    for m in methods:
        fields = dict(METHODS[m][1])
        mb = int(fields.get("algorithm.mini_batches", 1))
        if mb > 1:  # micro-batches tile a mini-batch: at most the sequences of one (2 mini-batches: half a rollout)
            fields["optim.micro_batch_size"] = min(s["micro"], s["prompts"] // mb * s["group"])
        for key, value in fields.items():
            text = "true" if value is True else "false" if value is False else str(value)
            out += ["--set", f"{arm_name(m)}:{key}={text}"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="closeness", choices=["closeness", "frac_a", "exact"])
    ap.add_argument("--scale", action="store_true", help="SmolLM2-135M-Instruct on arithmetic with exact match")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default 500; 30 with --scale)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS), metavar="METHOD",
                    help=f"subset of: {', '.join(METHODS)}")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (default: the cores / --jobs)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (apo compare --jobs)")
    ap.add_argument("--out-dir", default="runs/quality", help="the comparison's folder (runs, quality.png/json/csv)")
    ap.add_argument("--dry-run", action="store_true", help="validate the arms and show the runs (apo compare --dry-run)")
    ap.add_argument("--report", metavar="DIR", help="only print the report of a saved comparison and redraw its plot")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    s = settings(args)
    out = Path(args.report or args.out_dir)
    exports = ["--png", str(out / "quality.png"), "--json", str(out / "quality.json"), "--csv", str(out / "quality.csv")]
    common = ["--threshold", str(s["threshold"]), "--window", "20", *exports]
    if args.report:
        cmd = ["--report", str(out), *common]
    else:
        out.mkdir(parents=True, exist_ok=True)
        base = out / "quality.yaml"
        base.write_text(f"# benchmarks/quality.py: {s['task']}\n" + yaml.safe_dump(recipe(s, args.threads), sort_keys=False))
        print(f"task: {s['task']}\n{len(args.methods)} methods x seeds {args.seeds} x {s['steps']} steps; "
              f"{s['prompts']} prompts x G={s['group']}, max_new_tokens {s['max_new_tokens']}, lr {s['lr']}, "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        trust = ["--trust-code"] if ":" in s["reward"]["name"] else []  # this file's own reward functions
        cmd = [str(base), *compare_args(args.methods, s), *trust, "--seeds", ",".join(map(str, args.seeds)),
               "-o", str(out), "--jobs", str(args.jobs), *common] + (["--dry-run"] if args.dry_run else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    sys.exit(subprocess.call([sys.executable, "-m", "apo_cli", "compare", *cmd], env=env))


if __name__ == "__main__":
    main()
