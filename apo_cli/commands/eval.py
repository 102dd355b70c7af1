from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from apo_cli.commands._common import TrustCodeOpt, guarded
from apo_cli.commands.generate import (
    BackendOpt,
    BatchOpt,
    ChatOpt,
    ChatTemplate,
    GreedyOpt,
    SeedOpt,
    StopOpt,
    SystemOpt,
)


ModelsArg = Annotated[
    list[str],
    typer.Argument(help="Checkpoint folders, run directories (all their checkpoints), globs "
                        "('runs/x/checkpoints/step-*'), hub ids or built-in aliases.", show_default=False),
]

RecipeOpt = Annotated[
    Path | None,
    typer.Option("--recipe", "-r", help="Evaluate on this recipe's eval split with its rewards (default: the "
                                        "run's own recipe when MODEL is a run or its checkpoint)."),
]

DataOpt = Annotated[
    str | None, typer.Option("--data", "-d", help="Evaluate on every row of this source instead: builtin:<task>, "
                                                  "a .jsonl/.json/.parquet/.csv file, or a hub dataset.")
]

RewardOpt = Annotated[
    list[str] | None,
    typer.Option("--reward", help="With --data: reward name (repeatable; default exact_match).")
]

KOpt = Annotated[int | None, typer.Option("-k", min=1, help="Samples per problem for the @k metrics "
                                                         "(default 4; 1 with --greedy).")]

SamplesOpt = Annotated[
    int | None, typer.Option("--samples", "-n", min=1, help="Completions drawn per problem (>= k, default k); "
                                                           "more samples make pass@k less noisy.")
]

TemperatureOpt = Annotated[
    float | None, typer.Option("--temperature", "-t", help="Sampling temperature (default: the recipe's, else 1.0).")
]

MaxNewTokensOpt = Annotated[
    int | None, typer.Option("--max-new-tokens", "-m", min=1, help="Longest completion (default: the recipe's, else 256).")
]

PassThresholdOpt = Annotated[
    float, typer.Option("--pass-threshold", help="Without a verifying reward: a sample is correct when its "
                                                 "total reward reaches this.")
]

DumpOpt = Annotated[Path | None, typer.Option("--dump", help="Write every sample (completion, answer, "
                                                         "correctness, reward) as JSONL here.")]


@guarded
def eval_(
    models: ModelsArg,
    base: Annotated[bool, typer.Option("--base", help="Also evaluate the base model of each run, for reference.")] = False,
    recipe: RecipeOpt = None,
    data: DataOpt = None,
    reward: RewardOpt = None,
    prompt_column: Annotated[str, typer.Option("--prompt-column", help="With --data: the problem column.")] = "prompt",
    answer_column: Annotated[str, typer.Option("--answer-column", help="With --data: the reference answer column.")] = "answer",
    chat_template: ChatOpt = ChatTemplate.auto,
    system: SystemOpt = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Evaluate the first N problems only.")] = None,
    k: KOpt = None,
    samples: SamplesOpt = None,
    greedy: GreedyOpt = False,
    temperature: TemperatureOpt = None,
    top_p: Annotated[float | None, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass.")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", min=0, help="Top-k sampling (0: off).")] = None,
    max_new_tokens: MaxNewTokensOpt = None,
    stop: StopOpt = None,
    seed: SeedOpt = 0,
    pass_threshold: PassThresholdOpt = 1.0,
    backend: BackendOpt = "cpu",
    batch_size: BatchOpt = 8,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON instead of a table.")] = False,
    dump: DumpOpt = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Sample everything again (the cache is rewritten).")] = False,
    trust_code: TrustCodeOpt = False,
) -> None:
    """Score checkpoints on a dataset: mean@k, pass@k and maj@k with 95 % confidence intervals.

    pass@k is the unbiased estimator 1 - C(n-c, k)/C(n, k) over n >= k samples; maj@k is the
    majority vote over the extracted answers of k samples. Intervals are normal approximations over
    problems (mean ± 1.96 s/√m). Results of a run's checkpoints are appended to the run's
    eval.jsonl (shown by `apo inspect-alpha`). Finished problems are cached per model, data and
    sampling settings, so an interrupted evaluation resumes where it stopped. --reward,
    --prompt-column, --answer-column, --chat-template and --system apply to --data.

    Examples:

        apo eval runs/quickstart --base -k 8

        apo eval 'runs/quickstart/checkpoints/step-*' --recipe recipes/quickstart.yaml --json

        apo eval smollm2-135m-instruct --data problems.jsonl --reward math_verify --greedy --dump samples.jsonl
    """
    from apo_cli import trust
    from apo_cli.evaluation import dump_samples, expand_models, task_from_recipe, task_from_source

    trust.grant(trust_code)
    k, n = _counts(k, samples, greedy, recipe is not None, data is not None, bool(reward))
    resolved = expand_models(list(models), base=base)
    r, recipe_path = _recipe(recipe, data, resolved)
    if data is not None:
        task = task_from_source(data, list(reward or ["exact_match"]), prompt_column=prompt_column,
                                answer_column=answer_column, chat_template=chat_template.value, system=system,
                                limit=limit)
    else:
        task = task_from_recipe(r, recipe_path, limit)
    trust.check_rewards(task.rewards)  # a run directory someone sent brings its recipe's rewards
    settings = _settings(r, k=k, samples=n, greedy=greedy, temperature=temperature, top_p=top_p, top_k=top_k,
                         max_new_tokens=max_new_tokens, stop=stop, seed=seed, batch_size=batch_size,
                         pass_threshold=pass_threshold)
    results, records = _evaluate_all(resolved, task, settings, backend, use_cache=not no_cache)
    if dump is not None:
        dump_samples(dump, results)
    if as_json:
        typer.echo(json.dumps(records, indent=1))
    else:
        _table(records, task.label, settings)


def _counts(k: int | None, samples: int | None, greedy: bool, has_recipe: bool, has_data: bool,
            has_reward: bool) -> tuple[int, int]:
    """``(k, n)``: samples scored per problem and drawn per problem, after the option rules."""
    from apo_cli.errors import UsageError

    if has_recipe and has_data:
        raise UsageError("give --recipe or --data, not both")
    if has_reward and not has_data:
        raise UsageError("--reward goes with --data (a recipe brings its own rewards)")
    k = k or (1 if greedy else 4)
    if greedy and k > 1:
        raise UsageError(f"--greedy gives one completion per problem; -k {k} needs sampling")
    n = samples or k
    if n < k:
        raise UsageError(f"--samples {n} is fewer than -k {k}")
    return k, n


def _settings(r, *, k: int, samples: int, greedy: bool, temperature, top_p, top_k, max_new_tokens, stop, seed: int,
              batch_size: int, pass_threshold: float):
    """The sampling settings: each option, else the recipe's rollout value, else the default."""
    from apo_cli.errors import UsageError
    from apo_cli.evaluation import EvalSettings
    from apo_cli.generation import unescape

    ro = r.rollout if r is not None else None
    settings = EvalSettings(
        k=k, samples=samples, greedy=greedy,
        temperature=temperature if temperature is not None else (ro.temperature if ro else 1.0),
        top_p=top_p if top_p is not None else (ro.top_p if ro else 1.0),
        top_k=top_k if top_k is not None else (ro.top_k if ro else 0),
        max_new_tokens=max_new_tokens or (ro.max_new_tokens if ro else 256),
        stop=tuple(unescape(x) for x in stop) if stop else (tuple(ro.stop) if ro else ()),
        seed=seed, batch_size=batch_size, pass_threshold=pass_threshold,
    )
    if not greedy and settings.temperature <= 0:
        raise UsageError("--temperature must be > 0 (use --greedy for deterministic decoding)")
    return settings


def _evaluate_all(resolved, task, settings, backend: str, *, use_cache: bool):
    """Evaluate each model with :class:`_Progress`; each run's checkpoints also land in its eval.jsonl."""
    from apo_cli.errors import RunDirError
    from apo_cli.evaluation import append_run_record, evaluate, record
    from apo_cli.generation import warn

    results, records = [], []
    with _Progress(len(resolved), len(task.examples)) as shown:
        for m in resolved:
            shown.start(m.label)
            res = evaluate(m, task, settings, backend=backend, use_cache=use_cache, advance=shown.advance)
            shown.finish()
            rec = record(res, task, settings)
            try:
                append_run_record(res, rec)
            except RunDirError as e:  # the results are in the table and the cache; only the run's copy is missing
                warn(f"{e}; the results are shown here and cached, not added to the run")
            results.append(res)
            records.append(rec)
    return results, records


PLAIN_EVERY_S = 30.0  # off a terminal: a progress line at most this often while a model is evaluated


class _Progress:
    """The evaluation's progress on stderr: on a terminal, one bar with the ETA; elsewhere (a log
    file, CI, nohup), where the bar hides itself, plain lines as `apo train` prints: when a model
    starts, at most every :data:`PLAIN_EVERY_S` seconds while it runs, and when it is done."""

    def __init__(self, models: int, problems: int):
        from apo_cli.generation import progress

        self.bar, self.task = progress(models * problems, "evaluating")
        self.plain = bool(self.bar.disable)
        self.models, self.problems, self.index = models, problems, 0

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def start(self, label: str) -> None:
        self.index += 1
        self.label, self.done, self.cached = label, 0, None
        self.t0 = self.last = time.monotonic()
        self.bar.update(self.task, description=f"evaluating {label}")

    def advance(self, n: int) -> None:
        """``n`` more problems done; the first call of a model counts those its cache held."""
        self.bar.advance(self.task, n)
        self.done += n
        if self.cached is None:
            self.cached = n
            from_cache = f", {n} from the cache" if n else ""
            self._line(f"evaluating {self._name()}: {self.problems} problems{from_cache}")
        elif self.done < self.problems and time.monotonic() - self.last >= PLAIN_EVERY_S:
            elapsed = time.monotonic() - self.t0
            rate = (self.done - self.cached) / elapsed if elapsed > 0 else 0.0
            eta = f", eta {_duration((self.problems - self.done) / rate)}" if rate > 0 else ""
            self._line(f"evaluating {self._name()}: {self.done}/{self.problems} problems, "
                       f"{_duration(elapsed)} elapsed{eta}")

    def finish(self) -> None:
        self._line(f"evaluated {self._name()}: {self.problems} problems in {_duration(time.monotonic() - self.t0)}")

    def _name(self) -> str:
        return self.label if self.models == 1 else f"{self.label} ({self.index}/{self.models})"

    def _line(self, text: str) -> None:
        self.last = time.monotonic()
        if self.plain:
            print(text, file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _recipe(recipe: Path | None, data: str | None, resolved):
    """The recipe whose eval split and rewards are used: --recipe, else the run's own (when one run)."""
    from apo_cli.errors import UsageError
    from apo_cli.recipe import load_recipe

    if recipe is not None:
        return load_recipe(recipe), str(recipe)
    if data is not None:
        return None, ""
    runs = list(dict.fromkeys(m.run_dir for m in resolved if m.run_dir is not None))
    if len(runs) == 1 and (runs[0] / "recipe.yaml").is_file():
        return load_recipe(runs[0] / "recipe.yaml"), str(runs[0] / "recipe.yaml")
    raise UsageError("which problems? give --recipe R.yaml (its eval split) or --data SOURCE")


def _table(records: list[dict], data_label: str, settings) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    names = list(records[0]["metrics"]) if records else []
    best = {name: max(rec["metrics"][name]["value"] for rec in records) for name in names}
    mode = "greedy" if settings.greedy else f"T={settings.temperature:g}"
    table = Table(title=f"{escape(data_label)}: {records[0]['problems'] if records else 0} problems, "
                        f"k={settings.k}, n={settings.samples}, {mode}",
                  caption="± : 95 % normal-approximation interval over problems; best per column in bold")
    longest = max((len(rec["model"]) for rec in records), default=0)
    console = Console(highlight=False)
    if not console.is_terminal:  # a file or a pipe: as wide as the table needs, so that nothing wraps
        natural = longest + 4 + sum(max(len(name), len("0.000 ±0.000")) + 3 for name in names)
        console = Console(highlight=False, width=max(console.width, natural))
    # the column that tells rows apart is never cut: the metric cells wrap (at the ±) first, and the
    # names fold onto more lines (every character kept) only where the terminal is narrower still
    metrics_min = sum(max(len(name), len("±0.000")) + 3 for name in names)  # a cell, its padding, a border
    room = console.width - metrics_min - 4
    if longest <= room:
        table.add_column("model", no_wrap=True)
    else:
        table.add_column("model", width=max(room, 8), overflow="fold")
    for name in names:
        table.add_column(name, justify="right")
    for rec in records:
        cells = []
        for name in names:
            m = rec["metrics"][name]
            half = (m["ci_high"] - m["ci_low"]) / 2
            text = f"{m['value']:.3f} ±{half:.3f}"
            top = len(records) > 1 and m["value"] == best[name] and not all(
                r["metrics"][name]["value"] == best[name] for r in records)
            cells.append(f"[bold green]{text}[/]" if top else text)
        table.add_row(escape(rec["model"]), *cells)
    console.print(table)
