"""The training loop, top to bottom.

One *step* is one rollout and the updates made from it:

1. **Rollout.** ``prompts_per_step`` prompts from the data (in a seeded order, epoch after epoch)
   are rendered (chat template or plain template) and sent to the backend, which samples
   ``group_size`` (G) completions for each, with the engine's log-probs of the sampled tokens.
2. **Rewards** per completion (weighted sum of the recipe's rewards), then **group advantages**
   (centred per group; std scaling per the objective) and the schedule **signals** (reward signal,
   confidence, calibration), from which the **alpha** and **tau** schedules give this step's values.
3. **Anchor.** The anchor log-probs are the trainer's own forward pass at the rollout weights. The
   first mini-batch of the first epoch is trained at exactly those weights, so its anchor is the
   detached log-prob of its own forward (u = 0, no extra pass); the other mini-batches get a
   no-grad pass before the first update. With one mini-batch and one epoch (the default) the
   step is purely on-policy and needs no extra forward at all.
4. **Updates.** The rollout's groups are shuffled *as whole groups* and split into
   ``algorithm.mini_batches``; each mini-batch is one optimizer step, accumulated from
   micro-batches of whole groups whose losses are normalised by the mini-batch totals (so 1×4 and
   4×1 give the same update). ``algorithm.epochs`` passes. Non-finite loss or gradient: the
   optimizer step is skipped and counted; after ``optim.max_consecutive_skips`` in a row the run
   stops with a checkpoint of the last good state.
5. **Sync, log, checkpoint.** ``backend.sync_weights()``; one metrics line; a checkpoint every
   ``checkpoint.every`` steps and at the end (atomic, the last K kept).

Stopping. SIGINT/SIGTERM finish the step, save and exit 130/143 (a second signal aborts at once).
An error in a step's rollout or rewards (before its update) saves the last completed step first,
so no finished step is lost; a kill at any moment loses at most the steps since the last
checkpoint. ``--resume`` restores weights, optimizer, LR schedule, RNG, data position and schedule
states, and cuts metrics.jsonl / samples.jsonl back to the checkpoint's step: on CPU a resumed run
equals an uninterrupted one.

Several processes (``torchrun``, apo_cli/parallel.py): each rank samples and scores its block of
the prompts, the rollout is gathered so signals, alpha and metrics are those of the whole step,
each rank trains on its block of every mini-batch with normalisers of the whole mini-batch, and
rank 0 alone writes. The update equals the one-process update on the same rollout.

Every name a recipe uses (objective, schedule, reward, backend) goes through a registry; the loop
never special-cases one.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from apo_cli.algo.advantages import compute_advantages
from apo_cli.algo.objectives import LossBatch, LossContext, get_objective, resolved
from apo_cli.algo.schedules import TauSchedule, compute_signals, make_alpha_schedule
from apo_cli.batching import completion_logprobs, pack
from apo_cli.checkpoint import (
    CheckpointPayload,
    RunLock,
    atomic_write_text,
    check_run_dir,
    checkpoint_path,
    latest_good_checkpoint,
    check_fit,
    load_weights_into,
    read_torch_state,
    read_trainer_state,
    read_weights,
    remove_stale_temp,
    verify_checkpoint,
    write_checkpoint,
)
from apo_cli.dashboard import make_dashboard
from apo_cli.data import uses_chat_template
from apo_cli.errors import (
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    ApoError,
    BackendError,
    CheckpointError,
    Interrupted,
    RunDirError,
    TrainingError,
    UsageError,
)
from apo_cli.metrics import MetricsWriter, truncate_jsonl_after
from apo_cli.runtime.world import World, shared
from apo_cli.runtime.fsdp import (
    adapter_names,
    check_shardable,
    full_model_state,
    full_optimizer_state,
    full_trainable_state,
    is_sharded,
    load_full_model_state,
    load_optimizer_state,
    named_optimizer_state,
)
from apo_cli.recipe import Recipe, recipe_to_yaml
from backends import SamplingParams, create_backend


@dataclass
class Rollout:
    """One step's samples, flattened group by group: row k belongs to group k // G."""

    prompt_ids: list[list[int]]  # [N]
    completion_ids: list[list[int]]  # [N]
    completions: list[str]  # [N]
    prompts: list[str]  # [N]
    finish: list[str]  # [N]
    engine_logprobs: list[list[float]] | None
    rewards: torch.Tensor  # [N]
    advantages: torch.Tensor  # [N]
    group_ids: torch.Tensor  # [N]


class DataOrder:
    """Seeded order over training examples, epoch after epoch; its state is (epoch, pos)."""

    def __init__(self, n: int, seed: int, shuffle: bool):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.pos = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        idx = list(range(self.n))
        if self.shuffle:
            random.Random(self.seed * 7919 + self.epoch).shuffle(idx)
        return idx

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._make_order()
            out.append(self._order[self.pos])
            self.pos += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, d: dict[str, int]) -> None:
        self.epoch, self.pos = int(d["epoch"]), int(d["pos"])
        self._order = self._make_order()


class _StopFlag:
    """First SIGINT/SIGTERM: finish the step, save, exit 130/143. Second: abort now."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7_919) % (2**63 - 1)


class Trainer:
    def __init__(self, recipe: Recipe, *, resume: bool = False, resume_from: Path | None = None,
                 allow_recipe_change: bool = False):
        self.recipe = r = recipe
        self.world = World.from_env()  # several processes under torchrun (apo_cli/parallel.py)
        self.backend: Any = None
        if self.world.distributed:  # join the other ranks first: then any failure below reaches them all
            _check_world(r, self.world)
            self.backend = _joined_backend(r)
        try:
            # what may fail on one rank alone and runs no collective (checks, data, rewards, reading
            # the model) ends in one collective that shares the failure, so no rank goes on to the
            # collectives of the placement (sharding, engines) while another has stopped. A failure
            # during the placement stops its rank at once, and torchrun stops the others.
            with self.world.agree():
                model, ref = self._prepare(resume, resume_from, allow_recipe_change)
            self._place(model, ref)
        except BaseException:
            if self.backend is not None:
                self.backend.close()  # under torchrun: leave the process group
            raise

    def _prepare(self, resume: bool, resume_from: Path | None, allow_recipe_change: bool) -> tuple[Any, Any]:
        """Checks, data, rewards, and the policy read from disk (on the CPU); no collective."""
        from apo_cli.data import load_examples, render_prompt
        from apo_cli.models import load_policy
        from apo_cli.rewards import RewardSet

        r = self.recipe
        self.run_dir = r.resolved_output_dir()
        if resume_from is not None and self.world.is_main:
            verify_checkpoint(Path(resume_from))  # a missing or corrupted checkpoint fails before anything loads
        self.resume = resume or resume_from is not None or (r.checkpoint.resume == "auto" and self._has_run())
        check_run_dir(self.run_dir, r.model_dump(mode="json"), resume=self.resume, allow_change=allow_recipe_change,
                      resume_from=resume_from)
        _check_creatable(self.run_dir)
        self.resume_from = resume_from
        self.G = r.rollout.group_size
        self.objective = get_objective(r.algorithm.objective)

        # data and rewards first: a bad dataset or reward fails before a model is loaded
        self.examples = load_examples(r.data, r.run.seed, "train")
        if not self.examples:
            raise ApoError(f"no training examples from {r.data.source} after filters and limits")
        self.rewards = RewardSet(r.rewards)
        if self.world.is_main:  # the checks (which call the rewards) once
            _preflight(r)
        self.max_steps = r.run.max_steps or max(1, math.ceil(r.run.epochs * len(self.examples) / r.rollout.prompts_per_step))

        _seed_everything(r.run.seed)
        if self.backend is None:
            self.backend = create_backend(r.backend)
        model, self.tok, self.model_path = load_policy(r.model, seed=r.run.seed, device_dtype=self._device_dtype())
        if self.world.distributed:
            check_shardable(model)  # before any collective: the same verdict on every rank
        ref = self._make_reference(model) if r.algorithm.kl_coef > 0 else None  # a copy before any sharding
        self._render = lambda ex: render_prompt(ex, r.data, self.tok)
        return model, ref

    def _place(self, model: Any, ref: Any) -> None:
        """The policy (and reference) on the backend, the optimizer and the schedules."""
        from apo_cli.models import context_length

        r = self.recipe
        self.model = self.backend.setup(model, self.tok)
        self.device = getattr(self.backend, "device", torch.device("cpu"))
        self.context = context_length(self.model, r.model)
        self.autocast = getattr(self.backend, "autocast", None)
        self.ref_model = None if ref is None else self._place_reference(ref)

        params = [p for p in self.model.parameters() if p.requires_grad]
        # fused on CPU: one kernel for all parameters instead of per-tensor ops (~3x less optimizer time)
        self.optimizer = torch.optim.AdamW(params, lr=r.optim.lr, betas=r.optim.betas, weight_decay=r.optim.weight_decay,
                                           fused=self.device.type == "cpu" and not is_sharded(self.model))
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda())
        self.alpha_schedule = make_alpha_schedule(r.algorithm.alpha, self.max_steps)
        self.tau_schedule = TauSchedule(r.algorithm.tau, r.algorithm.adaptive_tau)
        self.order = DataOrder(len(self.examples), r.run.seed, r.data.shuffle)
        self.step = 0
        self.skipped_total = 0
        self.consecutive_skips = 0
        self.truncated_prompts = 0
        self._last_saved, self._last_path = 0, None
        self._phase = "rollout"  # "update" once a step starts changing the weights
        self._own_anchors: set[int] = set()  # this step's rows whose anchor this rank computed

    # -- setup helpers ----------------------------------------------------------------------------

    def _has_run(self) -> bool:
        return (self.run_dir / "recipe.yaml").is_file()

    def _device_dtype(self) -> str:
        # model.dtype auto: fp32 master weights everywhere; the backend computes in its dtype under autocast
        return "float32"

    def _make_reference(self, model):
        import copy

        if self.recipe.model.lora is not None:
            return None  # the reference is the base model: adapters disabled (see _ref_logprobs)
        ref = copy.deepcopy(model).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    def _place_reference(self, ref):
        """The reference where the policy is: on its device, and sharded like it under torchrun."""
        from apo_cli.runtime.fsdp import shard

        ref = ref.to(self.device)
        return shard(ref, self.world, self.device) if is_sharded(self.model) else ref

    def _lr_lambda(self):
        o = self.recipe.optim
        mb = self.recipe.algorithm.mini_batches * self.recipe.algorithm.epochs
        total = max(1, self.max_steps * mb)

        def f(i: int) -> float:
            if o.warmup_steps and i < o.warmup_steps:
                return (i + 1) / o.warmup_steps
            frac = (i - o.warmup_steps) / max(1, total - o.warmup_steps)
            if o.scheduler == "linear":
                return max(0.0, 1.0 - frac)
            if o.scheduler == "cosine":
                return 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
            return 1.0

        return f

    # -- state ------------------------------------------------------------------------------------

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "max_steps": self.max_steps,
            "data": self.order.state_dict(),
            "alpha_schedule": self.alpha_schedule.state_dict(),
            "tau_schedule": self.tau_schedule.state_dict(),
            "skipped_total": self.skipped_total,
            "consecutive_skips": self.consecutive_skips,
            "truncated_prompts": self.truncated_prompts,
            "base_model": self.model_path,
            "objective": self.recipe.algorithm.objective,
        }

    def _torch_state(self, optimizer_state: dict[str, Any], rng: torch.Tensor | None = None) -> dict[str, Any]:
        return {
            "optimizer": optimizer_state,
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "torch_rng": torch.get_rng_state() if rng is None else rng,
        }

    def save(self, trainer_state: dict[str, Any] | None = None, rng: torch.Tensor | None = None) -> Path:
        """Checkpoint the current state, or ``trainer_state`` + ``rng`` taken before the running step.

        Under torchrun every rank calls it: the full weights and optimizer state are gathered to
        rank 0, which writes; a failed write stops every rank."""
        ts = trainer_state or self._trainer_state()
        step = int(ts["step"])
        if is_sharded(self.model):
            # a LoRA checkpoint is its adapter: gather the trainable parameters only
            lora = self.recipe.model.lora is not None
            weights = full_trainable_state(self.model) if lora else full_model_state(self.model)
            optim = full_optimizer_state(self.model, self.optimizer)
        else:
            weights, optim = None, self.optimizer.state_dict()
        error = None
        if self.world.is_main:
            try:
                write_checkpoint(self.run_dir, CheckpointPayload(step, self.model, self.tok, ts,
                                                                 self._torch_state(optim, rng), weights),
                                 keep_last=self.recipe.checkpoint.keep_last)
            except ApoError as e:
                error = e
        self.world.raise_if_any(error)
        self._last_saved, self._last_path = step, checkpoint_path(self.run_dir, step)
        return self._last_path

    def restore(self, path: Path, *, verified: bool = False) -> None:
        if is_sharded(self.model):
            ts, tt = self._restore_sharded(path, verified)
        else:
            if not verified:
                verify_checkpoint(path)
            ts = read_trainer_state(path)
            tt = read_torch_state(path)
            load_weights_into(self.model, path)
            try:
                load_optimizer_state(self.model, self.optimizer, tt["optimizer"])
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise _does_not_fit(path, e) from None
        with self.world.agree():  # the same state on every rank: the same verdict, printed once
            try:
                self.lr_scheduler.load_state_dict(tt["lr_scheduler"])
                torch.set_rng_state(tt["torch_rng"])
                self.step = int(ts["step"])
                self.order.load_state_dict(ts["data"])
                self.alpha_schedule.load_state_dict(ts["alpha_schedule"])
                self.tau_schedule.load_state_dict(ts["tau_schedule"])
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise _does_not_fit(path, e) from None
        self.skipped_total = int(ts.get("skipped_total", 0))
        self.consecutive_skips = int(ts.get("consecutive_skips", 0))
        self.truncated_prompts = int(ts.get("truncated_prompts", 0))

    def _read_full_weights(self, path: Path) -> dict[str, Any]:
        """A checkpoint's weights keyed by this (sharded) model's names, checked against it."""
        if self.recipe.model.lora is None:
            weights = read_weights(path)
            check_fit(path, self.model, weights)
            return weights
        from safetensors.torch import load_file

        adapter = path / "adapter_model.safetensors"
        if not adapter.is_file():
            raise CheckpointError(f"checkpoint {path} holds no LoRA adapter (adapter_model.safetensors)")
        try:
            weights = adapter_names(self.model, load_file(str(adapter)))
        except (ValueError, OSError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {path} does not fit the model: {e}") from None
        check_fit(path, self.model, weights, partial=True)
        return weights

    def _restore_sharded(self, path: Path, verified: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        """Rank 0 reads and checks the checkpoint and sends each tensor to the ranks, which keep their
        shards (the full weights and optimizer state are in rank 0's memory only). Returns the trainer
        state and the small torch state (scheduler, RNG), the same on every rank."""
        main = self.world.is_main
        weights: dict[str, Any] = {}
        optim: dict[str, Any] = {}
        small = None
        with self.world.agree():
            if main:
                if not verified:
                    verify_checkpoint(path)
                tt = read_torch_state(path)
                weights = self._read_full_weights(path)
                try:
                    optim = named_optimizer_state(self.model, self.optimizer, tt["optimizer"])
                except (KeyError, TypeError, ValueError) as e:
                    raise _does_not_fit(path, e) from None
                small = {k: v for k, v in tt.items() if k != "optimizer"}
        small = self.world.gather(small)[0]
        try:  # collectives inside: a failure here stops its rank at once (and torchrun the others)
            load_full_model_state(self.model, weights)
            load_optimizer_state(self.model, self.optimizer, optim)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise _does_not_fit(path, e) from None
        return read_trainer_state(path), small

    # -- one step ---------------------------------------------------------------------------------

    def rollout(self) -> tuple[Rollout, list, dict[str, float]]:
        """Sample and score this step's groups. Under torchrun each rank samples and scores its own
        block of the prompts and the rollout is gathered, so every rank returns the whole step."""
        r = self.recipe
        idx = self.order.take(r.rollout.prompts_per_step)
        examples = [self.examples[i] for i in idx]
        texts = [self._render(ex) for ex in examples]
        add_special = not uses_chat_template(r.data, self.tok)  # chat templates carry their own BOS
        prompt_ids = []
        for t in texts:
            ids = self.tok(t, add_special_tokens=add_special).input_ids
            limit = r.rollout.max_prompt_tokens or max(1, self.context - r.rollout.max_new_tokens)
            if len(ids) > limit:
                ids = ids[-limit:]
                self.truncated_prompts += 1
            prompt_ids.append(ids)
        mine = self.world.shard(len(examples))
        params = SamplingParams(
            n=self.G, max_new_tokens=r.rollout.max_new_tokens, temperature=r.rollout.temperature,
            top_p=r.rollout.top_p, top_k=r.rollout.top_k, stop=tuple(r.rollout.stop),
            seed=_step_seed(r.run.seed, self.step) + self.world.rank,  # each rank draws its own samples
        )
        rep = lambda xs: [x for x in xs for _ in range(self.G)]  # noqa: E731
        # generation may run collectives (a tensor-parallel engine, gathering a sharded policy): a
        # failure there stops its rank at once. Rewards run none: a failure is shared with every rank
        groups = self.backend.generate([prompt_ids[i] for i in mine], params)
        flat = [c for g in groups for c in g]
        completions = [self.tok.decode(c.ids, skip_special_tokens=True) for c in flat]
        with self.world.agree():
            out = self.rewards(rep([texts[i] for i in mine]), completions, [c.ids for c in flat],
                               rep([examples[i] for i in mine]), check=not self.world.distributed)
        if self.world.distributed:
            from apo_cli.rewards import merge_outputs

            parts = self.world.gather((flat, completions, out))
            flat = [c for p in parts for c in p[0]]
            completions = [c for p in parts for c in p[1]]
            out = merge_outputs([p[2] for p in parts])
            with self.world.agree():  # the same verdict on every rank: a reward broken for the whole step
                self.rewards.check(out)
        rewards = torch.tensor(out.total, dtype=torch.float32)
        group_ids = torch.arange(len(examples)).repeat_interleave(self.G)
        std_mode = resolved(r.algorithm, "advantage_std")
        adv, adv_stats = compute_advantages(rewards, group_ids, std_mode)
        engine_lp = None if any(c.logprobs is None for c in flat) else [c.logprobs for c in flat]
        ro = Rollout(rep(prompt_ids), [c.ids for c in flat], completions, rep(texts), [c.finish_reason for c in flat],
                     engine_lp, rewards, adv, group_ids)
        metrics = {**adv_stats, **out.metrics}
        correct = None if out.correct is None else torch.tensor(out.correct, dtype=torch.bool)
        return ro, correct, metrics

    def _forward(self, model, prompts, completions, *, grad: bool, entropy: bool = False):
        packed = pack(prompts, completions, self.tok.pad_token_id).to(self.device)
        ctx = torch.enable_grad() if grad else torch.no_grad()
        with ctx:
            logp, ent = completion_logprobs(model, packed, autocast=self.autocast() if self.autocast else None,
                                            with_entropy=entropy)
        return logp, ent, packed.mask

    def _ref_logprobs(self, prompts, completions):
        if self.ref_model is not None:
            return self._forward(self.ref_model, prompts, completions, grad=False)[0]
        with self.model.disable_adapter():
            return self._forward(self.model, prompts, completions, grad=False)[0]

    def _anchor_rows(self, rows: list[int], ro: Rollout, anchors: dict[int, torch.Tensor]) -> None:
        """Anchors for ``rows`` (the same list on every rank). Under torchrun each rank computes an
        equal block (FSDP needs the same forwards on every rank) and the ranks exchange them."""
        if not self.world.distributed:
            self._anchor_pass(rows, ro, anchors)
            self._own_anchors.update(rows)
            return
        local: dict[int, torch.Tensor] = {}
        self._anchor_pass(self.world.part(rows), ro, local)
        self._own_anchors.update(local)
        for part in self.world.gather({i: t.cpu() for i, t in local.items()}):
            anchors.update({i: t.to(self.device) for i, t in part.items()})

    def _anchor_pass(self, rows: list[int], ro: Rollout, anchors: dict[int, torch.Tensor]) -> None:
        """No-grad log-probs at the rollout weights for ``rows`` (before any update of this step)."""
        mbs = self.recipe.optim.micro_batch_size
        for s in range(0, len(rows), mbs):
            chunk = rows[s : s + mbs]
            logp, _, mask = self._forward(self.model, [ro.prompt_ids[i] for i in chunk],
                                          [ro.completion_ids[i] for i in chunk], grad=False)
            for k, i in enumerate(chunk):
                anchors[i] = logp[k, : len(ro.completion_ids[i])].detach()

    def _plan(self, n_groups: int) -> list[list[list[int]]]:
        """The step's updates: [epoch][mini-batch] -> group indices. The groups are shuffled as
        whole groups and split into mini-batches; under torchrun each rank trains on its block of
        every mini-batch (``World.part``), so the ranks together make exactly the one-process update."""
        a = self.recipe.algorithm
        gen = torch.Generator().manual_seed(_step_seed(self.recipe.run.seed, self.step) + 1)
        plans = []
        for _ in range(a.epochs):
            perm = torch.randperm(n_groups, generator=gen).tolist()
            per = n_groups // a.mini_batches
            plans.append([perm[i * per : (i + 1) * per] for i in range(a.mini_batches)])
        return plans

    def _rows(self, groups: list[int]) -> list[int]:
        return [g * self.G + j for g in groups for j in range(self.G)]

    def update(self, ro: Rollout, alpha: float, tau: float, anchors: dict[int, torch.Tensor],
               plans: list[list[list[int]]]) -> dict[str, float]:
        """All optimizer steps of one rollout. Returns the step's averaged training metrics."""
        a = self.recipe.algorithm
        first_rows = set(self._rows(plans[0][0]))  # trained first, at the rollout weights: own anchors
        rest = [i for i in range(len(ro.rewards)) if i not in first_rows and i not in anchors]
        if rest and (a.mini_batches > 1 or a.epochs > 1):
            self._anchor_rows(rest, ro, anchors)
        acc: dict[str, float] = {}
        weight = 0.0
        grad_norms = []
        for e, epoch_plan in enumerate(plans):
            for b, mb_groups in enumerate(epoch_plan):
                rows = self._rows(self.world.part(mb_groups))
                m, gn = self._optimizer_step(ro, rows, alpha, tau, anchors)
                if e == b == 0 and a.epochs > 1 and self.world.distributed:
                    # the first mini-batch's rows were anchored by their own forward, on the rank
                    # that trained each; a later epoch may give them to another rank
                    first = {i: anchors[i].cpu() for i in rows if i in anchors}
                    for part in self.world.gather(first):
                        for i, t in part.items():
                            anchors.setdefault(i, t.to(self.device))
                if gn is not None:
                    grad_norms.append(gn)
                for k, v in m.items():
                    acc[k] = acc.get(k, 0.0) + v * len(rows)
                weight += len(rows)
        out = {k: v / max(weight, 1) for k, v in acc.items()}
        if self.world.distributed:  # every rank trained on as many rows: means of means, losses add up
            out = self.world.mean(out)
            if "loss" in out:
                out["loss"] *= self.world.size
        out["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else float("nan")
        return out

    def _optimizer_step(self, ro, rows, alpha, tau, anchors):
        o, a = self.recipe.optim, self.recipe.algorithm
        world = self.world.size
        # normalisers of the whole mini-batch: this rank's rows and the other ranks' (as many rows each)
        total_tokens = float(sum(self.world.gather(sum(len(ro.completion_ids[i]) for i in rows))))
        ctx = LossContext(alpha=alpha, tau=tau, total_groups=world * len(rows) // self.G, total_seqs=world * len(rows),
                          total_tokens=max(total_tokens, 1.0), max_new_tokens=self.recipe.rollout.max_new_tokens)
        self.optimizer.zero_grad(set_to_none=True)
        acc: dict[str, float] = {}
        finite = True
        for s in range(0, len(rows), o.micro_batch_size):
            chunk = rows[s : s + o.micro_batch_size]
            prompts = [ro.prompt_ids[i] for i in chunk]
            comps = [ro.completion_ids[i] for i in chunk]
            logp, ent, mask = self._forward(self.model, prompts, comps, grad=True, entropy=True)
            width = logp.shape[1]
            old = torch.zeros_like(logp)
            for k, i in enumerate(chunk):
                if i not in anchors:  # first visit at the rollout weights: the anchor is this forward
                    anchors[i] = logp[k, : len(ro.completion_ids[i])].detach().clone()
                    self._own_anchors.add(i)
                old[k, : anchors[i].shape[0]] = anchors[i][:width]
            ref = self._ref_logprobs(prompts, comps) if a.kl_coef > 0 else None
            batch = LossBatch(logp=logp, logp_old=old, mask=mask, advantages=ro.advantages[chunk].to(self.device),
                              group_ids=ro.group_ids[chunk].to(self.device), logp_ref=ref)
            loss, m = self.objective.fn(batch, a, ctx)
            if not self.world.all_true(bool(torch.isfinite(loss))):  # one rank's NaN skips the step on all
                finite = False
                break
            # FSDP averages the gradients over the ranks; the loss is already a share of the whole sum
            (loss * world if world > 1 else loss).backward()
            m = dict(m)
            m["loss"] = float(loss.detach())
            m["entropy"] = float((ent.sum() / mask.sum().clamp(min=1)).item())
            share = len(chunk) / len(rows)
            for k, v in m.items():
                # the loss is already normalised by mini-batch totals, so it adds up; the rest are means
                acc[k] = acc.get(k, 0.0) + (v if k == "loss" else v * share)
        grad_norm = None
        if finite:
            params = [p for p in self.model.parameters() if p.grad is not None]
            max_norm = o.grad_clip if o.grad_clip is not None else float("inf")
            gn = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.tensor(0.0)
            gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn  # sharded: the norm of all shards
            finite = bool(torch.isfinite(gn))
            grad_norm = float(gn)
        if finite:
            self.optimizer.step()
            self.lr_scheduler.step()
            self.consecutive_skips = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_total += 1
            self.consecutive_skips += 1
            grad_norm = None
        self.optimizer.zero_grad(set_to_none=True)
        return acc, grad_norm

    # -- the run ----------------------------------------------------------------------------------

    def train(self) -> Path | None:
        r = self.recipe
        with self.world.agree():
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise RunDirError(f"cannot create run directory {self.run_dir}: {e.strerror or e}") from None
        main = self.world.is_main  # under torchrun only rank 0 shows and writes anything
        dash = make_dashboard(r.logging.dashboard, r.run.name, self.max_steps, muted=not main)
        with self.world.on_main(RunLock(self.run_dir)):
            notes = self._start()
            if self.step >= self.max_steps:
                dash.message(f"run {r.run.name} is already finished ({self.step}/{self.max_steps} steps)")
                return latest_good_checkpoint(self.run_dir)
            # the engine samples from the (restored) policy from the first rollout on; under torchrun
            # the sync's collectives run here, outside a rollout
            self.backend.sync_weights()
            metrics = MetricsWriter(self.run_dir / r.logging.metrics_file,
                                    self.run_dir / "tb" if r.logging.tensorboard else None) if main else None
            with _StopFlag() as stop, dash:
                for n in notes:
                    dash.message(n, "yellow")
                try:
                    self._loop(metrics, dash, stop)
                finally:
                    if metrics is not None:
                        metrics.close()
        dash.message(f"done: {self.step} steps; final checkpoint {self._last_path}")
        return self._last_path

    def _start(self) -> list[str]:
        """Clean up after a killed run, restore the state to resume from, cut the logs back to it."""
        notes = []
        main = self.world.is_main
        if main and remove_stale_temp(self.run_dir):
            notes.append("removed the partial files of an interrupted checkpoint or log write")
        if self.resume:
            # both were verified already: the --resume-from one in __init__, the latest good one here
            ckpt = self.resume_from
            if ckpt is None:
                with self.world.agree():  # rank 0 verifies and chooses; every rank takes its choice
                    ckpt = latest_good_checkpoint(self.run_dir, warn=notes.append) if main else None
                ckpt = self.world.gather(ckpt)[0]
            if ckpt is None:
                notes.append(f"no checkpoint in {self.run_dir}: starting from step 0")
            else:
                self.restore(Path(ckpt), verified=True)
                notes.append(f"resumed from {ckpt} at step {self.step}")
        if self.step >= self.max_steps:  # finished: leave the run directory as it is
            return notes
        if main:
            # lines of steps after the checkpoint are redone: drop them so each step is logged once
            truncate_jsonl_after(self.run_dir / self.recipe.logging.metrics_file, self.step)
            truncate_jsonl_after(self.run_dir / "samples.jsonl", self.step)
            atomic_write_text(self.run_dir / "recipe.yaml", recipe_to_yaml(self.recipe))
        self._last_saved = self.step
        return notes

    def _loop(self, metrics: MetricsWriter | None, dash, stop: _StopFlag) -> None:
        """``metrics`` is None on the ranks other than 0, which write nothing."""
        r = self.recipe
        samples_path = self.run_dir / "samples.jsonl"
        while self.step < self.max_steps:
            before = json.loads(json.dumps(self._trainer_state())), torch.get_rng_state()
            try:
                record, samples = self._one_step()
            except Exception as e:
                # under torchrun only a failure every rank knows of (shared through a collective)
                # can be saved: saving is collective, and the other ranks may be elsewhere
                if not self.world.distributed or getattr(e, "shared", False):
                    self._save_before_failure(*before, dash=dash)
                raise
            if metrics is not None:
                metrics.write(record)
                _append_samples(samples_path, samples)
            dash.update(record, samples)
            if self.consecutive_skips >= r.optim.max_consecutive_skips:
                path = self.save()
                raise shared(TrainingError(
                    f"{self.consecutive_skips} optimizer steps in a row had a non-finite loss or gradient; "
                    f"stopped at step {self.step} (weights untouched since the last good step, saved in {path})",
                    hint="lower optim.lr or check the rewards",
                ))  # every rank counted the same skips
            signum = self.world.max(stop.signum or 0)  # a signal to any rank stops all after this step
            if signum:
                path = self.save()
                code = EXIT_TERMINATED if signum == signal.SIGTERM else EXIT_INTERRUPTED
                name = "SIGTERM" if signum == signal.SIGTERM else "SIGINT"
                raise shared(Interrupted(f"{name}: stopped at step {self.step}; saved {path} (resume with --resume)", code))
            if self.step % r.checkpoint.every == 0 or self.step == self.max_steps:
                self.save()

    def _save_before_failure(self, trainer_state: dict[str, Any], rng: torch.Tensor, *, dash) -> None:
        """A step failed before its update: the weights are still those of the last completed step,
        so checkpoint that step (with the data position and RNG from before the failed step)."""
        done = int(trainer_state["step"])
        if self._phase != "rollout" or done <= self._last_saved:
            return
        self.step = done
        try:
            path = self.save(trainer_state, rng)
        except ApoError as e:
            dash.message(f"could not save step {done} before stopping: {e}", "red")
            return
        dash.message(f"saved {path} (the last completed step) before stopping; resume with --resume", "yellow")

    def _one_step(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        r = self.recipe
        t0 = time.perf_counter()
        self._phase = "rollout"
        self.step += 1
        torch.manual_seed(_step_seed(r.run.seed, self.step))
        ro, correct, roll_metrics = self.rollout()
        t_roll = time.perf_counter()
        anchors: dict[int, torch.Tensor] = {}
        self._own_anchors = set()
        plans = self._plan(len(ro.rewards) // self.G)
        if ro.engine_logprobs is None:  # signals need the rollout policy's log-probs: take the anchor pass
            self._anchor_rows(list(range(len(ro.rewards))), ro, anchors)
            seq_lp = torch.tensor([float(anchors[i].mean()) if anchors[i].numel() else 0.0 for i in range(len(ro.rewards))])
        else:
            seq_lp = torch.tensor([sum(lp) / max(len(lp), 1) for lp in ro.engine_logprobs])
        vocab = int(getattr(self.model.config, "vocab_size", len(self.tok)))
        sig = compute_signals(self.step - 1, ro.rewards, ro.advantages, ro.group_ids, seq_lp, vocab, correct)
        anchored = "tau" in self.objective.params  # apo/adpo: alpha and tau mean something
        alpha = self.alpha_schedule.step(sig) if self.objective.uses_alpha else 1.0
        tau = self.tau_schedule.step(sig)
        self._phase = "update"
        train_metrics = self.update(ro, alpha, tau, anchors, plans)
        # each row's mismatch counted once: on the rank that computed its anchor
        own = {i: t for i, t in anchors.items() if i in self._own_anchors}
        train_metrics.update(self.world.mean(_engine_mismatch(ro, own)))
        sync_s = self.backend.sync_weights()
        t_end = time.perf_counter()
        lengths = [len(c) for c in ro.completion_ids]
        n_tokens = sum(lengths) + sum(len(p) for p in ro.prompt_ids)
        record: dict[str, Any] = {
            "step": self.step,
            "epoch": self.order.epoch + self.order.pos / len(self.examples),
            **roll_metrics,
            **{k: v for k, v in vars(sig).items() if k != "step"},
            **train_metrics,
            **({"alpha": alpha, "tau": tau} if anchored else {}),
            **(self.alpha_schedule.metrics() if self.objective.uses_alpha else {}),
            "completions/mean_length": sum(lengths) / len(lengths),
            "completions/min_length": min(lengths),
            "completions/max_length": max(lengths),
            "completions/clipped_ratio": sum(f == "length" for f in ro.finish) / len(ro.finish),
            "prompts/truncated": self.truncated_prompts,
            "learning_rate": self.lr_scheduler.get_last_lr()[0],
            "skipped_steps": self.skipped_total,
            "num_tokens": n_tokens,
            "time/rollout": t_roll - t0,
            "time/train": t_end - t_roll - sync_s,
            "time/sync": sync_s,
            "step_time": t_end - t0,
            "tokens_per_s": sum(lengths) / max(t_end - t0, 1e-9),
        }
        k = r.logging.samples_per_step
        samples = [
            {"step": self.step, "prompt": ro.prompts[i * self.G], "completion": ro.completions[i * self.G],
             "reward": float(ro.rewards[i * self.G]), "finish_reason": ro.finish[i * self.G]}
            for i in range(min(k, len(ro.rewards) // self.G))
        ]
        return record, samples


def _engine_mismatch(ro: Rollout, anchors: dict[int, torch.Tensor]) -> dict[str, float]:
    """|engine log-prob − trainer log-prob| per token at the rollout weights (sampling/logprob_diff_*)."""
    if ro.engine_logprobs is None or not anchors:
        return {}
    diffs = [
        (torch.tensor(ro.engine_logprobs[i], dtype=torch.float32) - a.float().cpu()).abs()
        for i, a in anchors.items()
        if len(ro.engine_logprobs[i]) == a.numel() and a.numel()
    ]
    if not diffs:
        return {}
    d = torch.cat(diffs)
    return {"sampling/logprob_diff_mean": float(d.mean()), "sampling/logprob_diff_max": float(d.max())}


def _does_not_fit(path: Path, e: BaseException) -> CheckpointError:
    what = f"missing {e}" if isinstance(e, KeyError) else str(e).strip().splitlines()[0][:200]
    return CheckpointError(f"checkpoint {path} does not fit this run: {what}")


def _joined_backend(recipe: Recipe) -> Any:
    """The recipe's backend, joined to the other torchrun processes."""
    backend = create_backend(recipe.backend)
    if not getattr(backend, "supports_torchrun", False):
        raise BackendError(f"backend {recipe.backend.kind!r} does not run under torchrun; run one process")
    backend.join()
    return backend


def _check_world(recipe: Recipe, world: World) -> None:
    """Every rank trains on as many whole groups, in as many mini-batches (FSDP needs every rank to
    run the same forward and backward passes)."""
    b, mb = recipe.rollout.prompts_per_step, recipe.algorithm.mini_batches
    unit = world.size * mb
    if b % unit:
        what = f"{world.size} torchrun processes" + (f" × algorithm.mini_batches={mb}" if mb > 1 else "")
        near = sorted({max(unit, b // unit * unit), (b // unit + 1) * unit})
        raise UsageError(f"rollout.prompts_per_step={b} must be a multiple of {unit} ({what}), so that every "
                         f"process trains as many whole groups; try {' or '.join(map(str, near))}")


def _preflight(recipe: Recipe) -> None:
    """Warnings and errors of the preflight checks (apo validate --preflight); errors stop the run here."""
    from rich.console import Console
    from rich.markup import escape

    from apo_cli.errors import DataError
    from apo_cli.preflight import run_preflight

    findings = run_preflight(recipe)
    errors = [f.message for f in findings if f.level == "error"]
    if errors:  # one line, like every other error
        raise DataError(errors[0] + (f" (and {len(errors) - 1} more: apo validate --preflight)" if len(errors) > 1 else ""))
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    for f in findings:
        if f.level == "warning":
            console.print(f"[yellow]warning:[/yellow] {escape(f.message)}")


def _append_samples(path: Path, samples: list[dict[str, Any]]) -> None:
    if not samples:
        return
    try:
        with path.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(s) + "\n" for s in samples))
    except OSError as e:
        raise RunDirError(f"cannot write {path}: {e.strerror or e}") from None


def _check_creatable(run_dir: Path) -> None:
    """RunDirError now, before a model is loaded, when the run directory cannot be created or written."""
    p = run_dir.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise RunDirError(f"cannot create run directory {run_dir}: {p} is a file")
    if not os.access(p, os.W_OK | os.X_OK):
        raise RunDirError(f"cannot create run directory {run_dir}: {p} is not writable")


def _during_setup(build):
    """Run ``build`` with SIGTERM turned into a one-line exit 143 (nothing is trained yet, nothing to save)."""
    def handler(signum, frame):
        raise Interrupted("SIGTERM before training started; nothing to save", EXIT_TERMINATED)

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return build()
    try:
        return build()
    finally:
        signal.signal(signal.SIGTERM, old)


def train_from_recipe(recipe: Recipe, *, resume: bool = False, resume_from: Path | None = None,
                      allow_recipe_change: bool = False) -> Path | None:
    trainer = _during_setup(lambda: Trainer(recipe, resume=resume, resume_from=resume_from,
                                            allow_recipe_change=allow_recipe_change))
    try:
        return trainer.train()
    finally:
        trainer.backend.close()
