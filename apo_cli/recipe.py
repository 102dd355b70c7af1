"""The recipe schema: one strict, frozen pydantic model for everything a run needs.

A recipe is YAML. Loading it (:func:`load_recipe`) does, in order:

1. YAML safe-load with node positions kept, so every problem can name its line and column;
2. dotted command-line overrides (``algorithm.alpha.alpha_min=0.3``) applied on top, each value
   parsed as YAML and typed by the same schema; unknown keys get a "did you mean";
3. pydantic validation with ``extra="forbid"`` at every level, then cross-field rules;
4. relative input paths (data files, local models, reward files) resolved against the recipe file.

Every problem found is reported at once (:class:`apo_cli.errors.RecipeError`), never a traceback.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from apo_cli.errors import RecipeError

# --------------------------------------------------------------------------------------------------
# Sections


def _on_off(v: Any) -> Any:
    """YAML 1.1 reads on/off/yes/no as booleans: map them back for fields whose values are 'on'/'off'."""
    return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


class RunSpec(Section):
    name: str = Field("apo-run", description="Run name, shown in the dashboard and used in the default output_dir.")
    output_dir: str | None = Field(
        None,
        description="Run directory (relative paths are taken from the current directory). Default: runs/<name>.",
    )
    seed: int = Field(0, ge=0, description="Seed for data order, sampling and initialisation.")
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


class LoraSpec(Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (lora_alpha).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear'."
    )


class ModelSpec(Section):
    name_or_path: str = Field(
        ...,
        description="Hugging Face hub id, local directory, or a built-in alias "
        "(smollm2-135m-instruct, tiny-random).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    tokenizer: str | None = Field(None, description="Tokenizer id or path when it differs from the model's.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype of the trained (master) weights. auto: float32; compute runs in the backend's dtype under autocast."
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the hub. Off unless you trust it.")
    lora: LoraSpec | None = Field(None, description="Train a LoRA adapter instead of all weights.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    max_context: int | None = Field(
        None, ge=16, description="Context length to assume (default: the model config's max_position_embeddings)."
    )


class DataSpec(Section):
    source: str = Field(
        "builtin:arithmetic",
        description="builtin:<task> (arithmetic, gsm), a hub dataset id, or a local .jsonl/.json/.parquet/.csv file.",
    )
    config: str | None = Field(None, description="Hub dataset configuration name.")
    split: str = Field("train", description="Split used for training.")
    task_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Parameters of a built-in task (e.g. size, level, min_value, max_value)."
    )
    prompt_column: str = Field("prompt", description="Column holding the problem text.")
    answer_column: str | None = Field("answer", description="Column holding the reference answer (null: none).")
    extra_columns: list[str] = Field(
        default_factory=list, description="Further columns passed to reward functions as keyword arguments."
    )
    filters: dict[str, Any] = Field(
        default_factory=dict, description="Keep rows whose column equals the value (or is in the list), e.g. level: Level 3."
    )
    limit: int | None = Field(None, ge=1, description="Use at most this many training rows (after filtering).")
    shuffle: bool = Field(True, description="Shuffle rows with the run seed.")
    system_prompt: str | None = Field(None, description="System message (chat template) or preamble (plain template).")
    prompt_template: str = Field(
        "{prompt}", description="Template of the user message; {prompt} and any column name in braces are filled."
    )
    chat_template: Literal["auto", "on", "off"] = Field(
        "auto", description="Use the tokenizer's chat template: auto = when the tokenizer has one."
    )
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra arguments to the chat template (e.g. enable_thinking: false)."
    )
    eval_split: str | None = Field(None, description="Split used for evaluation (hub datasets).")
    eval_fraction: float = Field(
        0.0, ge=0, lt=1, description="Fraction of training rows held out for evaluation when eval_split is null."
    )
    eval_limit: int | None = Field(None, ge=1, description="Use at most this many evaluation rows.")

    @field_validator("chat_template", mode="before")
    @classmethod
    def _yaml_on_off(cls, v: Any) -> Any:
        return _on_off(v)

    @field_validator("prompt_template")
    @classmethod
    def _template_has_prompt(cls, v: str) -> str:
        if "{" not in v:
            raise ValueError("prompt_template must contain a placeholder such as {prompt}")
        return v


class RewardSpec(Section):
    name: str = Field(
        ..., description="Built-in reward name, or 'module:function', or 'path/to/file.py:function'."
    )
    weight: float = Field(1.0, description="Weight in the summed reward.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments bound to the reward.")
    timeout_s: float = Field(5.0, gt=0, description="Time box for one call of this reward.")


class RolloutSpec(Section):
    group_size: int = Field(8, description="G: completions sampled per prompt (the group).")
    prompts_per_step: int = Field(8, ge=1, description="Prompts per rollout (training step).")
    max_new_tokens: int = Field(256, ge=1, description="Longest completion, in tokens.")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Prompts longer than this are truncated from the left (and counted)."
    )
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Top-k sampling (0: off).")
    stop: list[str] = Field(default_factory=list, description="Stop strings; generation ends after one appears.")

    @field_validator("group_size")
    @classmethod
    def _g_at_least_two(cls, v: int) -> int:
        if v < 2:
            raise ValueError(f"group_size must be at least 2 (a group of {v} has no relative advantage)")
        return v


ScheduleKind = Literal["constant", "linear", "cosine", "reward_confidence", "guarded"]


class AlphaScheduleSpec(Section):
    kind: ScheduleKind = Field("guarded", description="How alpha moves: constant, linear, cosine, reward_confidence, guarded.")
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
        names = objective_names()
        if names and v not in names:
            raise ValueError(f"unknown objective {v!r}; valid names: {', '.join(sorted(names))}")
        return v


class OptimSpec(Section):
    lr: float = Field(1e-5, gt=0, description="Peak learning rate (AdamW).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
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


class CheckpointSpec(Section):
    every: int = Field(10, ge=1, description="Save a checkpoint every N steps (and at the end).")
    keep_last: int = Field(2, ge=1, description="Keep the newest N checkpoints.")
    resume: Literal["never", "auto"] = Field(
        "never", description="auto: continue from the latest checkpoint of output_dir when one exists."
    )


class LoggingSpec(Section):
    metrics_file: str = Field("metrics.jsonl", description="Metrics file name inside the run directory.")
    tensorboard: bool = Field(False, description="Also write TensorBoard events under <run>/tb.")
    dashboard: Literal["auto", "rich", "plain", "off"] = Field(
        "auto", description="auto: rich dashboard on a terminal, plain lines otherwise."
    )
    samples_per_step: int = Field(2, ge=0, description="Completions shown and written to samples.jsonl per step.")

    @field_validator("dashboard", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        return _on_off(v)

    @field_validator("metrics_file")
    @classmethod
    def _inside_run_dir(cls, v: str) -> str:
        p = Path(v)
        if p.is_absolute() or ".." in p.parts or len(p.parts) != 1:
            raise ValueError("metrics_file must be a plain file name inside the run directory")
        return v


class CPUBackendSpec(Section):
    kind: Literal["cpu"] = "cpu"
    threads: int | None = Field(None, ge=1, description="torch threads (default: all cores, shared out among the processes under torchrun).")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Autocast dtype for generation and training forward passes."
    )


class GPUBackendSpec(Section):
    kind: Literal["gpu"] = "gpu"
    rollout: Literal["vllm", "hf"] = Field("vllm", description="Rollout engine: vllm, or transformers generate.")
    gpu_memory_utilization: float = Field(0.35, gt=0, le=0.95, description="vLLM: share of GPU memory for the engine.")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM: GPUs per engine; above 1 needs torchrun, and divides its number of processes.")
    sleep_mode: bool = Field(True, description="vLLM: free the KV cache while training, wake before rollouts.")
    max_model_len: int | None = Field(None, ge=16, description="vLLM: context length (default: the model's context length).")
    enforce_eager: bool = Field(False, description="vLLM: disable CUDA graphs.")


BackendSpec = Annotated[CPUBackendSpec | GPUBackendSpec, Field(discriminator="kind")]


class Recipe(Section):
    """A whole training recipe."""

    run: RunSpec = Field(default_factory=RunSpec)
    model: ModelSpec
    data: DataSpec = Field(default_factory=DataSpec)
    rewards: list[RewardSpec] = Field(
        default_factory=lambda: [RewardSpec(name="exact_match")], description="Rewards summed with their weights."
    )
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)
    algorithm: AlgorithmSpec = Field(default_factory=AlgorithmSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    logging: LoggingSpec = Field(default_factory=LoggingSpec)
    backend: BackendSpec = Field(default_factory=CPUBackendSpec)

    @field_validator("rewards")
    @classmethod
    def _rewards(cls, v: list[RewardSpec]) -> list[RewardSpec]:
        if not v:
            raise ValueError("at least one reward is needed")
        known = reward_names()
        for i, r in enumerate(v):
            if ":" not in r.name and known and r.name not in known:
                raise ValueError(
                    f"rewards[{i}]: unknown reward {r.name!r}; built-ins: {', '.join(sorted(known))}, "
                    "or give 'module:function' / 'file.py:function'"
                )
        return v

    @model_validator(mode="after")
    def _cross_field(self, info: ValidationInfo) -> Recipe:
        # load_recipe reports these itself, each at its field's line; direct construction raises here
        if not (info.context or {}).get("defer_rules"):
            problems = cross_field_problems(self)
            if problems:
                raise ValueError(problems[0][1])
        return self

    def resolved_output_dir(self) -> Path:
        return Path(self.run.output_dir or f"runs/{self.run.name}")


# algorithm fields that every objective uses (loop control and the objective's own name).
_ALWAYS_USED = frozenset({"objective", "mini_batches", "epochs", "kl_coef", "advantage_std"})


def cross_field_problems(r: Recipe) -> list[tuple[tuple[str, ...], str]]:
    """Rules that span sections, as (location of the field to change, message stating the rule)."""
    out: list[tuple[tuple[str, ...], str]] = []
    g, p = r.rollout.group_size, r.rollout.prompts_per_step
    mb, micro = r.algorithm.mini_batches, r.optim.micro_batch_size
    if p % mb:
        out.append((("algorithm", "mini_batches"),
                    f"a mini-batch must hold whole groups: rollout.prompts_per_step={p} prompts cannot be split "
                    f"evenly into algorithm.mini_batches={mb}"))
    if micro % g:
        out.append((("optim", "micro_batch_size"),
                    f"a micro-batch must hold whole groups: optim.micro_batch_size={micro} is not a multiple "
                    f"of rollout.group_size={g}"))
    elif not p % mb and ((p // mb) * g) % micro:
        out.append((("optim", "micro_batch_size"),
                    f"micro-batches must tile a mini-batch: {p // mb} prompts × {g} completions = {(p // mb) * g} "
                    f"sequences is not divisible by optim.micro_batch_size={micro}"))
    used = objective_params(r.algorithm.objective)
    if used is not None:
        defaults = AlgorithmSpec.model_fields
        for name in sorted(r.algorithm.model_fields_set - used - _ALWAYS_USED):
            value = getattr(r.algorithm, name)
            default = defaults[name].get_default(call_default_factory=True)
            if value == default:  # restating a default (e.g. a dumped resolved recipe) is harmless
                continue
            out.append((("algorithm", name),
                        f"algorithm.{name} is set but objective {r.algorithm.objective!r} does not use it "
                        f"(it uses: {', '.join(sorted(used))})"))
    return out


# --------------------------------------------------------------------------------------------------
# Registries consulted at parse time (imported lazily so a broken optional module never breaks parsing)


def objective_names() -> set[str]:
    try:
        from apo_cli.algo.objectives import OBJECTIVES
    except ImportError:
        return set()
    return set(OBJECTIVES)


def objective_params(name: str) -> frozenset[str] | None:
    try:
        from apo_cli.algo.objectives import OBJECTIVES
    except ImportError:
        return None
    entry = OBJECTIVES.get(name)
    return None if entry is None else frozenset(entry.params)


def reward_names() -> set[str]:
    try:
        from apo_cli.rewards import REWARDS
    except ImportError:
        return set()
    return set(REWARDS)


# --------------------------------------------------------------------------------------------------
# Loading with positions

Loc = tuple[str | int, ...]


class _Positions:
    """Maps dotted paths of a YAML document to (line, column), 1-based, and notes structural problems."""

    def __init__(self) -> None:
        self.where: dict[Loc, tuple[int, int]] = {}
        self.problems: list[str] = []

    def walk(self, node: yaml.Node, path: Loc = (), active: frozenset[int] = frozenset()) -> None:
        if id(node) in active:  # an alias that contains itself
            line = node.start_mark.line + 1
            self.problems.append(f"line {line}: {_dotted(path) or 'recipe'}: recursive YAML alias")
            return
        active = active | {id(node)}
        self.where.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for k, v in node.value:
                at = f"line {k.start_mark.line + 1}, column {k.start_mark.column + 1}"
                if not isinstance(k, yaml.ScalarNode) or k.tag != "tag:yaml.org,2002:str":
                    key_text = k.value if isinstance(k, yaml.ScalarNode) else "a collection"
                    self.problems.append(f"{at}: {_dotted(path) or 'recipe'}: keys must be names, not {key_text!r}")
                    continue
                key = k.value
                if key in seen:
                    self.problems.append(
                        f"{at}: {_dotted((*path, key))}: duplicate key (YAML would silently keep only the last one)"
                    )
                seen.add(key)
                self.walk(v, (*path, key), active)
                # the key's own position is more useful than the value's ("unknown key", "wrong type")
                self.where[(*path, key)] = (k.start_mark.line + 1, k.start_mark.column + 1)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                self.walk(v, (*path, i), active)

    def find(self, loc: Loc) -> tuple[int, int] | None:
        for n in range(len(loc), -1, -1):
            if loc[:n] in self.where:
                return self.where[loc[:n]]
        return None


def _yaml_error(source: str, e: yaml.YAMLError) -> RecipeError:
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e)
    ctx, ctx_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if ctx and ctx_mark is not None and mark is not None and ctx_mark.line != mark.line:
        problem += f" ({ctx} started at line {ctx_mark.line + 1}, column {ctx_mark.column + 1})"
    return RecipeError(source, [f"{where}invalid YAML: {problem}"])


def parse_yaml(text: str, source: str) -> tuple[dict[str, Any], _Positions]:
    """Safe-load ``text``; return the mapping and the positions of its nodes."""
    positions = _Positions()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise _yaml_error(source, e) from None
    if node is None:
        raise RecipeError(source, ["the recipe is empty (expected a mapping with at least a 'model' section)"])
    if not isinstance(node, yaml.MappingNode):
        kind = "a list" if isinstance(node, yaml.SequenceNode) else "a single value"
        raise RecipeError(source, [f"line {node.start_mark.line + 1}: a recipe must be a mapping of sections, not {kind}"])
    positions.walk(node)
    if positions.problems:
        raise RecipeError(source, positions.problems)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise _yaml_error(source, e) from None
    return data, positions


def _dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _unwrap_model(ann: Any, kind: str | None = None) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (for a backend union, the one of ``kind``)."""
    import typing

    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    found = [m for a in typing.get_args(ann) if (m := _unwrap_model(a, kind)) is not None]
    if kind is not None:
        for m in found:
            tag = m.model_fields.get("kind")
            if tag is not None and tag.default == kind:
                return m
    return found[0] if found else None


def _backend_kind(data: dict[str, Any]) -> str | None:
    b = data.get("backend")
    return b.get("kind") if isinstance(b, dict) and isinstance(b.get("kind"), str) else None


def _model_at(loc: Loc, data: dict[str, Any]) -> type[BaseModel] | None:
    """The pydantic model that owns the mapping at ``loc`` (used for "did you mean")."""
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            return None
        model = _unwrap_model(model.model_fields[part].annotation, _backend_kind(data) or "cpu")
    return model


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(choices)}"


_TYPE_ERRORS = ("_type", "_parsing", "literal_error", "enum", "finite_number")


def _message(err: dict[str, Any], loc: Loc, data: dict[str, Any]) -> str:
    kind, msg = err["type"], err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    msg = re.sub(r" or instance of \w+", "", msg)
    if kind == "extra_forbidden":
        owner = _model_at(loc[:-1], data)
        key = str(loc[-1])
        return f"unknown key {key!r}" + (_suggest(key, list(owner.model_fields)) if owner else "")
    if kind == "missing":
        return "required field is missing"
    if kind == "union_tag_not_found":
        return "backend.kind is missing: set kind: cpu or kind: gpu"
    if kind == "union_tag_invalid":
        return f"unknown backend kind {err['ctx'].get('tag')!r}; valid kinds: cpu, gpu"
    if kind == "finite_number":
        return "must be a finite number (not nan or inf)"
    if any(kind.endswith(t) or kind == t for t in _TYPE_ERRORS) and not isinstance(err.get("input"), dict | list):
        return f"{msg} (got {err.get('input')!r})"
    return msg


def _format_errors(e: ValidationError, data: dict[str, Any]) -> list[tuple[Loc, str]]:
    out = []
    for err in e.errors(include_url=False):
        # discriminated unions insert the tag ("cpu"/"gpu") into the location: drop it
        raw = err["loc"]
        loc = tuple(p for i, p in enumerate(raw) if not (i > 0 and raw[i - 1] == "backend" and p in ("cpu", "gpu")))
        out.append((loc, _message(err, loc, data)))
    return out


def _place(problems: list[tuple[Loc, str]], positions: _Positions, overridden: dict[Loc, str]) -> list[str]:
    """Prefix each problem with where it comes from (override or YAML line), sorted by line."""
    placed: list[tuple[int, str]] = []
    for loc, msg in problems:
        field = _dotted(loc) or "recipe"
        origin = next((src for path, src in overridden.items()
                       if loc and (loc[: len(path)] == path or path[: len(loc)] == loc)), None)
        if origin is not None:
            placed.append((0, f"override {origin!r}: {field}: {msg}"))
            continue
        pos = positions.find(loc)
        where = f"line {pos[0]}, column {pos[1]}" if pos else "recipe"
        placed.append((pos[0] if pos else 0, f"{where}: {field}: {msg}"))
    return [text for _, text in sorted(placed, key=lambda t: t[0])]


# --------------------------------------------------------------------------------------------------
# Overrides


def _override_target(path: tuple[str, ...], data: dict[str, Any]) -> tuple[str | None, Any]:
    """Check ``path`` against the schema: (problem or None, the field's annotation)."""
    model: Any = Recipe
    ann: Any = None
    for depth, part in enumerate(path):
        if model is None:
            if _is_free_mapping(ann):
                return None, None  # keys inside task_kwargs, filters, kwargs... are free
            return f"{'.'.join(path[:depth])!r} is a value, not a section", None
        fields = list(model.model_fields)
        if part not in fields:
            return f"unknown key {'.'.join(path[: depth + 1])!r}{_suggest(part, fields)}", None
        ann = model.model_fields[part].annotation
        kind = _backend_kind(data) or ("gpu" if path[0] == "backend" and len(path) > 1 and path[1] in GPUBackendSpec.model_fields and path[1] not in CPUBackendSpec.model_fields else "cpu")
        model = _unwrap_model(ann, kind)
    return None, ann


def _is_free_mapping(ann: Any) -> bool:
    import typing

    return ann is dict or typing.get_origin(ann) is dict or any(_is_free_mapping(a) for a in typing.get_args(ann))


def _wants_text(ann: Any) -> bool:
    """True for fields typed str / str | None: an override's text is taken as is (run.name=2024)."""
    import types
    import typing

    args = set(typing.get_args(ann)) if typing.get_origin(ann) in (typing.Union, types.UnionType) else {ann}
    return str in args and args <= {str, type(None)}


def _allows_none(ann: Any) -> bool:
    import typing

    return type(None) in typing.get_args(ann)


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str) -> dict[Loc, str]:
    """Apply ``a.b.c=value`` overrides to ``data`` in place; return {path: original text} for messages."""
    applied: dict[Loc, str] = {}
    problems: list[str] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not p for p in key.split(".")):
            problems.append(f"override {item!r}: expected key.path=value, e.g. algorithm.alpha.alpha_min=0.3")
            continue
        path = tuple(key.split("."))
        problem, ann = _override_target(path, data)
        if problem:
            problems.append(f"override {item!r}: {problem}")
            continue
        if _wants_text(ann) and not (raw.strip() in ("null", "~") and _allows_none(ann)):
            value: Any = raw
        else:
            try:
                value = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError as e:
                problems.append(f"override {item!r}: value is not valid YAML ({getattr(e, 'problem', e)})")
                continue
        node: Any = data
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
        applied[path] = item
    if problems:
        raise RecipeError(source, problems)
    return applied


# --------------------------------------------------------------------------------------------------
# Public entry points


_PATH_FIELDS = (("data", "source"), ("model", "name_or_path"), ("model", "tokenizer"))


def _resolve_paths(data: dict[str, Any], base: Path, overridden: dict[Loc, str]) -> None:
    """Rewrite relative local paths to absolute ones: the recipe's against its folder, overrides' against the CWD."""
    for section, key in _PATH_FIELDS:
        sec = data.get(section)
        if not isinstance(sec, dict) or not isinstance(sec.get(key), str):
            continue
        val = sec[key]
        if val.startswith(("builtin:", "/")) or ":" in val.split("/")[0]:
            continue
        root = Path.cwd() if (section, key) in overridden else base
        if val.startswith("~"):
            sec[key] = str(Path(val).expanduser())
        elif val.startswith(".") or (root / val).exists():
            sec[key] = str((root / val).resolve())
    rewards = data.get("rewards")
    if isinstance(rewards, list):
        for r in rewards:
            if isinstance(r, dict) and isinstance(r.get("name"), str):
                target, sep, fn = r["name"].rpartition(":")
                if sep and target.endswith(".py") and not Path(target).is_absolute():
                    r["name"] = f"{(base / target).resolve()}:{fn}"


def recipe_from_dict(data: dict[str, Any], source: str = "<recipe>", positions: _Positions | None = None,
                     overridden: dict[Loc, str] | None = None) -> Recipe:
    """Validate a recipe mapping; every problem is reported at once, each where it comes from."""
    positions = positions or _Positions()
    overridden = overridden or {}
    try:
        recipe = Recipe.model_validate(data, context={"defer_rules": True})
    except ValidationError as e:
        raise RecipeError(source, _place(_format_errors(e, data), positions, overridden)) from None
    except RecursionError:
        raise RecipeError(source, ["recipe: recursive structure (a YAML alias that contains itself)"]) from None
    rules = cross_field_problems(recipe)
    if ("algorithm", "objective") in overridden:
        # the objective was switched on the command line (e.g. to compare GRPO with a recipe's APO):
        # the recipe's settings for the other objective are ignored, with a warning, not an error
        unused = [(loc, msg) for loc, msg in rules if msg.startswith(f"algorithm.{loc[-1]} is set but objective")]
        rules = [r for r in rules if r not in unused]
        if not rules:
            for text in _place(unused, positions, {}):
                _warn(f"{source}: {text.replace('is set but', 'is ignored:')} (objective switched by an override)")
    if rules:
        raise RecipeError(source, _place(rules, positions, overridden))
    return recipe


def _warn(text: str) -> None:
    import sys

    print(f"warning: {text}", file=sys.stderr)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load, override, validate and resolve the recipe at ``path``. Raises RecipeError with all problems."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(source, ["recipe file not found"]) from None
    except IsADirectoryError:
        raise RecipeError(source, ["is a directory, not a recipe file"]) from None
    except UnicodeDecodeError:
        raise RecipeError(source, ["recipe is not UTF-8 text"]) from None
    data, positions = parse_yaml(text, source)
    overridden = apply_overrides(data, overrides or [], source)
    _resolve_paths(data, path.resolve().parent, overridden)
    return recipe_from_dict(data, source, positions, overridden)


def with_values(recipe: Recipe, values: dict[str, Any], source: str = "<command line>") -> Recipe:
    """A copy of ``recipe`` with dotted fields set to already-typed values (e.g. from CLI options)."""
    data = recipe.model_dump(mode="json", exclude_unset=True)
    for dotted, value in values.items():
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return recipe_from_dict(data, source, overridden={tuple(k.split(".")): f"{k}={v}" for k, v in values.items()})


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML (every field, defaults included)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def json_schema() -> dict[str, Any]:
    return Recipe.model_json_schema()
