"""Does the search's accuracy proxy rank policies the way calibrated accuracy does?

For ``--policies`` random feasible policies (MiniLM ``bert``, BBC News unless ``--data`` names
another data set, the Nano / TX2 / Orin Nano devices) this computes

* the probe proxy L_val (``coformer.offline.evaluator``, ``proxy="probe"``): a linear probe on the
  concatenated features of the sliced, uncalibrated sub-models, fitted on ``--probe-docs``
  training documents and scored on ``--val-docs`` validation documents;
* the seed's proxy (``proxy="uncalibrated"``) on the same documents, for comparison;
* CoFormer's validation accuracy after calibration (progressive boosting distillation, then the
  aggregator), on the whole validation split, deploying the same units (shared importance);

and reports the Spearman rank correlation of −L_val with calibrated accuracy. Only the
train and validation splits are read. Example (the full measurement, minutes per policy)::

    nice .venv/bin/python examples/proxy_correlation.py --policies 10 --out runs/proxy

``--quick`` shrinks every size for a smoke test (seconds per policy; its ρ means nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Any, Sequence

import torch


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def sample_policies(evaluator: Any, encoding: Any, n: int, seed: int) -> list[Any]:
    """``n`` distinct feasible policies drawn uniformly from the search space."""
    rng = random.Random(seed)
    out, seen = [], set()
    for _ in range(200 * n):
        policy = encoding.policy(encoding.sample(rng))
        key = tuple(s for s in policy.specs)
        if key in seen or evaluator.check(policy):
            continue
        seen.add(key)
        out.append(policy)
        if len(out) == n:
            break
    return out


def spread_policies(evaluator: Any, encoding: Any, n: int, seed: int, pool: int = 20) -> list[Any]:
    """``n`` feasible policies at evenly spaced quantiles of total FLOPs, from ``pool * n`` random ones.

    Uniform draws have similar total sizes (a sum of uniforms), so their calibrated accuracies
    differ by a few validation documents; a search meets small and large policies alike."""
    candidates = sample_policies(evaluator, encoding, pool * n, seed)
    candidates.sort(key=lambda p: sum(evaluator.cost(s).flops for s in p.specs))
    step = (len(candidates) - 1) / max(1, n - 1)
    return [candidates[round(i * step)] for i in range(min(n, len(candidates)))]


def calibrated_accuracy(backbone: Any, teacher: Any, policy: Any, importance: Any, config: Any,
                        train: Any, train_labels: Any, aggregator_name: str) -> float:
    """CoFormer's validation accuracy (%) after calibrating ``policy`` on ``train``."""
    from coformer import registry
    from coformer.offline.booster import calibrate, submodel_features, train_aggregator
    from coformer.offline.pipeline import accuracy, decompose_policy

    parts = decompose_policy(backbone, teacher, policy, importance=importance)
    result = calibrate(backbone, teacher.model, parts.submodels, train, config=config, teacher_labels=train_labels,
                       on_progress=False)
    f_train = submodel_features(result.submodels, train)
    f_val = submodel_features(result.submodels, teacher.val)
    aggregator = registry.create("aggregator", aggregator_name, feature_dims=[m.feature_dim for m in result.submodels],
                                 embed_dim=backbone.shape(teacher.model).embed_dim,
                                 task_head=backbone.task_head(teacher.model), student_heads=result.student_heads)
    train_aggregator(aggregator, f_train, train.labels, config=config, teacher_labels=train_labels)
    aggregator.eval()
    with torch.inference_mode():
        return accuracy(aggregator(f_val), teacher.val.labels)


def main() -> None:
    """Measure and write ``OUT/proxy_correlation.json`` (rewritten after every policy)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", type=int, default=10)
    ap.add_argument("--probe-docs", type=int, default=160, help="training docs the probe is fitted on")
    ap.add_argument("--val-docs", type=int, default=64, help="validation docs the proxy is scored on")
    ap.add_argument("--calib-docs", type=int, default=0, help="training docs for calibration (0: all)")
    ap.add_argument("--epochs", type=int, default=None, help="calibration epochs (default: the backbone's)")
    ap.add_argument("--aggregator", default="mlp_fusion")
    ap.add_argument("--data", default="bbc_news",
                    help="data set name or URI, e.g. 'wordnet_supersense?train_size=1500&val_size=500&test_size=500'")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--devices", default="jetson-nano,jetson-tx2,orin-nano")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib-seeds", type=int, default=1,
                    help="calibrate each policy with this many seeds and rank by the mean accuracy (the "
                         "reference's own noise shrinks; the spread between seeds is reported)")
    ap.add_argument("--spread", action="store_true",
                    help="policies at evenly spaced quantiles of total FLOPs instead of uniform draws")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test")
    ap.add_argument("--resume", action="store_true",
                    help="keep the policies already in OUT/proxy_correlation.json and measure the rest")
    ap.add_argument("--out", default="proxy-correlation")
    args = ap.parse_args()
    if args.calib_seeds < 1:
        ap.error(f"--calib-seeds must be at least 1 (got {args.calib_seeds})")
    if args.quick:
        args.probe_docs, args.val_docs, args.calib_docs = 40, 24, 60
        args.epochs = 1 if args.epochs is None else args.epochs
    torch.set_num_threads(args.threads)

    import coformer
    from coformer.offline.booster import BoosterConfig
    from coformer.data import TensorDataset
    from coformer.offline.evaluator import Evaluator
    from coformer.offline.importance import IMPORTANCE_SAMPLES, shared_importance
    from coformer.offline.pipeline import prepare_teacher
    from coformer.offline.profiler import reference_input
    from coformer.offline.search import PolicyEncoding
    from coformer.spec import resolve_devices

    started = time.perf_counter()
    backbone = coformer.create_backbone("bert")
    data = coformer.load_dataset(args.data)
    teacher = prepare_teacher(backbone, data, seed=args.seed, load_options={"max_length": args.max_length})
    if args.quick:
        keep = torch.arange(min(len(teacher.val), 60))
        teacher.val = TensorDataset(teacher.val.batch(keep), teacher.val.labels[keep])
    g = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(len(teacher.train), generator=g)
    probe_idx = perm[: args.probe_docs]
    probe = TensorDataset(teacher.train.batch(probe_idx), teacher.train.labels[probe_idx])
    val_idx = torch.randperm(len(teacher.val), generator=g)[: args.val_docs]
    val = TensorDataset(teacher.val.batch(val_idx), teacher.val.labels[val_idx])
    calib_train = teacher.train
    hard = teacher.train_logits.argmax(-1)
    if args.calib_docs:
        idx = perm[: args.calib_docs]
        calib_train, hard = TensorDataset(teacher.train.batch(idx), teacher.train.labels[idx]), hard[idx]
    # the importance deployment uses (first training samples), shared with the evaluators
    importance, key = shared_importance(backbone, teacher.model,
                                        teacher.train.batch(range(min(IMPORTANCE_SAMPLES, len(teacher.train)))))
    devices = resolve_devices(args.devices)
    common = dict(val=val, importance=importance, cost_batch=reference_input(backbone, teacher.model))
    probe_ev = Evaluator(backbone, teacher.model, devices, probe_train=probe, proxy="probe", **common)
    seed_ev = Evaluator(backbone, teacher.model, devices, proxy="uncalibrated", **common)
    encoding = PolicyEncoding(backbone.shape(teacher.model), tuple(devices))
    policies = (spread_policies if args.spread else sample_policies)(probe_ev, encoding, args.policies, args.seed)
    overrides = {"seed": args.seed, **({"epochs": args.epochs} if args.epochs is not None else {})}
    config = BoosterConfig.for_backbone(backbone, **overrides)

    rows: list[dict[str, Any]] = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = out / "proxy_correlation.json"
    if args.resume and previous.exists():
        rows = json.loads(previous.read_text())["rows"]
        done = [[s.to_dict() for s in p.specs] for p in policies[: len(rows)]]
        if done != [r["policy"] for r in rows]:
            raise SystemExit(f"{previous} holds other policies (other --seed or --devices?); drop --resume")
    for i, policy in enumerate(policies):
        if i < len(rows):
            continue
        t0 = time.perf_counter()
        probe_L = probe_ev.submodel_losses(policy.specs)[0]
        t_probe = time.perf_counter() - t0
        seed_L = seed_ev.submodel_losses(policy.specs)[0]
        t1 = time.perf_counter()
        per_seed = [calibrated_accuracy(backbone, teacher, policy, importance,
                                        dataclasses.replace(config, seed=args.seed + k), calib_train, hard,
                                        args.aggregator) for k in range(args.calib_seeds)]
        acc = sum(per_seed) / len(per_seed)
        rows.append({"policy": [s.to_dict() for s in policy.specs], "probe_L_val": probe_L,
                     "total_flops": sum(probe_ev.cost(s).flops for s in policy.specs),
                     "uncalibrated_L_val": seed_L, "calibrated_val_accuracy": acc,
                     "calibrated_val_accuracy_per_seed": per_seed,
                     "probe_seconds": t_probe, "calibration_seconds": time.perf_counter() - t1})
        print(f"[{i + 1}/{len(policies)}] layers {[s.layers for s in policy.specs]} "
              f"dims {[s.embed_dim for s in policy.specs]}: probe L_val {probe_L:.4f}, uncalibrated L_val "
              f"{seed_L:.4f}, calibrated val acc {acc:.2f}% (seeds: {', '.join(f'{a:.2f}' for a in per_seed)}; "
              f"{t_probe:.1f} s probe, "
              f"{time.perf_counter() - t1:.0f} s calibration)", flush=True)
        accs = [r["calibrated_val_accuracy"] for r in rows]
        summary = {
            "command": "examples/proxy_correlation.py " + " ".join(
                f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
                for k, v in vars(args).items() if v is not False and v is not None),
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "importance_key": key, "calibration": {"epochs": config.epochs, "train_docs": len(calib_train),
                                                   "seeds": args.calib_seeds,
                                                   "aggregator": args.aggregator, "val_docs": len(teacher.val)},
            "policies": len(rows),
            "spearman_probe": spearman([-r["probe_L_val"] for r in rows], accs) if len(rows) > 2 else None,
            "spearman_uncalibrated": spearman([-r["uncalibrated_L_val"] for r in rows], accs)
            if len(rows) > 2 else None,
            "seconds": time.perf_counter() - started,
            "rows": rows,
        }
        (out / "proxy_correlation.json").write_text(json.dumps(summary, indent=2))
    print(f"Spearman rho (−L_val vs calibrated validation accuracy, {len(rows)} policies): "
          f"probe {summary['spearman_probe']:.3f}, uncalibrated {summary['spearman_uncalibrated']:.3f}")


if __name__ == "__main__":
    main()
