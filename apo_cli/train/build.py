"""Everything a run is built from, in the order that fails cheapest first: checks of the run
directory, data, rewards, the backend, the policy read from disk and placed on the backend (sharded
under torchrun), the KL reference, the optimizer, the LR schedule and the alpha/tau schedules.

:func:`build` returns a :class:`Built`; the loop (apo_cli/train/loop.py) only reads it.

Under torchrun the ranks join first, then every check that may fail on one rank alone (data,
rewards, reading the model) ends in one collective that shares the failure, so no rank goes on to
the collectives of the placement (sharding, engines) while another has stopped.
"""

from __future__ import annotations

import copy
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from apo_cli.algo.objectives import get_objective
from apo_cli.algo.schedules import TauSchedule, make_alpha_schedule
from apo_cli.checkpoint import check_run_dir, read_trainer_state
from apo_cli.errors import ApoError, BackendError, DataError, RunDirError, UsageError
from apo_cli.runtime.fsdp import check_shardable, is_sharded, shard
from apo_cli.runtime.world import World
from apo_cli.sampling import prompt_limit
from apo_cli.train.embedding import row_gradient_embedding
from apo_cli.train.policy import Policy, disable_dropout
from apo_cli.train.state import DataOrder, TrainState, check_objective, verify_resumable
from backends import create_backend

if TYPE_CHECKING:
    from apo_cli.recipe import Recipe


@dataclass
class Built:
    recipe: Recipe
    world: World
    backend: Any
    run_dir: Path
    resume: bool  # restore the latest good checkpoint of run_dir (or resume_from)
    resume_from: Path | None
    examples: list[Any]  # the training rows (apo_cli.data.Example)
    rewards: Any  # apo_cli.rewards.RewardSet
    objective: Any  # apo_cli.algo.objectives.ObjectiveInfo
    tok: Any
    render: Any  # Example -> prompt text
    chat: bool  # the prompts are chat-templated (they carry their own BOS)
    prompt_limit: int  # prompt tokens kept (the last ones)
    policy: Policy
    state: TrainState


def build(recipe: Recipe, *, resume: bool, resume_from: Path | None, allow_recipe_change: bool) -> Built:
    world = World.from_env()
    backend = None
    if world.distributed:  # join the other ranks first: then any failure below reaches them all
        _check_world(recipe, world)
        backend = _joined_backend(recipe)
    try:
        with world.agree():
            parts = _prepare(recipe, world, backend, resume, resume_from, allow_recipe_change)
        backend = parts["backend"]
        return _place(recipe, world, parts)
    except BaseException:
        if backend is not None:
            backend.close()  # under torchrun: leave the process group
        raise


def _prepare(r: Recipe, world: World, backend: Any, resume: bool, resume_from: Path | None,
             allow_recipe_change: bool) -> dict[str, Any]:
    """Checks, data, rewards, and the policy read from disk (on the CPU); no collective."""
    from apo_cli.data import load_examples, render_prompt, uses_chat_template
    from apo_cli.models import load_policy
    from apo_cli.rewards import RewardSet

    run_dir = r.resolved_output_dir()
    if resume_from is not None and world.is_main:  # a missing, corrupted or foreign checkpoint fails before anything loads
        verify_resumable(Path(resume_from))
        check_objective(Path(resume_from), read_trainer_state(Path(resume_from)), r.algorithm.objective)
    resume = resume or resume_from is not None or (r.checkpoint.resume == "auto" and (run_dir / "recipe.yaml").is_file())
    check_run_dir(run_dir, r.model_dump(mode="json"), resume=resume, allow_change=allow_recipe_change,
                  resume_from=resume_from, metrics_file=r.logging.metrics_file)  # again under the run lock
    _check_creatable(run_dir)
    objective = get_objective(r.algorithm.objective)
    # data and rewards first: a bad dataset or reward fails before a model is loaded
    examples = load_examples(r.data, r.run.seed, "train")
    if not examples:
        raise ApoError(f"no training examples from {r.data.source} after filters and limits")
    rewards = RewardSet(r.rewards)
    if world.is_main:  # the checks (which call the rewards) once
        _preflight(r)
    random.seed(r.run.seed)
    torch.manual_seed(r.run.seed)
    if backend is None:
        backend = create_backend(r.backend)
    # model.dtype auto: fp32 master weights everywhere; the backend computes in its dtype under autocast
    model, tok, model_path = load_policy(r.model, seed=r.run.seed, device_dtype="float32")
    model.train()  # whatever the loader left (from_pretrained: eval): gradient checkpointing needs train mode
    if r.algorithm.disable_dropout:  # one function at one set of weights: anchors equal the policy's log-probs
        disable_dropout(model)
    if world.distributed:
        check_shardable(model)  # before any collective: the same verdict on every rank
    ref = _reference(model) if r.algorithm.kl_coef > 0 and r.model.lora is None else None  # before sharding
    return dict(run_dir=run_dir, resume=resume, resume_from=resume_from, allow_change=allow_recipe_change,
                objective=objective, examples=examples,
                rewards=rewards, backend=backend, model=model, tok=tok, model_path=model_path, ref=ref,
                render=lambda ex: render_prompt(ex, r.data, tok), chat=uses_chat_template(r.data, tok))


def _place(r: Recipe, world: World, p: dict[str, Any]) -> Built:
    """The policy (and reference) on the backend, the optimizer and the schedules."""
    from apo_cli.models import context_length

    backend = p["backend"]
    model = backend.setup(p["model"], p["tok"])
    row_gradient_embedding(model, backend.device)
    ref = p["ref"]
    if ref is not None:  # where the policy is: on its device, its attention, and sharded like it under torchrun
        ref = ref.to(backend.device)
        attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if attention is not None and ref.config._attn_implementation != attention:
            ref.set_attn_implementation(attention)  # the backend's choice (CPU: backends/attention.py)
        ref = shard(ref, world, backend.device) if is_sharded(model) else ref
    max_steps = r.run.max_steps or max(1, math.ceil(r.run.epochs * len(p["examples"]) / r.rollout.prompts_per_step))
    params = [q for q in model.parameters() if q.requires_grad]
    # fused on CPU: one kernel for all parameters instead of per-tensor ops (~3x less optimizer time)
    optimizer = torch.optim.AdamW(params, lr=r.optim.lr, betas=r.optim.betas, weight_decay=r.optim.weight_decay,
                                  fused=backend.device.type == "cpu" and not is_sharded(model))
    state = TrainState(
        max_steps=max_steps, order=DataOrder(len(p["examples"]), r.run.seed, r.data.shuffle),
        alpha_schedule=make_alpha_schedule(r.algorithm.alpha, max_steps),
        tau_schedule=TauSchedule(r.algorithm.tau, r.algorithm.adaptive_tau), optimizer=optimizer,
        lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(r, max_steps)),
        base_model=p["model_path"], objective=r.algorithm.objective, allow_recipe_change=p["allow_change"],
        optim_values={"lr": r.optim.lr, "betas": r.optim.betas, "weight_decay": r.optim.weight_decay},
    )
    limit = prompt_limit(context_length(model, r.model), r.rollout.max_new_tokens, r.rollout.max_prompt_tokens)
    return Built(recipe=r, world=world, backend=backend, run_dir=p["run_dir"], resume=p["resume"],
                 resume_from=p["resume_from"], examples=p["examples"], rewards=p["rewards"], objective=p["objective"],
                 tok=p["tok"], render=p["render"], chat=p["chat"], prompt_limit=limit,
                 policy=Policy(model, p["tok"], backend, ref), state=state)


def _reference(model: Any) -> Any:
    """A frozen copy of the initial policy (a LoRA policy's reference is its base: adapters disabled)."""
    ref = copy.deepcopy(model).eval()
    for q in ref.parameters():
        q.requires_grad_(False)
    return ref


def lr_lambda(r: Recipe, max_steps: int):
    """LR multiplier per optimizer step: linear warmup, then constant, linear or cosine decay."""
    o = r.optim
    total = max(1, max_steps * r.algorithm.mini_batches * r.algorithm.epochs)

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


def _joined_backend(recipe: Recipe) -> Any:
    """The recipe's backend, joined to the other torchrun processes."""
    backend = create_backend(recipe.backend)
    if not backend.supports_torchrun:
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

    from apo_cli.preflight import run_preflight

    findings = run_preflight(recipe)
    errors = [f.message for f in findings if f.level == "error"]
    if errors:  # one line, like every other error
        raise DataError(errors[0] + (f" (and {len(errors) - 1} more: apo validate --preflight)" if len(errors) > 1 else ""))
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    for f in findings:
        if f.level == "warning":
            console.print(f"[yellow]warning:[/yellow] {escape(f.message)}")


def _check_creatable(run_dir: Path) -> None:
    """RunDirError now, before a model is loaded, when the run directory cannot be created or written."""
    p = run_dir.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise RunDirError(f"cannot create run directory {run_dir}: {p} is a file")
    if not os.access(p, os.W_OK | os.X_OK):
        raise RunDirError(f"cannot create run directory {run_dir}: {p} is not writable")
