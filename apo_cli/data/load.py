"""From a DataSpec to a list of Examples: read, filter, map columns, hold out, shuffle, limit.

Order of operations (the same for every source):

1. read the rows of ``data.split`` (or of ``data.eval_split`` for ``split="eval"`` on a hub dataset);
2. keep rows matching ``data.filters`` (a value, or a list of accepted values; values also match by
   their text, so ``level: 3`` matches the CSV cell ``"3"``);
3. map columns; every kept row is checked, so a missing column fails at load time, naming the row.
   A prompt is text, or a list of chat messages ``[{"role": ..., "content": ...}]`` (a chat prompt,
   rendered with the tokenizer's chat template); numbers, booleans, objects and NaN are refused;
4. without ``eval_split``, hold out ``round(eval_fraction × n)`` rows for evaluation. The held-out
   rows are those whose prompt text hashes lowest: the split does not depend on the run seed, the
   row order or ``limit``, so runs with different seeds evaluate on the same problems;
5. training rows are shuffled with the run seed (``data.shuffle``), then cut to ``data.limit``;
   evaluation rows are shuffled with a fixed seed (same subset for every run), cut to ``eval_limit``.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from typing import TYPE_CHECKING, Any, Literal

from apo_cli.data.example import Example
from apo_cli.data.sources import read_rows, source_kind
from apo_cli.errors import DataError

if TYPE_CHECKING:
    from apo_cli.data.spec import DataSpec

EVAL_SHUFFLE_SEED = 0


def _label(spec: DataSpec, split: str) -> str:
    return f"{spec.source} [{split}]" if source_kind(spec.source) == "hub" else spec.source


def _same(value: Any, wanted: Any) -> bool:
    return value == wanted or (value is not None and wanted is not None and str(value) == str(wanted))


def filter_rows(rows: list[dict[str, Any]], filters: dict[str, Any], label: str) -> list[tuple[int, dict[str, Any]]]:
    """(source index, row) of the rows matching every filter; DataError if a filter column is missing
    or nothing matches (listing the values that were seen, to spot a typo such as 'level 3')."""
    kept = []
    for i, row in enumerate(rows):
        ok = True
        for col, wanted in filters.items():
            if col not in row:
                raise DataError(f"{label}: row {i} has no column {col!r} (used in data.filters); "
                                f"columns: {', '.join(map(str, row))}")
            accepted = wanted if isinstance(wanted, (list, tuple)) else [wanted]
            if not any(_same(row[col], w) for w in accepted):
                ok = False
                break
        if ok:
            kept.append((i, row))
    if rows and filters and not kept:
        seen = "; ".join(
            f"{col}: {', '.join(repr(v) for v in sorted({str(r[col]) for r in rows})[:8])}" for col in filters
        )
        raise DataError(f"{label}: no row of {len(rows)} matches data.filters {filters} (values seen — {seen})")
    return kept


def _value(row: dict[str, Any], col: str, i: int, field: str, label: str) -> Any:
    if col not in row:
        raise DataError(f"{label}: row {i} has no column {col!r} (data.{field}); columns: {', '.join(map(str, row))}")
    return row[col]


def _is_blank(value: Any) -> bool:
    """None, NaN (a missing value in parquet / pandas) or whitespace-only text."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or \
        (isinstance(value, str) and not value.strip())


_NOT_TEXT = "not text or a list of chat messages ({\"role\": ..., \"content\": ...})"


def _messages(raw: list[Any], where: str) -> tuple[dict[str, str], ...]:
    """A chat prompt's messages, checked: each an object with a text ``role`` and ``content``."""
    out = []
    for k, m in enumerate(raw):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            kind = "an object without 'role' and 'content'" if isinstance(m, dict) else _kind(m)
            raise DataError(f"{where} holds a list whose item {k} is {kind}, {_NOT_TEXT}")
        if not isinstance(m["role"], str) or not m["role"].strip():
            raise DataError(f"{where}: message {k}: 'role' must be a name such as 'user' (got {m['role']!r})")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: message {k} ({m['role']}): 'content' must be text (got {_kind(m['content'])})")
        out.append({key: v for key, v in m.items() if v is not None})  # parquet fills absent keys with None
    return tuple(out)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, int | float):
        return f"a number ({value!r})"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"


def _prompt(raw: Any, i: int, col: str, label: str) -> tuple[str, tuple[dict[str, str], ...] | None]:
    """(prompt text, chat messages or None) of a prompt cell; DataError naming the row for anything else."""
    where = f"{label}: row {i}: column {col!r} (data.prompt_column)"
    if _is_blank(raw) or (isinstance(raw, list | tuple) and not raw):
        raise DataError(f"{where} is empty")
    if isinstance(raw, str):
        return raw, None
    if not isinstance(raw, list | tuple):
        hint = " (a chat prompt is a list of such messages)" if isinstance(raw, dict) else ""
        raise DataError(f"{where} holds {_kind(raw)}, {_NOT_TEXT}{hint}")
    messages = _messages(list(raw), where)
    users = [m["content"] for m in messages if m["role"] == "user"]
    if not users:
        raise DataError(f"{where}: the chat messages have no 'user' message")
    if not users[-1].strip():
        raise DataError(f"{where}: the last user message is empty")
    return users[-1], messages


def map_rows(kept: list[tuple[int, dict[str, Any]]], spec: DataSpec, auto_columns: list[str],
             label: str) -> list[Example]:
    """Examples from (source index, row) pairs; errors name the source row index and the column."""
    out = []
    for index, (i, row) in enumerate(kept):
        prompt, messages = _prompt(_value(row, spec.prompt_column, i, "prompt_column", label), i,
                                   spec.prompt_column, label)
        columns = {col: _value(row, col, i, "extra_columns", label) for col in spec.extra_columns}
        columns.update({col: row.get(col) for col in auto_columns if col not in columns})
        answer = None
        if spec.answer_column is not None:
            raw = _value(row, spec.answer_column, i, "answer_column", label)
            if _is_blank(raw):
                raise DataError(f"{label}: row {i}: column {spec.answer_column!r} (data.answer_column) is empty")
            answer = str(raw)
            columns[spec.answer_column] = raw
        out.append(Example(index=index, prompt=prompt, answer=answer, columns=columns, messages=messages))
    return out


def _hash_rank(example: Example) -> tuple[str, int]:
    text = example.prompt if example.messages is None else json.dumps(example.messages, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest(), example.index


def hold_out(examples: list[Example], fraction: float, label: str) -> tuple[list[Example], list[Example]]:
    """(train, eval): the ``round(fraction × n)`` examples with the lowest prompt hash are held out."""
    if fraction <= 0:
        return examples, []
    n = len(examples)
    k = round(fraction * n)
    if n < 2:
        raise DataError(f"{label}: data.eval_fraction={fraction} needs at least 2 rows (have {n})")
    k = min(max(k, 1), n - 1)
    held = {x.index for x in sorted(examples, key=_hash_rank)[:k]}
    return [x for x in examples if x.index not in held], [x for x in examples if x.index in held]


def load_examples(spec: DataSpec, seed: int, split: Literal["train", "eval"] = "train") -> list[Example]:
    """The training or evaluation examples of a recipe's data section (see the module docstring).

    ``split="eval"`` returns [] when neither ``eval_split`` nor ``eval_fraction`` is set.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    if split == "eval" and spec.eval_split is not None:
        if source_kind(spec.source) != "hub":
            raise DataError(
                f"data.eval_split={spec.eval_split!r} needs a hub dataset; for {spec.source} use data.eval_fraction"
            )
        examples = _examples(spec, spec.eval_split)
        return _order(examples, spec.shuffle, EVAL_SHUFFLE_SEED, spec.eval_limit)
    examples = _examples(spec, spec.split)
    fraction = spec.eval_fraction if spec.eval_split is None else 0.0
    train, held = hold_out(examples, fraction, _label(spec, spec.split))
    if split == "eval":
        return _order(held, spec.shuffle, EVAL_SHUFFLE_SEED, spec.eval_limit)
    return _order(train, spec.shuffle, seed, spec.limit)


def _examples(spec: DataSpec, split: str) -> list[Example]:
    label = _label(spec, split)
    rows, auto_columns = read_rows(spec, split)
    if not rows:
        raise DataError(f"{label}: no rows")
    return map_rows(filter_rows(rows, spec.filters, label), spec, auto_columns, label)


def _order(examples: list[Example], shuffle: bool, seed: int, limit: int | None) -> list[Example]:
    out = list(examples)
    if shuffle:
        random.Random(seed).shuffle(out)
    return out[:limit] if limit is not None else out
