"""``coformer demo``: the main job on the embedded default, no arguments needed."""

from __future__ import annotations

import json
from pathlib import Path

import click

from coformer import defaults
from coformer.cli.app import DATA_HELP, cli, console


@cli.command("demo")
@click.option("--backbone", "backbone_name", default=defaults.BACKBONE, show_default=True,
              help="Any registered backbone (`coformer plugins` lists them); without --source, its own default weights.")
@click.option("--source", default=None, help="Local checkpoint directory instead of the embedded default.")
@click.option("--plan", "plan_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="A `coformer plan` directory whose policy replaces the proportional one.")
@click.option("--data", "data_uri", default=None, help=DATA_HELP)
@click.option("--devices", default="jetson-nano,jetson-tx2,orin-nano", show_default=True,
              help="Built-in device names or a .toml/.json file of device profiles.")
@click.option("--aggregator", "aggregator_name", default=defaults.AGGREGATOR, show_default=True)
@click.option("--weight-rule", type=click.Choice(["paper", "seed-unweighted", "boost", "seed"]), default=None,
              help="Sample-weight update between sub-models: paper (eq. 13 as written), seed-unweighted, boost; "
                   "'seed' is a deprecated alias of seed-unweighted (default: the backbone's calibration default, "
                   "else the booster's).")
@click.option("--epochs", type=int, default=None, help="Calibration epochs per sub-model.")
@click.option("--out", type=click.Path(file_okay=False), default="coformer-demo", show_default=True,
              help="Where to write the plan directory.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the figures as JSON (keys: teacher, submodels, coformer).")
@click.option("--max-length", type=int, default=64, show_default=True,
              help="Tokens kept per text (text backbones).")
@click.option("--img-size", type=int, default=56, show_default=True,
              help="Pixels per side of the inputs (image backbones).")
@click.option("--layers", type=int, default=None,
              help="Layers each sub-model keeps (its most important ones; default: all). Fewer is faster.")
@click.option("--compressed/--no-compressed", default=True, show_default=True,
              help="Also build the single-model alternative for the strongest device (same rule with N = 1, same "
                   "calibration budget) into OUT/compressed/, which `coformer bench` runs as 'compressed'.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Training seed (head fit, calibration); never changes the data split.")
def demo_cmd(backbone_name: str, source: str | None, plan_dir: str | None, data_uri: str | None, devices: str,
             aggregator_name: str,
             weight_rule: str | None, epochs: int | None, out: str, json_path: str | None,
             max_length: int, img_size: int, layers: int | None, compressed: bool, seed: int) -> None:
    """Fine-tune, decompose into one sub-model per device, calibrate, aggregate, and compare with the teacher."""
    from coformer.experiments.demo import render, run_demo

    if plan_dir is not None and layers is not None:
        raise click.UsageError("--layers applies to the proportional policy; a --plan already fixes each "
                               "sub-model's layers — pass one or the other")
    overrides = {k: v for k, v in {"weight_rule": weight_rule, "epochs": epochs}.items() if v is not None}
    result = run_demo(backbone_name=backbone_name, source=source, plan=plan_dir, devices=devices,
                      aggregator_name=aggregator_name, booster_overrides=overrides, out=out, seed=seed, console=console,
                      max_length=max_length, img_size=img_size, layers=layers, compressed=compressed,
                      data_uri=data_uri)
    render(result, console)
    if json_path:
        Path(json_path).write_text(json.dumps(result.to_dict(), indent=2))
        console.print(f"figures written to {json_path}")
