"""The paper's recipes (APO_METHOD §7): their data section works on a local MATH-lighteval stand-in.

The recipes name the hub dataset; tests point ``data.source`` at tests/fixtures/math_level3_standin.jsonl,
which has the same columns (problem, level, type, solution) and 16 level-3 rows among 22.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from apo_cli.data import load_examples, render_prompt
from apo_cli.errors import DataError
from apo_cli.recipe import Recipe, load_recipe, recipe_from_dict
from apo_cli.rewards import RewardSet
from apo_cli.rewards.extract import extract_gold

ROOT = Path(__file__).resolve().parents[2]
STANDIN = ROOT / "tests" / "fixtures" / "math_level3_standin.jsonl"
RECIPES = {name: ROOT / "recipes" / f"qwen3-1.7b-math-level3-{name}.yaml" for name in ("apo", "grpo", "gspo")}


def _local(name: str) -> Recipe:
    """The recipe with its data read from the stand-in file, 25% of it held out for evaluation."""
    data = yaml.safe_load(RECIPES[name].read_text(encoding="utf-8"))
    data["data"].update(source=str(STANDIN), eval_split=None, eval_fraction=0.25)
    return recipe_from_dict(data, str(RECIPES[name]))


@pytest.mark.parametrize("name", list(RECIPES))
def test_data_loads_filters_and_splits(name):
    recipe = _local(name)
    train = load_examples(recipe.data, recipe.run.seed, "train")
    held = load_examples(recipe.data, recipe.run.seed, "eval")
    assert len(train) + len(held) == 16 and len(held) == 4  # the level-3 rows, 25% held out
    assert {e.prompt for e in train}.isdisjoint({e.prompt for e in held})
    assert all(e.answer and "\\boxed" in e.answer for e in train)  # the worked solution is the reference


def test_reference_reward_accepts_every_gold_answer():
    recipe = _local("apo")
    examples = load_examples(recipe.data, 0, "train") + load_examples(recipe.data, 0, "eval")
    completions = [f"Step by step... so the answer is $\\boxed{{{extract_gold(e.answer)}}}$." for e in examples]
    out = RewardSet(list(recipe.rewards))([e.prompt for e in examples], completions,
                                          [[0] * 100 for _ in examples], examples)
    assert out.total == [1.0] * len(examples) and all(out.correct)


def test_the_recipe_keeps_the_hub_eval_split_for_files_it_is_an_error():
    recipe = load_recipe(RECIPES["apo"], overrides=[f"data.source={STANDIN}"])
    assert len(load_examples(recipe.data, 0, "train")) == 16  # eval_split set: no rows held out of training
    with pytest.raises(DataError, match="needs a hub dataset"):
        load_examples(recipe.data, 0, "eval")


def test_prompt_asks_for_a_boxed_answer_without_thinking():
    recipe = _local("apo")
    ex = load_examples(recipe.data, 0, "train")[0]

    class Tok:
        name_or_path = "Qwen/Qwen3-1.7B"
        chat_template = "qwen3"
        seen: dict = {}

        def apply_chat_template(self, messages, **kw):
            Tok.seen = kw
            return "|".join(m["content"] for m in messages)

    text = render_prompt(ex, recipe.data, Tok())
    assert text.startswith("Please reason step by step, and put your final answer within \\boxed{}.|")
    assert Tok.seen["enable_thinking"] is False


def test_twins_differ_only_in_the_algorithm_block_and_grpo_group_size_and_prompts():
    dumps = {n: load_recipe(p).model_dump(mode="json") for n, p in RECIPES.items()}
    for name in ("grpo", "gspo"):
        a, b = dict(dumps["apo"]), dict(dumps[name])
        for d in (a, b):
            d.pop("algorithm")
            d["run"] = {k: v for k, v in d["run"].items() if k != "name"}
            if name == "grpo":  # G = 8, 128 prompts as the author's GRPO baseline; micro-batches hold whole groups
                d["rollout"] = {k: v for k, v in d["rollout"].items() if k not in ("group_size", "prompts_per_step")}
                d["optim"] = {k: v for k, v in d["optim"].items() if k != "micro_batch_size"}
        assert a == b, name
    assert dumps["grpo"]["rollout"]["group_size"] == 8 and dumps["apo"]["rollout"]["group_size"] == 6
    assert dumps["grpo"]["rollout"]["prompts_per_step"] == 128 and dumps["apo"]["rollout"]["prompts_per_step"] == 48
    assert dumps["apo"]["algorithm"]["alpha"]["kind"] == "reward_confidence"
    assert dumps["apo"]["algorithm"]["adaptive_tau"]["enabled"] is True
