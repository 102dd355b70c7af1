from __future__ import annotations

from typing import Annotated

import typer

from apo_cli.commands._common import OverridesArg, RecipeArg, TrustCodeOpt, guarded


@guarded
def validate(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    preflight: Annotated[
        bool, typer.Option("--preflight", help="Also run the rewards on a few rows and check prompt lengths.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing when the recipe is valid.")] = False,
    trust_code: TrustCodeOpt = False,
) -> None:
    """Parse a recipe, check every rule, and print the resolved recipe.

    Plain validate never imports code the recipe names; --preflight runs its rewards, so custom
    rewards need --trust-code (or APO_TRUST_CODE=1).

    Examples:

        apo validate recipes/quickstart.yaml

        apo validate recipes/quickstart.yaml rollout.group_size=4 --preflight
    """
    from apo_cli.recipe import load_recipe, recipe_to_yaml

    r = load_recipe(recipe, overrides or [])
    if preflight:
        from apo_cli import trust
        from apo_cli.preflight import print_findings, run_preflight

        trust.grant(trust_code)
        trust.check_rewards(r.rewards)  # preflight runs the rewards; it loads no model
        print_findings(run_preflight(r))
    if not quiet:
        typer.echo(recipe_to_yaml(r), nl=False)
