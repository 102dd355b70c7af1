"""Everything a checkpoint restores, in one object with one ``state_dict``.

:class:`TrainState` is the loop's whole mutable state: the step, the data position, the alpha and
tau schedules, the skip and truncation counters, the optimizer and the LR scheduler. Its
``state_dict()`` is the checkpoint's ``trainer_state.json`` (plain JSON) and ``torch_state()`` its
``optimizer.pt``; ``load_state_dict`` takes both back.

:func:`save` and :func:`restore` move it, with the weights, to and from a checkpoint folder. Under
torchrun the full weights and optimizer state are gathered to rank 0, which writes; on resume rank
0 reads and every rank keeps its shard (apo_cli/runtime/fsdp.py), so the files are the same for
any number of processes.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from apo_cli.checkpoint import (
    STATE_FILE,
    CheckpointPayload,
    check_fit,
    checkpoint_path,
    load_weights_into,
    read_torch_state,
    read_trainer_state,
    read_weights,
    verify_checkpoint,
    write_checkpoint,
)
from apo_cli.errors import ApoError, CheckpointError
from apo_cli.runtime.fsdp import (
    adapter_names,
    full_model_state,
    full_optimizer_state,
    full_trainable_state,
    is_sharded,
    load_full_model_state,
    load_optimizer_state,
    named_optimizer_state,
)
from apo_cli.runtime.world import World


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

    @property
    def progress(self) -> float:
        """Epochs done, fractional."""
        return self.epoch + self.pos / self.n

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, d: dict[str, int]) -> None:
        self.epoch, self.pos = int(d["epoch"]), int(d["pos"])
        self._order = self._make_order()


class TrainState:
    """The loop's mutable state; see the module docstring."""

    def __init__(self, *, max_steps: int, order: DataOrder, alpha_schedule: Any, tau_schedule: Any,
                 optimizer: torch.optim.Optimizer, lr_scheduler: Any, base_model: str, objective: str,
                 optim_values: dict[str, Any] | None = None, allow_recipe_change: bool = False):
        self.step = 0
        self.max_steps = max_steps
        self.order = order
        self.alpha_schedule = alpha_schedule
        self.tau_schedule = tau_schedule
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.skipped_total = 0  # optimizer steps skipped for a non-finite loss or gradient
        self.consecutive_skips = 0
        self.truncated_prompts = 0  # prompts cut to the context limit, over the run
        self.base_model = base_model
        self.objective = objective
        # the recipe's optim.lr, betas, weight_decay: a checkpoint trained with others resumes with these
        # only under --allow-recipe-change (see apply_recipe), which is also checked again under the run lock
        self.optim_values = optim_values
        self.allow_recipe_change = allow_recipe_change

    def state_dict(self) -> dict[str, Any]:
        """``trainer_state.json``: plain JSON."""
        return {
            "step": self.step,
            "max_steps": self.max_steps,
            "data": self.order.state_dict(),
            "alpha_schedule": self.alpha_schedule.state_dict(),
            "tau_schedule": self.tau_schedule.state_dict(),
            "skipped_total": self.skipped_total,
            "consecutive_skips": self.consecutive_skips,
            "truncated_prompts": self.truncated_prompts,
            "base_model": self.base_model,
            "objective": self.objective,
        }

    def torch_state(self, optimizer_state: dict[str, Any], rng: torch.Tensor | None = None) -> dict[str, Any]:
        """``optimizer.pt``: the optimizer's state as given (gathered when sharded), the LR scheduler, the RNG."""
        return {
            "optimizer": optimizer_state,
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "torch_rng": torch.get_rng_state() if rng is None else rng,
        }

    def load_state_dict(self, ts: dict[str, Any], tt: dict[str, Any]) -> None:
        """Everything but the optimizer (loaded with the weights, see :func:`restore`)."""
        self.lr_scheduler.load_state_dict(tt["lr_scheduler"])
        torch.set_rng_state(tt["torch_rng"])
        self.step = int(ts["step"])
        self.order.load_state_dict(ts["data"])
        self.alpha_schedule.load_state_dict(ts["alpha_schedule"])
        self.tau_schedule.load_state_dict(ts["tau_schedule"])
        self.skipped_total = int(ts.get("skipped_total", 0))
        self.consecutive_skips = int(ts.get("consecutive_skips", 0))
        self.truncated_prompts = int(ts.get("truncated_prompts", 0))

    def apply_recipe(self, path: Path, saved_lr: list[float]) -> None:
        """Make the restored optimizer train with the recipe's optim values (peak LR, betas, weight decay)
        where they differ from the checkpoint's (``saved_lr``: its scheduler's peak LRs): refused without
        --allow-recipe-change, applied with it (the LR schedule goes on at its position, to the new peak)."""
        if self.optim_values is None:
            return
        want, groups, sched = self.optim_values, self.optimizer.param_groups, self.lr_scheduler
        have = {"lr": list(saved_lr) or [g.get("initial_lr", g["lr"]) for g in groups],
                "betas": [g["betas"] for g in groups], "weight_decay": [g["weight_decay"] for g in groups]}
        diff = [k for k in have if any(_differs(v, want[k]) for v in have[k])]
        if not diff:
            return
        if not self.allow_recipe_change:
            raise CheckpointError(
                f"checkpoint {path} was trained with {', '.join(f'optim.{k}={_show(have[k][0])}' for k in diff)}; "
                f"the recipe says {', '.join(f'optim.{k}={_show(want[k])}' for k in diff)}",
                hint="pass --allow-recipe-change to train on with the recipe's values")
        sched.base_lrs = [float(want["lr"])] * len(groups)
        for g, f in zip(groups, sched.lr_lambdas):
            g["initial_lr"] = float(want["lr"])
            g["lr"] = float(want["lr"]) * f(sched.last_epoch)
            g["betas"] = tuple(float(x) for x in want["betas"])
            g["weight_decay"] = float(want["weight_decay"])
        sched._last_lr = [g["lr"] for g in groups]


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return list(map(float, a)) != list(map(float, b))
    return float(a) != float(b)


def _show(v: Any) -> str:
    return str(list(v)) if isinstance(v, (list, tuple)) else f"{v:g}"


# --------------------------------------------------------------------------------------------------
# A checkpoint's trainer_state.json, validated like a recipe before anything is restored from it

_COUNTS = ("skipped_total", "consecutive_skips", "truncated_prompts")


def check_trainer_state(path: Path, ts: Any) -> dict[str, Any]:
    """``ts`` (a checkpoint's trainer_state.json) if it can be resumed; else a one-line CheckpointError."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path}: {STATE_FILE} is not valid: {what}")

    def count(value: Any, name: str, least: int = 0) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad(f"{name} is {value!r}, not a whole number")
        if value < least:
            raise bad(f"{name} is {value}, must be >= {least}")
        return value

    if not isinstance(ts, dict):
        raise bad(f"a {type(ts).__name__}, not a mapping")
    missing = [k for k in ("step", "max_steps", "data", "alpha_schedule", "tau_schedule") if k not in ts]
    if missing:
        raise bad(f"missing {', '.join(missing)}")
    step, total = count(ts["step"], "step"), count(ts["max_steps"], "max_steps", 1)
    if step > total:
        raise bad(f"step {step} is past max_steps {total}")
    if not isinstance(ts["data"], dict) or not {"epoch", "pos"} <= set(ts["data"]):
        raise bad("data must be a mapping with epoch and pos")
    count(ts["data"]["epoch"], "data.epoch")
    count(ts["data"]["pos"], "data.pos")
    for k in ("alpha_schedule", "tau_schedule"):
        if not isinstance(ts[k], dict):
            raise bad(f"{k} is {type(ts[k]).__name__}, not a mapping")
    for k in _COUNTS:
        if k in ts:
            count(ts[k], k)
    for k in ("objective", "base_model"):
        if k in ts and not isinstance(ts[k], str):
            raise bad(f"{k} is {ts[k]!r}, not a name")
    return ts


def check_data_position(path: Path, ts: dict[str, Any], examples: int) -> None:
    """The checkpoint's place in the data exists in this run's data: a position past the training
    examples (fewer of them now: another data file, limit or eval_fraction) would silently start a
    new epoch, training on something other than what the checkpoint's order continues to."""
    pos = ts["data"]["pos"]
    if pos > examples:
        raise CheckpointError(
            f"checkpoint {path} stopped at position {pos} of its data, and this run has {examples} training "
            "example(s): the data is not the one it trained on (start a new run, or restore the data section)")


def verify_resumable(path: Path) -> None:
    """:func:`verify_checkpoint`, and a trainer state that can be resumed."""
    verify_checkpoint(path)
    check_trainer_state(path, read_trainer_state(path))


def check_objective(path: Path, ts: dict[str, Any], objective: str) -> None:
    """A checkpoint resumes only under the objective it was trained with (never a GRPO one into APO)."""
    saved = ts.get("objective")
    if saved is not None and saved != objective:
        raise CheckpointError(
            f"checkpoint {path} was trained with algorithm.objective={saved}; the recipe's is {objective}",
            hint="resume it under its own objective, or set model.name_or_path to the checkpoint to start a "
                 f"new {objective} run from its weights")


_MISFIT = (KeyError, TypeError, ValueError, RuntimeError)


def does_not_fit(path: Path, e: BaseException) -> CheckpointError:
    what = f"missing {e}" if isinstance(e, KeyError) else str(e).strip().splitlines()[0][:200]
    return CheckpointError(f"checkpoint {path} does not fit this run: {what}")


def save(run_dir: Path, state: TrainState, model: Any, tok: Any, world: World, *, lora: bool, keep_last: int,
         trainer_state: dict[str, Any] | None = None, rng: torch.Tensor | None = None, finisher: Any = None) -> Path:
    """Checkpoint ``state`` (or ``trainer_state`` + ``rng`` taken before a running step) and return its path.

    Under torchrun every rank calls it: the full weights (a LoRA policy: its adapter) and optimizer
    state are gathered to rank 0, which writes; a failed write stops every rank (so the write is
    finished at once there; one process finishes it through ``finisher``: apo_cli/checkpoint_io.py)."""
    ts = trainer_state or state.state_dict()
    step = int(ts["step"])
    if is_sharded(model):
        weights = full_trainable_state(model) if lora else full_model_state(model)
        optim = full_optimizer_state(model, state.optimizer)
    else:
        weights, optim = None, state.optimizer.state_dict()
    error = None
    if world.is_main:
        try:
            write_checkpoint(run_dir, CheckpointPayload(step, model, tok, ts, state.torch_state(optim, rng), weights),
                             keep_last=keep_last, finisher=None if world.distributed else finisher)
        except ApoError as e:
            error = e
    world.raise_if_any(error)
    return checkpoint_path(run_dir, step)


def restore(path: Path, state: TrainState, model: Any, world: World, *, lora: bool, verified: bool = False) -> None:
    """Load the checkpoint at ``path`` into ``model`` and ``state`` (every rank calls it)."""
    if is_sharded(model):
        ts, tt = _restore_sharded(path, state, model, world, lora, verified)
    else:
        if not verified:
            verify_checkpoint(path)
        ts = read_trainer_state(path)
        tt = read_torch_state(path)
        load_weights_into(model, path)
        try:
            load_optimizer_state(model, state.optimizer, tt["optimizer"])
        except _MISFIT as e:
            raise does_not_fit(path, e) from None
    with world.agree():  # the same state on every rank: the same verdict, printed once
        check_objective(path, check_trainer_state(path, ts), state.objective)
        check_data_position(path, ts, state.order.n)
        try:
            state.load_state_dict(ts, tt)
            state.apply_recipe(path, tt["lr_scheduler"].get("base_lrs", []))
        except _MISFIT as e:
            raise does_not_fit(path, e) from None


def _read_full_weights(path: Path, model: Any, lora: bool) -> dict[str, Any]:
    """A checkpoint's weights keyed by this (sharded) model's names, checked against it."""
    if not lora:
        weights = read_weights(path)
        check_fit(path, model, weights)
        return weights
    from safetensors.torch import load_file

    adapter = path / "adapter_model.safetensors"
    if not adapter.is_file():
        raise CheckpointError(f"checkpoint {path} holds no LoRA adapter (adapter_model.safetensors)")
    try:
        weights = adapter_names(model, load_file(str(adapter)))
    except (ValueError, OSError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} does not fit the model: {e}") from None
    check_fit(path, model, weights, partial=True)
    return weights


def _restore_sharded(path: Path, state: TrainState, model: Any, world: World, lora: bool,
                     verified: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Rank 0 reads and checks the checkpoint and sends each tensor to the ranks, which keep their
    shards (the full weights and optimizer state are in rank 0's memory only). Returns the trainer
    state and the small torch state (scheduler, RNG), the same on every rank."""
    weights: dict[str, Any] = {}
    optim: dict[str, Any] = {}
    small = None
    with world.agree():
        if world.is_main:
            if not verified:
                verify_checkpoint(path)
            tt = read_torch_state(path)
            weights = _read_full_weights(path, model, lora)
            try:
                optim = named_optimizer_state(model, state.optimizer, tt["optimizer"])
            except (KeyError, TypeError, ValueError) as e:
                raise does_not_fit(path, e) from None
            small = {k: v for k, v in tt.items() if k != "optimizer"}
    small = world.gather(small)[0]
    try:  # collectives inside: a failure here stops its rank at once (and torchrun the others)
        load_full_model_state(model, weights)
        load_optimizer_state(model, state.optimizer, optim)
    except _MISFIT as e:
        raise does_not_fit(path, e) from None
    return read_trainer_state(path), small
