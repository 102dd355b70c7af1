"""The builtin:arithmetic task: integer arithmetic problems generated from a seed, exact answers.

``task_kwargs``: ``level`` 1..5 (default 2) picks operand range, operators and number of terms;
``min_value``/``max_value``, ``ops`` (e.g. "+-*" or ["+", "-"]) and ``terms`` override the level;
``size`` problems (default 2000) from ``seed`` (default 0: the same problem set for every run seed —
the run seed only orders it; change ``seed`` to draw another set).

Expressions are evaluated left to right and parenthesised accordingly (``(3 + 4) * 5``), and a
division is only ever by an exact divisor, so every answer is an integer.
"""

from __future__ import annotations

import random
from typing import Any

from apo_cli.errors import DataError

# level: (min operand, max operand, operators, terms)
LEVELS: dict[int, tuple[int, int, str, int]] = {
    1: (0, 9, "+-", 2),
    2: (0, 99, "+-", 2),
    3: (0, 99, "+-*", 2),
    4: (0, 999, "+-*/", 2),
    5: (0, 999, "+-*/", 3),
}
KNOWN_KWARGS = ("level", "min_value", "max_value", "ops", "terms", "size", "seed")


def _settings(kwargs: dict[str, Any]) -> tuple[int, int, list[str], int, int, int]:
    """Validated (lo, hi, ops, terms, size, seed) from task_kwargs; DataError naming the bad key."""
    where = "builtin:arithmetic: data.task_kwargs"
    unknown = sorted(set(kwargs) - set(KNOWN_KWARGS))
    if unknown:
        raise DataError(f"{where} has unknown key {unknown[0]!r}; valid keys: {', '.join(KNOWN_KWARGS)}")
    level = kwargs.get("level", 2)
    if level not in LEVELS:
        raise DataError(f"{where}.level must be one of 1..5 (got {level!r})")
    lo, hi, ops, terms = LEVELS[level]
    lo, hi = kwargs.get("min_value", lo), kwargs.get("max_value", hi)
    ops_raw = kwargs.get("ops", ops)
    op_list = list(ops_raw) if isinstance(ops_raw, str) else list(ops_raw or [])
    terms, size, seed = kwargs.get("terms", terms), kwargs.get("size", 2000), kwargs.get("seed", 0)
    for name, value in (("min_value", lo), ("max_value", hi), ("terms", terms), ("size", size), ("seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise DataError(f"{where}.{name} must be an integer (got {value!r})")
    if lo > hi:
        raise DataError(f"{where}: min_value {lo} is above max_value {hi}")
    if not op_list or any(op not in "+-*/" or len(op) != 1 for op in op_list):
        raise DataError(f"{where}.ops must be a non-empty selection of + - * / (got {ops_raw!r})")
    if terms < 2 or size < 1:
        raise DataError(f"{where}: terms must be >= 2 and size >= 1 (got terms={terms}, size={size})")
    if op_list == ["/"] and hi < 1:
        raise DataError(f"{where}: division needs max_value >= 1")
    return lo, hi, op_list, terms, size, seed


def _show(x: int) -> str:
    return f"({x})" if x < 0 else str(x)


def _problem(rng: random.Random, lo: int, hi: int, ops: list[str], terms: int) -> tuple[str, int]:
    value = rng.randint(lo, hi)
    expr = _show(value)
    for k in range(terms - 1):
        op = rng.choice(ops)
        if op == "/" and hi < 1:
            op = "*" if "*" in ops else "+"
        if op == "/":
            if k == 0:  # build the dividend as a multiple of the divisor
                d = rng.randint(max(1, lo), hi)
                value = d * rng.randint(lo, hi)
                expr = _show(value)
            else:  # an exact divisor (> 1) of what we have; otherwise another operator, or / 1
                cands = [c for c in (rng.randint(max(1, lo), hi) for _ in range(50)) if c > 1 and value % c == 0]
                others = [o for o in ops if o != "/"]
                d = max(cands) if cands else 1
                if not cands and others:
                    op = rng.choice(others)
        if op == "/":
            operand, value = d, value // d
        else:
            operand = rng.randint(lo, hi)
            value = value + operand if op == "+" else value - operand if op == "-" else value * operand
        expr = f"({expr})" if k > 0 else expr
        expr = f"{expr} {op} {_show(operand)}"
    return expr, value


def generate(kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows {prompt, answer, expression} of the arithmetic task for ``kwargs`` (see module docstring)."""
    lo, hi, ops, terms, size, seed = _settings(kwargs)
    rng = random.Random(f"apo-arithmetic:{seed}")
    rows = []
    for _ in range(size):
        expr, value = _problem(rng, lo, hi, ops, terms)
        rows.append({"prompt": f"What is {expr}?", "answer": str(value), "expression": expr})
    return rows
