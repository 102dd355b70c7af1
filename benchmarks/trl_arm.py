"""TRL 1.16's GRPOTrainer as one more arm of an ``apo compare`` folder: the same task, trained and
scored so that ``apo compare --report`` reads it beside apo's arms.

For each seed, ``<compare folder>/<arm>-s<seed>/`` becomes a run directory the report understands:

- TRL trains on the recipe's task with the recipe's model, G (``num_generations``), prompts per
  step (TRL generates P·G completions per optimizer step: ``per_device_train_batch_size`` =
  ``optim.micro_batch_size``, gradient accumulation P·G/M), completion length, temperature (no
  top-k/top-p), learning rate, its schedule and warm-up, AdamW betas and weight decay, gradient clip
  and KL coefficient (``beta``); everything else is TRL's default (loss ``dapo``, clip 0.2, rewards
  scaled by the group's std, one iteration per rollout). The prompts are apo's, in apo's seeded
  order (``shuffle_dataset=False``); the reward is apo's ``exact_match``. The model is seeded
  with the run seed, like apo's.
- ``metrics.jsonl``: one row per step (``step``, ``reward``, ``completions/mean_length``,
  ``step_time``) from TRL's log lines; ``recipe.yaml``: the recipe with ``algorithm.objective:
  grpo`` (what the report reads for max_steps and the objective).
- ``eval.jsonl``: TRL saves the weights every ``eval.every`` steps and at the end; each is scored
  with ``apo eval --recipe`` on the recipe's held-out problems with the recipe's ``eval`` settings
  (k, limit, lengths), as apo's arms are during training.

Run it after ``apo compare`` (which rewrites ``compare.json``): the arm is then added to the manifest
so the report lists it. Runs already finished (every step logged and every evaluation recorded)
are skipped. ``--jobs N``
runs seeds in parallel processes, the cores shared out (``OMP_NUM_THREADS``). TRL is a
benchmark-only dependency: ``pip install --no-deps trl==1.16.0``.

Usage::

    python benchmarks/trl_arm.py recipes/smollm2-arithmetic2-compare.yaml \\
        --out runs/smollm2-arithmetic2-compare --seeds 0,1,2 --jobs 2
    apo compare --report runs/smollm2-arithmetic2-compare
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _rows(recipe: Any, seed: int, tok: Any) -> list[dict[str, Any]]:
    """The training prompts in apo's seeded order, as TRL rows (messages when apo uses the chat template)."""
    from apo_cli.data import load_examples, render_prompt
    from apo_cli.data.template import user_message, uses_chat_template
    from apo_cli.train.state import DataOrder

    examples = load_examples(recipe.data, seed, "train")
    n = recipe.rollout.prompts_per_step * (recipe.run.max_steps + 2)
    chat = uses_chat_template(recipe.data, tok)
    rows = []
    for i in DataOrder(len(examples), seed, recipe.data.shuffle).take(n):
        ex = examples[i]
        if chat:
            system = [{"role": "system", "content": recipe.data.system_prompt}] if recipe.data.system_prompt else []
            prompt: Any = system + [{"role": "user", "content": user_message(ex, recipe.data)}]
        else:
            prompt = render_prompt(ex, recipe.data, tok)
        rows.append({"prompt": prompt, "answer": ex.answer})
    return rows


def _finished(run: Path, max_steps: int, evals: int) -> bool:
    try:
        steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        records = [x for x in (run / "eval.jsonl").read_text().splitlines() if x.strip()]
    except (OSError, ValueError, KeyError):
        return False
    return bool(steps) and max(steps) >= max_steps and len(records) >= evals


def _eval_steps(recipe: Any) -> list[int]:
    every, last = recipe.eval.every, recipe.run.max_steps
    return sorted({*(range(every, last + 1, every) if every else ()), last})


def train_one(recipe_path: Path, seed: int, run: Path) -> None:
    """One seed: TRL training, then apo's evaluation of every saved step (see the module docstring)."""
    import torch
    import yaml
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from apo_cli.models import load_tokenizer, quiet_transformers, resolve_model_path
    from apo_cli.recipe import load_recipe
    from vs_trl import exact_match_reward  # apo's exact_match with TRL's reward signature (this folder)

    quiet_transformers()
    recipe = load_recipe(recipe_path, [f"run.seed={seed}"])
    r, o = recipe.rollout, recipe.optim
    if run.exists():
        shutil.rmtree(run)  # an unfinished seed starts over (TRL's own resume is not used here)
    run.mkdir(parents=True)
    data = recipe.model_dump(mode="json")
    data["algorithm"] = {"objective": "grpo"}
    data["run"]["output_dir"] = str(run)
    (run / "recipe.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")

    torch.manual_seed(seed)
    path = resolve_model_path(recipe.model.name_or_path, seed)
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    n = r.prompts_per_step * r.group_size
    micro = min(o.micro_batch_size, n)
    config = GRPOConfig(
        output_dir=str(run / "trl"), max_steps=recipe.run.max_steps, seed=seed, use_cpu=True,
        per_device_train_batch_size=micro, gradient_accumulation_steps=n // micro,
        num_generations=r.group_size, max_completion_length=r.max_new_tokens,
        temperature=r.temperature, top_p=1.0, top_k=0, beta=recipe.algorithm.kl_coef,
        learning_rate=o.lr, lr_scheduler_type=o.scheduler, warmup_steps=o.warmup_steps, weight_decay=o.weight_decay,
        adam_beta1=o.betas[0], adam_beta2=o.betas[1], max_grad_norm=o.grad_clip or 0.0,
        shuffle_dataset=False, remove_unused_columns=False, dataloader_num_workers=0,
        logging_steps=1, report_to=[], disable_tqdm=True, log_completions=False,
        save_strategy="steps", save_steps=recipe.eval.every or recipe.run.max_steps, save_only_model=True,
    )
    metrics = (run / "metrics.jsonl").open("a", encoding="utf-8")
    clock = {"t": time.perf_counter()}

    class Log(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                now = time.perf_counter()
                row = {"step": state.global_step, "reward": logs["reward"],
                       "completions/mean_length": logs.get("completions/mean_length"),
                       "step_time": now - clock["t"], "source": "trl"}
                clock["t"] = now
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()

    trainer = GRPOTrainer(model=model, reward_funcs=[exact_match_reward], args=config,
                          train_dataset=Dataset.from_list(_rows(recipe, seed, tok)), processing_class=tok,
                          callbacks=[Log()])
    trainer.train()
    metrics.close()
    for step in _eval_steps(recipe):
        ckpt = run / "trl" / f"checkpoint-{step}"
        if not ckpt.is_dir():
            raise SystemExit(f"trl_arm: TRL saved no {ckpt}")
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "apo_cli", "eval", str(ckpt), "--recipe", str(recipe_path), "--json",
               "-k", str(recipe.eval.k), "--seed", str(seed), "--no-cache",
               "--max-new-tokens", str(recipe.eval.max_new_tokens or r.max_new_tokens)]
        if recipe.eval.limit:
            cmd += ["--limit", str(recipe.eval.limit)]
        if recipe.eval.temperature is not None:
            cmd += ["--temperature", str(recipe.eval.temperature)]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if out.returncode != 0:
            raise SystemExit(f"trl_arm: apo eval of {ckpt} failed:\n{out.stderr[-3000:]}")
        result = json.loads(out.stdout)
        results = result if isinstance(result, list) else result.get("results", [result])
        record = {**results[0], "source": "train", "step": step, "time_s": time.perf_counter() - t0}
        with (run / "eval.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    shutil.rmtree(run / "trl", ignore_errors=True)  # the weights were only kept to be scored


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="the apo compare folder to add the arm to")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--arm", default="trl_grpo", help="the arm's name (run directories <arm>-s<seed>)")
    ap.add_argument("--jobs", type=int, default=1, help="seeds trained at once (the cores shared out)")
    ap.add_argument("--child-seed", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_seed is not None:
        train_one(args.recipe, args.child_seed, args.out / f"{args.arm}-s{args.child_seed}")
        return
    if importlib.util.find_spec("trl") is None:
        raise SystemExit("trl_arm: TRL is not installed; install it with `pip install --no-deps trl==1.16.0`")
    from apo_cli.recipe import load_recipe
    from apo_cli.runtime.threads import share_env

    recipe = load_recipe(args.recipe)
    seeds = [int(s) for s in args.seeds.split(",")]
    todo = [s for s in seeds if not _finished(args.out / f"{args.arm}-s{s}", recipe.run.max_steps,
                                              len(_eval_steps(recipe)))]
    print(f"trl_arm: {args.arm} on {args.recipe}: seeds {seeds}, {len(seeds) - len(todo)} finished, "
          f"{len(todo)} to run ({args.jobs} at once)", flush=True)
    env = {**share_env(args.jobs), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    running: list[tuple[int, subprocess.Popen, float]] = []
    failed = []
    while todo or running:
        while todo and len(running) < max(1, args.jobs):
            s = todo.pop(0)
            log = (args.out / "logs" / f"{args.arm}-s{s}.log").open("w")
            cmd = [sys.executable, __file__, str(args.recipe), "--out", str(args.out), "--arm", args.arm,
                   "--child-seed", str(s)]
            running.append((s, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), time.time()))
        time.sleep(1)
        for item in list(running):
            s, proc, t0 = item
            if proc.poll() is not None:
                running.remove(item)
                print(f"  {args.arm}-s{s}: {'done' if proc.returncode == 0 else f'failed (exit {proc.returncode})'}"
                      f" in {time.time() - t0:.0f} s", flush=True)
                if proc.returncode:
                    failed.append(s)
    if failed:
        raise SystemExit(f"trl_arm: seeds {failed} failed; see {args.out / 'logs'}")
    add_to_manifest(args.out, args.arm, args.recipe, seeds)


def add_to_manifest(root: Path, arm: str, recipe: Path, seeds: list[int]) -> None:
    """List the arm in the comparison's compare.json (after apo compare's arms), so that
    ``apo compare --report`` reads it; a folder without a manifest is read by its run directories."""
    import trl

    path = root / "compare.json"
    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    if any(a.get("name") == arm for a in data.get("arms", [])):
        return
    data["arms"].append({"name": arm, "objective": "grpo", "recipe": str(recipe), "dropped": [], "set": [],
                         "unread_after_set": [], "trainer": f"TRL {trl.__version__} GRPOTrainer"})
    missing = [s for s in seeds if s not in data["seeds"]]
    if missing:
        print(f"trl_arm: seeds {missing} are not in {path}'s seeds {data['seeds']}; the report shows its seeds only")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    tmp.replace(path)


if __name__ == "__main__":
    main()
