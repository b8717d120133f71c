"""Ablations on one decomposition (seed Tables III and IV, and missing devices).

One run, one teacher, one policy (sub-models sized in proportion to Nano / TX2 / Orin Nano
compute), then side by side:

* **weight rules** — the booster calibrated once with the seed's update rule and once with the
  boosting rule (hard samples up-weighted); everything below is reported for both;
* **components** (Table III) — teacher alone; each sub-model alone, uncalibrated (its features
  placed in the teacher channels it kept, through the teacher's head) and calibrated; CoFormer
  without a trained aggregator (averaging the calibrated sub-models' predictions) and with
  ``mlp_fusion``;
* **aggregators** (Table IV) — every registered aggregator (or ``--aggregators``) on the same
  calibrated sub-models: test accuracy and median aggregation latency per request (batch 1);
* **missing devices** — accuracy of every aggregator for every non-empty subset of devices.

    python examples/ablation.py --out runs/ablation            # BBC News on MiniLM
    python examples/ablation.py --backbone vit --out runs/ablation-vit   # Fashion-MNIST on ViT-S

Writes ``ablation.json`` and ``ablation.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import time
from pathlib import Path

import torch
from rich.console import Console

import coformer
from coformer.booster import BoosterConfig, calibrate, submodel_features, train_aggregator
from coformer.decompose import proportional_specs
from coformer.demo import DEFAULT_DEVICES, default_dataset
from coformer.pipeline import accuracy, decompose_policy, median_latency_ms, prepare_teacher, scatter_logits
from coformer.spec import Policy, resolve_devices


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="bert")
    p.add_argument("--source", default=None, help="local checkpoint directory (default: embedded model)")
    p.add_argument("--devices", default=",".join(DEFAULT_DEVICES))
    p.add_argument("--max-length", type=int, default=None, help="tokens per text (text backbones)")
    p.add_argument("--epochs", type=int, default=None, help="calibration epochs per sub-model")
    p.add_argument("--rules", default="boost,seed", help="weight rules to compare")
    p.add_argument("--device-dropout", type=float, default=None, help="aggregator training drop-out per device")
    p.add_argument("--aggregator-epochs", type=int, default=None)
    p.add_argument("--aggregator-data", choices=["train", "val"], default="train",
                   help="split whose sub-model features train the aggregators")
    p.add_argument("--aggregators", default=None, help="comma-separated (default: every registered one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/ablation")
    return p.parse_args()


def aggregator_table(names, submodels, students, feats, labels, hard, shape, task_head, config, fit="train"):
    """Accuracy, aggregation latency and every-subset accuracy for each aggregator."""
    n = len(submodels)
    subsets = [s for k in range(1, n + 1) for s in itertools.combinations(range(n), k)]
    rows = {}
    for name in names:
        agg = coformer.create_aggregator(name, feature_dims=[m.feature_dim for m in submodels],
                                         embed_dim=shape.embed_dim, task_head=task_head, student_heads=students)
        train_aggregator(agg, feats[fit], labels[fit], config=config, teacher_labels=hard[fit], on_progress=False)
        agg.eval()
        one = [f[:1] for f in feats["test"]]
        with torch.inference_mode():
            acc = accuracy(agg(feats["test"]), labels["test"])
            per_subset = {
                ",".join(map(str, s)): accuracy(agg([f if i in s else None for i, f in enumerate(feats["test"])]),
                                                labels["test"])
                for s in subsets
            }
        rows[name] = {"accuracy": acc, "aggregation_ms": median_latency_ms(lambda: agg(one), repeats=200),
                      "params": sum(p.numel() for p in agg.parameters()), "subsets": per_subset}
    return rows


def main() -> None:
    """Run every ablation and write JSON + markdown."""
    args = parse_args()
    console = Console()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    backbone = coformer.create_backbone(args.backbone)
    data = default_dataset(backbone.modality)
    options = {"max_length": args.max_length} if args.max_length else None
    teacher = prepare_teacher(backbone, data, source=args.source, seed=args.seed, load_options=options)
    shape = backbone.shape(teacher.model)
    devices = resolve_devices(args.devices)
    policy = Policy(proportional_specs(shape, [d.gflops for d in devices]), devices)
    parts = decompose_policy(backbone, teacher, policy)
    head = backbone.task_head(teacher.model)
    labels = {"train": teacher.train.labels, "test": teacher.test.labels}
    hard = {"train": teacher.train_logits.argmax(-1), "val": teacher.val_logits.argmax(-1)}
    labels["val"] = teacher.val.labels
    names = args.aggregators.split(",") if args.aggregators else [p.name for p in coformer.list_plugins("aggregator")]

    teacher_acc = accuracy(teacher.test_logits, labels["test"])
    uncal = submodel_features(parts.submodels, teacher.test)
    with torch.inference_mode():
        uncalibrated = [accuracy(scatter_logits(f, sel.channels, shape.embed_dim, head), labels["test"])
                        for f, sel in zip(uncal, parts.selections)]
    console.print(f"teacher {teacher_acc:.2f}%  uncalibrated sub-models {[round(a, 2) for a in uncalibrated]}")

    report = {"backbone": args.backbone, "dataset": data.name, "devices": [d.name for d in devices],
              "policy": policy.to_dict(), "teacher_accuracy": teacher_acc, "uncalibrated": uncalibrated, "rules": {}}
    for rule in args.rules.split(","):
        overrides = {k: v for k, v in {"epochs": args.epochs, "device_dropout": args.device_dropout,
                                       "aggregator_epochs": args.aggregator_epochs}.items() if v is not None}
        config = BoosterConfig(seed=args.seed, weight_rule=rule, **overrides)
        subs = [copy.deepcopy(m) for m in parts.submodels]
        t0 = time.perf_counter()
        cal = calibrate(backbone, teacher.model, subs, teacher.train, config=config, teacher_labels=hard["train"])
        seconds = time.perf_counter() - t0
        feats = {s: submodel_features(cal.submodels, getattr(teacher, s)) for s in ("train", "val", "test")}
        with torch.inference_mode():
            calibrated = [accuracy(h(f), labels["test"]) for h, f in zip(cal.student_heads, feats["test"])]
        aggs = aggregator_table(names, cal.submodels, cal.student_heads, feats, labels, hard, shape, head, config,
                                args.aggregator_data)
        report["rules"][rule] = {"calibrated": calibrated, "calibration_s": seconds, "aggregators": aggs,
                                 "final_loss": cal.final_loss}
        console.print(f"[{rule}] calibrated {[round(a, 2) for a in calibrated]}  "
                      + "  ".join(f"{k} {v['accuracy']:.2f}%" for k, v in aggs.items()))
    report["seconds"] = time.perf_counter() - started
    (out / "ablation.json").write_text(json.dumps(report, indent=2))
    (out / "ablation.md").write_text(markdown(report))
    console.print(markdown(report))


def markdown(r: dict) -> str:
    """The three tables as markdown."""
    rules = list(r["rules"])
    lines = [f"### Components (Table III) — {r['backbone']} on {r['dataset']}, devices {', '.join(r['devices'])}", "",
             "| model | " + " | ".join(f"accuracy % ({rule} rule)" for rule in rules) + " |",
             "|---|" + "---|" * len(rules)]
    lines.append("| teacher | " + " | ".join(f"{r['teacher_accuracy']:.2f}" for _ in rules) + " |")
    for n, dev in enumerate(r["devices"]):
        lines.append(f"| sub-model {n} ({dev}), uncalibrated | "
                     + " | ".join(f"{r['uncalibrated'][n]:.2f}" for _ in rules) + " |")
        lines.append(f"| sub-model {n} ({dev}), calibrated | "
                     + " | ".join(f"{r['rules'][rule]['calibrated'][n]:.2f}" for rule in rules) + " |")
    for label, agg in (("CoFormer without aggregator (averaging)", "averaging"), ("CoFormer (mlp_fusion)", "mlp_fusion")):
        if all(agg in r["rules"][rule]["aggregators"] for rule in rules):
            lines.append(f"| {label} | "
                         + " | ".join(f"{r['rules'][rule]['aggregators'][agg]['accuracy']:.2f}" for rule in rules) + " |")
    for rule in rules:
        aggs = r["rules"][rule]["aggregators"]
        lines += ["", f"### Aggregators (Table IV), {rule} rule", "",
                  "| aggregator | accuracy % | aggregation latency (ms, median, batch 1) | parameters |", "|---|---|---|---|"]
        for name, a in aggs.items():
            lines.append(f"| {name} | {a['accuracy']:.2f} | {a['aggregation_ms']:.3f} | {a['params']:,} |")
        subsets = list(next(iter(aggs.values()))["subsets"])
        names = [f"{{{', '.join(r['devices'][int(i)] for i in s.split(','))}}}" for s in subsets]
        lines += ["", f"### Devices present → accuracy %, {rule} rule", "",
                  "| aggregator | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for name, a in aggs.items():
            lines.append(f"| {name} | " + " | ".join(f"{a['subsets'][s]:.2f}" for s in subsets) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
