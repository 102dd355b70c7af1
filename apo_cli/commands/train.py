from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from apo_cli.commands._common import OverridesArg, RecipeArg, TrustCodeOpt, guarded


@guarded
def train(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in the run directory from its latest good checkpoint.")
    ] = False,
    resume_from: Annotated[
        Path | None, typer.Option("--resume-from", help="Continue from this checkpoint folder.")
    ] = None,
    allow_recipe_change: Annotated[
        bool, typer.Option("--allow-recipe-change", help="On --resume or --resume-from, go on under a recipe changed in "
                           "fields that may change (steps, checkpointing, logging, eval; optim.lr, betas, "
                           "weight_decay and grad_clip, which then replace the checkpoint's). Others are refused.")
    ] = False,
    output_dir: Annotated[Path | None, typer.Option("--output-dir", "-o", help="Run directory (overrides run.output_dir).")] = None,
    trust_code: TrustCodeOpt = False,
) -> None:
    """Train a model with the recipe's objective (APO, GRPO, GSPO, ADPO) on-policy.

    Examples:

        apo train recipes/quickstart.yaml

        apo train recipes/quickstart.yaml algorithm.objective=grpo run.max_steps=20

        apo train recipes/quickstart.yaml --resume

        torchrun --standalone --nproc-per-node=8 -m apo_cli train recipe.yaml   (data parallel, docs/gpu.md)
    """
    from apo_cli import trust
    from apo_cli.recipe import load_recipe, with_values
    from apo_cli.train import train_from_recipe

    trust.grant(trust_code)

    r = load_recipe(recipe, list(overrides or []))
    if output_dir is not None:
        r = with_values(r, {"run.output_dir": str(output_dir)})
    trust.check_recipe(r)  # before the run directory is touched
    train_from_recipe(r, resume=resume or resume_from is not None, resume_from=resume_from,
                      allow_recipe_change=allow_recipe_change)
