"""RewardSet: weighting, None handling, custom rewards, failure policy and metrics."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import pytest

from apo_cli.data import Example
from apo_cli.errors import RewardError
from apo_cli.recipe import RewardSpec
from apo_cli.rewards import RewardSet, Scores


def _batch(groups: list[tuple[str, list[str]]], extra: dict | None = None):
    """(prompts, completions, ids, examples) for groups of (answer, completions), examples repeated."""
    prompts, completions, ids, examples = [], [], [], []
    for i, (answer, texts) in enumerate(groups):
        ex = Example(index=i, prompt=f"q{i}", answer=answer, columns={"answer": answer, **(extra or {})})
        for t in texts:
            prompts.append(ex.prompt)
            completions.append(t)
            ids.append([1] * len(t.split()))
            examples.append(ex)
    return prompts, completions, ids, examples


@pytest.fixture
def custom_module(tmp_path, monkeypatch):
    """A module 'my_rewards' on sys.path with a few custom rewards."""
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent('''
        import time
        CALLS = []

        def contains_seven(completions, **kwargs):
            CALLS.append(sorted(kwargs))
            with open(__file__ + ".calls", "a") as f:  # custom rewards run in a worker process
                f.write(" ".join(sorted(kwargs)) + "\\n")
            return [1.0 if "7" in c else 0.0 for c in completions]

        def simple(completions, answer):  # no **kwargs: gets only what it names
            return [float(c == a) for c, a in zip(completions, answer)]

        def explode_on_bad(completions, **kwargs):
            if any("bad" in c for c in completions):
                raise ValueError("cannot score 'bad'")
            return [0.5] * len(completions)

        def always_raises(completions, **kwargs):
            raise KeyError("boom")

        def wrong_length(completions, **kwargs):
            return [1.0]

        def wrong_type(completions, **kwargs):
            return {"score": 1.0}

        def wrong_item(completions, **kwargs):
            return ["high"] * len(completions)

        def nan(completions, **kwargs):
            return [float("nan")] * len(completions)

        def slow(completions, **kwargs):
            if "slow" in completions:
                time.sleep(3)
            return [1.0] * len(completions)

        def none_for_short(completions, **kwargs):
            return [None if len(c) < 3 else 1.0 for c in completions]

        NOT_CALLABLE = 3
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


def test_weighted_total_and_metrics():
    rs = RewardSet([RewardSpec(name="exact_match", weight=2.0), RewardSpec(name="format", weight=0.5)])
    out = rs(*_batch([("4", [r"<answer>4</answer>", r"\boxed{5}"]), ("1", [r"\boxed{1}", "x"])]))
    # exact_match: 1, 0, 1, 0 (x2); format: 1, 0, 0, 0 (x0.5)
    assert out.total == [2.5, 0.0, 2.0, 0.0]
    assert out.correct == [True, False, True, False]
    assert out.metrics["rewards/exact_match/mean"] == 0.5
    assert out.metrics["rewards/exact_match/std"] == 0.5
    assert out.metrics["rewards/format/mean"] == 0.25
    assert out.metrics["rewards/exact_match/none_frac"] == 0.0
    assert out.metrics["rewards/exact_match/errors"] == 0.0
    assert out.metrics["rewards/correct_frac"] == 0.5
    assert out.per_reward["format"] == [1.0, 0.0, 0.0, 0.0]
    assert rs.names == ["exact_match", "format"] and rs.verifying == ["exact_match"]


def test_no_verifying_reward_means_no_correctness():
    out = RewardSet([RewardSpec(name="length", kwargs={"target": 2, "unit": "words"})])(*_batch([("1", ["a b"])]))
    assert out.correct is None and out.total == [pytest.approx(0.1)]


def test_none_is_skipped_and_all_none_counted(custom_module):
    rs = RewardSet([RewardSpec(name=f"{custom_module}:none_for_short", weight=3.0)])
    out = rs(*_batch([("1", ["ab", "abcd"])]))
    assert out.total == [0.0, 3.0]
    assert out.metrics["rewards/none_for_short/none_frac"] == 0.5
    assert out.metrics["rewards/all_none"] == 1.0


def test_custom_reward_from_module_gets_columns_and_kwargs(custom_module, tmp_path):
    rs = RewardSet([RewardSpec(name=f"{custom_module}:contains_seven", kwargs={"alpha": 1})])
    out = rs(*_batch([("7", ["7", "8"])], extra={"level": "Level 3"}))
    assert out.total == [1.0, 0.0]
    calls = (tmp_path / f"{custom_module}.py.calls").read_text().splitlines()
    assert calls[-1].split() == ["alpha", "answer", "completion_ids", "level", "prompts"]
    assert custom_module not in sys.modules  # imported only in the worker process


def test_custom_reward_without_var_kwargs(custom_module):
    out = RewardSet([RewardSpec(name=f"{custom_module}:simple")])(*_batch([("a", ["a", "b"])]))
    assert out.total == [1.0, 0.0]


def test_custom_reward_from_file(tmp_path):
    path = tmp_path / "rewards_file.py"
    path.write_text("def short(completions, **kw):\n    return [1.0 if len(c) < 4 else 0.0 for c in completions]\n")
    rs = RewardSet([RewardSpec(name=f"{path}:short")])
    assert rs.names == ["short"]
    assert rs(*_batch([("1", ["abc", "abcdef"])])).total == [1.0, 0.0]


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("no_such_module_xyz:fn", "no module named 'no_such_module_xyz'"),
        ("my_rewards:missing", "has no attribute 'missing'"),
        ("my_rewards:NOT_CALLABLE", "not a function"),
        ("/nonexistent/dir/r.py:fn", "file not found"),
        ("nope", "unknown reward 'nope'"),
    ],
)
def test_bad_custom_targets(custom_module, name, match):
    with pytest.raises(RewardError, match=match) as e:
        RewardSet([RewardSpec(name=name)])
    assert name in str(e.value) or "unknown reward" in str(e.value)


def test_file_that_fails_on_import(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("raise RuntimeError('no GPU here')\n")
    with pytest.raises(RewardError, match=r"importing .*broken.py failed: RuntimeError: no GPU here"):
        RewardSet([RewardSpec(name=f"{path}:fn")])


def test_builtin_kwargs_are_checked():
    with pytest.raises(RewardError, match="unknown kwargs key 'tag'; did you mean 'tags'"):
        RewardSet([RewardSpec(name="format", kwargs={"tag": ["<a>"]})])


def test_raising_call_scores_none_and_is_counted_once(custom_module, capsys):
    rs = RewardSet([RewardSpec(name=f"{custom_module}:explode_on_bad"), RewardSpec(name="exact_match")])
    batch = _batch([("1", ["bad", "x"]), ("2", [r"\boxed{2}", "y"]), ("3", ["bad", "z"])])
    out = rs(*batch)
    assert out.per_reward["explode_on_bad"] == [None, None, 0.5, 0.5, None, None]  # groups 0 and 2 raised
    assert out.metrics["rewards/explode_on_bad/errors"] == 4.0
    assert out.total == [0.0, 0.0, 1.5, 0.5, 0.0, 0.0]
    err = capsys.readouterr().err
    assert err.count("Traceback") == 1 and "cannot score 'bad'" in err
    rs(*batch)
    assert "Traceback" not in capsys.readouterr().err  # later failures are only counted


def test_reward_failing_on_every_sample_is_an_error(custom_module):
    rs = RewardSet([RewardSpec(name=f"{custom_module}:always_raises")])
    with pytest.raises(RewardError, match=r"reward always_raises failed on all 4 samples of this step: KeyError: 'boom'"):
        rs(*_batch([("1", ["a", "b"]), ("2", ["c", "d"])]))


def test_math_reward_without_answers_is_an_error():
    prompts, completions, ids, examples = _batch([("1", [r"\boxed{1}"])])
    examples = [Example(index=0, prompt="q", answer=None)]
    with pytest.raises(RewardError, match="math_verify failed on all 1 samples.*no reference answer"):
        RewardSet([RewardSpec(name="math_verify")])(prompts, completions, ids, examples)


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        ("wrong_length", r"reward wrong_length returned 1 values for 2 completions"),
        ("wrong_type", r"reward wrong_type returned \{'score': 1.0\}; expected a list of 2 floats or None"),
        # every value bad: each is isolated, and a reward bad on all samples stops the step
        ("wrong_item", r"reward wrong_item failed on all 2 samples.*returned str 'high' for completion 0"),
        ("nan", r"reward nan failed on all 2 samples.*returned float nan for completion 0"),
    ],
)
def test_bad_return_values(custom_module, fn, match):
    with pytest.raises(RewardError, match=match):
        RewardSet([RewardSpec(name=f"{custom_module}:{fn}")])(*_batch([("1", ["a", "b"])]))


def test_a_single_bad_value_is_isolated_and_counted(tmp_path):
    mod = tmp_path / "partly_bad.py"
    mod.write_text(
        "def partly(completions, **kw):\n"
        "    return [float('nan') if c == 'x' else ('oops' if c == 'y' else 1.0) for c in completions]\n"
    )
    rs = RewardSet([RewardSpec(name=f"{mod}:partly")])
    out = rs(*_batch([("1", ["x", "ok"]), ("2", ["y", "ok"])]))
    assert out.total == [0.0, 1.0, 0.0, 1.0]  # the bad samples score None -> 0.0 in the total
    assert out.metrics["rewards/partly/bad_values"] == 2.0
    assert out.metrics["rewards/partly/none_frac"] == 0.5


def test_slow_custom_reward_times_out(custom_module):
    rs = RewardSet([RewardSpec(name=f"{custom_module}:slow", timeout_s=0.2), RewardSpec(name="exact_match")])
    t0 = time.monotonic()
    out = rs(*_batch([("1", [r"\boxed{1}", "slow"]), ("2", ["a", "b"])]))
    assert time.monotonic() - t0 < 2.0
    assert out.per_reward["slow"] == [None, None, 1.0, 1.0]
    assert out.metrics["rewards/slow/timeouts"] == 2.0
    with pytest.raises(RewardError, match="slow failed on all 2 samples of this step: timed out after 0.2 s"):
        rs(*_batch([("1", ["slow", "b"])]))


def test_duplicate_names_get_suffixes():
    rs = RewardSet([RewardSpec(name="length"), RewardSpec(name="length", kwargs={"target": 10})])
    assert rs.names == ["length", "length_2"]


def test_custom_reward_may_report_correctness(tmp_path):
    path = tmp_path / "judge.py"
    path.write_text(
        "from apo_cli.rewards import Scores\n"
        "def judge(completions, **kw):\n"
        "    return Scores([1.0 for _ in completions], correct=[c == 'yes' for c in completions])\n"
    )
    out = RewardSet([RewardSpec(name=f"{path}:judge")])(*_batch([("1", ["yes", "no"])]))
    assert out.correct == [True, False]


def test_scores_is_a_list():
    s = Scores([1.0, None], correct=[True, None], counts={"x": 1})
    assert s == [1.0, None] and isinstance(s, list) and s.counts == {"x": 1}
