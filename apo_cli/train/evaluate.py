"""Evaluation during training (recipe section ``eval``): every ``eval.every`` steps and at the end,
the held-out problems are sampled and scored with the policy being trained, by the code `apo eval`
runs (:func:`apo_cli.evaluation.sample_problems`: the same chunks, seeds, rewards and estimators).

- The results (``eval/mean@k``, ``eval/pass@k``, ``eval/maj@k``, ``eval/reward``, each with
  ``/ci_low`` and ``/ci_high``, and ``time/eval``) join the step's metrics row, and so the dashboard
  and the trackers; the record goes to the run's eval.jsonl (read by `apo inspect-alpha`).
- The training RNG streams are not touched: the sampler seeds torch's generator for each chunk, so
  the evaluation runs with the generators' states saved and restored around it; a run with
  ``eval.every`` trains exactly the weights of one without.
- It runs after the step's update and before its checkpoint: a kill during an evaluation leaves no
  checkpoint of the step, and ``--resume`` redoes the step and its evaluation (the eval.jsonl
  records after the checkpoint are dropped first, so each is written once).
- Under torchrun every process samples every problem (the backend's generate is collective for a
  sharded policy) with the same seeds; rank 0 writes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from apo_cli.evaluation import (
    EvalSettings,
    ModelResult,
    append_training_record,
    cache_key,
    metric_label,
    record,
    sample_problems,
    summarize,
    task_from_recipe,
)
from apo_cli.generation import ResolvedModel
from apo_cli.tracking import own_rng


class _LiveSampler:
    """The policy being trained, as the sampler `apo eval` uses (backend, tokenizer, render, encode)."""

    def __init__(self, trainer: Any):
        from apo_cli.models import context_length

        self.backend, self.tok, self.chat = trainer.backend, trainer.tok, trainer.chat
        self.context = context_length(trainer.model, trainer.recipe.model)
        self.max_prompt_tokens = trainer.recipe.rollout.max_prompt_tokens

    def render(self, prompt: str, example: Any, spec: Any) -> str:
        from apo_cli.data import render_prompt

        return render_prompt(example, spec, self.tok)

    def encode(self, texts: list[str], max_new_tokens: int) -> list[list[int]]:
        from apo_cli.sampling import encode_prompts, prompt_limit

        limit = prompt_limit(self.context, max_new_tokens, self.max_prompt_tokens)
        return encode_prompts(self.tok, texts, chat=self.chat, limit=limit).ids


def eval_settings(r: Any) -> EvalSettings:
    """The recipe's eval section over its rollout's sampling; a chunk holds as many completions as a rollout."""
    e, ro = r.eval, r.rollout
    greedy = e.temperature == 0
    k = 1 if greedy else e.k
    return EvalSettings(k=k, samples=k, greedy=greedy,
                        temperature=ro.temperature if greedy or e.temperature is None else e.temperature,
                        top_p=ro.top_p, top_k=ro.top_k, max_new_tokens=e.max_new_tokens or ro.max_new_tokens,
                        stop=tuple(ro.stop), seed=r.run.seed,
                        batch_size=max(1, ro.prompts_per_step * ro.group_size // k), pass_threshold=1.0)


class Evaluator:
    """Built with the trainer (the problems are loaded then); :meth:`maybe_run` after each step."""

    def __init__(self, trainer: Any):
        r = trainer.recipe
        self.trainer, self.every = trainer, r.eval.every
        if not self.every:
            return
        data = r.data if r.eval.split is None else r.data.model_copy(update={"eval_split": r.eval.split})
        self.task = task_from_recipe(r.model_copy(update={"data": data}), "eval", r.eval.limit)
        self.settings = eval_settings(r)
        self.sampler = _LiveSampler(trainer)

    def due(self, step: int, max_steps: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == max_steps)

    def maybe_run(self, step: int, max_steps: int, dash: Any) -> dict[str, float]:
        """The step's eval/* metrics (empty when no evaluation is due); the record in eval.jsonl."""
        if not self.due(step, max_steps):
            return {}
        t = self.trainer
        s = self.settings
        dash.message(f"step {step}: evaluating {len(self.task.examples)} held-out problems × {s.samples} samples")
        t0 = time.perf_counter()
        with own_rng():  # the sampler seeds torch's generator per chunk: the training stream is kept
            results = sample_problems(self.sampler, t.rewards, self.task, s)
        elapsed = time.perf_counter() - t0
        out: dict[str, float] = {}
        for name, iv in summarize(results, s.k).items():
            label = f"eval/{metric_label(name, s.k)}"
            out.update({label: iv.value, f"{label}/ci_low": iv.low, f"{label}/ci_high": iv.high})
        out["time/eval"] = elapsed
        if t.world.is_main:
            model = ResolvedModel(str(Path(t.run_dir) / "checkpoints" / f"step-{step}"),
                                  f"{t.recipe.run.name}/step-{step}", "training", Path(t.run_dir), step)
            res = ModelResult(model, cache_key(model, self.task, s), results, 0)
            append_training_record(t.run_dir, {**record(res, self.task, s), "time_s": elapsed})
        return out
