"""Latency-only plans for `coformer bench`: the real teacher sliced in proportion to device speed, uncalibrated.

`coformer demo` writes the calibrated plan (accuracy figures included); this script writes, in
seconds, one plan per device set — e.g. 1, 2, 3 devices and the 4th the Raspberry Pi 4B profile
— for the bench's device-count table and for latency/bytes/memory measurements when no
calibrated plan is at hand. Their sub-models are sliced by importance but NOT calibrated and the
aggregator is untrained, so their accuracy means nothing; the bench says "recomputed" and this
script records ``"calibrated": false`` in each plan.json. The teacher (with a fresh task head
unless ``--teacher`` names a fine-tuned one) is saved next to the plans for ``--teacher``.

    python examples/bench_devices.py --out /tmp/bench-plans
    coformer bench --testbed --plan /tmp/bench-plans/3dev --teacher /tmp/bench-plans/teacher \
        --device-plans /tmp/bench-plans/1dev,/tmp/bench-plans/2dev,/tmp/bench-plans/4dev ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import coformer
from coformer.artifacts import save_plan
from coformer.decompose import proportional_specs
from coformer.spec import Policy, resolve_devices, validate

DEVICE_SETS = {
    "1dev": "jetson-tx2",
    "2dev": "jetson-tx2,orin-nano",
    "3dev": "jetson-nano,jetson-tx2,orin-nano",
    "4dev": "jetson-nano,jetson-tx2,orin-nano,rpi4b",
}


def main() -> None:
    """Write the teacher and one uncalibrated plan per device set."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="bert")
    ap.add_argument("--teacher", default=None, help="fine-tuned teacher directory (default: embedded, fresh head)")
    ap.add_argument("--num-labels", type=int, default=5)
    ap.add_argument("--layers", type=int, default=None,
                    help="layers each sub-model keeps (as `coformer demo --layers`; default: all)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    backbone = coformer.create_backbone(args.backbone)
    teacher = backbone.load(args.teacher, num_labels=None if args.teacher else args.num_labels)
    backbone.save(teacher, out / "teacher")
    shape = backbone.shape(teacher)
    texts = ["calibration text about markets, sport, politics, films and technology"] * 8
    batch = backbone.prepare(teacher, texts) if backbone.modality == "text" else backbone.example_batch(teacher, 8)
    importance = backbone.importance(teacher, batch)
    head = backbone.task_head(teacher)
    for name, devs in DEVICE_SETS.items():
        devices = resolve_devices(devs)
        specs = proportional_specs(shape, [d.gflops for d in devices], layers=args.layers)
        validate(specs, shape, devices)
        subs = backbone.decompose(teacher, specs, importance=importance)
        agg = coformer.create_aggregator("mlp_fusion", feature_dims=[m.feature_dim for m in subs],
                                         embed_dim=shape.embed_dim, task_head=head, student_heads=None)
        save_plan(out / name, submodels=subs, aggregator=agg, task_head=head, student_heads=None,
                  meta={"backbone": backbone.name, "source": str(out / "teacher"), "calibrated": False,
                        "policy": Policy(specs, devices, {"source": "proportional, uncalibrated"}).to_dict(),
                        "figures": {}})
        print(f"{out / name}: {', '.join(d.name for d in devices)}: {[s.to_dict() for s in specs]}")


if __name__ == "__main__":
    main()
