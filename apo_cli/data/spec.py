"""The ``data`` section of a recipe (:class:`DataSpec`): where the prompts come from and how they are rendered.

Read by :mod:`apo_cli.data` (sources, templates); defined here, beside it, on the shared
:class:`apo_cli.spec.Section`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from apo_cli.spec import Section, on_off

__all__ = ["DataSpec"]


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
    prompt_column: str = Field("prompt", description="Column holding the problem text.")
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
        "{prompt}", description="Template of the user message; {prompt} and any column name in braces are filled."
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
        if "{" not in v:
            raise ValueError("prompt_template must contain a placeholder such as {prompt}")
        return v
