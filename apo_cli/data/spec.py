"""The ``data`` section of a recipe (:class:`DataSpec`): where the prompts come from and how they are rendered.

Read by :mod:`apo_cli.data` (sources, templates); defined here, beside it, on the shared
:class:`apo_cli.spec.Section`.
"""

from __future__ import annotations

import re
import string
from typing import Any, Literal

from pydantic import Field, field_validator

from apo_cli.spec import Section, on_off

__all__ = ["MAX_TEMPLATE_CHARS", "MAX_TEMPLATE_WIDTH", "DataSpec", "template_problem"]

MAX_TEMPLATE_CHARS = 100_000
MAX_TEMPLATE_WIDTH = 10_000  # a width or precision in a placeholder ({prompt:>20}); 300M would fill the memory


def template_problem(template: str) -> str | None:
    """Why ``template`` is not a prompt template: ``{name}`` (or ``{name:spec}``) placeholders of plain
    column names only; no attribute or item access (``{prompt.__class__}``), conversion (``!r``),
    positional ``{}`` or nested field; widths at most :data:`MAX_TEMPLATE_WIDTH`."""
    if len(template) > MAX_TEMPLATE_CHARS:
        return f"prompt_template is {len(template):,} characters long; at most {MAX_TEMPLATE_CHARS:,}"
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        return f"prompt_template is not a valid template ({e}); write literal braces as {{{{ and }}}}"
    names = [name for _, name, _, _ in parts if name is not None]
    if not names:
        return "prompt_template must contain a placeholder such as {prompt}"
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        if not name.strip() or name.isdigit():
            return (f"prompt_template has a positional placeholder {shown}, not a column name; write literal "
                    "braces as {{ and }} (e.g. \\boxed{{}})")
        if any(c in name for c in ".[]"):
            return (f"prompt_template placeholder {shown} is not a plain column name "
                    "(write {prompt} or {column}: no attribute or index access)")
        if conversion:
            return f"prompt_template placeholder {shown}: conversions (!r, !s, !a) are not allowed; write {{{name}}}"
        if spec and ("{" in spec or any(int(n) > MAX_TEMPLATE_WIDTH for n in re.findall(r"\d+", spec))):
            return (f"prompt_template placeholder {shown}: a format spec may not nest placeholders or exceed "
                    f"a width of {MAX_TEMPLATE_WIDTH:,}")
    return None


class DataSpec(Section):
    source: str = Field(
        "builtin:arithmetic",
        description="builtin:<task> (arithmetic, gsm), a hub dataset id, or a local .jsonl/.json/.parquet/.csv file.",
    )
    config: str | None = Field(None, description="Hub dataset configuration name.")
    split: str = Field("train", description="Split used for training.")
    task_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Parameters of a built-in task (e.g. size, level, min_value, max_value)."
    )
    prompt_column: str = Field(
        "prompt", description="Column holding the problem: text, or a chat prompt (a list of {role, content} "
                              "messages, rendered with the chat template)."
    )
    answer_column: str | None = Field("answer", description="Column holding the reference answer (null: none).")
    extra_columns: list[str] = Field(
        default_factory=list, description="Further columns passed to reward functions as keyword arguments."
    )
    filters: dict[str, Any] = Field(
        default_factory=dict, description="Keep rows whose column equals the value (or is in the list), e.g. level: Level 3."
    )
    limit: int | None = Field(None, ge=1, description="Use at most this many training rows (after filtering).")
    shuffle: bool = Field(True, description="Shuffle rows with the run seed.")
    system_prompt: str | None = Field(None, description="System message (chat template) or preamble (plain template).")
    prompt_template: str = Field(
        "{prompt}", description="Template of the user message (of a chat prompt: of its last one); {prompt} and any "
                                "column name in braces are filled (plain names only: no attributes, indexes or !r)."
    )
    chat_template: Literal["auto", "on", "off"] = Field(
        "auto", description="Use the tokenizer's chat template: auto = when the tokenizer has one."
    )
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra arguments to the chat template (e.g. enable_thinking: false)."
    )
    eval_split: str | None = Field(None, description="Split used for evaluation (hub datasets).")
    eval_fraction: float = Field(
        0.0, ge=0, lt=1, description="Fraction of training rows held out for evaluation when eval_split is null."
    )
    eval_limit: int | None = Field(None, ge=1, description="Use at most this many evaluation rows.")

    @field_validator("chat_template", mode="before")
    @classmethod
    def _yaml_on_off(cls, v: Any) -> Any:
        return on_off(v)

    @field_validator("prompt_template")
    @classmethod
    def _template_has_prompt(cls, v: str) -> str:
        problem = template_problem(v)
        if problem:
            raise ValueError(problem)
        return v
