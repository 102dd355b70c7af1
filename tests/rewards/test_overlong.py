"""The built-in ``overlong`` reward (DAPO's soft overlong punishment), at the edges of its bands,
and the rule of its kwargs, checked when the recipe is read."""

from __future__ import annotations

import re

import pytest

from apo_cli.errors import RecipeError, RewardError
from apo_cli.recipe import recipe_from_dict
from apo_cli.rewards import RewardSet
from apo_cli.rewards.builtin import overlong
from apo_cli.rewards.spec import RewardSpec


def _score(lengths: list[int], **kwargs) -> list[float]:
    return list(overlong(["x"] * len(lengths), [[7] * n for n in lengths], **kwargs))


def test_values_at_the_band_edges():
    # max_len 10, buffer 4: 0 up to 10 - 4 = 6 tokens, then (6 - L) / 4, -1 at 10 and beyond
    assert _score([0, 1, 6, 7, 8, 9, 10, 11, 50], max_len=10, buffer=4) == \
        [0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0]


def test_dapo_figures():
    # DAPO: L_max 20480, L_cache 4096 -> 0 up to 16384, -0.5 at 16384 + 2048, -1 at 20480
    assert _score([16384, 16385, 18432, 20480, 20481], max_len=20480, buffer=4096) == \
        [0.0, -1 / 4096, -0.5, -1.0, -1.0]


def test_a_zero_buffer_is_a_cliff_and_a_full_buffer_a_ramp_from_zero():
    assert _score([9, 10, 11], max_len=10, buffer=0) == [0.0, 0.0, -1.0]
    assert _score([0, 5, 10], max_len=10, buffer=10) == [0.0, -0.5, -1.0]


def test_it_counts_tokens_not_characters():
    # one long word of 3 tokens and three short ones of 12 tokens: the ids decide
    out = overlong(["a" * 100, "a b c"], [[1, 2, 3], [1] * 12], max_len=10, buffer=4)
    assert list(out) == [0.0, -1.0]
    with pytest.raises(RewardError, match="counts tokens"):
        overlong(["a"], None, max_len=10, buffer=4)


def test_through_the_reward_set_the_ids_reach_it():
    rs = RewardSet([RewardSpec(name="overlong", kwargs={"max_len": 4, "buffer": 2})])
    out = rs(["p"] * 3, ["a", "b", "c"], [[1, 2], [1, 2, 3], [1] * 5], [None, None, None])
    assert out.total == [0.0, -0.5, -1.0]


@pytest.mark.parametrize("kwargs, rule", [
    ({}, "needs kwargs max_len and buffer"),
    ({"max_len": 10}, "needs kwargs max_len and buffer"),
    ({"max_len": 0, "buffer": 0}, "kwargs.max_len must be at least 1 token (got 0)"),
    ({"max_len": 10, "buffer": 11}, "kwargs.buffer must be between 0 and max_len=10 tokens (got 11)"),
    ({"max_len": 10, "buffer": -1}, "kwargs.buffer must be between 0 and max_len=10 tokens (got -1)"),
    ({"max_len": 10.5, "buffer": 2}, "kwargs.max_len must be a whole number of tokens (got 10.5)"),
    ({"max_len": 10, "buffer": True}, "kwargs.buffer must be a whole number of tokens (got True)"),
])
def test_bad_kwargs_are_refused_when_the_recipe_is_read(kwargs, rule):
    d = {"model": {"name_or_path": "tiny-random"}, "data": {"source": "builtin:arithmetic"},
         "rewards": [{"name": "exact_match"}, {"name": "overlong", "kwargs": kwargs}]}
    with pytest.raises(RecipeError, match=re.escape(f"rewards[1] (overlong): {rule}")):
        recipe_from_dict(d)
    with pytest.raises(RewardError, match=re.escape(rule)):
        overlong(["a"], [[1]], **kwargs)


def test_bad_kwargs_are_one_line_from_apo_validate(tmp_path, cli):
    path = tmp_path / "r.yaml"
    path.write_text("model: {name_or_path: tiny-random}\ndata: {source: 'builtin:arithmetic'}\n"
                    "rewards:\n  - name: overlong\n    kwargs: {max_len: 16, buffer: 20}\n")
    res = cli("validate", str(path))
    assert res.exit_code == 2
    assert "rewards[0] (overlong): kwargs.buffer must be between 0 and max_len=16 tokens (got 20)" in res.output
    assert "Traceback" not in res.output
