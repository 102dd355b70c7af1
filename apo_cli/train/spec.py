"""The sections of a recipe the training loop reads: ``run``, ``rollout``, ``optim``, ``checkpoint``, ``logging``,
``eval`` (evaluation during training).

Defined here, beside the loop (:mod:`apo_cli.train.loop`), on the shared :class:`apo_cli.spec.Section`.
This module imports pydantic only; ``apo_cli.train`` imports the loop lazily, so parsing a recipe does
not load it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from apo_cli.spec import Section, on_off

__all__ = ["CheckpointSpec", "DynamicSamplingSpec", "EvalSpec", "LoggingSpec", "OptimSpec", "RolloutSpec", "RunSpec",
           "TRACKERS"]

# the experiment trackers logging.report_to may name, each an optional extra: pip install 'apo-cli[NAME]'
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")


class RunSpec(Section):
    name: str = Field("apo-run", description="Run name, shown in the dashboard and used in the default output_dir.")
    output_dir: str | None = Field(
        None,
        description="Run directory (relative paths are taken from the current directory). Default: runs/<name>.",
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed for data order, sampling and initialisation "
                                                         "(0 to 2**32-1).")
    max_steps: int | None = Field(
        100, ge=1, description="Number of training steps (one step = one rollout and its updates). Set this or epochs."
    )
    epochs: float | None = Field(
        None, gt=0, description="Passes over the training prompts; used when max_steps is null."
    )

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> RunSpec:
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set run.max_steps or run.epochs (both are null)")
        return self

    @field_validator("name")
    @classmethod
    def _name_is_safe(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", v):
            raise ValueError("run name must be 1-100 characters of letters, digits, '.', '_' or '-'")
        return v


class DynamicSamplingSpec(Section):
    enabled: bool = Field(
        False,
        description="DAPO dynamic sampling: drop the groups whose G rewards are all equal (no signal for a group "
                    "objective) and sample more prompts, round after round, until rollout.prompts_per_step "
                    "informative groups are in hand or max_rounds rounds were sampled. The step trains the first "
                    "prompts_per_step informative groups; short of them, the most that is a multiple of "
                    "algorithm.mini_batches × the torchrun processes (so a short step's count depends on the number "
                    "of processes; none: no update). The rewards/* metrics cover "
                    "every sampled completion; the signals, advantages, completions/* and samples.jsonl the trained "
                    "groups; sampling/dynamic_rounds, sampling/filtered_groups and sampling/trained_groups say what "
                    "happened. Each round takes prompts from the data order, so a step may use up to max_rounds × "
                    "prompts_per_step prompts (run.epochs still counts steps of prompts_per_step).",
    )
    max_rounds: int = Field(3, ge=1, le=100, description="Most sampling rounds of prompts_per_step prompts per step "
                                                        "(1 to 100; 1: filter without resampling).")


class RolloutSpec(Section):
    group_size: int = Field(8, le=4096, description="G: completions sampled per prompt (the group).")
    prompts_per_step: int = Field(8, ge=1, le=65536, description="Prompts per rollout (training step).")
    max_new_tokens: int = Field(256, ge=1, le=2**20, description="Longest completion, in tokens.")
    max_prompt_tokens: int | None = Field(
        None, ge=1, le=2**20, description="Prompts longer than this are truncated from the left (and counted)."
    )
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Top-k sampling (0: off).")
    stop: list[str] = Field(default_factory=list, description="Stop strings; generation ends after one appears.")
    dynamic_sampling: DynamicSamplingSpec = Field(
        default_factory=DynamicSamplingSpec, description="DAPO dynamic sampling (see its fields)."
    )

    @field_validator("group_size")
    @classmethod
    def _g_at_least_two(cls, v: int) -> int:
        if v < 2:
            raise ValueError(f"group_size must be at least 2 (a group of {v} has no relative advantage)")
        return v


class OptimSpec(Section):
    lr: float = Field(1e-5, gt=0, description="Peak learning rate (AdamW).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up, in optimizer steps.")
    scheduler: Literal["constant", "linear", "cosine"] = Field("constant", description="LR schedule after warm-up.")
    grad_clip: float | None = Field(1.0, gt=0, description="Clip of the global gradient norm (null: off).")
    micro_batch_size: int = Field(
        8, ge=1, description="Sequences per forward/backward; mini-batches are accumulated from micro-batches."
    )
    max_consecutive_skips: int = Field(
        3, ge=1, description="Stop after this many optimizer steps in a row skipped for non-finite loss or gradient."
    )

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        bad = [f"betas[{i}]={b}" for i, b in enumerate(v) if not 0 <= b < 1]
        if bad:
            raise ValueError(f"each AdamW beta must be in [0, 1): {', '.join(bad)}")
        return v


class CheckpointSpec(Section):
    every: int = Field(10, ge=1, description="Save a checkpoint every N steps (and at the end).")
    keep_last: int = Field(2, ge=1, description="Keep the newest N checkpoints.")
    resume: Literal["never", "auto"] = Field(
        "never", description="auto: continue from the latest checkpoint of output_dir when one exists."
    )


class LoggingSpec(Section):
    metrics_file: str = Field("metrics.jsonl", description="Metrics file name inside the run directory.")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        default_factory=list,
        description="Experiment trackers that also get every metrics row, the resolved recipe as the run's config and "
                    "the samples: tensorboard (<run>/tb), wandb (offline unless logged in or WANDB_MODE is set), "
                    "mlflow (a store under the run directory unless MLFLOW_TRACKING_URI is set), trackio (its local "
                    "store). Each is an extra: pip install 'apo-cli[wandb]'.",
    )
    project: str = Field("apo", min_length=1, max_length=128,
                         description="Project (W&B, Trackio) or experiment (MLflow) the run is logged under.")
    tensorboard: bool = Field(False, description="Deprecated alias of report_to: [tensorboard] (true adds it).")
    dashboard: Literal["auto", "rich", "plain", "off"] = Field(
        "auto", description="auto: rich dashboard on a terminal, plain lines otherwise."
    )
    samples_per_step: int = Field(2, ge=0, description="Completions shown and written to samples.jsonl per step.")

    @field_validator("dashboard", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        return on_off(v)

    @field_validator("metrics_file")
    @classmethod
    def _inside_run_dir(cls, v: str) -> str:
        p = Path(v)
        if p.is_absolute() or ".." in p.parts or len(p.parts) != 1:
            raise ValueError("metrics_file must be a plain file name inside the run directory")
        return v

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("report_to")
    @classmethod
    def _once_each(cls, v: list[str]) -> list[str]:
        twice = sorted({t for t in v if v.count(t) > 1})
        if twice:
            raise ValueError(f"report_to names {', '.join(twice)} more than once")
        return v

    def trackers(self) -> list[str]:
        """``report_to``, with tensorboard added by the old ``tensorboard: true``."""
        return list(self.report_to) + (["tensorboard"] if self.tensorboard and "tensorboard" not in self.report_to else [])


class EvalSpec(Section):
    every: int = Field(0, ge=0, description="Evaluate on the held-out problems every N steps and at the end (0: off). "
                                            "The same sampling and scoring as apo eval; results go into the step's "
                                            "metrics row (eval/mean@k, eval/pass@k, eval/maj@k with 95 % intervals), "
                                            "the run's eval.jsonl, the dashboard and the trackers.")
    k: int = Field(4, ge=1, le=4096, description="Samples per problem for mean@k, pass@k and maj@k.")
    limit: int | None = Field(100, ge=1, description="Evaluate the first N held-out problems (null: all).")
    temperature: float | None = Field(None, ge=0, description="Sampling temperature (null: rollout.temperature; "
                                                              "0: greedy, one completion per problem, k must be 1).")
    max_new_tokens: int | None = Field(None, ge=1, le=2**20,
                                       description="Longest completion (null: rollout.max_new_tokens).")
    split: str | None = Field(None, min_length=1, description="Split of a hub dataset to evaluate on (null: the data "
                                                              "section's held-out problems, data.eval_split or "
                                                              "data.eval_fraction).")

    @model_validator(mode="after")
    def _greedy_is_one_sample(self) -> EvalSpec:
        if self.temperature == 0 and self.k != 1:
            raise ValueError(f"eval.temperature=0 is greedy decoding, one completion per problem: set eval.k to 1 "
                             f"(not {self.k}), or sample with a temperature > 0")
        return self
