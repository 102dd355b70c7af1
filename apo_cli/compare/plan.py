"""The arms and seeds of a comparison, each arm's recipe built and validated before anything trains.

Arms come from the command line in one of three ways:

- one recipe and ``--objectives apo,grpo,gspo``: one arm per objective, named after it
  (``NAME=OBJECTIVE`` names an arm, so the same objective can appear twice:
  ``apo,apo_ref=apo --set apo_ref:algorithm.alpha.kind=reward_confidence``);
- several recipes (twins such as the paper's three): one arm per recipe, named after the file;
- several recipes and ``--objectives``: every recipe with every objective, ``<recipe>-<objective>``.

An arm whose objective differs from its recipe's takes that objective's defaults for the algorithm
fields: it keeps the fields every objective reads for the loop (:data:`KEPT_ON_SWITCH`) and drops
the rest of the recipe's ``algorithm`` section (the dead-field rule of :mod:`apo_cli.algo.spec`
would refuse a field the new objective does not read, and a field it does read was set for another
objective: GSPO's clip epsilons are not GRPO's). ``--set ARM:key=value`` then sets one arm's field,
checked like any override. Every run's recipe is validated here, so a bad arm fails before the
first run starts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apo_cli.errors import UsageError

__all__ = ["KEPT_ON_SWITCH", "MANIFEST", "Arm", "Plan", "build_plan", "parse_objectives", "parse_seeds",
           "parse_sets", "read_manifest", "split_args"]

MANIFEST = "compare.json"
# algorithm fields every objective reads for the loop: an arm that switches the objective keeps them
KEPT_ON_SWITCH = ("mini_batches", "epochs", "kl_coef", "advantage_eps", "disable_dropout")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,59}")


@dataclass
class Arm:
    name: str
    source: str  # the recipe file it comes from
    objective: str
    data: dict[str, Any]  # the arm's recipe mapping (paths resolved), before the seed and run directory
    dropped: list[str] = field(default_factory=list)  # algorithm fields dropped by an objective switch
    sets: list[str] = field(default_factory=list)  # its --set KEY=VALUE items
    unread: list[str] = field(default_factory=list)  # fields a --set switch (alpha.kind, ...) left unread: dropped


@dataclass
class Plan:
    name: str
    root: Path  # runs/<name>-compare, absolute
    arms: list[Arm]
    seeds: list[int]
    recipes: dict[tuple[str, int], Any] = field(default_factory=dict)  # (arm, seed) -> validated Recipe

    def run_dir(self, arm: str, seed: int) -> Path:
        return self.root / f"{arm}-s{seed}"

    def recipe_file(self, arm: str, seed: int) -> Path:
        return self.root / "recipes" / f"{arm}-s{seed}.yaml"

    def tasks(self) -> list[tuple[str, int]]:
        """Seed-major: an interrupted comparison has every arm at the seeds it got through."""
        return [(a.name, s) for s in self.seeds for a in self.arms]

    def manifest(self) -> dict[str, Any]:
        return {"name": self.name, "seeds": self.seeds,
                "arms": [{"name": a.name, "objective": a.objective, "recipe": a.source, "dropped": a.dropped,
                          "set": a.sets, "unread_after_set": a.unread} for a in self.arms]}


# --------------------------------------------------------------------------------------------------
# The command line


def split_args(args: list[str]) -> tuple[list[Path], list[str]]:
    """Positional arguments as (recipe files, key=value overrides for every arm)."""
    recipes = [Path(a) for a in args if not ("=" in a and not Path(a).exists())]
    return recipes, [a for a in args if "=" in a and not Path(a).exists()]


def parse_objectives(text: str) -> list[tuple[str, str]]:
    """``apo,grpo,apo_ref=apo`` -> [(arm name, objective)], each objective checked against the registry."""
    from apo_cli.algo.spec import objective_names

    names = sorted(objective_names())
    out = []
    for item in text.split(","):
        item = item.strip()
        arm, sep, objective = item.partition("=")
        arm, objective = arm.strip(), (objective.strip() if sep else arm.strip())
        if not item or not arm or not objective:
            raise UsageError(f"--objectives {text!r}: expected a comma-separated list of objectives "
                             "(NAME=OBJECTIVE names an arm), e.g. apo,grpo,gspo")
        if objective not in names:
            raise UsageError(f"--objectives: unknown objective {objective!r}; valid names: {', '.join(names)}")
        out.append((arm, objective))
    return out


def parse_seeds(text: str) -> list[int]:
    """``0,1,2`` -> [0, 1, 2]: distinct non-negative integers."""
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise UsageError(f"--seeds {text!r}: expected comma-separated non-negative integers, e.g. 0,1,2") from None
    if any(s < 0 for s in seeds):
        raise UsageError(f"--seeds {text!r}: a seed must be >= 0")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds {text!r}: a seed appears twice")
    return seeds


def parse_sets(items: list[str], arms: list[str]) -> dict[str, list[str]]:
    """``--set ARM:key=value`` items as {arm: [key=value, ...]}; the arm must be one of ``arms``."""
    out: dict[str, list[str]] = {}
    for item in items:
        arm, sep, kv = item.partition(":")
        if not sep or "=" in arm or "=" not in kv or not kv.partition("=")[0].strip():
            raise UsageError(f"--set {item!r}: expected ARM:key.path=value, e.g. grpo:algorithm.eps_high=0.28")
        if arm not in arms:
            raise UsageError(f"--set {item!r}: no arm named {arm!r}; the arms are: {', '.join(arms)}")
        out.setdefault(arm, []).append(kv)
    return out


def _check_name(name: str, what: str) -> str:
    if not _NAME.fullmatch(name):
        raise UsageError(f"{what} {name!r}: a name must be 1-60 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return name


# --------------------------------------------------------------------------------------------------
# The arms


def _drop(data: dict[str, Any], problems: list[tuple[tuple[str, ...], str]]) -> list[str]:
    """Remove the fields the problems name from ``data``; their dotted names."""
    dropped = []
    for loc, _ in problems:
        node: Any = data
        for part in loc[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and loc[-1] in node:
            del node[loc[-1]]
            dropped.append(".".join(map(str, loc)))
    return dropped


def _base_data(recipe: Any) -> dict[str, Any]:
    """The recipe as the mapping it was written as (fields left at their defaults stay out), without
    the fields an objective switched by an override left unread (load_recipe warned about them)."""
    from apo_cli.algo.spec import unused_param_problems

    data = recipe.model_dump(mode="json", exclude_unset=True)
    data.setdefault("backend", {})["kind"] = recipe.backend.kind  # the kind picks the options model
    _drop(data, unused_param_problems(recipe.algorithm))
    return data


def _switch(data: dict[str, Any], objective: str) -> tuple[dict[str, Any], list[str]]:
    """``data`` with ``objective``'s defaults for the algorithm fields; the dropped fields."""
    from apo_cli.algo.spec import AlgorithmSpec, unused_param_problems

    old = data.get("algorithm") or {}
    if old.get("objective", "apo") == objective:
        return data, []
    new = {k: v for k, v in old.items() if k in KEPT_ON_SWITCH}
    new["objective"] = objective
    _drop({"algorithm": new}, unused_param_problems(AlgorithmSpec.model_validate(new)))  # e.g. advantage_eps
    dropped = [f"algorithm.{k}" for k in old if k not in new and k != "objective"]
    return {**data, "algorithm": new}, dropped


def _switched_by_set(data: dict[str, Any], overridden: dict[Any, str]) -> list[str]:
    """Drop the fields a --set switch (alpha.kind, adaptive_tau.enabled) left unread, so that the
    run's recipe file loads on its own; the rest of the recipe's problems are reported by validation."""
    from pydantic import ValidationError

    from apo_cli.algo.spec import switched_unused
    from apo_cli.recipe import Recipe, cross_field_problems

    try:
        r = Recipe.model_validate(data, context={"defer_rules": True})
    except ValidationError:
        return []
    return _drop(data, list(switched_unused(r.algorithm, cross_field_problems(r), overridden)))


def _arm_recipe(arm: Arm) -> Any:
    """Apply the arm's --set items and validate (one block naming every problem)."""
    from apo_cli.recipe import _resolve_paths, apply_overrides, recipe_from_dict

    source = f"{arm.source} (arm {arm.name})"
    data = json.loads(json.dumps(arm.data))
    overridden = apply_overrides(data, arm.sets, source)
    _resolve_paths(data, Path.cwd(), overridden)  # a path set on the command line is the CWD's
    arm.unread = _switched_by_set(data, overridden)
    recipe_from_dict(data, source, overridden={loc: f"--set {arm.name}:{t}" for loc, t in overridden.items()})
    arm.data = data


def _arms(recipes: list[Path], overrides: list[str], objectives: list[tuple[str, str]] | None) -> list[Arm]:
    from apo_cli.recipe import load_recipe

    loaded = [(p, load_recipe(p, overrides)) for p in recipes]
    arms = []
    for path, recipe in loaded:
        base = _base_data(recipe)
        stem = path.stem if len(loaded) > 1 else None
        for arm_name, objective in objectives or [(None, recipe.algorithm.objective)]:
            name = "-".join(n for n in (stem, arm_name) if n) if (stem or arm_name) else recipe.run.name
            data, dropped = _switch(base, objective) if objectives else (base, [])
            arms.append(Arm(_check_name(name, "arm name"), str(path), objective, data, dropped))
    seen: set[str] = set()
    for a in arms:
        if a.name in seen:
            raise UsageError(f"two arms are named {a.name!r}: give them names (--objectives NAME=OBJECTIVE) "
                             "or recipe files with different names")
        seen.add(a.name)
    return arms


def build_plan(args: list[str], *, objectives: str | None, seeds: str, sets: list[str], name: str | None,
               output_dir: Path | None) -> Plan:
    """Every run of the comparison with its validated recipe (UsageError / RecipeError before any run)."""
    from apo_cli.recipe import recipe_from_dict

    recipes, overrides = split_args(args)
    if not recipes:
        raise UsageError("give a recipe (with --objectives) or several recipes to compare")
    arms = _arms(recipes, overrides, parse_objectives(objectives) if objectives else None)
    if len(arms) < 2:
        raise UsageError("a comparison needs at least two arms: give --objectives (e.g. apo,grpo) or several recipes")
    by_arm = parse_sets(sets, [a.name for a in arms])
    seed_list = parse_seeds(seeds)
    first = arms[0]
    cname = _check_name(name or str((first.data.get("run") or {}).get("name") or "apo-run"), "--name")
    root = (output_dir or Path("runs") / f"{cname}-compare").expanduser().resolve()
    plan = Plan(cname, root, arms, seed_list)
    for arm in arms:
        arm.sets = by_arm.get(arm.name, [])
        _arm_recipe(arm)
        for seed in seed_list:
            run = {**arm.data.get("run", {}), "name": f"{cname}-{arm.name}-s{seed}"[:100], "seed": seed,
                   "output_dir": str(plan.run_dir(arm.name, seed))}
            plan.recipes[(arm.name, seed)] = recipe_from_dict({**arm.data, "run": run},
                                                              f"{arm.source} (arm {arm.name}, seed {seed})")
    return plan


def read_manifest(root: Path) -> dict[str, Any] | None:
    """The comparison's compare.json, or None when there is none (a folder of run directories)."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UsageError(f"{path} is not valid JSON; delete it to report on the run directories found") from None
    if not isinstance(data, dict) or not isinstance(data.get("arms"), list):
        raise UsageError(f"{path} is not a comparison manifest (no 'arms' list)")
    return data
