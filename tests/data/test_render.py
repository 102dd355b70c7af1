"""render_prompt: plain and chat templates, system prompts, template placeholders."""

from __future__ import annotations

import pytest

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
    with pytest.raises(DataError, match=r"not a valid template .*literal braces as \{\{ and \}\}"):
        render_prompt(EX, DataSpec(prompt_template="{prompt} \\boxed{}", chat_template="off"), None)


def test_braces_in_the_problem_are_kept():
    ex = Example(index=0, prompt="Simplify {x | x > 0}", answer=None)
    assert render_prompt(ex, DataSpec(chat_template="off"), None) == "Simplify {x | x > 0}"
