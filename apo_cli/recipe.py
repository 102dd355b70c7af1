"""The recipe: one strict, frozen pydantic model for everything a run needs, composed of sections.

Each section is defined by the package that reads it (see :mod:`apo_cli.spec`); this module composes
them into :class:`Recipe`, adds the rules that span sections, and loads recipes. A recipe is YAML.
Loading it (:func:`load_recipe`) does, in order:

1. YAML safe-load with node positions kept (:mod:`apo_cli.recipe_yaml`), so every problem can name
   its line and column;
2. dotted command-line overrides (``algorithm.alpha.alpha_min=0.3``) applied on top, each value
   parsed as YAML and typed by the same schema; unknown keys get a "did you mean";
3. pydantic validation with ``extra="forbid"`` at every level (the ``backend`` section against the
   options model of its ``kind``, :mod:`backends.options`), then cross-field rules;
4. relative input paths (data files, local models, reward files) resolved against the recipe file.

Every problem found is reported at once (:class:`apo_cli.errors.RecipeError`), never a traceback.
Names (objectives, alpha schedules, rewards, backends) come from their registries, which third-party
packages extend through entry points.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import (
    BaseModel,
    Field,
    SerializeAsAny,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from apo_cli.algo.spec import ALWAYS_USED as _ALWAYS_USED  # noqa: F401 - the former name, for tests
from apo_cli.algo.spec import (
    AdaptiveTauSpec,
    AlgorithmSpec,
    AlphaScheduleSpec,
    objective_names,
    objective_params,
    switched_unused,
    unused_param_problems,
)
from apo_cli.data.spec import DataSpec
from apo_cli.errors import RecipeError
from apo_cli.model_spec import LoraSpec, ModelSpec
from apo_cli.recipe_yaml import Loc, Positions, check_size, dotted, load_value, parse_yaml, recipe_to_yaml
from apo_cli.rewards.spec import RewardSpec, check_rewards, reward_names
from apo_cli.spec import Section
from apo_cli.train.spec import CheckpointSpec, EvalSpec, LoggingSpec, OptimSpec, RolloutSpec, RunSpec
from backends import BACKENDS
from backends.cpu_options import CPUBackendSpec
from backends.gpu_options import GPUBackendSpec
from backends.options import BackendOptions, backend_options, builtin_backend_options, validate_backend

__all__ = [
    "AdaptiveTauSpec", "AlgorithmSpec", "AlphaScheduleSpec", "BackendOptions", "CPUBackendSpec", "CheckpointSpec",
    "DataSpec", "EvalSpec", "GPUBackendSpec", "LoggingSpec", "LoraSpec", "ModelSpec", "OptimSpec", "Recipe", "RewardSpec",
    "RolloutSpec", "RunSpec", "Section", "apply_overrides", "cross_field_problems", "json_schema", "load_recipe",
    "objective_names", "objective_params", "parse_yaml", "recipe_from_dict", "recipe_to_yaml", "reward_names",
    "with_values",
]

_Positions = Positions  # the former name

# --------------------------------------------------------------------------------------------------
# The recipe


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
    eval: EvalSpec = Field(default_factory=EvalSpec)
    # the options model of the chosen kind (backends.options); dumped with its own fields
    backend: SerializeAsAny[BackendOptions] = Field(default_factory=CPUBackendSpec)

    @field_validator("rewards")
    @classmethod
    def _rewards(cls, v: list[RewardSpec]) -> list[RewardSpec]:
        return check_rewards(v)

    @field_validator("backend", mode="before")
    @classmethod
    def _backend(cls, v: Any) -> Any:
        return validate_backend(v)

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


MAX_SEQUENCES_PER_STEP = 2**20  # prompts_per_step × group_size


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
    if p * g > MAX_SEQUENCES_PER_STEP:
        out.append((("rollout", "prompts_per_step"),
                    f"a step may sample at most {MAX_SEQUENCES_PER_STEP:,} sequences: rollout.prompts_per_step={p} × "
                    f"rollout.group_size={g} = {p * g:,}"))
    out += unused_param_problems(r.algorithm)
    out += _eval_problems(r)
    return out


def _eval_problems(r: Recipe) -> list[tuple[tuple[str, ...], str]]:
    """Evaluation during training needs held-out problems with reference answers."""
    from apo_cli.data.sources import source_kind

    e, d = r.eval, r.data
    if e.split is not None and source_kind(d.source) != "hub":
        return [(("eval", "split"), f"eval.split={e.split!r} names a split of a hub dataset; {d.source} has none "
                                    "(hold problems out with data.eval_fraction)")]
    if e.every and e.split is None and d.eval_split is None and d.eval_fraction == 0:
        return [(("eval", "every"), f"eval.every={e.every} needs held-out problems: set data.eval_fraction (or "
                                    "data.eval_split / eval.split for a hub dataset)")]
    if e.every and d.answer_column is None:
        return [(("eval", "every"), "eval.every needs a reference answer per problem: set data.answer_column")]
    return []


# --------------------------------------------------------------------------------------------------
# Error messages


def _unwrap_model(ann: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (``LoraSpec | None`` -> ``LoraSpec``)."""
    import typing

    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    found = [m for a in typing.get_args(ann) if (m := _unwrap_model(a)) is not None]
    return found[0] if found else None


def _backend_kind(data: dict[str, Any]) -> str | None:
    b = data.get("backend")
    return b.get("kind") if isinstance(b, dict) and isinstance(b.get("kind"), str) else None


def _backend_model(data: dict[str, Any], key: str | None = None) -> type[BaseModel] | None:
    """The options model of the recipe's backend kind; without a (known) kind, the first registered
    backend's that has ``key`` (``backend.gpu_memory_utilization=0.5`` alone means the GPU's)."""
    kind = _backend_kind(data)
    first = None
    for k in [kind] if kind in BACKENDS else BACKENDS.ordered():
        try:
            model = backend_options(k)
        except Exception:  # noqa: BLE001 - a plugin that cannot be imported has no keys to suggest
            continue
        first = first or model
        if key is None or key in model.model_fields:
            return model
    return first


def _field_model(model: type[BaseModel], part: str, data: dict[str, Any], key: str | None = None) -> Any:
    """The model of section ``part`` of ``model`` (for the backend, the one of the recipe's kind)."""
    if model is Recipe and part == "backend":
        return _backend_model(data, key)
    return _unwrap_model(model.model_fields[part].annotation)


def _model_at(loc: Loc, data: dict[str, Any]) -> type[BaseModel] | None:
    """The pydantic model that owns the mapping at ``loc`` (used for "did you mean")."""
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            return None
        model = _field_model(model, part, data)
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
    if kind == "finite_number":
        return "must be a finite number (not nan or inf)"
    if any(kind.endswith(t) or kind == t for t in _TYPE_ERRORS) and not isinstance(err.get("input"), dict | list):
        return f"{msg} (got {err.get('input')!r})"
    return msg


def _format_errors(e: ValidationError, data: dict[str, Any]) -> list[tuple[Loc, str]]:
    return [(tuple(err["loc"]), _message(err, tuple(err["loc"]), data)) for err in e.errors(include_url=False)]


def _place(problems: list[tuple[Loc, str]], positions: Positions, overridden: dict[Loc, str]) -> list[str]:
    """Prefix each problem with where it comes from (override or YAML line), sorted by line."""
    placed: list[tuple[int, str]] = []
    for loc, msg in problems:
        field = dotted(loc) or "recipe"
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
        model = _field_model(model, part, data, path[depth + 1] if depth + 1 < len(path) else None)
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
                value = load_value(raw) if raw.strip() else ""
            except yaml.YAMLError as e:
                problems.append(f"override {item!r}: value is not valid YAML ({getattr(e, 'problem', e)})")
                continue
            except ValueError as e:
                problems.append(f"override {item!r}: {key}: {e}")
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


def recipe_from_dict(data: dict[str, Any], source: str = "<recipe>", positions: Positions | None = None,
                     overridden: dict[Loc, str] | None = None) -> Recipe:
    """Validate a recipe mapping; every problem is reported at once, each where it comes from."""
    positions = positions or Positions()
    overridden = overridden or {}
    huge = _out_of_range(data)
    if huge:
        raise RecipeError(source, _place(huge, positions, overridden))
    try:
        recipe = Recipe.model_validate(data, context={"defer_rules": True})
    except ValidationError as e:
        raise RecipeError(source, _place(_format_errors(e, data), positions, overridden)) from None
    except RecursionError:
        raise RecipeError(source, ["recipe: recursive structure (a YAML alias that contains itself)"]) from None
    rules = cross_field_problems(recipe)
    # a switch (the objective, alpha.kind, adaptive_tau.enabled) set on the command line, e.g. to compare
    # GRPO with a recipe's APO: the recipe's settings the new choice does not read are ignored, with a
    # warning, not an error
    unused = switched_unused(recipe.algorithm, rules, overridden)
    rules = [r for r in rules if r not in unused]
    if not rules:
        for problem, what in unused.items():
            for text in _place([problem], positions, {}):
                _warn(f"{source}: {text.replace('is set but', 'is ignored:')} ({what} switched by an override)")
    if rules:
        raise RecipeError(source, _place(rules, positions, overridden))
    return recipe


INT_RANGE = (-(2**63), 2**63 - 1)  # what torch, numpy and the backends take as an integer


def _out_of_range(value: Any, loc: Loc = ()) -> list[tuple[Loc, str]]:
    """Integers anywhere in the recipe (kwargs included) outside a signed 64-bit integer."""
    if isinstance(value, int) and not isinstance(value, bool) and not INT_RANGE[0] <= value <= INT_RANGE[1]:
        text = str(value) if len(str(value)) <= 24 else f"{str(value)[:12]}… ({len(str(value))} digits)"
        return [(loc, f"integer {text} is out of range (a recipe's integers must lie between -2**63 and 2**63-1)")]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list | tuple) else ()
    return [p for k, v in items for p in _out_of_range(v, (*loc, k))]


def _warn(text: str) -> None:
    import sys

    print(f"warning: {text}", file=sys.stderr)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load, override, validate and resolve the recipe at ``path``. Raises RecipeError with all problems."""
    path = Path(path)
    source = str(path)
    try:
        if path.is_file():
            check_size(path.stat().st_size, source)
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
    if "backend" in data:  # the kind picks the options model: keep it even when it was a default
        data["backend"]["kind"] = recipe.backend.kind
    for key, value in values.items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return recipe_from_dict(data, source, overridden={tuple(k.split(".")): f"{k}={v}" for k, v in values.items()})


def _schema_model() -> type[Recipe]:
    """``Recipe`` with ``backend`` typed as the union of the built-in backends' options (for the schema)."""
    models = tuple(m for _, m in builtin_backend_options())
    union: Any = Annotated[Union[models], Field(discriminator="kind")] if len(models) > 1 else models[0]  # noqa: UP007
    return create_model("Recipe", __base__=Recipe, __doc__=Recipe.__doc__,
                        backend=(union, Field(default_factory=CPUBackendSpec)))


def json_schema() -> dict[str, Any]:
    """The JSON schema of recipes, with the built-in backends (for editors and docs/recipe.schema.json)."""
    return _schema_model().model_json_schema()
