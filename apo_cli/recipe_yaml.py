"""A recipe's YAML: read with the position of every node (so that each problem names its line), written back.

:func:`parse_yaml` safe-loads the text and returns the mapping with a :class:`Positions` (dotted
path -> line and column); structural problems YAML would hide (duplicate keys, non-string keys,
recursive aliases) are reported here, all at once, as a :class:`~apo_cli.errors.RecipeError`.
:func:`recipe_to_yaml` writes a resolved recipe (any pydantic model: this module does not import
:mod:`apo_cli.recipe`, so the training loop can write ``recipe.yaml`` without depending on it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import yaml

from apo_cli.errors import RecipeError

if TYPE_CHECKING:
    from pydantic import BaseModel

__all__ = ["Loc", "Positions", "dotted", "parse_yaml", "recipe_to_yaml"]

Loc = tuple[str | int, ...]


class Positions:
    """Maps dotted paths of a YAML document to (line, column), 1-based, and notes structural problems."""

    def __init__(self) -> None:
        self.where: dict[Loc, tuple[int, int]] = {}
        self.problems: list[str] = []

    def walk(self, node: yaml.Node, path: Loc = (), active: frozenset[int] = frozenset()) -> None:
        if id(node) in active:  # an alias that contains itself
            line = node.start_mark.line + 1
            self.problems.append(f"line {line}: {dotted(path) or 'recipe'}: recursive YAML alias")
            return
        active = active | {id(node)}
        self.where.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for k, v in node.value:
                at = f"line {k.start_mark.line + 1}, column {k.start_mark.column + 1}"
                if not isinstance(k, yaml.ScalarNode) or k.tag != "tag:yaml.org,2002:str":
                    key_text = k.value if isinstance(k, yaml.ScalarNode) else "a collection"
                    self.problems.append(f"{at}: {dotted(path) or 'recipe'}: keys must be names, not {key_text!r}")
                    continue
                key = k.value
                if key in seen:
                    self.problems.append(
                        f"{at}: {dotted((*path, key))}: duplicate key (YAML would silently keep only the last one)"
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


def parse_yaml(text: str, source: str) -> tuple[dict[str, Any], Positions]:
    """Safe-load ``text``; return the mapping and the positions of its nodes."""
    positions = Positions()
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


def dotted(loc: Loc) -> str:
    """``("rewards", 0, "name")`` -> ``rewards[0].name``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def recipe_to_yaml(recipe: BaseModel) -> str:
    """The resolved recipe as YAML (every field, defaults included)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
