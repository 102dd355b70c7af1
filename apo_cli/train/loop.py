"""The training loop, top to bottom: :meth:`Trainer.one_step` is one step of the algorithm.

One *step* is one rollout and the updates made from it:

1. **Rollout.** ``prompts_per_step`` prompts from the data (in a seeded order, epoch after epoch)
   are rendered (chat template or plain template), encoded (cut to the context, counted) and sent
   to the backend, which samples ``group_size`` (G) completions for each, with the engine's
   log-probs of the sampled tokens; the rewards score every completion (apo_cli/sampling.py). With
   ``rollout.dynamic_sampling`` the groups without reward spread are dropped and more prompts sampled
   (apo_cli/train/rollout.py).
2. **Advantages and signals.** Group advantages (centred per group; std scaling per the objective)
   and the schedule signals (reward signal, confidence, calibration), from which the **alpha** and
   **tau** schedules give this step's values.
3. **Anchor.** The anchor log-probs are the trainer's own forward pass at the rollout weights. The
   first mini-batch of the first epoch is trained at exactly those weights, so its anchor is the
   detached log-prob of its own forward (u = 0, no extra pass); the other mini-batches get a
   no-grad pass before the first update. With one mini-batch and one epoch (the default) the
   step is purely on-policy and needs no extra forward at all. Without engine log-probs the
   signals need the rollout policy's log-probs, so every row is anchored first.
4. **Updates.** The rollout's groups are shuffled *as whole groups* and split into
   ``algorithm.mini_batches``; each mini-batch is one optimizer step, accumulated from
   micro-batches of whole groups whose losses are normalised by the mini-batch totals (so 1×4 and
   4×1 give the same update). ``algorithm.epochs`` passes. Non-finite loss or gradient: the
   optimizer step is skipped and counted; after ``optim.max_consecutive_skips`` in a row the run
   stops with a checkpoint of the last good state.
5. **Sync, log, checkpoint.** ``backend.sync_weights()``; one metrics line; a checkpoint every
   ``checkpoint.every`` steps and at the end (atomic, the last K kept; its files are written at
   once, their checksums and the rename finish in the background during the next step, which is
   logged only once they are done: apo_cli/checkpoint_io.py).

Regimes: one mini-batch × one epoch is purely on-policy (u = 0, no anchor pass); more of either
trains later mini-batches off the rollout weights, against anchors taken before the first update.

Stopping (apo_cli/train/session.py). SIGINT/SIGTERM/SIGHUP finish the step, save and exit 130/143/129
(a second signal aborts at once). An error in a step's rollout or rewards (before its update) saves the last
completed step first; a kill loses at most the steps since the last checkpoint. ``--resume``
restores weights, optimizer, LR schedule, RNG, data position and schedule states
(apo_cli/train/state.py): on CPU a resumed run equals an uninterrupted one.

Several processes (torchrun): the same code. ``self.world`` (apo_cli/runtime/world.py) splits the
rows over the ranks and sums the normalisers; in one process every collective is a no-op. Each rank
samples and scores its block of the prompts and the rollout is gathered, so signals, alpha and
metrics are those of the whole step; rank 0 alone writes.

Every name a recipe uses (objective, schedule, reward, backend) goes through a registry
(apo_cli/registry.py); the loop never special-cases one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from apo_cli.algo.advantages import compute_advantages
from apo_cli.algo.objectives import resolved
from apo_cli.algo.stabilizers import objective_loss
from apo_cli.algo.schedules import LossBatchSchedule, compute_signals
from apo_cli.checkpoint import RunLock, latest_good_checkpoint
from apo_cli.checkpoint_io import CheckpointFinisher
from apo_cli.dashboard import make_dashboard
from apo_cli.errors import Interrupted, TrainingError
from apo_cli.perf import Perf
from apo_cli.runtime.fsdp import clip_grad_norm
from apo_cli.runtime.world import shared
from apo_cli.train import session, state
from apo_cli.train.build import build
from apo_cli.train.evaluate import Evaluator
from apo_cli.train.loss_inputs import loss_batch, loss_context, mismatch_metrics
from apo_cli.train.policy import Anchors
from apo_cli.train.rollout import Rollout, collect, no_update_record, step_seed

if TYPE_CHECKING:
    from apo_cli.recipe import Recipe


class Trainer:
    """A run: built from the recipe (apo_cli/train/build.py), trained by :meth:`train`."""

    def __init__(self, recipe: Recipe, *, resume: bool = False, resume_from: Path | None = None,
                 allow_recipe_change: bool = False):
        session.check_trackers(recipe)  # a tracker that is not installed fails before anything loads
        b = build(recipe, resume=resume, resume_from=resume_from, allow_recipe_change=allow_recipe_change)
        self.recipe, self.world, self.backend, self.run_dir = b.recipe, b.world, b.backend, b.run_dir
        self.resume, self.resume_from = b.resume, b.resume_from
        self.examples, self.rewards, self.objective = b.examples, b.rewards, b.objective
        self.tok, self.render, self.chat, self.prompt_limit = b.tok, b.render, b.chat, b.prompt_limit
        self.policy, self.state = b.policy, b.state
        self.G = recipe.rollout.group_size
        self.phase = "rollout"  # "update" once a step starts changing the weights
        self.last_saved, self.last_path = 0, None
        self.loss_batch = None  # the reference rule per loss call (algorithm.alpha.granularity: micro_batch)
        self.evaluator, self.perf = Evaluator(self), Perf(self.model, self.backend, recipe, self.world.size)
        self.finisher = CheckpointFinisher()  # checkpoints finish in the background during train()

    # what tests, benchmarks and callers read
    model = property(lambda self: self.policy.model)
    step = property(lambda self: self.state.step)
    optimizer = property(lambda self: self.state.optimizer)
    lr_scheduler = property(lambda self: self.state.lr_scheduler)
    consecutive_skips = property(lambda self: self.state.consecutive_skips)

    # -- the run ----------------------------------------------------------------------------------

    def train(self) -> Path | None:
        r, st = self.recipe, self.state
        with self.world.agree():
            session.make_run_dir(self.run_dir)
        main = self.world.is_main  # under torchrun only rank 0 shows and writes anything
        dash = make_dashboard(r.logging.dashboard, r.run.name, st.max_steps, muted=not main)
        with self.world.on_main(RunLock(self.run_dir)):
            notes = session.start(self)
            if st.step >= st.max_steps:
                dash.message(f"run {r.run.name} is already finished ({st.step}/{st.max_steps} steps)")
                return latest_good_checkpoint(self.run_dir)
            self.last_saved = st.step
            self.backend.sync_weights()  # the engine samples from the (restored) policy from the first rollout on
            with session.StopFlag() as stop, dash, session.run_log(self, dash) as log, self.finisher:
                for n in notes:
                    dash.message(n, "yellow")
                self._loop(log, dash, stop)
        dash.message(f"done: {st.step} steps; final checkpoint {self.last_path}")
        return self.last_path

    def _loop(self, log: session.RunLog | None, dash, stop: session.StopFlag) -> None:
        """``log`` (metrics, samples, trackers) is None on the ranks other than 0, which write nothing."""
        r, st = self.recipe, self.state
        while st.step < st.max_steps:
            before = json.loads(json.dumps(st.state_dict())), torch.get_rng_state()
            try:
                record, samples = self.one_step()
            except Exception as e:
                # under torchrun only a failure every rank knows of can be saved (saving is collective)
                if not self.world.distributed or getattr(e, "shared", False):
                    session.save_before_failure(self, *before, dash=dash)
                raise
            record.update(self.evaluator.maybe_run(st.step, st.max_steps, dash))  # before the checkpoint
            self.finisher.wait()  # the last checkpoint is in place before a later step is logged
            if log is not None:
                log.write(record, samples)
            dash.update(record, samples)
            if st.consecutive_skips >= r.optim.max_consecutive_skips:
                path = self.save()
                raise shared(TrainingError(
                    f"{st.consecutive_skips} optimizer steps in a row had a non-finite loss or gradient; "
                    f"stopped at step {st.step} (weights untouched since the last good step, saved in {path})",
                    hint="lower optim.lr or check the rewards",
                ))  # every rank counted the same skips
            signum = self.world.max(stop.signum or 0)  # a signal to any rank stops all after this step
            if signum:
                path = self.save()
                code, name = stop.reason(signum)
                raise shared(Interrupted(f"{name}: stopped at step {st.step}; saved {path} (resume with --resume)", code))
            if st.step % r.checkpoint.every == 0 or st.step == st.max_steps:
                self.save()

    # -- one step ---------------------------------------------------------------------------------

    def one_step(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """One rollout and its updates; returns the metrics line and the samples to log."""
        r, st, a = self.recipe, self.state, self.recipe.algorithm
        t0 = time.perf_counter()
        self.phase = "rollout"
        st.step += 1
        torch.manual_seed(step_seed(r.run.seed, st.step))
        # 1. rollout: G completions per prompt, scored; 2. group advantages
        ro, correct, roll_metrics = self.rollout()
        t_roll = time.perf_counter()
        n = len(ro.rewards)
        if not n:
            return no_update_record(self, roll_metrics, t_roll - t0)
        plans = self.plan(n // self.G)
        anchors = Anchors(self.policy, self.world, ro.prompt_ids, ro.completion_ids, r.optim.micro_batch_size)
        if ro.engine_logprobs is None:  # signals need the rollout policy's log-probs: take the anchor pass
            anchors.compute(list(range(n)))
            seq_lp = anchors.mean_logprobs(n)
        else:
            seq_lp = torch.tensor([sum(lp) / max(len(lp), 1) for lp in ro.engine_logprobs])
        # 2. signals -> this step's alpha and tau
        vocab = int(getattr(self.model.config, "vocab_size", len(self.tok)))
        sig = compute_signals(st.step - 1, ro.rewards, ro.advantages, ro.group_ids, seq_lp, vocab, correct)
        per_mb = self.objective.uses_alpha and a.alpha.granularity == "micro_batch"  # alpha, tau at each loss call
        self.loss_batch = LossBatchSchedule(st.alpha_schedule, st.tau_schedule, st.step - 1, vocab) if per_mb else None
        alpha = st.alpha_schedule.step(sig) if self.objective.uses_alpha and not per_mb else 1.0
        tau = st.tau_schedule.step(sig) if not per_mb else float("nan")
        # 3. anchors of the rows not trained first; 4. the updates
        self.phase = "update"
        first = set(self._rows(plans[0][0]))  # trained first, at the rollout weights: their own anchors
        rest = [i for i in range(n) if i not in first and i not in anchors]
        if rest and (a.mini_batches > 1 or a.epochs > 1):
            anchors.compute(rest)
        train_metrics = self.update(ro, alpha, tau, anchors, plans)
        train_metrics.update(mismatch_metrics(self, ro, anchors.mine()))
        if per_mb:  # what was used: the mean alpha and tau over the loss calls, their range and signals
            alpha, tau = self.loss_batch.log_into(train_metrics)
        # 5. sync the engine, record
        sync_s = self.backend.sync_weights()
        times = {"time/rollout": t_roll - t0, "time/train": time.perf_counter() - t_roll - sync_s, "time/sync": sync_s}
        return self._record(ro, sig, alpha, tau, roll_metrics, train_metrics, times)

    def rollout(self) -> tuple[Rollout, torch.Tensor | None, dict[str, float]]:
        """Sample and score this step's groups (apo_cli/train/rollout.py: dynamic sampling); group advantages."""
        a = self.recipe.algorithm
        ro, correct, metrics = collect(self)
        if not len(ro.rewards):  # dynamic sampling found no informative group: no update
            return ro, correct, metrics
        ro.advantages, adv_stats = compute_advantages(ro.rewards, ro.group_ids, resolved(a, "advantage_std"),
                                                      a.advantage_eps)
        return ro, correct, {**adv_stats, **metrics}

    def plan(self, n_groups: int) -> list[list[list[int]]]:
        """The step's updates: [epoch][mini-batch] -> group indices, shuffled as whole groups."""
        a = self.recipe.algorithm
        gen = torch.Generator().manual_seed(step_seed(self.recipe.run.seed, self.state.step) + 1)
        plans = []
        for _ in range(a.epochs):
            perm = torch.randperm(n_groups, generator=gen).tolist()
            per = n_groups // a.mini_batches
            plans.append([perm[i * per : (i + 1) * per] for i in range(a.mini_batches)])
        return plans

    def _rows(self, groups: list[int]) -> list[int]:
        return [g * self.G + j for g in groups for j in range(self.G)]

    def update(self, ro: Rollout, alpha: float, tau: float, anchors: Anchors,
               plans: list[list[list[int]]]) -> dict[str, float]:
        """All optimizer steps of one rollout; the step's averaged training metrics. Each rank
        trains its block of every mini-batch (``world.part``; in one process, all of it)."""
        acc: dict[str, float] = {}
        weight, grad_norms = 0.0, []
        for e, epoch_plan in enumerate(plans):
            for b, mb_groups in enumerate(epoch_plan):
                rows = self._rows(self.world.part(mb_groups))
                m, gn = self.optimizer_step(ro, rows, alpha, tau, anchors)
                if e == b == 0 and len(plans) > 1:
                    anchors.share(rows)  # later epochs may hand these rows to another rank
                if gn is not None:
                    grad_norms.append(gn)
                for k, v in m.items():
                    acc[k] = acc.get(k, 0.0) + v * len(rows)
                weight += len(rows)
        out = self.world.mean({k: v / max(weight, 1) for k, v in acc.items()})  # every rank trained as many rows
        if "loss" in out:
            out["loss"] *= self.world.size  # each rank's loss is its share of the mini-batch's
        out["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else float("nan")
        return out

    def optimizer_step(self, ro: Rollout, rows: list[int], alpha: float, tau: float,
                       anchors: Anchors) -> tuple[dict[str, float], float | None]:
        """One optimizer step on ``rows`` (whole groups), accumulated over micro-batches."""
        o, a, st, world = self.recipe.optim, self.recipe.algorithm, self.state, self.world
        ctx = loss_context(self, ro, rows, alpha, tau)  # normalisers of the whole mini-batch (all ranks)
        st.optimizer.zero_grad(set_to_none=True)
        acc: dict[str, float] = {}
        finite = True
        for s in range(0, len(rows), o.micro_batch_size):
            chunk = rows[s : s + o.micro_batch_size]
            prompts, comps = [ro.prompt_ids[i] for i in chunk], [ro.completion_ids[i] for i in chunk]
            logp, ent, mask = self.policy.logprobs(prompts, comps, entropy_grad=a.entropy_coef > 0)
            batch = loss_batch(self, ro, chunk, logp, ent, mask, anchors)  # anchors, ref, stabilizer inputs
            if self.loss_batch is not None:  # alpha and tau from this micro-batch
                ctx = replace(ctx, **self.loss_batch.values(ro.rewards[chunk], batch.advantages, ro.group_ids[chunk],
                                                            logp, batch.logp_old, mask))
            loss, m = objective_loss(self.objective, batch, a, ctx)  # stabilizers + objective + entropy bonus
            if not world.all_true(bool(torch.isfinite(loss))):  # one rank's NaN skips the step on all
                finite = False
                break
            world.backward(loss)
            m = {**m, "loss": float(loss.detach()), "entropy": float((ent.sum() / mask.sum().clamp(min=1)).item())}
            share = len(chunk) / len(rows)
            for k, v in m.items():  # the loss is normalised by mini-batch totals, so it adds up; the rest are means
                acc[k] = acc.get(k, 0.0) + (v if k == "loss" else v * share)
        grad_norm = clip_grad_norm(self.model, o.grad_clip) if finite else None
        if grad_norm is not None and math.isfinite(grad_norm):
            st.optimizer.step()
            st.lr_scheduler.step()
            st.consecutive_skips = 0
        else:
            st.optimizer.zero_grad(set_to_none=True)
            st.skipped_total += 1
            st.consecutive_skips += 1
            grad_norm = None
        st.optimizer.zero_grad(set_to_none=True)
        return acc, grad_norm

    def _record(self, ro: Rollout, sig: Any, alpha: float, tau: float, roll_metrics: dict[str, float],
                train_metrics: dict[str, float], times: dict[str, float]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The step's metrics line (TRL names where one exists) and its logged samples."""
        st = self.state
        step_time = times["time/rollout"] + times["time/train"] + times["time/sync"]
        lengths = [len(c) for c in ro.completion_ids]
        anchored = "tau" in self.objective.params  # apo/adpo: alpha and tau mean something
        record: dict[str, Any] = {
            "step": st.step,
            "epoch": st.order.progress,
            **roll_metrics,
            **{k: v for k, v in vars(sig).items() if k != "step"},
            **train_metrics,
            **({"alpha": alpha, "tau": tau} if anchored else {}),
            **(st.alpha_schedule.metrics() if self.objective.uses_alpha else {}),
            "completions/mean_length": sum(lengths) / len(lengths),
            "completions/min_length": min(lengths),
            "completions/max_length": max(lengths),
            "completions/clipped_ratio": sum(f == "length" for f in ro.finish) / len(ro.finish),
            "prompts/truncated": st.truncated_prompts,
            "learning_rate": st.lr_scheduler.get_last_lr()[0],
            "skipped_steps": st.skipped_total,
            "num_tokens": sum(lengths) + sum(len(p) for p in ro.prompt_ids),
            **times,
            "step_time": step_time,
            "tokens_per_s": sum(lengths) / max(step_time, 1e-9),
            **self.perf.metrics(ro.prompt_ids, ro.completion_ids, self.G, ro.engine_logprobs is not None, times),
        }
        k = self.recipe.logging.samples_per_step
        samples = [
            {"step": st.step, "prompt": ro.prompts[i * self.G], "completion": ro.completions[i * self.G],
             "reward": float(ro.rewards[i * self.G]), "finish_reason": ro.finish[i * self.G]}
            for i in range(min(k, len(ro.rewards) // self.G))
        ]
        return record, samples

    # -- checkpoints ------------------------------------------------------------------------------

    def save(self, trainer_state: dict[str, Any] | None = None, rng: torch.Tensor | None = None) -> Path:
        """Checkpoint the current state, or ``trainer_state`` + ``rng`` taken before the running step."""
        path = state.save(self.run_dir, self.state, self.model, self.tok, self.world, lora=self.recipe.model.lora is not None,
                          keep_last=self.recipe.checkpoint.keep_last, trainer_state=trainer_state, rng=rng,
                          finisher=self.finisher)
        self.last_saved, self.last_path = int((trainer_state or {"step": self.state.step})["step"]), path
        return path

    def restore(self, path: Path, *, verified: bool = False) -> None:
        state.restore(path, self.state, self.model, self.world, lora=self.recipe.model.lora is not None, verified=verified)


def train_from_recipe(recipe: Recipe, *, resume: bool = False, resume_from: Path | None = None,
                      allow_recipe_change: bool = False) -> Path | None:
    trainer = session.during_setup(lambda: Trainer(recipe, resume=resume, resume_from=resume_from,
                                                   allow_recipe_change=allow_recipe_change))
    try:
        return trainer.train()
    finally:
        trainer.backend.close()
