"""Built-in tasks: generated arithmetic and reasoning-gym datasets (with their reward bridge)."""

from __future__ import annotations

import pytest

from apo_cli.data import load_examples
from apo_cli.data.arithmetic import generate
from apo_cli.errors import DataError
from apo_cli.recipe import DataSpec, RewardSpec
from apo_cli.rewards import RewardSet


def test_arithmetic_defaults_and_answers_are_exact():
    examples = load_examples(DataSpec(), 0, "train")
    assert len(examples) == 2000
    for row in generate({"level": 5, "size": 300}):
        # evaluate the shown expression independently: / is always exact, so // equals /
        assert eval(row["expression"].replace("/", "//")) == int(row["answer"])  # noqa: S307 - our own digits


def test_arithmetic_is_seed_determined():
    a = load_examples(DataSpec(task_kwargs={"size": 20, "level": 3}, shuffle=False), 0, "train")
    b = load_examples(DataSpec(task_kwargs={"size": 20, "level": 3}, shuffle=False), 9, "train")
    c = load_examples(DataSpec(task_kwargs={"size": 20, "level": 3, "seed": 1}, shuffle=False), 0, "train")
    assert a == b  # the run seed does not change the problem set ...
    assert a != c  # ... task_kwargs.seed does


def test_arithmetic_ranges_and_ops():
    rows = generate({"min_value": 10, "max_value": 20, "ops": ["*"], "size": 50})
    for r in rows:
        x, y = (int(t) for t in r["expression"].split(" * "))
        assert 10 <= x <= 20 and 10 <= y <= 20 and int(r["answer"]) == x * y


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"level": 7}, r"level must be one of 1..5"),
        ({"ops": "+%"}, r"ops must be a non-empty selection"),
        ({"min_value": 5, "max_value": 1}, r"min_value 5 is above max_value 1"),
        ({"sizes": 3}, r"unknown key 'sizes'"),
        ({"size": "many"}, r"size must be an integer"),
    ],
)
def test_arithmetic_bad_kwargs(kwargs, match):
    with pytest.raises(DataError, match=match):
        load_examples(DataSpec(task_kwargs=kwargs), 0, "train")


def test_unknown_builtin_lists_known_tasks():
    with pytest.raises(DataError, match=r"unknown builtin task 'algebra_x'; known: arithmetic, gsm, .*basic_arithmetic"):
        load_examples(DataSpec(source="builtin:algebra_x"), 0, "train")


def test_gsm_via_reasoning_gym_and_its_reward():
    spec = DataSpec(source="builtin:gsm", task_kwargs={"size": 4}, shuffle=False)
    examples = load_examples(spec, 0, "train")
    assert len(examples) == 4
    ex = examples[0]
    assert ex.answer and "metadata" in ex.columns and ex.columns["metadata"]["source_dataset"] == "gsm_symbolic"
    rs = RewardSet([RewardSpec(name="reasoning_gym"), RewardSpec(name="exact_match")])
    out = rs([ex.prompt] * 2, [rf"\boxed{{{ex.answer}}}", r"\boxed{-1}"], [[1], [1]], [ex, ex])
    assert out.per_reward["reasoning_gym"][0] == 1.0 and out.per_reward["reasoning_gym"][1] < 1.0
    assert out.per_reward["exact_match"] == [1.0, 0.0]


def test_any_reasoning_gym_dataset_with_task_kwargs():
    spec = DataSpec(source="builtin:basic_arithmetic", task_kwargs={"size": 3, "seed": 5, "max_terms": 2})
    assert len(load_examples(spec, 0, "train")) == 3
    with pytest.raises(DataError, match=r"builtin:basic_arithmetic: bad data.task_kwargs"):
        load_examples(DataSpec(source="builtin:basic_arithmetic", task_kwargs={"no_such": 1}), 0, "train")
