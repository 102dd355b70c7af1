"""render_prompt: plain and chat templates, system prompts, template placeholders."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from apo_cli.data import Example, render_prompt, uses_chat_template
from apo_cli.errors import DataError
from apo_cli.recipe import DataSpec

EX = Example(index=4, prompt="What is 2 + 2?", answer="4", columns={"answer": "4", "topic": "sums"})


class ChatTokenizer:
    """Just enough of a tokenizer: a chat template that records what it was asked."""

    name_or_path = "fake/chat-model"
    chat_template = "{% for m in messages %}...{% endfor %}"

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def apply_chat_template(self, messages, **kwargs):
        self.calls.append({"messages": messages, **kwargs})
        body = "".join(f"<|{m['role']}|>{m['content']}" for m in messages)
        return body + ("<|assistant|>" if kwargs.get("add_generation_prompt") else "")


class PlainTokenizer:
    name_or_path = "fake/base-model"
    chat_template = None


def test_plain_template_with_columns_and_system_prompt():
    spec = DataSpec(prompt_template="[{topic}] {prompt}", system_prompt="Answer in \\boxed{}.", chat_template="off")
    assert render_prompt(EX, spec, ChatTokenizer()) == "Answer in \\boxed{}.\n\n[sums] What is 2 + 2?"
    assert render_prompt(EX, DataSpec(chat_template="off"), None) == "What is 2 + 2?"


def test_chat_template_gets_messages_and_kwargs():
    tok = ChatTokenizer()
    spec = DataSpec(system_prompt="Be careful.", chat_template="on", chat_template_kwargs={"enable_thinking": False})
    text = render_prompt(EX, spec, tok)
    assert text == "<|system|>Be careful.<|user|>What is 2 + 2?<|assistant|>"
    call = tok.calls[-1]
    assert call["tokenize"] is False and call["add_generation_prompt"] is True and call["enable_thinking"] is False
    assert uses_chat_template(spec, tok)


def test_auto_uses_the_template_only_when_there_is_one():
    assert render_prompt(EX, DataSpec(), ChatTokenizer()).endswith("<|assistant|>")
    assert render_prompt(EX, DataSpec(system_prompt="S"), PlainTokenizer()) == "S\n\nWhat is 2 + 2?"
    assert not uses_chat_template(DataSpec(), PlainTokenizer())


def test_on_without_a_chat_template_is_an_error():
    with pytest.raises(DataError, match=r"^tokenizer of fake/base-model has no chat template; set data.chat_template: off$"):
        render_prompt(EX, DataSpec(chat_template="on"), PlainTokenizer())


def test_template_placeholder_errors():
    with pytest.raises(DataError, match=r"uses \{level\}, which is not a column of row 4 .*add it to data.extra_columns"):
        render_prompt(EX, DataSpec(prompt_template="{level}: {prompt}", chat_template="off"), None)
    # a template that is not one is refused with the recipe, before any row is read
    with pytest.raises(ValidationError, match=r"positional placeholder \{\}.*literal braces as \{\{ and \}\}"):
        DataSpec(prompt_template="{prompt} \\boxed{}")
    with pytest.raises(ValidationError, match=r"not a valid template .*literal braces as \{\{ and \}\}"):
        DataSpec(prompt_template="{prompt} }")


def test_braces_in_the_problem_are_kept():
    ex = Example(index=0, prompt="Simplify {x | x > 0}", answer=None)
    assert render_prompt(ex, DataSpec(chat_template="off"), None) == "Simplify {x | x > 0}"


# ---- chat prompts (a list of messages in the prompt column), with the tiny model's real tokenizer ----

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CONVERSATION = ({"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is 2 + 2?"})


@pytest.fixture(scope="module")
def tiny_tok():
    from apo_cli.models import ensure_tiny, load_tokenizer

    tok = load_tokenizer(str(ensure_tiny(0)))
    assert not tok.chat_template  # the tiny model has none: each test gives it one, or checks the refusal
    return tok


def test_a_chat_prompt_is_rendered_by_the_chat_template(tiny_tok, monkeypatch):
    monkeypatch.setattr(tiny_tok, "chat_template", TEMPLATE)
    ex = Example(index=0, prompt="What is 2 + 2?", answer="4", messages=CONVERSATION)
    want = tiny_tok.apply_chat_template(list(CONVERSATION), tokenize=False, add_generation_prompt=True)
    assert render_prompt(ex, DataSpec(), tiny_tok) == want
    assert want.endswith("<|user|>What is 2 + 2?\n<|assistant|>") and "[{" not in want
    # the template fills the last user message; the conversation's own system message is kept
    text = render_prompt(ex, DataSpec(prompt_template="Q: {prompt}", system_prompt="ignored"), tiny_tok)
    assert text.startswith("<|system|>Answer with a number.\n") and "ignored" not in text
    assert text.endswith("<|user|>Q: What is 2 + 2?\n<|assistant|>") and "<|user|>Hi\n" in text
    # without a system message of its own, data.system_prompt comes first
    short = Example(index=1, prompt="1 + 1?", answer="2", messages=({"role": "user", "content": "1 + 1?"},))
    assert render_prompt(short, DataSpec(system_prompt="Be brief."), tiny_tok) == \
        "<|system|>Be brief.\n<|user|>1 + 1?\n<|assistant|>"


def test_a_chat_prompt_without_a_chat_template_is_refused_not_flattened(tiny_tok):
    ex = Example(index=3, prompt="What is 2 + 2?", answer="4", messages=CONVERSATION)
    with pytest.raises(DataError, match=r"^chat.jsonl: row 3 is a chat prompt .*needs a chat template, and the "
                                        r"tokenizer of .* has none"):
        render_prompt(ex, DataSpec(source="chat.jsonl"), tiny_tok)
    with pytest.raises(DataError, match=r"needs a chat template, and data.chat_template is off"):
        render_prompt(ex, DataSpec(source="chat.jsonl", chat_template="off"), tiny_tok)
    # no tokenizer at all (preflight's length estimates): the contents stand in
    assert render_prompt(ex, DataSpec(chat_template="off"), None) == "Answer with a number.\n\nHi\n\nHello.\n\nWhat is 2 + 2?"


def test_training_on_chat_prompts_feeds_the_templated_conversation(tmp_path):
    """End to end: a JSONL of message lists, the tiny model given a chat template, one step of apo train."""
    import json
    import shutil

    from apo_cli.models import ensure_tiny
    from apo_cli.recipe import load_recipe
    from apo_cli.train import train_from_recipe
    from tests.helpers import tiny_recipe, write_recipe

    model = tmp_path / "tiny-chat"
    shutil.copytree(ensure_tiny(0), model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": TEMPLATE}))
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": f"What is {i} + 1?"}],
                                        "answer": str(i + 1)}) + "\n" for i in range(8)))
    d = tiny_recipe(tmp_path, "run", run={"max_steps": 1}, data={"source": str(data)})
    d["data"].pop("task_kwargs", None)
    d["model"]["name_or_path"] = str(model)
    train_from_recipe(load_recipe(write_recipe(tmp_path, d)))
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert samples
    for s in samples:
        assert s["prompt"].startswith("<|system|>Be brief.\n<|user|>What is ") and s["prompt"].endswith("<|assistant|>")
        assert "'role'" not in s["prompt"]
