"""Sampling from a trained (or any) model outside training: what `apo generate` and `apo eval` share.

- :func:`resolve_model` turns the MODEL argument into something loadable: a checkpoint folder
  (``runs/x/checkpoints/step-40``), a run directory (its newest checkpoint that verifies), a built-in
  alias (``tiny-random``, ``smollm2-135m-instruct``) or a hub id. Every way that can fail is a
  one-line error naming the argument.
- :class:`Sampler` loads a resolved model on a backend (the same backends, and so the same sampling
  code, as training) and turns prompt texts into completions. Prompts are rendered like training
  prompts (:func:`apo_cli.data.render_prompt`: chat template or plain, optional system message).
- :func:`read_prompts` reads prompts from a text file (one per line), a JSONL file (``prompt`` field)
  or stdin.

Determinism: batch ``b`` of a call is sampled with seed ``batch_seed(seed, b)``, so the same seed,
prompts and batch size give the same completions.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from apo_cli.errors import BackendError, CheckpointError, ModelError, UsageError

RUN_MARKERS = ("metrics.jsonl", "recipe.yaml", "checkpoints")
WEIGHT_GLOBS = ("model*.safetensors", "adapter_model.safetensors", "pytorch_model*.bin", "adapter_model.bin")


# --------------------------------------------------------------------------------------------------
# The MODEL argument


@dataclass(frozen=True)
class ResolvedModel:
    """A loadable model and where it came from."""

    path: str  # what load_model / load_tokenizer take (local folder or hub id)
    label: str  # short name for tables and records
    kind: str  # "checkpoint", "base", "alias" or "hub"
    run_dir: Path | None = None  # the run a checkpoint belongs to
    step: int | None = None  # the checkpoint's step

    def identity(self) -> dict[str, Any]:
        """What makes this model's outputs what they are (for cache keys): path and weight checksums."""
        ident: dict[str, Any] = {"path": self.path}
        sums = Path(self.path) / "checksums.json"
        if sums.is_file():
            ident["checksums"] = sums.read_text(encoding="utf-8")
        return ident


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).exists() for m in RUN_MARKERS)


def has_weights(path: Path) -> bool:
    return any(next(path.glob(g), None) is not None for g in WEIGHT_GLOBS)


def checkpoint_model(path: Path) -> ResolvedModel:
    """A checkpoint folder as a ResolvedModel; CheckpointError when its weights are missing or corrupted."""
    from apo_cli.checkpoint import SUMS_FILE, verify_checkpoint

    path = path.resolve()
    if not has_weights(path):
        raise CheckpointError(f"checkpoint {path} holds no model weights (*.safetensors)")
    if (path / SUMS_FILE).is_file():
        verify_checkpoint(path)
    run_dir, step = None, None
    if path.parent.name == "checkpoints" and path.name.startswith("step-"):
        run_dir = path.parent.parent
        try:
            step = int(path.name.removeprefix("step-"))
        except ValueError:
            step = None
    label = f"{run_dir.name}/{path.name}" if run_dir is not None else path.name
    return ResolvedModel(str(path), label, "checkpoint", run_dir, step)


def resolve_model(arg: str) -> ResolvedModel:
    """The MODEL argument of `apo generate` / `apo eval` (see the module docstring)."""
    from apo_cli.checkpoint import latest_good_checkpoint, list_checkpoints
    from apo_cli.models import ALIASES, resolve_model_path

    if arg in ALIASES:
        return ResolvedModel(resolve_model_path(arg), arg, "alias")
    p = Path(arg).expanduser()
    if p.is_dir():
        if (p / "config.json").is_file() or (p / "adapter_config.json").is_file() or has_weights(p):
            return checkpoint_model(p)
        if is_run_dir(p):
            notes: list[str] = []
            ckpt = latest_good_checkpoint(p, warn=notes.append)
            for n in notes:
                warn(n)
            if ckpt is None:
                what = "no intact checkpoint" if list_checkpoints(p) else "no checkpoint"
                raise CheckpointError(f"run directory {p} has {what} to load")
            return checkpoint_model(ckpt)
        raise ModelError(f"{p} is not a model folder, a checkpoint or a run directory (no config.json)")
    if p.exists():
        raise ModelError(f"{p} is a file, not a model folder, a checkpoint or a run directory")
    if arg.startswith((".", "/", "~")) or arg.count("/") > 1 or "\\" in arg:
        raise ModelError(f"model path {arg} does not exist")
    return ResolvedModel(arg, arg, "hub")


def run_base_model(run_dir: Path) -> ResolvedModel:
    """The model a run started from (for `apo eval --base`)."""

    from apo_cli.checkpoint import list_checkpoints, read_trainer_state
    from apo_cli.models import resolve_model_path
    from apo_cli.recipe_yaml import load_file

    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            base = read_trainer_state(ckpt).get("base_model")
        except CheckpointError:
            continue
        if base:
            return ResolvedModel(str(base), f"{run_dir.name}/base", "base", run_dir, 0)
    try:
        data = load_file(run_dir / "recipe.yaml") or {}  # under a recipe's caps: the run may be someone else's
        name = data["model"]["name_or_path"]
        seed = int((data.get("run") or {}).get("seed", 0))
    except (OSError, KeyError, TypeError, ValueError):
        raise UsageError(f"--base: cannot tell the base model of {run_dir} (no readable recipe.yaml)") from None
    return ResolvedModel(resolve_model_path(name, seed), f"{run_dir.name}/base", "base", run_dir, 0)


# --------------------------------------------------------------------------------------------------
# Prompts


def read_prompts(source: str | Path, stream: IO[str] | None = None) -> list[str]:
    """Prompts from a .jsonl file (``prompt`` field), a text file (one per line), or ``-``/stream (stdin)."""
    if str(source) == "-" or stream is not None:
        stream = stream or sys.stdin
        label = "stdin"
        lines = stream.read().splitlines()
    else:
        path = Path(source)
        label = str(path)
        if not path.exists():
            raise UsageError(f"prompts file {path} does not exist")
        if path.is_dir():
            raise UsageError(f"prompts file {path} is a directory")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise UsageError(f"prompts file {path} is not UTF-8 text") from None
    if label.endswith(".jsonl"):
        prompts = _jsonl_prompts(lines, label)
    else:
        prompts = [ln for ln in lines if ln.strip()]
    if not prompts:
        raise UsageError(f"{'prompts file ' + label if label != 'stdin' else 'stdin'} holds no prompts")
    return prompts


def _jsonl_prompts(lines: list[str], label: str) -> list[str]:
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(f"{label}:{n}: not a JSON object") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
            raise UsageError(f"{label}:{n}: no 'prompt' text field")
        out.append(rec["prompt"])
    return out


# --------------------------------------------------------------------------------------------------
# Sampling


def unescape(text: str) -> str:
    """``\\n``, ``\\t`` and ``\\\\`` typed on a command line as the characters they name (for --stop)."""
    import re

    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def batch_seed(seed: int, batch: int) -> int:
    return (seed * 1_000_003 + batch * 7_919 + 17) % (2**63 - 1)


def make_backend(kind: str):
    """A backend for inference (any registered one, with its default options), with a one-line error
    when it cannot be had."""
    from pydantic import ValidationError

    from apo_cli.registry import UnknownName
    from apo_cli.runtime.world import World
    from backends import create_backend
    from backends.options import backend_options

    if World.from_env().distributed:  # every process would do all the work and write the same files
        raise UsageError("apo generate and apo eval run as one process; only apo train runs under torchrun")
    try:
        spec = backend_options(kind).model_validate({"kind": kind})
        return create_backend(spec)
    except UnknownName as e:
        raise UsageError(str(e)) from None
    except ImportError as e:
        raise BackendError(f"backend {kind!r} is not available here: {e}") from None
    except ValidationError as e:  # a plugin whose options have required fields
        err = e.errors(include_url=False)[0]
        raise BackendError(f"backend {kind!r} has no default for backend.{'.'.join(map(str, err['loc']))}: "
                           f"{err['msg']}") from None


@dataclass
class Sample:
    """One completion of one prompt."""

    prompt_index: int
    sample_index: int
    completion: str
    finish_reason: str
    ids: list[int] = field(default_factory=list)


class Sampler:
    """A model loaded on a backend, sampling completions for prompt texts."""

    def __init__(self, model: ResolvedModel, backend: str = "cpu", *, chat_template: str = "auto",
                 system: str | None = None):
        from apo_cli.data import uses_chat_template
        from apo_cli.models import context_length, load_model, load_tokenizer, quiet_transformers
        from apo_cli.data.spec import DataSpec

        quiet_transformers()
        self.resolved = model
        self.backend = make_backend(backend)
        self.tok = load_tokenizer(model.path)
        dtype = "bfloat16" if backend == "gpu" else "float32"
        loaded = load_model(model.path, dtype=dtype)
        if getattr(loaded.config, "pad_token_id", None) is None:
            loaded.config.pad_token_id = self.tok.pad_token_id
        self.model = self.backend.setup(loaded, self.tok)
        self.spec = DataSpec(chat_template=chat_template, system_prompt=system)
        self.chat = uses_chat_template(self.spec, self.tok)
        self.context = context_length(self.model)

    def render(self, prompt: str, example: Any = None, spec: Any = None) -> str:
        """The text the model sees for ``prompt`` (or for a dataset ``example`` with its ``spec``)."""
        from apo_cli.data import Example, render_prompt

        if example is None:
            example = Example(index=0, prompt=prompt, answer=None)
        return render_prompt(example, spec or self.spec, self.tok)

    def encode(self, texts: list[str], max_new_tokens: int) -> list[list[int]]:
        """Token ids of rendered prompts, each cut to what the context leaves for ``max_new_tokens``
        (its last tokens kept, as in training); a warning says how many were cut."""
        from apo_cli.sampling import encode_prompts, prompt_limit

        enc = encode_prompts(self.tok, texts, chat=self.chat, limit=prompt_limit(self.context, max_new_tokens))
        if enc.truncated:
            warn(f"{enc.truncated} of {len(texts)} prompts are longer than {enc.limit} tokens (the context of "
                 f"{self.context} less max_new_tokens {max_new_tokens}); each was cut to its last {enc.limit} tokens")
        return enc.ids

    def sample_ids(self, prompt_ids: list[list[int]], params, streamer: Any = None) -> list[list[Sample]]:
        """``params.n`` completions for each prompt (token ids in, decoded Samples out)."""
        from apo_cli.sampling import sample_groups

        s = sample_groups(self.backend, self.tok, prompt_ids, params, streamer)
        n = params.n
        return [
            [Sample(i, j, s.texts[i * n + j], s.completions[i * n + j].finish_reason, list(s.completions[i * n + j].ids))
             for j in range(n)]
            for i in range(len(prompt_ids))
        ]

    def stream_one(self, prompt_ids: list[int], params, write: Callable[[str], None]) -> Sample:
        """One completion, its text handed to ``write`` piece by piece as it is generated."""
        from transformers import TextStreamer

        written: list[str] = []

        class _Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                written.append(text)
                write(text)

        streamer = _Streamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        # a backend that can stream (the CPU sampler, also the GPU backend's rollout: hf) feeds it
        sample = self.sample_ids([prompt_ids], params, streamer)[0][0]
        if not written:  # a backend that does not stream (vLLM): print it whole
            write(sample.completion)
        return sample

    def close(self) -> None:
        self.backend.close()


def warn(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[yellow]warning:[/yellow] {message}", emoji=False)


def progress(total: int, description: str, *, enabled: bool = True):
    """A rich progress bar with ETA on stderr (hidden when stderr is not a terminal or ``enabled`` is False)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True)
    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), console=console, transient=True,
        disable=not (enabled and console.is_terminal),
    )
    task = bar.add_task(description, total=total)
    return bar, task


def chunks(items: list[Any], size: int) -> Iterable[tuple[int, list[Any]]]:
    for b, start in enumerate(range(0, len(items), size)):
        yield b, items[start : start + size]
