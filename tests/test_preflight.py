"""Preflight findings: data, batches, rewards on gold and wrong answers, prompt lengths. No model loads."""

from __future__ import annotations

import json

import pytest

from apo_cli.errors import DataError
from apo_cli.preflight import Finding, print_findings, run_preflight
from apo_cli.recipe import recipe_from_dict


def _recipe(tmp_path, rows=None, **sections):
    data = {"model": {"name_or_path": "tiny-random"}, "rollout": {"group_size": 2, "prompts_per_step": 4},
            "optim": {"micro_batch_size": 2}}
    if rows is not None:
        path = tmp_path / "rows.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        data["data"] = {"source": str(path), "prompt_column": "q", "answer_column": "a"}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return recipe_from_dict(data)


def _levels(findings, level):
    return [f.message for f in findings if f.level == level]


ROWS = [{"q": f"What is {i} + {i}?", "a": str(2 * i)} for i in range(10)]


class WordTokenizer:
    """A tokenizer whose tokens are words; no chat template."""

    chat_template = None
    model_max_length = 64

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": list(range(len(text.split())))}


def test_clean_recipe_has_no_problems(tmp_path, capsys):
    findings = run_preflight(_recipe(tmp_path, ROWS, rewards=[{"name": "math_verify"}]))
    assert not _levels(findings, "error") and not _levels(findings, "warning"), findings
    info = " | ".join(_levels(findings, "info"))
    assert "data: 10 training rows" in info and "estimated at 4 characters per token" in info
    assert "4 prompts × 2 completions = 8 sequences per step" in info
    print_findings(findings)
    assert "no problems found" in capsys.readouterr().err


def test_missing_column_is_an_error_and_print_raises(tmp_path):
    findings = run_preflight(_recipe(tmp_path, [{"q": "x"}]))
    assert len(_levels(findings, "error")) == 1
    assert "row 0 has no column 'a'" in _levels(findings, "error")[0]
    with pytest.raises(DataError, match=r"^preflight found 1 error: data: .*row 0 has no column 'a'"):
        print_findings(findings)


def test_unparseable_gold_and_constant_reward_are_reported(tmp_path):
    rows = ROWS[:6] + [{"q": "Which?", "a": "\\boxed{}"}]
    findings = run_preflight(_recipe(tmp_path, rows, data={"shuffle": False},
                                     rewards=[{"name": "math_verify"}, {"name": "format"}]))
    warnings = " | ".join(_levels(findings, "warning"))
    assert "reward math_verify: the reference answer of 1/7 sampled rows is missing or does not parse (e.g. row 6" in warnings
    assert "not judged correct for 1/7 sampled rows (rows 6)" in warnings
    # format gives 1.0 to both synthetic completions: said, but as info for a shaping reward
    assert any("reward format gives the reference and the wrong completions the same value 1" in m
               for m in _levels(findings, "info"))


def test_reward_that_cannot_load_is_an_error(tmp_path):
    findings = run_preflight(_recipe(tmp_path, ROWS, rewards=[{"name": "no_such_module_abc:fn"}]))
    assert any("no module named 'no_such_module_abc'" in m for m in _levels(findings, "error"))


def test_reward_failing_everywhere_is_an_error(tmp_path):
    # reasoning_gym needs the metadata of a reasoning-gym task: on a plain file it fails on every sample
    findings = run_preflight(_recipe(tmp_path, ROWS, rewards=[{"name": "reasoning_gym"}]))
    assert any("reward reasoning_gym failed on all" in m for m in _levels(findings, "error"))


def test_truncation_and_context_with_estimates(tmp_path):
    rows = [{"q": "word " * 200, "a": "1"}] * 3 + ROWS[:3]
    findings = run_preflight(_recipe(tmp_path, rows, rollout={"max_prompt_tokens": 100, "max_new_tokens": 64},
                                     model={"max_context": 128}))
    warnings = " | ".join(_levels(findings, "warning"))
    assert "3/6 (50%) are longer than rollout.max_prompt_tokens=100 (estimated)" in warnings
    assert "longest prompt 100 (estimated) + rollout.max_new_tokens 64 exceeds model.max_context=128" in warnings


def test_exact_lengths_with_a_tokenizer(tmp_path):
    rows = [{"q": "word " * 80, "a": "1"}] * 4 + ROWS[:2]
    recipe = _recipe(tmp_path, rows, rollout={"max_prompt_tokens": 50, "max_new_tokens": 32},
                     data={"chat_template": "auto"})
    findings = run_preflight(recipe, tokenizer=WordTokenizer())
    errors = " | ".join(_levels(findings, "error"))
    # 4 of 6 prompts have 80 words > 50: most prompts would lose their beginning -> error
    assert "4/6 (67%) are longer than rollout.max_prompt_tokens=50 and will lose their beginning" in errors
    # 50 + 32 > the tokenizer's model_max_length of 64
    assert "longest prompt 50 + rollout.max_new_tokens 32 exceeds the tokenizer's model_max_length=64" in errors
    assert any("tokens: min 5, median 80, p95 80, max 80" in m for m in _levels(findings, "info"))


def test_chat_template_on_without_one_is_an_error(tmp_path):
    findings = run_preflight(_recipe(tmp_path, ROWS, data={"chat_template": "on"}), tokenizer=WordTokenizer())
    assert any("has no chat template; set data.chat_template: off" in m for m in _levels(findings, "error"))


def test_few_rows_for_a_step_is_a_warning(tmp_path):
    findings = run_preflight(_recipe(tmp_path, ROWS[:3]))
    assert any("only 3 training rows for 4 prompts per step" in m for m in _levels(findings, "warning"))


def test_eval_problems_are_reported(tmp_path):
    findings = run_preflight(_recipe(tmp_path, ROWS, data={"eval_split": "test"}))
    assert any("data (evaluation):" in m and "needs a hub dataset" in m for m in _levels(findings, "error"))


def test_print_findings_with_only_warnings_does_not_raise(capsys):
    print_findings([Finding("warning", "something odd [not markup]"), Finding("info", "figures")])
    err = capsys.readouterr().err
    assert "warning: something odd [not markup]" in err and "info: figures" in err


def test_validate_preflight_from_the_cli(tmp_path, cli):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: {name_or_path: tiny-random}\n"
        f"data: {{source: {path}, prompt_column: q, answer_column: a}}\n"
        "rollout: {group_size: 2, prompts_per_step: 4}\n"
        "optim: {micro_batch_size: 2}\n"
    )
    assert cli("validate", "--quiet", "--preflight", str(recipe)).exit_code == 0
    bad = cli("validate", "--quiet", "--preflight", str(recipe), "data.answer_column=missing")
    assert bad.exit_code != 0
