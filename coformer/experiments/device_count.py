"""The device-count table (the paper's Table V) with accuracy: CoFormer on 1, 2, 3 and 4 devices.

Each device set gets its own *calibrated* plan — the demo flow (:func:`coformer.experiments.demo.run_demo`):
proportional decomposition, boosting calibration and aggregator training on the train split,
the test split read once, by the demo, for the reported accuracy; nothing is tuned, so there is
no choice for the validation split to make. Each plan is then run through in-process workers
(:func:`coformer.experiments.bench.device_count_run`) for latency, bytes and the energy ESTIMATE at one
(modelled) link rate. ``coformer bench --testbed --device-plans`` measures the same plans on
shaped links.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from coformer import defaults, open_transport, registry
from coformer.artifacts import load_plan
from coformer.experiments.bench import BenchConfig, device_count_run, make_sample
from coformer.data import RawDataset, RawSplit
from coformer.spec import resolve_devices

#: The seed's Table V device sets: the strongest single device, then Nano / TX2 / Orin Nano, then a Pi 4B.
DEVICE_SETS: dict[str, str] = {
    "1dev": "jetson-tx2",
    "2dev": "jetson-tx2,orin-nano",
    "3dev": "jetson-nano,jetson-tx2,orin-nano",
    "4dev": "jetson-nano,jetson-tx2,orin-nano,rpi4b",
}


@dataclass
class DeviceCountConfig:
    """What to build and how much to measure."""

    backbone: str = defaults.BACKBONE
    layers: int | None = 2
    seed: int = 0
    rate_mbps: float = 1000.0
    bench: BenchConfig = field(default_factory=lambda: BenchConfig(requests=20, warmup=3))
    booster_overrides: dict[str, Any] = field(default_factory=dict)
    max_length: int | None = 64
    latency_repeats: int = 10


def every_kth(split: RawSplit, n: int) -> RawSplit:
    """``n`` examples spread evenly over ``split`` (its class mix kept roughly)."""
    if n <= 0 or n >= len(split.labels):
        return split
    step = len(split.labels) / n
    idx = [int(i * step) for i in range(n)]
    return RawSplit([split.examples[i] for i in idx], [split.labels[i] for i in idx])


def shrink(data: RawDataset, train: int, val: int, test: int) -> RawDataset:
    """A smaller copy of ``data`` (for quick runs and tests); the name records the sizes."""
    return replace(data, name=f"{data.name}-{train}-{val}-{test}", train=every_kth(data.train, train),
                   val=every_kth(data.val, val), test=every_kth(data.test, test))


def run_device_count(out: str | Path, cfg: DeviceCountConfig, *, dataset: RawDataset | None = None,
                     device_sets: dict[str, str] | None = None,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """Calibrate one plan per device set under ``out`` and measure each; returns the JSON-ready document."""
    from coformer.experiments.demo import default_dataset, run_demo
    from coformer.offline.pipeline import encode

    out = Path(out)
    backbone = registry.create("backbone", cfg.backbone)
    data = dataset or default_dataset(backbone.modality)
    quiet = Console(quiet=True)
    options = {"max_length": cfg.max_length} if backbone.modality == "text" and cfg.max_length else {}
    tokeniser = backbone.load(None, **options)  # prepares the timed requests' inputs (labels unused)
    test = encode(backbone, tokeniser, data.test)
    sample = make_sample(test, max(cfg.bench.requests, cfg.bench.warmup, 1), cfg.bench.batch_size)
    rows = []
    for name, devs in (device_sets or DEVICE_SETS).items():
        devices = resolve_devices(devs)
        started = time.perf_counter()
        result = run_demo(backbone_name=cfg.backbone, devices=devs, out=out / name, seed=cfg.seed, dataset=data,
                          max_length=cfg.max_length, layers=cfg.layers, booster_overrides=cfg.booster_overrides,
                          latency_repeats=cfg.latency_repeats, console=quiet)
        seconds = time.perf_counter() - started
        plan = load_plan(result.plan_dir)
        clients = [open_transport(f"{defaults.LOCAL_TRANSPORT}://device-count-{name}-{i}") for i in range(len(devices))]
        try:
            row = device_count_run(plan, clients, devices, sample, cfg.rate_mbps, cfg.bench, shaped=False,
                                   accuracy=result.coformer.accuracy)
        finally:
            for c in clients:
                c.close()
        row.pop("predictions", None)
        row.update({"plan": str(result.plan_dir), "accuracy_source": "test split, read once (demo flow)",
                    "teacher_accuracy": result.teacher.accuracy,
                    "submodel_accuracy": [s.accuracy for s in result.submodels],
                    "specs": result.meta["policy"]["specs"], "build_seconds": round(seconds, 1)})
        log(f"{name}: {devs}: CoFormer {row['accuracy']:.2f}% (teacher {result.teacher.accuracy:.2f}%), "
            f"median {row['latency_ms']['median']:.1f} ms, {row['bytes_per_request'] / 1024:.1f} KB, "
            f"{row['energy_j_estimate']:.3f} J (estimate), built in {seconds:.0f} s")
        rows.append(row)
    return {"device_count": rows, "dataset": data.name, "test_size": len(data.test.labels),
            "config": {"backbone": cfg.backbone, "layers": cfg.layers, "seed": cfg.seed, "rate_mbps": cfg.rate_mbps,
                       "requests": cfg.bench.requests, "warmup": cfg.bench.warmup,
                       "booster_overrides": cfg.booster_overrides, "max_length": cfg.max_length},
            "notes": {"calibrated": "every plan calibrated (boosting + aggregator) by the demo flow; no tuning, "
                                    "so no validation-based choice; test split read once per plan",
                      "link": "modelled: in-process run + payload bytes / rate",
                      "energy": "ESTIMATE: sum over devices of compute time x device profile power (W); idle and "
                                "network power excluded"}}


def markdown(doc: dict[str, Any]) -> str:
    """The device-count table: one row per device set."""
    lines = [f"Data set {doc['dataset']} (test split of {doc['test_size']}), link {doc['config']['rate_mbps']:g} Mb/s "
             f"(modelled), {doc['config']['requests']} requests of one example.", "",
             "| devices | device set | CoFormer accuracy % | sub-models % | teacher % | median ms | p90 ms "
             "| KB/request | energy J/request (estimate) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["device_count"]:
        subs = " / ".join(f"{a:.1f}" for a in r["submodel_accuracy"])
        lines.append(f"| {len(r['devices'])} | {', '.join(r['devices'])} | {r['accuracy']:.2f} | {subs} "
                     f"| {r['teacher_accuracy']:.2f} | {r['latency_ms']['median']:.1f} | {r['latency_ms']['p90']:.1f} "
                     f"| {r['bytes_per_request'] / 1024:.1f} | {r['energy_j_estimate']:.3f} |")
    lines.append("")
    lines += [f"- {k}: {v}" for k, v in doc["notes"].items()]
    return "\n".join(lines) + "\n"
