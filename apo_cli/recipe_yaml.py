"""A recipe's YAML: read with the position of every node (so that each problem names its line), written back.

:func:`parse_yaml` safe-loads the text and returns the mapping with a :class:`Positions` (dotted
path -> line and column); structural problems YAML would hide (duplicate keys, non-string keys,
recursive aliases) are reported here, all at once, as a :class:`~apo_cli.errors.RecipeError`.
Before anything is built, the text is checked against caps that keep a hostile document cheap to
refuse: at most :data:`MAX_RECIPE_BYTES`, nested at most :data:`MAX_DEPTH` levels, at most
:data:`MAX_VALUES` values once YAML aliases are expanded (an "alias bomb" names a list of lists ten
times per level), integers of at most :data:`MAX_INT_DIGITS` digits.
:func:`recipe_to_yaml` writes a resolved recipe (any pydantic model: this module does not import
:mod:`apo_cli.recipe`, so the training loop can write ``recipe.yaml`` without depending on it).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from apo_cli.errors import RecipeError

if TYPE_CHECKING:
    from pydantic import BaseModel

__all__ = ["MAX_DEPTH", "MAX_INT_DIGITS", "MAX_RECIPE_BYTES", "MAX_VALUES", "Loc", "Positions", "check_size",
           "dotted", "load_value", "parse_yaml", "recipe_to_yaml"]

Loc = tuple[str | int, ...]

MAX_RECIPE_BYTES = 256 * 1024  # a recipe is a few kB; pure-Python YAML takes seconds per 100 kB
MAX_DEPTH = 64  # sections nest 3 levels deep; the pure-Python parser is quadratic in the depth
MAX_VALUES = 100_000  # scalars and collections once aliases are expanded
MAX_INT_DIGITS = 32  # Python refuses to read integers of more than 4300 digits; no field needs 32
_INT_TAG = "tag:yaml.org,2002:int"


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
        if isinstance(node, yaml.ScalarNode) and node.tag == _INT_TAG and len(node.value) > MAX_INT_DIGITS:
            line = node.start_mark.line + 1
            self.problems.append(f"line {line}: {dotted(path) or 'recipe'}: an integer of {len(node.value)} characters "
                                 f"is out of range (at most {MAX_INT_DIGITS} digits)")
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


def check_size(size: int, source: str) -> None:
    """RecipeError for a recipe of ``size`` bytes over :data:`MAX_RECIPE_BYTES`."""
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(source, [f"the recipe is {size:,} bytes; a recipe may be at most {MAX_RECIPE_BYTES:,} bytes"])


def _shape_problem(text: str) -> str | None:
    """A problem with the depth or expanded size of ``text``, found from its event stream alone.

    libyaml's parser (when PyYAML has it) is linear in the depth; the pure-Python one is quadratic,
    so without libyaml a count of flow brackets (quoted ones too) stands in for the depth first."""
    fast = getattr(yaml, "CSafeLoader", None)
    if fast is None:
        depth = deepest = 0
        for ch in text:
            depth += (ch in "[{") - (ch in "]}")
            deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
            return f"the recipe is nested more than {MAX_DEPTH} levels deep"
    sizes: dict[str, int] = {}  # anchor -> values it stands for
    opened: list[tuple[str | None, int]] = []  # per open collection: (anchor, values before it)
    total = 0
    try:
        for ev in yaml.parse(text, Loader=fast or yaml.SafeLoader):
            line = ev.start_mark.line + 1 if ev.start_mark is not None else 0
            if isinstance(ev, yaml.CollectionStartEvent):
                opened.append((ev.anchor, total))
                total += 1
                if len(opened) > MAX_DEPTH:
                    return f"line {line}: the recipe is nested more than {MAX_DEPTH} levels deep"
            elif isinstance(ev, yaml.CollectionEndEvent):
                anchor, before = opened.pop()
                if anchor is not None:
                    sizes[anchor] = total - before
            elif isinstance(ev, yaml.ScalarEvent | yaml.AliasEvent):
                # an unknown alias (undefined, or one that contains itself) is reported by compose / walk
                total += sizes.get(ev.anchor, 1) if isinstance(ev, yaml.AliasEvent) else 1
                if isinstance(ev, yaml.ScalarEvent) and ev.anchor is not None:
                    sizes[ev.anchor] = 1
            if total > MAX_VALUES:
                return (f"line {line}: the recipe expands to more than {MAX_VALUES:,} values "
                        "(YAML aliases repeat what they name)")
    except yaml.YAMLError:
        return None  # reported, with its position, by the parse proper
    return None


def _compose(text: str, source: str) -> yaml.Node | None:
    check_size(len(text.encode("utf-8", "surrogatepass")), source)
    problem = _shape_problem(text)
    if problem:
        raise RecipeError(source, [problem])
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise _yaml_error(source, e) from None
    except RecursionError:
        raise RecipeError(source, [f"the recipe is nested more than {MAX_DEPTH} levels deep"]) from None


def load_value(text: str) -> Any:
    """One YAML value (a command-line override's) under the caps of a recipe.

    Raises ``yaml.YAMLError`` for text that is not YAML and ``ValueError`` (its message the problem)
    for a value over the caps."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_RECIPE_BYTES:
        raise ValueError(f"value is longer than {MAX_RECIPE_BYTES:,} bytes")
    problem = _shape_problem(text)
    if problem:
        raise ValueError(problem.replace("the recipe", "the value").split(": ", 1)[-1])
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        raise ValueError(f"the value is nested more than {MAX_DEPTH} levels deep") from None
    positions = Positions()
    if node is not None:
        positions.walk(node)
    if positions.problems:
        raise ValueError(positions.problems[0].split(": ", 2)[-1])
    return yaml.safe_load(text)


def load_file(path: Path) -> Any:
    """The YAML value in ``path`` under a recipe's caps (size, depth, alias expansion), for files apo
    reads back from a run directory (its ``recipe.yaml``), which may come from someone else.

    ``ValueError`` whose message names the file for any file that is not a recipe's YAML: over the
    caps, not UTF-8, not YAML ("PATH is not valid YAML"); ``OSError`` when it cannot be read."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise ValueError(f"{path} is {size:,} bytes; a recipe may be at most {MAX_RECIPE_BYTES:,} bytes")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not valid YAML") from None
    problem = _shape_problem(text)
    if problem:
        raise ValueError(f"{path}: {problem}")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ValueError(f"{path} is not valid YAML") from None
    except RecursionError:
        raise ValueError(f"{path}: the recipe is nested more than {MAX_DEPTH} levels deep") from None


def parse_yaml(text: str, source: str) -> tuple[dict[str, Any], Positions]:
    """Safe-load ``text``; return the mapping and the positions of its nodes."""
    positions = Positions()
    node = _compose(text, source)
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
