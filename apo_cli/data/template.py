"""Turning an Example into the prompt text the policy sees.

The user message is ``data.prompt_template`` filled with ``{prompt}`` and the example's columns.
With a chat template (``data.chat_template: on``, or ``auto`` and the tokenizer has one) the messages
[system?, user] go through ``tokenizer.apply_chat_template(..., add_generation_prompt=True,
**data.chat_template_kwargs)``, and the loop must tokenize the result with
``add_special_tokens=False`` (the template already wrote them). Without one, the text is the user
message, preceded by ``system_prompt`` and a blank line when a system prompt is set.

A chat prompt (an example with ``messages``: the prompt column held a list of messages) is its
conversation with the last user message filled into the template (``{prompt}`` is that message), and
``system_prompt`` first when the conversation has no system message of its own. It needs a chat
template: without one it is refused (DataError), never flattened into text (except without any
tokenizer, where the contents joined by blank lines stand in for length estimates).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from apo_cli.data.example import Example
from apo_cli.errors import DataError

if TYPE_CHECKING:
    from apo_cli.data.spec import DataSpec


def _tokenizer_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def uses_chat_template(spec: DataSpec, tokenizer: Any) -> bool:
    """Whether render_prompt applies the tokenizer's chat template (DataError for 'on' without one)."""
    has_template = bool(getattr(tokenizer, "chat_template", None)) if tokenizer is not None else False
    if spec.chat_template == "on" and not has_template:
        name = _tokenizer_name(tokenizer) if tokenizer is not None else "the model (no tokenizer given)"
        raise DataError(f"tokenizer of {name} has no chat template; set data.chat_template: off")
    return spec.chat_template == "on" or (spec.chat_template == "auto" and has_template)


def user_message(example: Example, spec: DataSpec) -> str:
    """``prompt_template`` filled with ``prompt`` and the example's columns."""
    values = {**example.columns, "prompt": example.prompt}
    try:
        return spec.prompt_template.format(**values)
    except KeyError as e:
        raise DataError(
            f"data.prompt_template uses {{{e.args[0]}}}, which is not a column of row {example.index} "
            f"(available: {', '.join(sorted(values))}; add it to data.extra_columns)"
        ) from None
    except (ValueError, IndexError) as e:
        raise DataError(
            f"data.prompt_template is not a valid template ({e}); write literal braces as {{{{ and }}}}"
        ) from None


def _conversation(example: Example, spec: DataSpec, user: str) -> list[dict[str, Any]]:
    """A chat prompt's messages, its last user message replaced by ``user`` (the filled template) and
    ``system_prompt`` put first when the conversation has no system message."""
    messages = [dict(m) for m in example.messages or ()]
    last = max(k for k, m in enumerate(messages) if m["role"] == "user")
    messages[last]["content"] = user
    if spec.system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": spec.system_prompt})
    return messages


def render_prompt(example: Example, spec: DataSpec, tokenizer: Any) -> str:
    """The full prompt text for ``example`` (chat-templated or plain; see the module docstring)."""
    user = user_message(example, spec)
    if not uses_chat_template(spec, tokenizer):
        if example.messages is not None and tokenizer is None:  # length estimates (preflight): the texts
            return "\n\n".join(m["content"] for m in _conversation(example, spec, user))
        if example.messages is not None:
            why = "data.chat_template is off" if spec.chat_template == "off" else \
                f"the tokenizer of {_tokenizer_name(tokenizer)} has none"
            raise DataError(f"{spec.source}: row {example.index} is a chat prompt (a list of messages), which needs "
                            f"a chat template, and {why}; use a tokenizer with one, or text prompts")
        return f"{spec.system_prompt}\n\n{user}" if spec.system_prompt else user
    if example.messages is not None:
        messages = _conversation(example, spec, user)
    else:
        messages = ([{"role": "system", "content": spec.system_prompt}] if spec.system_prompt else []) + [
            {"role": "user", "content": user}
        ]
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **spec.chat_template_kwargs
        )
    except Exception as e:  # noqa: BLE001 - jinja errors, a template without a system role, ...
        raise DataError(f"chat template of {_tokenizer_name(tokenizer)} failed on row {example.index}: {e}") from None
    if not isinstance(text, str):
        raise DataError(f"chat template of {_tokenizer_name(tokenizer)} returned {type(text).__name__}, not text")
    return text
