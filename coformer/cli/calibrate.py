"""``coformer calibrate``: a policy (``coformer plan`` output, or the proportional default) → packaged plan."""

from __future__ import annotations

import click

from coformer import defaults
from coformer.cli.app import DATA_HELP, cli, console


@cli.command("calibrate")
@click.option("--plan", "plan_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="A `coformer plan` directory whose policy is calibrated (default: one sub-model per device, "
                   "sized in proportion to its GFLOPS).")
@click.option("--data", "data_uri", default=None, help=DATA_HELP + " With --plan, the default is the plan's data set.")
@click.option("--teacher", "teacher_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Teacher checkpoint directory; its task head is fitted on --data (cached). Default: the plan's "
                   "source, else the backbone's embedded model.")
@click.option("--backbone", "backbone_name", default=None, help="Backbone (default: the plan's, else bert).")
@click.option("--source", default=None, help="Same as --teacher (a local checkpoint directory).")
@click.option("--devices", default="jetson-nano,jetson-tx2,orin-nano", show_default=True,
              help="Devices of the proportional default (ignored with --plan, which fixes them).")
@click.option("--aggregator", "aggregator_name", default=defaults.AGGREGATOR, show_default=True)
@click.option("--epochs", type=int, default=None, help="Calibration epochs per sub-model.")
@click.option("--max-length", type=int, default=None, help="Tokens per text (default: the plan's, else 64).")
@click.option("--img-size", type=int, default=56, show_default=True, help="Pixels per side (image backbones).")
@click.option("--layers", type=int, default=None, help="Layers per sub-model of the proportional default.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The packaged plan directory.")
def calibrate_cmd(plan_dir: str | None, data_uri: str | None, teacher_dir: str | None, backbone_name: str | None,
                  source: str | None, devices: str, aggregator_name: str, epochs: int | None,
                  max_length: int | None, img_size: int, layers: int | None, seed: int, out: str) -> None:
    """Decompose the policy, calibrate the sub-models, train the aggregator; write a deployable plan directory."""
    import coformer
    from coformer.offline.calibrate import run_calibrate, searched_plan
    from coformer.offline.data_choice import choose_dataset

    if teacher_dir and source and teacher_dir != source:
        raise click.UsageError("--teacher and --source both name the teacher; give one")
    if plan_dir is not None and layers is not None:
        raise click.UsageError("--layers applies to the proportional default; a --plan already fixes each "
                               "sub-model's layers — pass one or the other")
    doc = searched_plan(plan_dir) if plan_dir else {}
    name = backbone_name or doc.get("backbone") or defaults.BACKBONE
    data = choose_dataset(data_uri or doc.get("dataset"), coformer.create_backbone(name).modality)
    out_dir = run_calibrate(data=data, out=out, backbone_name=name, plan=plan_dir, source=teacher_dir or source,
                            devices=devices, aggregator_name=aggregator_name,
                            booster_overrides={"epochs": epochs} if epochs is not None else None,
                            max_length=max_length or (None if plan_dir else 64), img_size=img_size, layers=layers,
                            seed=seed)
    from coformer.plan_document import read_plan_document

    value = read_plan_document(out_dir)["figures"]["coformer"]["val_accuracy"]
    console.print(f"calibrated on {data.name}: CoFormer validation accuracy {value:.2f}%; packaged plan {out_dir}")
    console.print(f"next: coformer bench --plan {out_dir} --workers URI,... (or --testbed)")
