from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from apo_cli.commands._common import TrustCodeOpt, guarded

ArgsArg = Annotated[
    list[str] | None,
    typer.Argument(help="Recipe YAML file(s), then key=value overrides for every arm.", show_default=False,
                   metavar="RECIPE|KEY=VALUE"),
]


@guarded
def compare(
    args: ArgsArg = None,
    objectives: Annotated[str | None, typer.Option(
        "--objectives", "-O", help="Comma-separated objectives, one arm each (NAME=OBJECTIVE names an arm, "
                                   "e.g. apo,apo_ref=apo,grpo).")] = None,
    seeds: Annotated[str, typer.Option("--seeds", help="Comma-separated seeds; every arm runs each.")] = "0,1,2",
    sets: Annotated[list[str] | None, typer.Option(
        "--set", help="ARM:key.path=value: an override for one arm (repeatable).")] = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Runs at once; the cores are shared out "
                                                                  "among them (OMP_NUM_THREADS).")] = 1,
    name: Annotated[str | None, typer.Option("--name", help="Name of the comparison (default: the first "
                                                            "recipe's run.name).")] = None,
    output_dir: Annotated[Path | None, typer.Option("--output-dir", "-o", help="Folder of the comparison "
                                                                               "(default: runs/<name>-compare).")] = None,
    report: Annotated[Path | None, typer.Option("--report", help="Only report on the comparison in this folder "
                                                                 "(finished runs; no training).")] = None,
    threshold: Annotated[float | None, typer.Option("--threshold", help="Reward threshold for 'steps to' "
                                                    "(default: halfway from the start to the best final reward).")] = None,
    window: Annotated[int | None, typer.Option("--window", min=1, help="Steps in the reward's moving average "
                                               "(default: a tenth of the run, at most 20).")] = None,
    png: Annotated[Path | None, typer.Option("--png", help="Also write the curves as a PNG (needs matplotlib).")] = None,
    csv_path: Annotated[Path | None, typer.Option("--csv", help="Export the table (one row per arm) as CSV.")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Export everything (runs, summaries, "
                                                                  "differences, curves) as JSON.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate every arm and show the runs and what "
                                                            "each would do, without training.")] = False,
    width: Annotated[int | None, typer.Option("--width", min=40, help="Chart width (default: the terminal's).")] = None,
    trust_code: TrustCodeOpt = False,
) -> None:
    """Compare objectives (or twin recipes) over seeds: one run directory per arm × seed, then a report.

    Each run is an ordinary `apo train` run in runs/<name>-compare/<arm>-s<seed>/ (apo eval,
    apo inspect-alpha and apo train --resume work on it). An arm whose objective differs from its
    recipe's takes that objective's defaults for the algorithm fields (keeping mini_batches,
    epochs, kl_coef, advantage_eps, disable_dropout). Run the same command again after an
    interruption: finished runs are skipped, interrupted ones resumed.

    The report: per arm, mean ± std over seeds of the final reward (last 10 % of steps), the
    held-out mean@k / pass@k (evaluation during training: the eval: section), steps to a reward
    threshold, step-to-step noise, completion length and time; each arm's difference from the first
    with a paired bootstrap 95 % interval over seeds and a verdict; the mean curves of reward,
    held-out accuracy and alpha (APO arms).

    Examples:

        apo compare recipes/quickstart.yaml --objectives apo,grpo,gspo,adpo --seeds 0,1,2

        apo compare r.yaml run.max_steps=50 -O apo,grpo --set grpo:algorithm.eps_high=0.28

        apo compare a.yaml b.yaml c.yaml --seeds 0,1,2 --jobs 2 --png curves.png

        apo compare --report runs/quickstart-compare --csv table.csv --json report.json
    """
    from apo_cli import trust
    from apo_cli.errors import UsageError

    trust.grant(trust_code)  # passed on to every run (apo train --trust-code)
    for p, flag in ((png, "--png"), (csv_path, "--csv"), (json_path, "--json")):
        if p is not None and not p.expanduser().resolve().parent.is_dir():
            raise UsageError(f"{flag} {p}: folder {p.expanduser().resolve().parent} does not exist")
    outcome = None
    if report is not None:
        if args or objectives or sets or dry_run:
            raise UsageError("--report reads an existing comparison: give it no recipes, --objectives, --set "
                             "or --dry-run")
        root = report
    else:
        root, outcome = _run(args or [], objectives, seeds, sets or [], jobs, name, output_dir, dry_run)
        if root is None:
            return
    _report(root, threshold, window, png, csv_path, json_path, width)
    if outcome is not None and outcome.failed:
        from apo_cli.compare.runner import failure

        raise failure(outcome)


def _echo(text: str) -> None:
    typer.echo(text)


def _run(args, objectives, seeds, sets, jobs, name, output_dir, dry_run):
    from apo_cli import trust
    from apo_cli.compare.plan import build_plan
    from apo_cli.compare.runner import run_plan, run_state, write_plan

    plan = build_plan(args, objectives=objectives, seeds=seeds, sets=sets, name=name, output_dir=output_dir)
    for recipe in plan.recipes.values():  # before anything runs: one line naming the code and the opt-in
        trust.check_recipe(recipe)
    states = {key: run_state(plan, *key) for key in plan.tasks()}
    _echo(f"comparison {plan.name}: {len(plan.arms)} arms × seeds {','.join(map(str, plan.seeds))} in {plan.root}")
    for a in plan.arms:
        extra = [f"{a.objective}'s defaults for {', '.join(a.dropped)}"] if a.dropped else []
        extra += [f"set {', '.join(a.sets)}"] if a.sets else []
        extra += [f"dropped {', '.join(a.unread)} (not read after the --set)"] if a.unread else []
        _echo(f"  {a.name}: objective {a.objective}, recipe {a.source}" + (f"; {'; '.join(extra)}" if extra else ""))
    if dry_run:
        for arm, seed in plan.tasks():
            st = states[(arm, seed)]
            what = {"new": "to start", "resume": "to resume", "done": "finished (skipped)"}[st.state]
            _echo(f"  {arm}-s{seed}: {what}" + (f"; changed: {', '.join(st.changed)}" if st.changed else ""))
        return None, None
    write_plan(plan)
    return plan.root, run_plan(plan, states, jobs, _echo)


def _report(root, threshold, window, png, csv_path, json_path, width) -> None:
    import shutil
    import sys

    from apo_cli.compare.charts import charts_text, write_png
    from apo_cli.compare.report import load, render, summarize, write_csv, write_json

    c = summarize(load(root, lambda text: typer.echo(f"warning: {text}", err=True)), threshold, window)
    _echo("")
    _echo(render(c))
    if any(a.done() for a in c.arms):
        w = width or shutil.get_terminal_size((100, 24)).columns
        _echo("")
        _echo(charts_text(c, w, color=sys.stdout.isatty()))
    for path, write in ((png, write_png), (csv_path, write_csv), (json_path, write_json)):
        if path is not None:
            write(c, path)
            _echo(f"wrote {path}")
