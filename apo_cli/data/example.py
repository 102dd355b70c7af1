"""The unit of training data handed to the loop: one problem, its reference answer, its columns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Example:
    """One problem after column mapping.

    ``index`` is the row's position in the source after filtering (stable under shuffling), used in
    messages; ``columns`` holds ``data.extra_columns`` and the answer under its own column name, and
    is passed to rewards as keyword arguments (for builtin reasoning-gym tasks it also holds
    ``metadata``, which the reasoning_gym reward needs).

    A chat prompt (a list of messages in the prompt column, the conversational format of TRL) keeps
    its conversation in ``messages``; ``prompt`` is then the content of its last user message, which
    ``data.prompt_template`` fills in (see :mod:`apo_cli.data.template`).
    """

    index: int
    prompt: str
    answer: str | None
    columns: dict[str, Any] = field(default_factory=dict)
    # a chat prompt (the prompt column held a list of {"role", "content"} messages): the conversation,
    # whose last user message is ``prompt``; None for a text prompt
    messages: tuple[dict[str, str], ...] | None = None
