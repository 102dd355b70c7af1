from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from apo_cli.commands._common import guarded


def backend_kind(value: str) -> str:
    """``--backend``: a registered backend (built-in, or from the ``apo.backends`` entry points)."""
    from backends import BACKENDS

    if value not in BACKENDS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(repr(n) for n in BACKENDS.ordered())}.")
    return value


def _backend_metavar() -> str:
    from backends import BACKENDS

    return f"<{'|'.join(BACKENDS.builtins())}>"  # the built-ins: help must not depend on the plugins installed


class ChatTemplate(str, Enum):
    auto = "auto"
    on = "on"
    off = "off"


# Options shared with `apo eval`
ModelArg = Annotated[
    str,
    typer.Argument(help="Checkpoint folder, run directory (its latest good checkpoint), hub id, or built-in alias "
                        "(tiny-random, smollm2-135m-instruct).", show_default=False),
]
TemperatureOpt = Annotated[float, typer.Option("--temperature", "-t", min=0.0, help="Sampling temperature (> 0).")]
TopPOpt = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass.")]
TopKOpt = Annotated[int, typer.Option("--top-k", min=0, help="Top-k sampling (0: off).")]
MaxNewTokensOpt = Annotated[int, typer.Option("--max-new-tokens", "-m", min=1, help="Longest completion, in tokens.")]
StopOpt = Annotated[
    list[str] | None,
    typer.Option("--stop", help="Stop string (repeatable; \\n and \\t understood); a completion ends after it."),
]
GreedyOpt = Annotated[bool, typer.Option("--greedy", help="Greedy decoding (ignores temperature, top-p, top-k).")]
SeedOpt = Annotated[int, typer.Option("--seed", min=0, help="Sampling seed: the same seed gives the same completions.")]
BackendOpt = Annotated[
    str, typer.Option("--backend", parser=backend_kind, metavar=_backend_metavar(),
                      help="Where the model runs.")
]
ChatOpt = Annotated[
    ChatTemplate, typer.Option("--chat-template", help="Use the tokenizer's chat template (auto: when it has one).")
]
SystemOpt = Annotated[str | None, typer.Option("--system", help="System message (chat template) or preamble (plain).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Prompts sampled together.")]


PromptsFileOpt = Annotated[
    Path | None,
    typer.Option("--prompts-file", "-f", help="Text file with one prompt per line, or .jsonl with a 'prompt' "
                                              "field; '-' reads stdin."),
]
OutputOpt = Annotated[Path | None, typer.Option("--output", "-o", help="Write the JSONL records here instead of stdout.")]
StreamOpt = Annotated[
    bool | None,
    typer.Option("--stream/--no-stream",
                 help="Print the completion as it is generated (default: for one prompt, -n 1, on a terminal)."),
]


@guarded
def generate(
    model: ModelArg,
    prompt: Annotated[list[str] | None, typer.Option("--prompt", "-p", help="A prompt (repeatable).")] = None,
    prompts_file: PromptsFileOpt = None,
    n: Annotated[int, typer.Option("-n", min=1, help="Completions per prompt.")] = 1,
    temperature: TemperatureOpt = 1.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    max_new_tokens: MaxNewTokensOpt = 256,
    stop: StopOpt = None,
    greedy: GreedyOpt = False,
    seed: SeedOpt = 0,
    chat_template: ChatOpt = ChatTemplate.auto,
    system: SystemOpt = None,
    backend: BackendOpt = "cpu",
    batch_size: BatchOpt = 8,
    output: OutputOpt = None,
    stream: StreamOpt = None,
) -> None:
    """Sample completions from a checkpoint, a run, a hub id or a built-in model.

    Prompts come from --prompt, --prompts-file, or stdin (one per line). Each completion is one
    JSON line {"prompt", "completion", "finish_reason", "tokens", "index", "sample"} on stdout or in
    --output. One prompt on a terminal streams its completion as plain text instead. The same
    --seed, prompts and --batch-size give the same completions.

    Examples:

        apo generate runs/quickstart --prompt "What is 12 + 30?"

        apo generate runs/quickstart/checkpoints/step-40 -f prompts.txt -n 4 -o out.jsonl

        echo "2 + 2 =" | apo generate tiny-random --greedy --max-new-tokens 8 --stop "\\n"
    """
    from apo_cli.errors import UsageError
    from apo_cli.generation import Sampler, batch_seed, resolve_model, unescape
    from backends import SamplingParams

    texts = _prompt_texts(prompt, prompts_file)
    if not greedy and temperature <= 0:
        raise UsageError("--temperature must be > 0 (use --greedy for deterministic decoding)")
    resolved = resolve_model(model)
    interactive = output is None and sys.stdout.isatty()
    if stream is None:
        stream = interactive and len(texts) == 1 and n == 1
    elif stream and (len(texts) != 1 or n != 1):
        raise UsageError("--stream needs exactly one prompt and -n 1")

    def params_for(b: int) -> SamplingParams:
        return SamplingParams(n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              top_k=top_k, stop=tuple(unescape(x) for x in stop or ()), seed=batch_seed(seed, b),
                              greedy=greedy)

    sampler = Sampler(resolved, backend, chat_template=chat_template.value, system=system)
    sink = output.open("w", encoding="utf-8") if output is not None else None
    try:
        def emit(rec: dict) -> None:
            line = json.dumps(rec, ensure_ascii=False)
            if sink is not None:
                sink.write(line + "\n")
                sink.flush()
            elif not stream:
                typer.echo(line)

        ids = sampler.encode([sampler.render(t) for t in texts], max_new_tokens)
        if stream:
            s = sampler.stream_one(ids[0], params_for(0), lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
            sys.stdout.write("\n")
            sys.stdout.flush()
            typer.echo(f"[{s.finish_reason}, {len(s.ids)} tokens]", err=True)
            emit(_record(texts[0], s))
        else:
            _sample_all(sampler, texts, ids, params_for, emit, batch_size, n, resolved.label)
    finally:
        sampler.close()
        if sink is not None:
            sink.close()


def _prompt_texts(prompt: list[str] | None, prompts_file: Path | None) -> list[str]:
    """The prompts of --prompt, --prompts-file, or stdin."""
    from apo_cli.errors import UsageError
    from apo_cli.generation import read_prompts

    if prompt and prompts_file is not None:
        raise UsageError("give prompts with --prompt or --prompts-file, not both")
    if prompt:
        return list(prompt)
    if prompts_file is not None:
        return read_prompts(prompts_file)
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError("no prompts: give --prompt, --prompts-file, or pipe prompts on stdin")
    return read_prompts("-")


def _sample_all(sampler, texts: list[str], ids: list[list[int]], params_for, emit, batch_size: int, n: int,
                label: str) -> None:
    """Every prompt's ``n`` completions, ``batch_size`` prompts at a time, each record emitted as it comes."""
    from apo_cli.generation import chunks, progress

    bar, task = progress(len(texts) * n, f"generating with {label}",
                         enabled=len(texts) > batch_size or len(texts) * n > 32)
    with bar:
        for b, part in chunks(list(range(len(texts))), batch_size):
            for group in sampler.sample_ids([ids[i] for i in part], params_for(b)):
                for s in group:
                    emit(_record(texts[part[s.prompt_index]], s, part[s.prompt_index]))
                bar.advance(task, len(group))


def _record(prompt: str, s, index: int = 0) -> dict:
    return {"prompt": prompt, "completion": s.completion, "finish_reason": s.finish_reason, "tokens": len(s.ids),
            "index": index, "sample": s.sample_index}
