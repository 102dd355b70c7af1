"""The one prompt path (apo_cli/sampling.py) shared by `apo train`, `apo eval` and `apo generate`:
the same encoding and the same cut to the context, counted wherever it happens."""

from __future__ import annotations

import json

import pytest

from apo_cli.recipe import recipe_from_dict
from apo_cli.sampling import encode_prompts, prompt_limit
from tests.helpers import tiny_recipe

TINY_CONTEXT = 512  # the tiny random model's max_position_embeddings


@pytest.fixture(scope="module")
def tok():
    from apo_cli.models import ensure_tiny, load_tokenizer

    return load_tokenizer(str(ensure_tiny(0)))


def test_plain_prompts_get_the_tokenizers_special_tokens_and_chat_prompts_do_not(tok):
    plain, chat = encode_prompts(tok, ["1+2="], chat=False, limit=100), encode_prompts(tok, ["1+2="], chat=True, limit=100)
    assert plain.ids == [tok("1+2=", add_special_tokens=True).input_ids]
    assert chat.ids == [tok("1+2=", add_special_tokens=False).input_ids]
    assert plain.truncated == chat.truncated == 0


def test_long_prompts_keep_their_last_tokens_and_are_counted(tok):
    texts = ["a" * 30 + "END", "short"]
    enc = encode_prompts(tok, texts, chat=True, limit=10)
    assert enc.truncated == 1 and enc.limit == 10
    assert len(enc.ids[0]) == 10 and tok.decode(enc.ids[0]).endswith("END")
    assert enc.ids[1] == tok("short", add_special_tokens=False).input_ids


def test_the_limit_is_what_the_context_leaves_unless_the_recipe_sets_one():
    assert prompt_limit(512, 8) == 504
    assert prompt_limit(512, 8, 100) == 100
    assert prompt_limit(16, 64) == 1


def test_generate_cuts_like_training_and_says_how_many(cli):
    long = "7" * (TINY_CONTEXT + 40)
    res = cli("generate", "tiny-random", "-p", long, "-p", "1+2=", "--max-new-tokens", "8", "--seed", "0")
    assert res.exit_code == 0, res.output
    assert "1 of 2 prompts are longer than 504 tokens" in res.stderr
    assert len([json.loads(x) for x in res.stdout.splitlines() if x.strip()]) == 2


def test_eval_says_how_many_prompts_it_cut(cli, tmp_path):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": "9" * (TINY_CONTEXT + 10), "answer": "1"}) + "\n"
                    + json.dumps({"prompt": "1+2=", "answer": "3"}) + "\n")
    res = cli("eval", "tiny-random", "--data", str(data), "-k", "1", "--max-new-tokens", "4", "--no-cache", "--json")
    assert res.exit_code == 0, res.output
    assert "1 of 2 prompts are longer than 508 tokens" in res.stderr


def test_training_counts_the_prompts_it_cut(tmp_path):
    from apo_cli.train import train_from_recipe

    d = tiny_recipe(tmp_path, "cut", run={"max_steps": 2}, rollout={"max_prompt_tokens": 3},
                    checkpoint={"every": 2, "keep_last": 1})
    train_from_recipe(recipe_from_dict(d))
    rows = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["prompts/truncated"] for r in rows] == [4, 8]  # every arithmetic prompt is longer than 3 tokens
