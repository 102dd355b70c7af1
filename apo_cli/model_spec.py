"""The ``model`` section of a recipe (:class:`ModelSpec`, with :class:`LoraSpec`): which model is trained.

Read by :mod:`apo_cli.models` (loading; kept apart so that parsing a recipe imports neither torch nor
transformers) and the training loop.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from apo_cli.spec import Section

__all__ = ["LoraSpec", "ModelSpec"]


class LoraSpec(Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (lora_alpha).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear'."
    )


class ModelSpec(Section):
    name_or_path: str = Field(
        ...,
        description="Hugging Face hub id, local directory, or a built-in alias "
        "(smollm2-135m-instruct, tiny-random).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    tokenizer: str | None = Field(None, description="Tokenizer id or path when it differs from the model's.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype of the trained (master) weights. auto: float32; compute runs in the backend's dtype under autocast."
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the hub. Off unless you trust it.")
    lora: LoraSpec | None = Field(None, description="Train a LoRA adapter instead of all weights.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    max_context: int | None = Field(
        None, ge=16, description="Context length to assume (default: the model config's max_position_embeddings)."
    )
