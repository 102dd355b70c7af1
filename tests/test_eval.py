"""`apo eval`: the estimators by hand, the table/JSON over checkpoints, the cache, bad inputs."""

from __future__ import annotations

import json
import math
import random
from fractions import Fraction
from pathlib import Path

import pytest

from apo_cli.evaluation import ProblemResult, majority_correct, mean_ci, pass_at_k, summarize


def closed_form(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def outcomes(correct: list[bool], answers: list[str | None] | None = None) -> ProblemResult:
    n = len(correct)
    return ProblemResult(position=0, prompt="p", reference="1", completions=[""] * n, finish_reasons=["stop"] * n,
                         tokens=[1] * n, rewards=[float(c) for c in correct], correct=list(correct),
                         answers=answers or [None] * n)


# -- estimators ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 10, 16])
def test_pass_at_k_matches_the_closed_form(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(closed_form(n, c, k), abs=1e-12)


def test_pass_at_k_hand_values_and_stability():
    # n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # n=5, c=2, k=1: the plain success rate 2/5
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    # n - c < k: every k-subset holds a correct sample
    assert pass_at_k(4, 3, 2) == 1.0
    # C(1000, 500) overflows a float; the product form does not: compare with exact rationals
    exact = 1 - Fraction(math.comb(997, 500), math.comb(1000, 500))
    assert pass_at_k(1000, 3, 500) == pytest.approx(float(exact), rel=1e-12)


def test_summary_pass_at_k_is_the_mean_of_per_problem_estimates():
    problems = [outcomes([True, False, False, False]), outcomes([True, True, False, False]),
                outcomes([False] * 4), outcomes([True] * 4)]
    s = summarize(problems, k=2)
    want = [closed_form(4, c, 2) for c in (1, 2, 0, 4)]  # 0.5, 5/6, 0, 1
    assert s["pass"].value == pytest.approx(sum(want) / 4)
    assert s["mean"].value == pytest.approx((1 + 2 + 0 + 4) / 16)
    # normal interval: mean ± 1.96 s/√m, s the sample std of the per-problem estimates (clipped to [0, 1])
    mean = sum(want) / 4
    s_dev = math.sqrt(sum((x - mean) ** 2 for x in want) / 3)
    assert s["pass"].high == pytest.approx(min(1.0, mean + 1.959963984540054 * s_dev / 2))
    assert s["pass"].low == pytest.approx(max(0.0, mean - 1.959963984540054 * s_dev / 2))


def test_ci_width_shrinks_with_k():
    """Problems of equal difficulty p = 0.5: with k samples each, mean@k's spread is sampling noise,
    p(1-p)/k, so its interval narrows as k grows; pass@k approaches 1 for all, so its interval narrows too."""
    rng = random.Random(0)
    widths = {"mean": [], "pass": []}
    for k in (1, 4, 16, 64):
        problems = [outcomes([rng.random() < 0.5 for _ in range(k)]) for _ in range(200)]
        s = summarize(problems, k=k)
        for name in widths:
            widths[name].append(s[name].high - s[name].low)
    assert all(a > b for a, b in zip(widths["mean"], widths["mean"][1:])), widths
    assert all(a >= b for a, b in zip(widths["pass"], widths["pass"][1:])), widths
    assert widths["pass"][-1] < widths["pass"][0]


def test_majority_vote():
    assert majority_correct(["4", "5", "4"], [True, False, True])
    assert not majority_correct(["5", "4", "5"], [False, True, False])
    assert majority_correct(["4", "5"], [True, False])  # tie: the answer seen first wins
    assert majority_correct([None, None, "4"], [False, False, True])  # no answer, no vote
    assert not majority_correct([None, None], [False, False])
    assert majority_correct(["4.0", "4", "5"], [True, True, False])  # normalised answers vote together
    assert mean_ci([0.5]).low == mean_ci([0.5]).high == 0.5


# -- the command on a real tiny run -------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from apo_cli.recipe import recipe_from_dict
    from apo_cli.train import train_from_recipe
    from tests.helpers import tiny_recipe

    root = tmp_path_factory.mktemp("evalrun")
    d = tiny_recipe(root, "r", run={"max_steps": 2},
                    data={"task_kwargs": {"level": 1, "size": 40}, "eval_fraction": 0.1},
                    rewards=[{"name": "exact_match"}])
    train_from_recipe(recipe_from_dict(d))
    return root / "r"


def eval_json(cli, *args):
    res = cli("eval", *args, "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_run_dir_covers_every_checkpoint_and_the_base(cli, run_dir, tmp_path):
    dump = tmp_path / "dump.jsonl"
    recs = eval_json(cli, str(run_dir), "--base", "-k", "2", "--dump", str(dump))
    assert [r["model"] for r in recs] == ["r/base", "r/step-1", "r/step-2"]
    assert [r["step"] for r in recs] == [0, 1, 2]
    for r in recs:
        assert r["problems"] == 4 and r["k"] == 2 and r["data"] == "builtin:arithmetic [eval]"
        assert set(r["metrics"]) == {"mean@2", "pass@2", "maj@2", "reward"}
        for m in r["metrics"].values():
            assert m["ci_low"] <= m["value"] <= m["ci_high"]
    lines = [json.loads(x) for x in dump.read_text().splitlines()]
    assert len(lines) == 3 * 4 * 2
    assert {"model", "problem", "sample", "completion", "answer", "correct", "reward"} <= set(lines[0])
    # the run's checkpoints (not the base) are recorded in the run's eval.jsonl, once per settings
    logged = [json.loads(x) for x in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in logged) == [1, 2]


def test_rerun_comes_from_the_cache(cli, run_dir, monkeypatch):
    args = [str(run_dir / "checkpoints" / "step-*"), "-k", "2", "--seed", "7"]
    first = eval_json(cli, *args)
    assert [r["model"] for r in first] == ["r/step-1", "r/step-2"]

    def no_model(*a, **k):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr("apo_cli.evaluation.Sampler", no_model)
    again = eval_json(cli, *args)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "time"} for r in rs]  # noqa: E731
    assert strip(again) == strip(first)


def test_interrupted_evaluation_resumes_to_the_same_result(run_dir):
    from apo_cli.evaluation import EvalSettings, cache_key, cache_path, evaluate, task_from_recipe
    from apo_cli.generation import resolve_model
    from apo_cli.recipe import load_recipe

    model = resolve_model(str(run_dir))
    task = task_from_recipe(load_recipe(run_dir / "recipe.yaml"), "r")
    settings = EvalSettings(k=2, samples=2, greedy=False, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=6,
                            stop=(), seed=11, batch_size=1, pass_threshold=1.0)
    full = evaluate(model, task, settings)
    path = cache_path(model, cache_key(model, task, settings))
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1][:20])  # killed while writing the second chunk
    seen = []
    resumed = evaluate(model, task, settings, advance=seen.append)
    assert seen[0] == 1  # one problem from the cache, the rest sampled again
    assert resumed.results == full.results


def test_table_highlights_and_prints(cli, run_dir):
    res = cli("eval", str(run_dir), "-k", "2")
    assert res.exit_code == 0, res.output
    for word in ("r/step-1", "r/step-2", "mean@2", "pass@2", "maj@2", "95 %"):
        assert word in res.stdout


def test_data_source_with_a_reward(cli, run_dir, tmp_path):
    f = tmp_path / "qa.jsonl"
    f.write_text("".join(json.dumps({"question": f"{i}+1=", "solution": str(i + 1)}) + "\n" for i in range(3)))
    recs = eval_json(cli, str(run_dir / "checkpoints" / "step-2"), "--data", str(f), "--prompt-column", "question",
                     "--answer-column", "solution", "--reward", "exact_match", "--greedy", "-m", "4")
    assert recs[0]["problems"] == 3 and set(recs[0]["metrics"]) == {"mean@1", "pass@1", "maj@1", "reward"}


@pytest.mark.parametrize("case", ["no_answer_column", "no_eval_split", "unknown_model", "no_match", "greedy_k"])
def test_bad_inputs(cli, run_dir, tmp_path, case):
    f = tmp_path / "prompts_only.jsonl"
    f.write_text('{"prompt": "1+1="}\n')
    recipe = tmp_path / "noeval.yaml"
    recipe.write_text("model: {name_or_path: tiny-random}\n")
    ckpt = str(run_dir / "checkpoints" / "step-1")
    args, code, words = {
        "no_answer_column": ([ckpt, "--data", str(f)], 2, [str(f), "'answer'"]),  # a data error: bad input
        "no_eval_split": ([ckpt, "--recipe", str(recipe)], 2, [str(recipe), "no evaluation split"]),
        "unknown_model": (["./no/such/model", "--data", str(f)], 1, ["no/such/model", "does not exist"]),
        "no_match": ([str(tmp_path / "x*")], 2, ["no path matches"]),
        "greedy_k": ([ckpt, "--greedy", "-k", "4"], 2, ["--greedy"]),
    }[case]
    res = cli("eval", *args)
    assert res.exit_code == code, res.output
    err = res.stderr.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err


# -- output: progress off a terminal, a table whose model names are whole ------------------------------


def test_progress_lines_when_stderr_is_not_a_terminal(cli, run_dir, monkeypatch):
    """Off a terminal the progress bar hides itself; plain lines say what is being evaluated."""
    monkeypatch.setattr("apo_cli.commands.eval.PLAIN_EVERY_S", 0.0)  # a line at every chunk
    res = cli("eval", str(run_dir / "checkpoints" / "step-*"), "-k", "2", "--seed", "23", "--batch-size", "1",
              "--json")
    assert res.exit_code == 0, res.output
    lines = res.stderr.splitlines()
    assert lines[0] == "evaluating r/step-1 (1/2): 4 problems"
    assert any(line.startswith("evaluating r/step-1 (1/2): 2/4 problems, ") and " elapsed, eta " in line
               for line in lines), lines
    assert any(line.startswith("evaluated r/step-1 (1/2): 4 problems in ") for line in lines), lines
    assert any(line.startswith("evaluated r/step-2 (2/2): 4 problems in ") for line in lines), lines
    json.loads(res.stdout)  # stdout holds the results alone
    again = cli("eval", str(run_dir / "checkpoints" / "step-1"), "-k", "2", "--seed", "23", "--batch-size", "1")
    assert again.stderr.splitlines()[0] == "evaluating r/step-1: 4 problems, 4 from the cache"


def _records(names: list[str]) -> list[dict]:
    def metric(v: float) -> dict:
        return {"value": v, "ci_low": max(0.0, v - 0.1), "ci_high": min(1.0, v + 0.1)}

    return [{"model": name, "problems": 40, "metrics": {"mean@4": metric(0.1 * i), "pass@4": metric(0.2 * i),
                                                        "maj@4": metric(0.05 * i), "reward": metric(0.3 * i)}}
            for i, name in enumerate(names, 1)]


@pytest.mark.parametrize("terminal", [False, True])
def test_table_never_cuts_the_model_names(capsys, monkeypatch, terminal):
    """Two checkpoints of a run with a long name differ only at the end of their names: each row must
    still say which it is (it once read `quickstart/step…` twice), on a narrow terminal too."""
    import re
    from types import SimpleNamespace

    from apo_cli.commands.eval import _table

    names = [f"quickstart-with-a-rather-long-run-name/checkpoints/step-{s}" for s in (100, 200)]
    monkeypatch.setenv("COLUMNS", "70")
    if terminal:
        monkeypatch.setenv("FORCE_COLOR", "1")  # rich takes stdout for a terminal
    _table(_records(names), "builtin:arithmetic [eval]", SimpleNamespace(greedy=False, temperature=1.0, k=4, samples=4))
    out = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)
    assert "…" not in out, out
    rows = [line for line in out.splitlines() if line.startswith("│")]
    model_cells = [line.split("│")[1].strip() for line in rows]
    # a row's name is its cell's lines up to the next row (the metric cells of a row start on its first line)
    starts = [i for i, line in enumerate(rows) if line.split("│")[2].strip()[:2] in ("0.", "1.")]
    whole = ["".join(model_cells[a:b]) for a, b in zip(starts, [*starts[1:], len(rows)])]
    assert whole == names, out
    if not terminal:  # a file or a pipe: one line per row
        assert all(name in out for name in names), out


def test_eval_cache_key_tells_chat_prompts_apart_by_their_earlier_messages():
    """Two eval sets whose rows differ only in an earlier message must not share cached results."""
    from apo_cli.data.example import Example
    from apo_cli.data.spec import DataSpec
    from apo_cli.evaluation import EvalTask

    def task(first: str) -> EvalTask:
        msgs = ({"role": "user", "content": first}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "2+2?"})
        return EvalTask("t", DataSpec(source="x.jsonl"), [Example(0, "2+2?", "4", messages=msgs)], [])

    text = EvalTask("t", DataSpec(source="x.jsonl"), [Example(0, "2+2?", "4")], [])
    assert task("be brief").key() != task("be verbose").key()
    assert task("be brief").key() == task("be brief").key()
    assert text.key() != task("be brief").key()


def test_a_symlinked_eval_jsonl_is_not_written_through(cli, run_dir, tmp_path):
    """A run directory from someone else whose eval.jsonl is a (dangling) link: before, `apo eval`
    appended through it, writing outside the run. Now it shows and caches the results and warns."""
    import shutil

    run = tmp_path / "r"
    shutil.copytree(run_dir, run, symlinks=True)
    (run / "eval.jsonl").unlink(missing_ok=True)
    outside = tmp_path / "outside" / "planted.jsonl"
    outside.parent.mkdir()
    (run / "eval.jsonl").symlink_to(outside)
    res = cli("eval", str(run / "checkpoints" / "step-2"), "-k", "1", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)[0]["model"] == "r/step-2"
    assert "symbolic link" in res.stderr and "not added to the run" in res.stderr
    assert not outside.exists()
