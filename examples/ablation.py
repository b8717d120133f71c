"""Ablations on one decomposition (seed Tables III and IV, and missing devices).

One run, one teacher, one policy (sub-models sized in proportion to Nano / TX2 / Orin Nano
compute), then side by side:

* **weight rules** — the booster calibrated once per rule: ``paper`` (eq. 13 exactly as written,
  the weighted loss L_Bo in the exponent), ``seed-unweighted`` (the seed code's rule: unweighted
  loss in the exponent) and ``boost`` (hard samples up-weighted); everything below per rule;
* **components** (Table III) — teacher alone; each sub-model alone, uncalibrated (its features
  placed in the teacher channels it kept, through the teacher's head) and calibrated; CoFormer
  without a trained aggregator (averaging the calibrated sub-models' predictions) and with
  ``mlp_fusion``;
* **aggregators** (Table IV) — every registered aggregator (or ``--aggregators``) on the same
  calibrated sub-models: accuracy and median aggregation latency per request (batch 1);
* **missing devices** — accuracy of every aggregator for every non-empty subset of devices.

Evaluation discipline: every table above is on the **validation** split, and the weight rule is
chosen there — the highest mean ``mlp_fusion`` accuracy over every non-empty subset of devices
(CoFormer's promise is graceful degradation), ties broken by the all-devices accuracy. The test
split is read once, at the end, for the chosen rule's reported figures.

    python examples/ablation.py --out runs/ablation            # BBC News on MiniLM
    python examples/ablation.py --backbone vit --out runs/ablation-vit   # Fashion-MNIST on ViT-S

Writes ``ablation.json`` and ``ablation.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

import coformer
from coformer.offline.booster import WEIGHT_RULES, BoosterConfig, calibrate, submodel_features, train_aggregator
from coformer.data import TensorDataset
from coformer.offline.decompose import proportional_specs
from coformer.heads import head_input_dim
from coformer.experiments.demo import DEFAULT_DEVICES, DEMO_IMG_SIZE, default_dataset
from coformer.offline.calibrate import text_or_image_options
from coformer.offline.pipeline import accuracy, decompose_policy, median_latency_ms, prepare_teacher, scatter_logits
from coformer.spec import Policy, resolve_devices


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="bert")
    p.add_argument("--source", default=None, help="local checkpoint directory (default: embedded model)")
    p.add_argument("--devices", default=",".join(DEFAULT_DEVICES))
    p.add_argument("--max-length", type=int, default=None, help="tokens per text (text backbones)")
    p.add_argument("--img-size", type=int, default=None,
                   help="pixels per side (image backbones; default: the demo's)")
    p.add_argument("--epochs", type=int, default=None, help="calibration epochs per sub-model")
    p.add_argument("--rules", default=",".join(WEIGHT_RULES), help="weight rules to compare")
    p.add_argument("--device-dropout", type=float, default=None, help="aggregator training drop-out per device")
    p.add_argument("--aggregator-epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="calibration learning rate (default: the backbone's)")
    p.add_argument("--lr-schedule", default=None, help="constant or cosine (default: the backbone's)")
    p.add_argument("--feature-weight", type=float, default=None, help="feature distillation weight beta")
    p.add_argument("--aggregators", default=None, help="comma-separated (default: every registered one)")
    p.add_argument("--train-limit", type=int, default=None,
                   help="calibrate on N random training examples only (a quick smoke run; not for reported figures)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/ablation")
    return p.parse_args()


def subsets_of(n: int) -> list[tuple[int, ...]]:
    """Every non-empty subset of ``n`` devices, smallest first."""
    return [s for k in range(1, n + 1) for s in itertools.combinations(range(n), k)]


def train_aggregators(names, submodels, students, feats, labels, hard, task_head, config):
    """Every named aggregator trained on the sub-models' train features (device drop-out as configured)."""
    out = {}
    for name in names:
        agg = coformer.create_aggregator(name, feature_dims=[m.feature_dim for m in submodels],
                                         embed_dim=head_input_dim(task_head), task_head=task_head,
                                         student_heads=students)
        train_aggregator(agg, feats, labels, config=config, teacher_labels=hard, on_progress=False)
        out[name] = agg.eval()
    return out


def aggregator_table(aggs, feats, labels):
    """Accuracy, aggregation latency and every-subset accuracy of each aggregator on one split."""
    subsets = subsets_of(len(feats))
    rows = {}
    for name, agg in aggs.items():
        one = [f[:1] for f in feats]
        with torch.inference_mode():
            acc = accuracy(agg(feats), labels)
            per_subset = {",".join(map(str, s)): accuracy(agg([f if i in s else None for i, f in enumerate(feats)]),
                                                          labels)
                          for s in subsets}
        rows[name] = {"accuracy": acc, "aggregation_ms": median_latency_ms(lambda: agg(one), repeats=200),
                      "params": sum(p.numel() for p in agg.parameters()), "subsets": per_subset,
                      "mean_over_subsets": sum(per_subset.values()) / len(per_subset)}
    return rows


def rule_config(backbone, rule: str, *, seed: int, overrides: dict) -> BoosterConfig:
    """The booster settings for one compared rule: the backbone's ``calibration_defaults`` (as the demo
    uses them), then the command-line overrides, then the rule under comparison."""
    return BoosterConfig.for_backbone(backbone, **{"seed": seed, **overrides, "weight_rule": rule})


def choose_rule(rules: dict) -> str:
    """The rule with the best validation ``mlp_fusion`` mean over device subsets (then all-devices accuracy)."""
    def key(rule: str) -> tuple[float, float]:
        row = rules[rule]["aggregators"]["mlp_fusion"]
        return row["mean_over_subsets"], row["accuracy"]

    return max(rules, key=key)


def input_options(backbone: Any, *, max_length: int | None, img_size: int | None) -> dict[str, Any]:
    """The teacher's input size: ``max_length`` tokens for text (if given), else the demo's pixels per side."""
    return text_or_image_options(backbone, None, max_length=max_length, img_size=img_size or DEMO_IMG_SIZE)


def main() -> None:
    """Run every ablation on validation data, pick the weight rule there, then read the test split once."""
    args = parse_args()
    console = Console()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    backbone = coformer.create_backbone(args.backbone)
    data = default_dataset(backbone.modality)
    options = input_options(backbone, max_length=args.max_length, img_size=args.img_size)
    teacher = prepare_teacher(backbone, data, source=args.source, seed=args.seed, load_options=options)
    if args.train_limit:
        g = torch.Generator().manual_seed(args.seed)  # a random subset: the split is ordered by class
        idx = torch.randperm(len(teacher.train), generator=g)[:args.train_limit]
        teacher = dataclasses.replace(teacher, train=TensorDataset(teacher.train.batch(idx), teacher.train.labels[idx]),
                                      train_logits=teacher.train_logits[idx])
    shape = backbone.shape(teacher.model)
    devices = resolve_devices(args.devices)
    policy = Policy(proportional_specs(shape, [d.gflops for d in devices]), devices)
    parts = decompose_policy(backbone, teacher, policy)
    head = backbone.task_head(teacher.model)
    labels = {"train": teacher.train.labels, "val": teacher.val.labels}
    hard = {"train": teacher.train_logits.argmax(-1)}
    names = args.aggregators.split(",") if args.aggregators else [p.name for p in coformer.list_plugins("aggregator")]
    if "mlp_fusion" not in names:
        names.append("mlp_fusion")  # the rule is chosen on it

    def uncalibrated_on(split: str) -> list[float]:
        feats = submodel_features(parts.submodels, getattr(teacher, split))
        with torch.inference_mode():
            return [accuracy(scatter_logits(f, sel.channels, shape.embed_dim, head), getattr(teacher, split).labels)
                    for f, sel in zip(feats, parts.selections)]

    report = {"backbone": args.backbone, "dataset": data.name, "devices": [d.name for d in devices],
              "policy": policy.to_dict(), "split": "val",
              "teacher_accuracy": accuracy(teacher.val_logits, labels["val"]),
              "uncalibrated": uncalibrated_on("val"), "rules": {}}
    console.print(f"[validation] teacher {report['teacher_accuracy']:.2f}%  uncalibrated sub-models "
                  f"{[round(a, 2) for a in report['uncalibrated']]}")
    overrides = {k: v for k, v in {"epochs": args.epochs, "device_dropout": args.device_dropout,
                                   "aggregator_epochs": args.aggregator_epochs, "lr": args.lr,
                                   "lr_schedule": args.lr_schedule,
                                   "feature_weight": args.feature_weight}.items() if v is not None}
    kept = {}
    for rule in args.rules.split(","):
        config = rule_config(backbone, rule, seed=args.seed, overrides=overrides)
        subs = [copy.deepcopy(m) for m in parts.submodels]
        t0 = time.perf_counter()
        cal = calibrate(backbone, teacher.model, subs, teacher.train, config=config, teacher_labels=hard["train"])
        seconds = time.perf_counter() - t0
        feats = {s: submodel_features(cal.submodels, getattr(teacher, s)) for s in ("train", "val")}
        with torch.inference_mode():
            calibrated = [accuracy(h(f), labels["val"]) for h, f in zip(cal.student_heads, feats["val"])]
        aggs = train_aggregators(names, cal.submodels, cal.student_heads, feats["train"], labels["train"],
                                 hard["train"], head, config)
        kept[rule] = (cal, aggs)
        w = cal.sample_weights[1] if len(cal.sample_weights) > 1 else cal.final_weights  # after one update
        report["rules"][rule] = {"calibrated": calibrated, "calibration_s": seconds, "config": dataclasses.asdict(config),
                                 "aggregators": aggregator_table(aggs, feats["val"], labels["val"]),
                                 "final_loss": cal.final_loss,
                                 "first_update_weight_ratio": float(w.max() / w.min()) if float(w.min()) > 0 else None}
        console.print(f"[{rule}, validation] calibrated {[round(a, 2) for a in calibrated]}  "
                      + "  ".join(f"{k} {v['accuracy']:.2f}%" for k, v in report["rules"][rule]["aggregators"].items()))

    chosen = choose_rule(report["rules"])
    cal, aggs = kept[chosen]
    test = teacher.test
    test_feats = submodel_features(cal.submodels, test)
    with torch.inference_mode():
        report["test"] = {
            "rule": chosen, "teacher_accuracy": accuracy(teacher.test_logits, test.labels),
            "uncalibrated": uncalibrated_on("test"),
            "calibrated": [accuracy(h(f), test.labels) for h, f in zip(cal.student_heads, test_feats)],
            "aggregators": aggregator_table(aggs, test_feats, test.labels)}
    report["seconds"] = time.perf_counter() - started
    (out / "ablation.json").write_text(json.dumps(report, indent=2))
    (out / "ablation.md").write_text(markdown(report))
    console.print(markdown(report))


def markdown(r: dict) -> str:
    """The three tables as markdown."""
    rules = list(r["rules"])
    lines = [f"### Components (Table III) — {r['backbone']} on {r['dataset']}, devices {', '.join(r['devices'])}, "
             f"validation split", "",
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
        lines += ["", f"### Aggregators (Table IV), {rule} rule, validation split", "",
                  "| aggregator | accuracy % | aggregation latency (ms, median, batch 1) | parameters |", "|---|---|---|---|"]
        for name, a in aggs.items():
            lines.append(f"| {name} | {a['accuracy']:.2f} | {a['aggregation_ms']:.3f} | {a['params']:,} |")
        subsets = list(next(iter(aggs.values()))["subsets"])
        names = [f"{{{', '.join(r['devices'][int(i)] for i in s.split(','))}}}" for s in subsets]
        lines += ["", f"### Devices present → accuracy %, {rule} rule, validation split", "",
                  "| aggregator | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for name, a in aggs.items():
            lines.append(f"| {name} | " + " | ".join(f"{a['subsets'][s]:.2f}" for s in subsets) + " |")
    lines += ["", "### Weight rule chosen on validation", "",
              "| rule | mlp_fusion, mean over device subsets % | mlp_fusion, all devices % | max/min sample weight "
              "after the first update |", "|---|---|---|---|"]
    for rule in rules:
        a = r["rules"][rule]["aggregators"]["mlp_fusion"]
        ratio = r["rules"][rule].get("first_update_weight_ratio")
        lines.append(f"| {rule} | {a['mean_over_subsets']:.2f} | {a['accuracy']:.2f} | "
                     f"{'n/a' if ratio is None else f'{ratio:.4g}'} |")
    t = r["test"]
    lines += ["", f"### Test split (read once): {t['rule']} rule", "", "| model | accuracy % |", "|---|---|",
              f"| teacher | {t['teacher_accuracy']:.2f} |"]
    for n, dev in enumerate(r["devices"]):
        lines.append(f"| sub-model {n} ({dev}), uncalibrated | {t['uncalibrated'][n]:.2f} |")
        lines.append(f"| sub-model {n} ({dev}), calibrated | {t['calibrated'][n]:.2f} |")
    for name, a in t["aggregators"].items():
        lines.append(f"| CoFormer ({name}) | {a['accuracy']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
