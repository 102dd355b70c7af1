"""The ``algorithm`` section of a recipe: the objective, its parameters, the alpha schedule, adaptive tau.

Names are checked against the registries of :mod:`apo_cli.algo.objectives` (``OBJECTIVES``) and
:mod:`apo_cli.algo.schedules` (``ALPHA_SCHEDULES``), so an objective or schedule a third-party package
registers through an entry point is valid here too. Those modules import this one only for type
checking.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from apo_cli.spec import Section

__all__ = [
    "ALWAYS_USED",
    "AdaptiveTauSpec",
    "AlgorithmSpec",
    "AlphaScheduleSpec",
    "CORRECTION_MODES",
    "RolloutCorrectionSpec",
    "objective_names",
    "objective_params",
    "schedule_kinds",
    "schedule_params",
    "switched_unused",
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
    granularity: Literal["step", "micro_batch"] = Field(
        "step",
        description="reward_confidence: compute alpha (and adaptive tau) once per step from the whole rollout "
        "(step), or, as the reference code does, at every loss call from that micro-batch's rows: the reward "
        "signal min-max normalised over the micro-batch and the confidence from the current policy's "
        "log-probs (micro_batch).",
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

CORRECTION_MODES = ("off", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


class RolloutCorrectionSpec(Section):
    mode: Literal["off", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] | None = Field(
        None,
        description="Correction of the engine/trainer log-prob mismatch, as TRL 1.16's vllm_importance_sampling_*: "
        "ratio = exp(trainer log-prob at the rollout weights − engine log-prob), per token (token_*) or one per "
        "completion from the summed difference (sequence_*); *_truncate clamps it to [clip_min, clip_max], *_mask "
        "sets it to 0 outside; the ratio weights each token's (or completion's) policy term of every objective "
        "(docs/method.md). null (the default): sequence_mask, TRL's default, when the backend samples with a "
        "separate engine (backend.rollout: vllm), off when the policy samples itself (backend cpu, rollout: hf: "
        "the engine is the trainer).",
    )
    clip_max: float | None = Field(
        3.0, description="Upper bound C_max of the ratio (>= 1, so a ratio of 1 is never changed; null: none)."
    )
    clip_min: float | None = Field(
        None, description="Lower bound C_min of the ratio (in [0, 1], so a ratio of 1 is never changed; null: none)."
    )

    @field_validator("clip_max")
    @classmethod
    def _max_at_least_one(cls, v: float | None) -> float | None:
        if v is not None and v < 1:
            raise ValueError(f"clip_max must be >= 1 so that a ratio of 1 (no mismatch) is never changed (got {v})")
        return v

    @field_validator("clip_min")
    @classmethod
    def _min_in_unit(cls, v: float | None) -> float | None:
        if v is not None and not 0 <= v <= 1:
            raise ValueError(f"clip_min must lie in [0, 1] so that a ratio of 1 (no mismatch) is never changed (got {v})")
        return v

    @model_validator(mode="after")
    def _a_bound(self) -> RolloutCorrectionSpec:
        if self.mode != "off" and self.clip_max is None and self.clip_min is None:
            raise ValueError(f"rollout correction mode {self.mode or 'null (sequence_mask on a separate engine)'} "
                             "needs clip_max or clip_min (with neither it changes nothing; use mode: off)")
        return self


class AlgorithmSpec(Section):
    objective: str = Field(
        "apo", description="Objective from the registry: apo, adpo, grpo, gspo, dr_grpo, cispo, sapo."
    )
    tau: float = Field(0.5, gt=0, description="APO/ADPO: temperature of the anchored logits u.")
    beta_r: float = Field(0.3, gt=0, description="APO/ADPO: temperature of the target q = softmax(A / beta_r).")
    clip_ratio: float = Field(5.0, gt=0, description="APO/ADPO: clip of logp − logp_anchor before dividing by tau.")
    clip_u: float = Field(10.0, gt=0, description="APO/ADPO: clip of the anchored logit u.")
    z_loss_coef: float = Field(0.0, ge=0, description="APO/ADPO: coefficient of the z-loss on logsumexp(u).")
    z_loss_form: Literal["reference", "centred"] = Field(
        "centred",
        description="APO/ADPO: z-loss per group as z·(lse_G(u) − log G)² (centred: zero and flat at u = 0, a trust "
        "region on the group's drift only; ahead on benchmarks/quality.py, docs/method.md) or z·lse_G(u)² "
        "(reference, the author's code: smallest at u = −log G, so at u = 0 it pushes every sampled "
        "completion's log-prob down).",
    )
    kl_coef: float = Field(
        0.0, ge=0,
        description="Coefficient of the KL to the initial (reference) model, estimated per token by "
        "kl_estimator (default k3: exp(d) − d − 1 with d = logp_ref − logp clamped to ±20 and the k3 value "
        "clamped at 10, as verl does; TRL clamps neither).",
    )
    kl_estimator: Literal["k1", "k2", "k3"] = Field(
        "k3",
        description="Per-token KL estimator with d = logp_ref − logp: k1 = −d (the log-ratio; its expected "
        "gradient is zero, so as a loss it does not regularise, see docs/method.md), k2 = d²/2, k3 = exp(d) − d − 1 "
        "(low variance; the default, as before). Read only when kl_coef > 0.",
    )
    logprob_reduction: Literal["mean", "sum"] = Field(
        "mean", description="APO/ADPO: sequence log-prob as the mean (length-normalised) or sum over tokens."
    )
    advantage_std: Literal["none", "group", "batch"] | None = Field(
        None, description="Divide centred rewards by the group or batch std. Default per objective (apo: none, grpo/gspo: group)."
    )
    advantage_eps: float = Field(
        1e-6, gt=0,
        description="Added to the std before dividing (advantage_std group/batch): verl's 1e-6 (the paper's "
        "stack); TRL uses 1e-4.",
    )
    disable_dropout: bool = Field(
        True,
        description="Set every dropout of the policy (LoRA's included) to 0 for training, so that the anchor, "
        "the ratio's old log-probs and the trained log-probs are the same function at the same weights; "
        "false keeps the model's dropout (then two passes at the same weights differ).",
    )
    eps_low: float | None = Field(None, gt=0, description="GRPO/GSPO: lower clip epsilon (default 0.2 / 3e-4).")
    eps_high: float | None = Field(
        None, gt=0,
        description="GRPO/GSPO: upper clip epsilon (default 0.2 / 4e-4). CISPO: the importance weight is capped at "
        "1 + eps_high (default 4.0: the cap 5.0 that TRL recommends as its epsilon_high for cispo, which is the cap "
        "itself).",
    )
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "constant"] | None = Field(
        None,
        description="GRPO/CISPO/SAPO: token_mean, seq_mean_token_mean, or constant (Dr.GRPO). Default per objective "
        "(grpo, cispo: token_mean; sapo: seq_mean_token_mean, as TRL; dr_grpo: constant).",
    )
    sapo_temperature_pos: float = Field(
        1.0, gt=0, description="SAPO: temperature of the soft gate for tokens of positive advantage (TRL's default)."
    )
    sapo_temperature_neg: float = Field(
        1.05, gt=0,
        description="SAPO: temperature of the soft gate for tokens of zero or negative advantage (TRL's default).",
    )
    rollout_correction: RolloutCorrectionSpec = Field(
        default_factory=RolloutCorrectionSpec, description="Every objective: engine/trainer mismatch correction."
    )
    off_policy_mask_threshold: float | None = Field(
        None, ge=0,
        description="Every objective: off-policy sequence masking (DeepSeek-V3.2, TRL off_policy_mask_threshold): a "
        "completion of negative advantage whose mean per-token log(pi_behaviour / pi_theta) exceeds this threshold "
        "(>= 0) leaves the policy term (pi_behaviour: the engine's log-probs when there is a separate engine, "
        "else the rollout-time trainer's). null: off.",
    )
    mask_truncated: bool = Field(
        False,
        description="Every objective: completions cut at rollout.max_new_tokens leave the loss (policy term, KL, "
        "entropy bonus and the token normaliser; TRL mask_truncated_completions); they still count in the rewards, "
        "advantages and metrics.",
    )
    entropy_coef: float = Field(
        0.0, ge=0,
        description="Every objective: entropy bonus, loss − entropy_coef × mean token entropy of the policy over the "
        "completion tokens that train (TRL's rule; >= 0; 0: off, no gradient through the entropy).",
    )
    top_entropy_quantile: float = Field(
        1.0, ge=0, le=1,
        description="Every objective: only the tokens whose policy entropy is at or above the (1 − q) quantile of "
        "the micro-batch's tokens train (TRL top_entropy_quantile, 'Beyond the 80/20 rule' recommends 0.2; in "
        "[0, 1]; 1: every token).",
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


# algorithm fields that every objective uses (loop control, the advantages and the objective's own name).
ALWAYS_USED = frozenset(
    {"objective", "mini_batches", "epochs", "kl_coef", "advantage_std", "advantage_eps", "disable_dropout",
     # the loss-side stabilizers of issue 16 (apo_cli/algo/stabilizers.py), applied around every objective
     "rollout_correction", "off_policy_mask_threshold", "mask_truncated", "entropy_coef", "top_entropy_quantile",
     "kl_estimator"}
)

Problem = tuple[tuple[str, ...], str]


def schedule_params(kind: str) -> frozenset[str] | None:
    """The ``algorithm.alpha`` fields schedule ``kind`` reads (besides ``kind``), or None when its factory
    does not declare them (a third-party schedule without a ``params`` attribute: nothing is checked)."""
    from apo_cli.algo.schedules import ALPHA_SCHEDULES

    try:
        params = getattr(ALPHA_SCHEDULES.get(kind), "params", None)
    except Exception:  # noqa: BLE001 - an unloadable plugin is reported by the kind validator
        return None
    return None if params is None else frozenset(params)


def _changed(section: Section) -> list[str]:
    """Fields of ``section`` set to a value other than their default (restating a default is harmless)."""
    fields = type(section).model_fields
    return [n for n in sorted(section.model_fields_set)
            if getattr(section, n) != fields[n].get_default(call_default_factory=True)]


def _dead_fields(a: AlgorithmSpec) -> list[tuple[Problem, tuple[tuple[str, ...], ...]]]:
    """Every field set to a non-default value that nothing reads with the choices made, with the
    locations of the switches (objective, alpha.kind, ...) whose value makes it unread."""
    from apo_cli.algo.objectives import OBJECTIVES

    used = objective_params(a.objective)
    if used is None:
        return []
    obj = ("algorithm", "objective")
    out = []
    for name in _changed(a):
        if name not in used | ALWAYS_USED:
            out.append(((("algorithm", name), f"algorithm.{name} is set but objective {a.objective!r} does not use it "
                                              f"(it uses: {', '.join(sorted(used))})"), (obj,)))
    if "alpha" in used and (reads := schedule_params(a.alpha.kind)) is not None:
        for name in _changed(a.alpha):
            if name != "kind" and name not in reads:
                uses = ", ".join(sorted(reads)) or "none"
                out.append(((("algorithm", "alpha", name), f"algorithm.alpha.{name} is set but alpha kind "
                             f"{a.alpha.kind!r} does not use it (it uses: {uses})"), (("algorithm", "alpha", "kind"),)))
    if "adaptive_tau" in used and not a.adaptive_tau.enabled:
        for name in _changed(a.adaptive_tau):
            if name != "enabled":
                out.append(((("algorithm", "adaptive_tau", name), f"algorithm.adaptive_tau.{name} is set but "
                             "adaptive_tau.enabled is false, so it is not used"), (("algorithm", "adaptive_tau", "enabled"),)))
    std = a.advantage_std or OBJECTIVES.get(a.objective).defaults.get("advantage_std", "none")
    if "advantage_eps" in _changed(a) and std == "none":
        out.append(((("algorithm", "advantage_eps"), f"algorithm.advantage_eps is set but advantage_std is 'none' "
                     f"(for objective {a.objective!r}), so no std is divided by"), (obj, ("algorithm", "advantage_std"))))
    if "kl_estimator" in _changed(a) and a.kl_coef == 0:
        out.append(((("algorithm", "kl_estimator"), "algorithm.kl_estimator is set but kl_coef is 0, so no KL is "
                     "estimated"), (("algorithm", "kl_coef"),)))
    if a.rollout_correction.mode == "off":
        for name in _changed(a.rollout_correction):
            if name != "mode":
                out.append(((("algorithm", "rollout_correction", name), f"algorithm.rollout_correction.{name} is set "
                             "but rollout_correction.mode is off, so it is not used"),
                            (("algorithm", "rollout_correction", "mode"),)))
    if "z_loss_form" in used and "z_loss_form" in _changed(a) and a.z_loss_coef == 0:
        out.append(((("algorithm", "z_loss_form"), "algorithm.z_loss_form is set but z_loss_coef is 0, so it is not used"),
                    (obj, ("algorithm", "z_loss_coef"))))
    return out


def unused_param_problems(a: AlgorithmSpec) -> list[Problem]:
    """Fields of ``a`` (nested sections included) set to a non-default value that the chosen objective,
    alpha kind or adaptive-tau switch never reads, as recipe problems naming the field and the choice."""
    return [problem for problem, _ in _dead_fields(a)]


def switched_unused(a: AlgorithmSpec, problems: list[Problem], overridden: Any) -> dict[Problem, str]:
    """Those of ``problems`` that are unread fields because a switch that makes them unread was set by
    an override (``overridden``: the overridden locations), each with the switch's name. The recipe
    reports these as warnings: switching the objective or the schedule on the command line (to compare
    GRPO with a recipe's APO, say) ignores the settings the new choice does not read."""
    def hit(switch: tuple[str, ...]) -> bool:
        return any(tuple(loc) == switch[: len(loc)] for loc in overridden)

    out = {}
    for problem, switches in _dead_fields(a):
        names = [s for s in switches if hit(s)]
        if problem in problems and names:
            out[problem] = "objective" if names[0] == ("algorithm", "objective") else ".".join(names[0])
    return out
