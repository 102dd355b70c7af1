"""The ``algorithm`` section of a recipe: the objective, its parameters, the alpha schedule, adaptive tau.

Names are checked against the registries of :mod:`apo_cli.algo.objectives` (``OBJECTIVES``) and
:mod:`apo_cli.algo.schedules` (``ALPHA_SCHEDULES``), so an objective or schedule a third-party package
registers through an entry point is valid here too. Those modules import this one only for type
checking.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from apo_cli.spec import Section

__all__ = [
    "ALWAYS_USED",
    "AdaptiveTauSpec",
    "AlgorithmSpec",
    "AlphaScheduleSpec",
    "objective_names",
    "objective_params",
    "schedule_kinds",
    "unused_param_problems",
]

def objective_names() -> set[str]:
    """Every registered objective (built-in and entry points)."""
    from apo_cli.algo.objectives import OBJECTIVES

    return set(OBJECTIVES.names())


def objective_params(name: str) -> frozenset[str] | None:
    """The algorithm fields objective ``name`` reads, or None when there is no such objective."""
    from apo_cli.algo.objectives import OBJECTIVES

    if name not in OBJECTIVES:
        return None
    return frozenset(OBJECTIVES.get(name).params)


def schedule_kinds() -> list[str]:
    """Every registered alpha schedule kind: the built-ins in order, then entry points."""
    from apo_cli.algo.schedules import ALPHA_SCHEDULES

    return ALPHA_SCHEDULES.ordered()


def _builtin_kinds(schema: dict) -> None:
    """JSON schema of ``kind``: a string, with the built-in kinds as examples (for editors)."""
    from apo_cli.algo.schedules import ALPHA_SCHEDULES

    schema["examples"] = ALPHA_SCHEDULES.builtins()


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


class AlphaScheduleSpec(Section):
    kind: str = Field(
        "guarded",
        description="How alpha moves (a registered schedule): constant, linear, cosine, reward_confidence, guarded.",
        json_schema_extra=_builtin_kinds,
    )
    alpha_max: float = Field(0.9, ge=0, le=1, description="Coverage end of alpha (start value).")
    alpha_min: float = Field(0.35, ge=0, le=1, description="Exploitation end of alpha.")
    value: float | None = Field(None, ge=0, le=1, description="Alpha for kind=constant (default: alpha_max).")
    steps: int | None = Field(
        None, ge=1, description="linear/cosine: steps from alpha_max to alpha_min (default: run.max_steps)."
    )
    ema: float = Field(0.9, ge=0, lt=1, description="guarded: EMA factor of the reward and confidence signals.")
    window: int = Field(8, ge=2, description="guarded: steps in the reward-improvement test window.")
    min_improvement: float = Field(
        0.0, ge=0, description="guarded: smallest reward slope per step that counts as improving."
    )
    confidence_threshold: float = Field(
        0.6, ge=0, le=1, description="guarded: calibrated confidence above which exploitation may start."
    )
    max_rate: float = Field(0.05, gt=0, le=1, description="guarded: largest change of alpha per step.")
    smoothing: float = Field(0.5, ge=0, lt=1, description="guarded: EMA factor applied to the alpha target.")
    hysteresis: float = Field(
        0.05, ge=0, le=1, description="guarded: margin below the confidence threshold before moving back."
    )

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        kinds = schedule_kinds()
        if v not in kinds:
            listed = ", ".join(repr(k) for k in kinds[:-1]) + f" or {kinds[-1]!r}" if len(kinds) > 1 else repr(kinds[0])
            raise ValueError(f"unknown alpha schedule {v!r}; valid kinds: {listed}")
        return v

    @model_validator(mode="after")
    def _ordered(self) -> AlphaScheduleSpec:
        if self.alpha_min > self.alpha_max:
            raise ValueError(
                f"alpha_min must be <= alpha_max within [0, 1] (got alpha_min={self.alpha_min}, alpha_max={self.alpha_max})"
            )
        return self


class AdaptiveTauSpec(Section):
    enabled: bool = Field(False, description="Adapt tau each step from entropy and confidence (APO_METHOD §3).")
    a: float = Field(0.2, description="Weight of the old-policy entropy proxy.")
    b: float = Field(0.5, description="Weight of confidence × (−reward signal).")
    tau_min: float = Field(0.2, gt=0, description="Lower clip of the effective tau.")
    tau_max: float = Field(1.5, gt=0, description="Upper clip of the effective tau.")

    @model_validator(mode="after")
    def _ordered(self) -> AdaptiveTauSpec:
        if self.tau_min > self.tau_max:
            raise ValueError(f"tau_min must be <= tau_max (got {self.tau_min} > {self.tau_max})")
        return self


class AlgorithmSpec(Section):
    objective: str = Field("apo", description="Objective from the registry: apo, adpo, grpo, gspo, dr_grpo.")
    tau: float = Field(0.5, gt=0, description="APO/ADPO: temperature of the anchored logits u.")
    beta_r: float = Field(0.3, gt=0, description="APO/ADPO: temperature of the target q = softmax(A / beta_r).")
    clip_ratio: float = Field(5.0, gt=0, description="APO/ADPO: clip of logp − logp_anchor before dividing by tau.")
    clip_u: float = Field(10.0, gt=0, description="APO/ADPO: clip of the anchored logit u.")
    z_loss_coef: float = Field(0.0, ge=0, description="APO/ADPO: coefficient of the z-loss on logsumexp(u).")
    kl_coef: float = Field(0.0, ge=0, description="Coefficient of the k3 KL to the initial (reference) model.")
    logprob_reduction: Literal["mean", "sum"] = Field(
        "mean", description="APO/ADPO: sequence log-prob as the mean (length-normalised) or sum over tokens."
    )
    advantage_std: Literal["none", "group", "batch"] | None = Field(
        None, description="Divide centred rewards by the group or batch std. Default per objective (apo: none, grpo/gspo: group)."
    )
    eps_low: float | None = Field(None, gt=0, description="GRPO/GSPO: lower clip epsilon (default 0.2 / 3e-4).")
    eps_high: float | None = Field(None, gt=0, description="GRPO/GSPO: upper clip epsilon (default 0.2 / 4e-4).")
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "constant"] | None = Field(
        None, description="GRPO: token_mean, seq_mean_token_mean, or constant (Dr.GRPO). Default per objective."
    )
    mini_batches: int = Field(1, ge=1, description="Optimizer steps per rollout (each holds whole groups).")
    epochs: int = Field(1, ge=1, description="Passes over each rollout.")
    alpha: AlphaScheduleSpec = Field(default_factory=AlphaScheduleSpec, description="APO: the alpha schedule.")
    adaptive_tau: AdaptiveTauSpec = Field(default_factory=AdaptiveTauSpec, description="APO/ADPO: adaptive tau.")

    @field_validator("objective")
    @classmethod
    def _known_objective(cls, v: str) -> str:
        from apo_cli.algo.objectives import OBJECTIVES

        names = OBJECTIVES.names()
        if v not in names:
            raise ValueError(f"unknown objective {v!r}; valid names: {', '.join(names)}")
        try:
            OBJECTIVES.get(v)  # a third-party objective that cannot be imported fails here, in one line
        except Exception as e:  # noqa: BLE001 - plugin code may raise anything on import
            raise ValueError(f"objective {v!r} cannot be loaded: {_one_line(e)}") from None
        return v


# algorithm fields that every objective uses (loop control and the objective's own name).
ALWAYS_USED = frozenset({"objective", "mini_batches", "epochs", "kl_coef", "advantage_std"})


def unused_param_problems(a: AlgorithmSpec) -> list[tuple[tuple[str, ...], str]]:
    """Fields of ``a`` set to a non-default value that its objective does not read, as recipe problems."""
    used = objective_params(a.objective)
    if used is None:
        return []
    out = []
    for name in sorted(a.model_fields_set - used - ALWAYS_USED):
        value = getattr(a, name)
        default = AlgorithmSpec.model_fields[name].get_default(call_default_factory=True)
        if value == default:  # restating a default (e.g. a dumped resolved recipe) is harmless
            continue
        out.append((("algorithm", name),
                    f"algorithm.{name} is set but objective {a.objective!r} does not use it "
                    f"(it uses: {', '.join(sorted(used))})"))
    return out
