"""apo against TRL's GRPOTrainer: the same GRPO step on the CPU, timed side by side.

Both sides train the same model from the same weights on the same prompts, in the same order, with
the same objective and sampling:

- data: builtin:arithmetic level 1 (apo's ``load_examples``), in apo's seeded order; TRL gets them as a
  ``datasets.Dataset`` with ``shuffle_dataset=False``. A chat model gets [system, user] messages on
  both sides (TRL applies the chat template itself; apo renders the same messages); a model without
  a chat template gets the same plain text on both sides. The script checks that both tokenize the
  first prompt to the same ids.
- step: P prompts × G completions sampled at temperature 1 (no top-k/top-p), ``max_new_tokens`` =
  ``max_completion_length``; one optimizer step per rollout: apo ``micro_batch_size`` M = TRL
  ``per_device_train_batch_size``, TRL ``gradient_accumulation_steps`` = P·G/M (= its
  ``steps_per_generation``, so TRL generates all P·G completions at once and needs no old-log-prob
  pass, like apo).
- objective: GRPO, token-level clipped ratio with eps 0.2/0.2, group-std-normalised advantages
  with the same epsilon added to the std (TRL's fixed 1e-4: apo ``advantage_eps: 1.0e-4``, whose
  default is verl's 1e-6), dropout disabled on both sides (apo's default; TRL ``disable_dropout``),
  loss normalised by the tokens of the whole optimizer step (apo ``loss_aggregation: token_mean`` =
  TRL ``loss_type: "dapo"``), no KL (``beta=0`` / ``kl_coef: 0``), one iteration per rollout.
- optimizer: AdamW, the same lr, betas (0.9, 0.999), no weight decay, constant schedule, no
  warm-up, gradient clip 1.0. Each side keeps its own default AdamW kernel (TRL: ``adamw_torch_fused``,
  apo: ``torch.optim.AdamW``). Reward: exact match of the last number (apo's ``exact_match``;
  TRL calls the same function through a TRL-signature wrapper).
- compute: fp32 by default (``--dtype bfloat16``: apo's bf16 autocast against TRL's ``bf16=True``),
  the same torch thread count.

Each side runs in its own subprocess (so peak RSS, ``ru_maxrss``, is its own: imports, model,
optimizer, the run), and runs alternate (apo, TRL, TRL, apo, ...: each pair of rounds is
symmetric, so a load that drifts linearly over the run hits both sides alike). Step time is the
wall time between consecutive ends of optimizer steps (the first step is a warm-up and not
counted); CPU time is the process's (all threads), which other processes' load disturbs less.
completions/s = P·G / step time; tokens/s = completion tokens / step time.

Contention (``--contend N``): N busy processes (``python -c "while 1: pass"``) run beside both sides
for the whole measurement, started before its first round and stopped after its last, so each side
shares the cores with the same load. ``--contend 0,1`` measures each level in turn in one run of
the benchmark (all rounds of one level, then the next), a table and a verdict line each. Each side
runs as its library ships: the apo child starts like
the ``apo`` command (``apo_cli.runtime.threads.configure_process()`` before torch is imported:
a short OpenMP spin, huge pages, malloc keeping freed blocks); TRL with the defaults.
``--same-wait-policy`` gives TRL the same process settings, to tell that part of the difference
from the rest. Threads: TRL takes the cores of the affinity mask; apo runs as the apo
command does (those cores, its training phase's count following the cores other processes leave
free: ``apo_cli.runtime.threads.ThreadGovernor``); ``--threads N`` fixes both sides at N.

Training MFU: the training FLOPs of the step as apo counts them (``apo_cli.perf.FlopModel``:
forward + backward of each prompt once per group and of each completion; the same count on both
sides, so the ratio of MFUs is that of useful work per second) over the training phase's seconds ×
the peak of a matmul calibration with the side's thread count (``backends.cpu.calibrate_matmul``).
The training phase is apo's ``time/train``; TRL's is the step time less the time spent in
``GRPOTrainer._generate_and_score_completions`` (generation, rewards, advantages). TRL's FLOPs
use the step's mean completion length (TRL logs no lengths per sequence).

Usage (TRL is a benchmark-only dependency: ``pip install --no-deps trl==1.16.0``)::

    APO_CACHE=/tmp/apocache python benchmarks/vs_trl.py --model tiny-random --steps 6
    APO_CACHE=/tmp/apocache python benchmarks/vs_trl.py --model smollm2-135m-instruct --steps 3 --rounds 2
    APO_CACHE=/tmp/apocache python benchmarks/vs_trl.py --model smollm2-135m-instruct --steps 4 --rounds 2 --contend 1
    APO_CACHE=/tmp/apocache python benchmarks/vs_trl.py --model smollm2-135m-instruct --steps 5 --rounds 2 --contend 0,1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SYSTEM = "Answer with the number only."
SIDES = ("apo", "trl")
# TRL divides centred rewards by (std + 1e-4), a constant of GRPOTrainer (not a GRPOConfig field):
# apo is given the same value (algorithm.advantage_eps) so that both sides compute the same advantages
TRL_ADVANTAGE_EPS = 1e-4


# --------------------------------------------------------------------------------------------------
# Shared settings


def apo_recipe(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    chat = args.model != "tiny-random"
    return {
        "run": {"name": "vs-trl", "output_dir": str(out_dir), "max_steps": args.steps, "seed": args.seed},
        "model": {"name_or_path": args.model},
        "data": {"source": "builtin:arithmetic", "task_kwargs": {"level": 1, "size": 2000},
                 **({"system_prompt": SYSTEM, "chat_template": "on"} if chat else {"chat_template": "off"})},
        "rewards": [{"name": "exact_match"}],
        "rollout": {"group_size": args.group, "prompts_per_step": args.prompts,
                    "max_new_tokens": args.max_new_tokens, "temperature": 1.0, "top_p": 1.0, "top_k": 0},
        "algorithm": {"objective": "grpo", "loss_aggregation": "token_mean", "advantage_std": "group",
                      "eps_low": 0.2, "eps_high": 0.2, "kl_coef": 0.0, "mini_batches": 1, "epochs": 1,
                      "advantage_eps": TRL_ADVANTAGE_EPS, "disable_dropout": True},
        "optim": {"lr": args.lr, "betas": [0.9, 0.999], "weight_decay": 0.0, "warmup_steps": 0,
                  "scheduler": "constant", "grad_clip": 1.0, "micro_batch_size": args.micro},
        "checkpoint": {"every": 1_000_000, "keep_last": 1},
        "logging": {"dashboard": "off", "samples_per_step": 0},
        # threads unset (as a user runs it: the affinity mask's cores, the training phase's count following
        # the cores other processes leave free) unless --threads fixes them
        "backend": {"kind": "cpu", "dtype": args.dtype, **({"threads": args.threads} if args.threads else {})},
    }


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class _StepClock:
    """Wall and CPU time at each optimizer step's end; completion tokens and RSS per step."""

    def __init__(self) -> None:
        self.wall = [time.perf_counter()]
        self.cpu = [time.process_time()]
        self.tokens: list[float] = []
        self.rss_mb = 0.0

    def tick(self, tokens: float) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.tokens.append(tokens)
        self.rss_mb = _rss_mb()

    def wall_steps(self) -> list[float]:
        return [b - a for a, b in zip(self.wall, self.wall[1:])]

    def result(self, side: str, n_completions: int, extra: dict[str, Any]) -> dict[str, Any]:
        return {"side": side, "step_wall": self.wall_steps(),
                "step_cpu": [b - a for a, b in zip(self.cpu, self.cpu[1:])], "tokens": self.tokens,
                "completions_per_step": n_completions, "peak_rss_mb": self.rss_mb, **extra}


# --------------------------------------------------------------------------------------------------
# The two sides (each in its own process)


def run_apo(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import torch

    from apo_cli.recipe import recipe_from_dict
    from apo_cli.train import Trainer

    trainer = Trainer(recipe_from_dict(apo_recipe(args, tmp / "apo-run")))
    clock = _StepClock()
    one_step = trainer.one_step
    rewards: list[float] = []
    mfu: list[float] = []

    def timed_step():
        record, samples = one_step()
        clock.tick(record["completions/mean_length"] * args.prompts * args.group)
        rewards.append(record["reward"])
        mfu.append(record.get("perf/mfu", float("nan")))
        return record, samples

    trainer.one_step = timed_step
    clock.__init__()
    trainer.train()
    trainer.backend.close()
    return clock.result("apo", args.prompts * args.group, {"reward": rewards, "threads": torch.get_num_threads(),
                                                           "mfu": mfu, "wait_policy": _wait_policy()})


def trl_rows(args: argparse.Namespace) -> tuple[list[dict[str, Any]], Any, str, bool]:
    """The prompts in apo's order, as TRL dataset rows; the tokenizer; the model path; chat or not."""
    from apo_cli.data import load_examples, render_prompt
    from apo_cli.data.template import user_message
    from apo_cli.models import load_tokenizer, resolve_model_path
    from apo_cli.recipe import recipe_from_dict
    from apo_cli.train.state import DataOrder

    recipe = recipe_from_dict(apo_recipe(args, Path(tempfile.gettempdir()) / "unused"))
    path = resolve_model_path(args.model, args.seed)
    tok = load_tokenizer(path)
    examples = load_examples(recipe.data, args.seed, "train")
    order = DataOrder(len(examples), args.seed, recipe.data.shuffle).take(args.prompts * (args.steps + 2))
    chat = recipe.data.chat_template == "on"
    rows = []
    for i in order:
        ex = examples[i]
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user_message(ex, recipe.data)}]
        prompt: Any = messages if chat else render_prompt(ex, recipe.data, tok)
        rows.append({"prompt": prompt, "answer": ex.answer})
    # the two sides must see the same token ids
    ex = examples[order[0]]
    apo_ids = tok(render_prompt(ex, recipe.data, tok), add_special_tokens=not chat).input_ids
    if chat:
        trl_ids = tok.apply_chat_template(rows[0]["prompt"], add_generation_prompt=True, tokenize=True,
                                          return_dict=True)["input_ids"]
    else:
        trl_ids = tok(text=[rows[0]["prompt"]])["input_ids"][0]
    if list(apo_ids) != list(trl_ids):
        raise SystemExit(f"prompt tokenization differs between apo and TRL:\n{apo_ids}\n{trl_ids}")
    return rows, tok, path, chat


def exact_match_reward(completions: list[Any], answer: list[Any], **_: Any) -> list[float | None]:
    """apo's exact_match with TRL's reward signature (conversational completions are message lists)."""
    from apo_cli.rewards.builtin import exact_match

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return list(exact_match(texts, answer))


def run_trl(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from apo_cli.models import quiet_transformers

    quiet_transformers()
    torch.manual_seed(args.seed)
    rows, tok, path, _chat = trl_rows(args)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    n = args.prompts * args.group
    config = GRPOConfig(
        output_dir=str(tmp / "trl-run"), max_steps=args.steps, seed=args.seed, use_cpu=True,
        bf16=args.dtype == "bfloat16", fp16=False,
        per_device_train_batch_size=args.micro, gradient_accumulation_steps=n // args.micro,
        num_generations=args.group, max_completion_length=args.max_new_tokens,
        temperature=1.0, top_p=1.0, top_k=0, beta=0.0, num_iterations=1, loss_type="dapo",
        scale_rewards="group", epsilon=0.2, epsilon_high=0.2, mask_truncated_completions=False, disable_dropout=True,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0,
        shuffle_dataset=False, remove_unused_columns=False, dataloader_num_workers=0,
        logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True, log_completions=False,
    )
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    clock = _StepClock()
    log_lines: list[dict[str, float]] = []  # TRL's per-step log lines (logging_steps=1)

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock.__init__()

        def on_step_end(self, *a, **k):
            clock.tick(float("nan"))  # tokens come from the log line

        def on_log(self, _args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                log_lines.append(dict(logs))
    trainer = GRPOTrainer(model=model, reward_funcs=[exact_match_reward], args=config,
                          train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[Clock()])
    gen = _GenerationClock(trainer, args.group)
    peak = _peak(args)
    trainer.train()
    clock.tokens = [entry["completions/mean_length"] * n for entry in log_lines][: len(clock.tokens)]
    mfu = [f / max(w - g, 1e-9) / peak for f, w, g in zip(gen.flops, clock.wall_steps(), gen.seconds)]
    return clock.result("trl", n, {"reward": [entry.get("reward", float("nan")) for entry in log_lines],
                                   "threads": torch.get_num_threads(), "optim": config.optim, "mfu": mfu,
                                   "wait_policy": _wait_policy()})


class _GenerationClock:
    """Seconds in TRL's generation phase per call (rollout, rewards, advantages), and the training
    FLOPs of what it produced, counted as apo counts them (apo_cli.perf.FlopModel)."""

    def __init__(self, trainer: Any, group: int):
        from apo_cli.perf import FlopModel

        self.seconds: list[float] = []
        self.flops: list[float] = []
        model = FlopModel.of(trainer.model)
        inner = trainer._generate_and_score_completions

        def timed(inputs):
            t0 = time.perf_counter()
            out = inner(inputs)
            self.seconds.append(time.perf_counter() - t0)
            p = out["prompt_mask"].sum(-1).tolist()  # [P*G] prompt tokens of each row (a group's rows are adjacent)
            c = out["completion_mask"].sum(-1).tolist()  # [P*G]
            self.flops.append(sum(model.train(int(p[i]), [int(x) for x in c[i:i + group]])
                                  for i in range(0, len(c), group)))
            return out

        trainer._generate_and_score_completions = timed


def _peak(args: argparse.Namespace) -> float:
    import torch

    from backends.cpu import calibrate_matmul

    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    n, before = args.threads or len(os.sched_getaffinity(0)), torch.get_num_threads()
    torch.set_num_threads(n)  # the peak of all the side's cores, whatever threads its step runs now
    try:
        return calibrate_matmul(n, dtype)[0]
    finally:
        torch.set_num_threads(before)


def _wait_policy() -> str:
    return os.environ.get("OMP_WAIT_POLICY") or (f"GOMP_SPINCOUNT={os.environ['GOMP_SPINCOUNT']}"
                                                if "GOMP_SPINCOUNT" in os.environ else "libgomp default (spin)")


# --------------------------------------------------------------------------------------------------
# The parent: alternate runs, print the table


def run_side(side: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--side", side, "--json-out", str(out)] + _passthrough(args)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH")]))}
    if side == "apo":
        env.update(dict(kv.split("=", 1) for kv in args.apo_env))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{side} run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    res = json.loads(out.read_text())
    res["process_s"] = time.perf_counter() - t0
    return res


def _passthrough(args: argparse.Namespace) -> list[str]:
    out = []
    for k in ("model", "steps", "prompts", "group", "micro", "max_new_tokens", "lr", "threads", "dtype", "seed"):
        out += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    return out


def summarize(runs: list[dict[str, Any]]) -> dict[str, float]:
    walls = [w for r in runs for w in r["step_wall"][1:]]  # the first step of each run is a warm-up
    cpus = [c for r in runs for c in r["step_cpu"][1:]]
    toks = [t for r in runs for t in r["tokens"][1:]]
    mfus = [m for r in runs for m in r.get("mfu", [])[1:] if m == m]
    wall = statistics.median(walls)
    n = runs[0]["completions_per_step"]
    return {
        "step_s": wall, "cpu_s": statistics.median(cpus), "completions_per_s": n / wall,
        "tokens_per_s": statistics.mean(toks) / wall, "mean_len": statistics.mean(toks) / n,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "steps": len(walls),
        "mfu_pct": 100 * statistics.median(mfus) if mfus else float("nan"),
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def busy_processes(n: int) -> list[subprocess.Popen]:
    """``n`` pure busy loops (each wants one core for as long as it runs)."""
    return [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(n)]


def stop_processes(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny-random", help="tiny-random, smollm2-135m-instruct, or a model folder")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first is a warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each side, alternating")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step (P)")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    ap.add_argument("--micro", type=int, default=16, help="sequences per forward/backward (a multiple of G)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=0,
                    help="fix both sides' torch threads (default: TRL the cores of the affinity mask, apo as "
                         "the apo command chooses: those cores, the training phase following the free ones)")
    ap.add_argument("--contend", type=_levels, default=[0], metavar="N[,N...]",
                    help="busy processes running beside both sides; a list (0,1) measures each level in turn")
    ap.add_argument("--same-wait-policy", action="store_true",
                    help="give TRL the apo command's process settings too (configure_process: OpenMP spin "
                         "count, huge pages, malloc; default: each side as it ships)")
    ap.add_argument("--apo-env", action="append", default=[], metavar="KEY=VALUE",
                    help="an environment variable for the apo side only (repeatable), e.g. OMP_WAIT_POLICY=PASSIVE "
                         "to measure a policy other than the one the apo command sets")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--json-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if (args.prompts * args.group) % args.micro or args.micro % args.group:
        raise SystemExit("--micro must be a multiple of --group and divide --prompts x --group")

    if any("=" not in kv for kv in args.apo_env):
        raise SystemExit(f"--apo-env wants KEY=VALUE, got {next(kv for kv in args.apo_env if '=' not in kv)!r}")
    if args.side:  # child
        if args.side == "apo" or args.same_wait_policy:  # as the apo command starts: before torch is imported
            from apo_cli.runtime.threads import configure_process

            configure_process()
        with tempfile.TemporaryDirectory(prefix=f"apo-vs-trl-{args.side}-") as tmp:
            res = (run_apo if args.side == "apo" else run_trl)(args, Path(tmp))
        Path(args.json_out).write_text(json.dumps(res))
        return

    if importlib.util.find_spec("trl") is None:
        print("vs_trl: TRL is not installed; install it with `pip install --no-deps trl==1.16.0` (benchmark-only)")
        raise SystemExit(1)
    import trl

    print(f"apo vs TRL {trl.__version__} GRPOTrainer | model {args.model} | {args.prompts} prompts x G={args.group}, "
          f"max_new_tokens {args.max_new_tokens}, micro-batch {args.micro} "
          f"(TRL grad-accum {args.prompts * args.group // args.micro}) | GRPO token-mean (dapo), beta 0 | "
          f"{args.dtype}, {args.threads or 'default'} threads | {args.steps} steps x {args.rounds} rounds | "
          f"{','.join(map(str, args.contend))} busy processes beside | {cpu_name()}, {os.cpu_count()} CPUs", flush=True)
    verdicts = [measure(args, busy) for busy in args.contend]
    if len(verdicts) > 1:
        print()
        for line in verdicts:
            print(line)


def measure(args: argparse.Namespace, busy: int) -> str:
    """The rounds of both sides beside ``busy`` busy processes; prints their table, returns the verdict line."""
    if len(args.contend) > 1:
        print(f"\n== {busy} busy processes beside ==", flush=True)
    runs = alternate(args, busy)
    a, t = summarize(runs["apo"]), summarize(runs["trl"])
    rows = [("step time (s, median)", "step_s", "{:.3f}"), ("CPU s / step (median)", "cpu_s", "{:.3f}"),
            ("completions / s", "completions_per_s", "{:.2f}"), ("completion tokens / s", "tokens_per_s", "{:.1f}"),
            ("mean completion length", "mean_len", "{:.1f}"), ("peak RSS (MB)", "peak_rss_mb", "{:.0f}"),
            ("training MFU (%)", "mfu_pct", "{:.2f}")]
    print(f"\n{'':26}{'apo':>12}{'TRL':>12}{'apo / TRL':>12}")
    for label, key, fmt in rows:
        print(f"{label:26}{fmt.format(a[key]):>12}{fmt.format(t[key]):>12}{a[key] / t[key]:>11.2f}x")
    policies = {side: runs[side][0].get("wait_policy", "?") for side in SIDES}
    print(f"measured steps: apo {a['steps']}, TRL {t['steps']} | {busy} busy processes | OpenMP waiting: "
          f"apo {policies['apo']}, TRL {policies['trl']} | load average now {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores")
    target = 2.5 if busy == 0 else 2.0
    verdict = (f"{busy} busy: apo completions/s = {a['completions_per_s'] / t['completions_per_s']:.2f} x TRL's "
               f"(target >= {target}); apo CPU time per step = {t['cpu_s'] / a['cpu_s']:.2f} x less than TRL's; "
               f"peak RSS apo / TRL = {a['peak_rss_mb'] / t['peak_rss_mb']:.2f} (target <= 1)")
    print(verdict)
    return verdict


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants N or N,N,... (busy processes), got {text!r}") from None
    if any(n < 0 for n in levels):
        raise argparse.ArgumentTypeError(f"busy processes cannot be negative: {text!r}")
    return levels


def alternate(args: argparse.Namespace, busy: int) -> dict[str, list[dict[str, Any]]]:
    """``args.rounds`` runs of each side, alternating (apo, TRL, TRL, apo, ...), with ``busy`` busy
    processes beside them all along."""
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SIDES}
    procs = busy_processes(busy)
    try:
        with tempfile.TemporaryDirectory(prefix="apo-vs-trl-") as tmp:
            for r in range(args.rounds):
                for side in (SIDES if r % 2 == 0 else SIDES[::-1]):
                    load = os.getloadavg()[0]
                    res = run_side(side, args, Path(tmp) / f"{side}-{r}.json")
                    runs[side].append(res)
                    walls = ", ".join(f"{w:.2f}" for w in res["step_wall"])
                    cpus = ", ".join(f"{c:.2f}" for c in res["step_cpu"])
                    mfu = ", ".join(f"{100 * m:.1f}" for m in res.get("mfu", []))
                    print(f"  round {r + 1} {side:3}: steps {walls} s (cpu {cpus}; MFU % {mfu}), "
                          f"peak RSS {res['peak_rss_mb']:.0f} MB, load avg {load:.1f}", flush=True)
    finally:
        stop_processes(procs)
    return runs

if __name__ == "__main__":
    main()
