"""The device-count table (the paper's Table V) with accuracy: CoFormer on 1, 2, 3 and 4 devices.

One CALIBRATED plan per device set (Jetson TX2; TX2 + Orin Nano; Nano + TX2 + Orin Nano; the
same + Raspberry Pi 4B), each built by the demo flow on MiniLM (``bert``) / BBC News: proportional
decomposition, boosting calibration, aggregator training; the test split is read once per plan
for its accuracy, and nothing is tuned (so no validation-based choice is made). Each plan is then
timed through in-process workers at one modelled link rate: accuracy, latency, bytes and the
energy ESTIMATE per row (:mod:`coformer.experiments.device_count`).

    python examples/bench_devices.py --out /tmp/table5            # full: 4 plans, about 2 min each
    python examples/bench_devices.py --out /tmp/table5 --quick    # small data subset, 1 epoch (a test)

The plans are ordinary plan directories, so shaped links on the emulated testbed are one command:

    coformer bench --testbed --plan /tmp/table5/3dev \
        --device-plans /tmp/table5/1dev,/tmp/table5/2dev,/tmp/table5/4dev ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from coformer.experiments.bench import BenchConfig
from coformer.experiments.device_count import DeviceCountConfig, markdown, run_device_count, shrink

#: --quick: train / val / test examples kept, booster epochs, tokens per text, requests
QUICK = {"split": (150, 30, 60), "epochs": 1, "max_length": 32, "requests": 3}


def main(argv: list[str] | None = None) -> dict:
    """Build and time the four plans; write ``device_count.json`` and ``device_count.md`` under ``--out``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="bert")
    ap.add_argument("--layers", type=int, default=2,
                    help="layers each sub-model keeps (as `coformer demo --layers`; 0 = all)")
    ap.add_argument("--rate-mbps", type=float, default=1000.0, help="modelled link rate for the timing")
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a small data subset and one booster epoch (for tests)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    cfg = DeviceCountConfig(backbone=args.backbone, layers=args.layers or None, seed=args.seed,
                            rate_mbps=args.rate_mbps, bench=BenchConfig(requests=args.requests, warmup=3))
    dataset = None
    if args.quick:
        from coformer import registry
        from coformer.experiments.demo import default_dataset

        dataset = shrink(default_dataset(registry.create("backbone", args.backbone).modality), *QUICK["split"])
        cfg.booster_overrides = {"epochs": QUICK["epochs"]}
        cfg.max_length = QUICK["max_length"]
        cfg.bench = BenchConfig(requests=QUICK["requests"], warmup=1)
        cfg.latency_repeats = 2
    doc = run_device_count(args.out, cfg, dataset=dataset)
    out = Path(args.out)
    (out / "device_count.json").write_text(json.dumps(doc, indent=2, default=float))
    table = markdown(doc)
    (out / "device_count.md").write_text(table)
    print(table)
    return doc


if __name__ == "__main__":
    main()
