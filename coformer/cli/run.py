"""``coformer run RECIPE``: every stage of an experiment from one recipe file (:mod:`coformer.experiments.recipe`)."""

from __future__ import annotations

import click

from coformer.cli.app import cli, console


@cli.command("run")
@click.argument("recipe_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--force", is_flag=True, help="Re-run every stage, even those whose inputs have not changed.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output directory (default: the recipe's `out`, else a directory named after the recipe).")
def run_cmd(recipe_file: str, force: bool, out_dir: str | None) -> None:
    """Run a recipe's stages (profile, search, calibrate, bench); a stage whose inputs are unchanged is skipped."""
    import dataclasses
    from pathlib import Path

    from coformer.experiments.recipe import RecipeError, load_recipe
    from coformer.experiments.recipe_run import RecipeRun

    try:
        recipe = load_recipe(recipe_file)
    except RecipeError as exc:
        raise click.ClickException(str(exc)) from exc
    if out_dir:
        recipe = dataclasses.replace(recipe, out=Path(out_dir))
    console.print(f"recipe {recipe.path}: stages {', '.join(recipe.stages)} → {recipe.out}")
    outcomes = RecipeRun(recipe, force=force, log=console.print).run()
    ran = [o.stage for o in outcomes if o.ran]
    console.print(f"ran: {', '.join(ran) or 'nothing (every stage was up to date)'}; "
                  f"plan directory: {recipe.out / 'calibrate'}")
