"""Training data: sources (built-in tasks, local files, hub datasets), column mapping, prompts.

Public API (the training loop's contract):

- :class:`Example` — one problem: ``index``, ``prompt``, ``answer``, ``columns`` (passed to rewards);
- :func:`load_examples` — a recipe's training or held-out evaluation examples;
- :func:`render_prompt` — the prompt text for an example (chat template or plain);
- :func:`uses_chat_template` — whether render_prompt applied a chat template (then tokenize with
  ``add_special_tokens=False``).

Importing this package is cheap; datasets, pyarrow and reasoning-gym load only when a source needs them.
"""

from __future__ import annotations

from apo_cli.data.example import Example
from apo_cli.data.load import load_examples
from apo_cli.data.template import render_prompt, uses_chat_template

__all__ = ["Example", "load_examples", "render_prompt", "uses_chat_template"]
