"""``coformer profile`` and ``coformer plan``: measure devices, then search a decomposition policy.

``plan`` needs a teacher *with a task head* for the accuracy proxy L_val. ``--teacher DIR`` takes
one saved by ``Backbone.save`` (e.g. a fine-tuned teacher); otherwise the teacher is not
fine-tuned, so a linear head is fitted on its frozen features of part of the training split
(multinomial logistic regression, full-batch Adam) and used as "the teacher's head". Validation
data: BBC News' validation split (a fixed subset, ``--val-docs``) for text backbones.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import click
import torch
from torch import nn

from coformer import defaults
from coformer.backbone import Backbone
from coformer.cli.app import DATA_HELP, cli, console
from coformer.data import RawDataset, TensorDataset
from coformer.offline.data_choice import choose_dataset
from coformer.heads import ClassifierHead
from coformer.offline.profiler import reference_input


def _subset(examples: Sequence[Any], labels: Sequence[int], n: int, seed: int) -> tuple[list, list[int]]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(labels), generator=g)[:n].tolist()
    return [examples[i] for i in idx], [labels[i] for i in idx]


@torch.no_grad()
def _features(backbone: Backbone, teacher: nn.Module, data: TensorDataset, batch_size: int = 16) -> torch.Tensor:
    return torch.cat([backbone.features(teacher, b) for _, b in data.batches(batch_size)])


def fit_linear_head(features: torch.Tensor, labels: torch.Tensor, num_labels: int, *, steps: int = 300,
                    lr: float = 0.05, weight_decay: float = 1e-4, seed: int = 0) -> ClassifierHead:
    """A linear :class:`ClassifierHead` fitted on frozen features (logistic regression)."""
    torch.manual_seed(seed)
    head = ClassifierHead(features.shape[1], num_labels)
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(head(features), labels).backward()
        opt.step()
    return head.eval()


def training_subset(backbone: Backbone, teacher: nn.Module, n: int, seed: int = 0,
                    data: RawDataset | None = None) -> TensorDataset:
    """``n`` labelled training examples of ``data`` (default: the modality's default data set; a random subset
    chosen by ``seed`` from the one fixed split), prepared by the teacher."""
    data = data or choose_dataset(None, backbone.modality)
    tx, ty = _subset(data.train.examples, data.train.labels, n, seed)
    return TensorDataset(backbone.prepare(teacher, tx), torch.tensor(ty))


def validation_task(backbone: Backbone, teacher: nn.Module, *, val_docs: int = 64, train_docs: int = 160,
                    fit_head: bool = True, seed: int = 0,
                    data: RawDataset | None = None) -> tuple[TensorDataset, nn.Module, dict[str, Any]]:
    """A validation subset of ``data`` (default: the modality's default data set) and the head L_val is
    computed with (fitted linear head or the teacher's)."""
    data = data or choose_dataset(None, backbone.modality)  # THE split: ``seed`` only picks which examples
    vx, vy = _subset(data.val.examples, data.val.labels, val_docs, seed)
    val = TensorDataset(backbone.prepare(teacher, vx), torch.tensor(vy))
    info: dict[str, Any] = {"dataset": data.name, "val_docs": len(vy), "classes": data.classes}
    if not fit_head:
        head = backbone.task_head(teacher)
        info["head"] = "teacher"
    else:
        train = training_subset(backbone, teacher, train_docs, seed, data)
        head = fit_linear_head(_features(backbone, teacher, train), train.labels, len(data.classes), seed=seed)
        with torch.no_grad():
            acc = float((head(_features(backbone, teacher, val)).argmax(1) == val.labels).float().mean())
        info.update({"head": f"linear head fitted on frozen teacher features of {train_docs} training docs",
                     "teacher_val_accuracy": acc})
    return val, head, info


def parse_topology(text: str) -> Any:
    """``coordinator`` or ``device:INDEX`` (the central node is the device at that index of --devices)."""
    from coformer.offline.evaluator import Topology

    if text == "coordinator":
        return Topology()
    kind, _, index = text.partition(":")
    if kind != "device" or not index.isdigit():
        raise click.BadParameter(f"{text!r}: use 'coordinator' (a separate node aggregates, as `coformer bench` "
                                 f"runs) or 'device:INDEX' (the device at INDEX of --devices aggregates)",
                                 param_hint="--topology")
    return Topology("device", int(index))


def load_predictors(spec: str | None) -> dict[str, Any]:
    """``--predictors DIR``: every ``*.json`` latency predictor in DIR, keyed by its device name."""
    from coformer.offline.predictor import LatencyPredictor

    if not spec:
        return {}
    out = {}
    for f in sorted(Path(spec).glob("*.json")):
        doc = json.loads(f.read_text())
        if doc.get("kind") == "coformer-latency-predictor":
            out[doc["device"]] = LatencyPredictor.load(f)
    if not out:
        raise click.UsageError(f"{spec}: no latency predictors (*.json written by `coformer profile --train`)")
    return out


@cli.command("profile")
@click.option("--backbone", "backbone_name", default=defaults.BACKBONE, show_default=True)
@click.option("--source", default=None, help="Teacher directory (default: the embedded model; 'tiny' for a test model).")
@click.option("--device-name", required=True, help="Name this profile (and its predictor) is stored under.")
@click.option("--cpu-quota", type=float, default=None, help="Measure in a cgroup limited to this many cores (root).")
@click.option("--worker", "worker_uri", default=None,
              help="Measure on a remote worker, by the URI `coformer worker` printed.")
@click.option("--threads", type=int, default=None, help="Torch threads for a local measurement.")
@click.option("--shapes", type=int, default=50, show_default=True, help="How many sub-model shapes.")
@click.option("--repeats", type=int, default=5, show_default=True)
@click.option("--warmup", type=int, default=2, show_default=True)
@click.option("--statistic", type=click.Choice(["median", "min"]), default="median", show_default=True)
@click.option("--train/--no-train", default=True, show_default=True,
              help="Also train the latency predictor and report held-out error.")
@click.option("--max-length", type=int, default=64, show_default=True,
              help="Tokens per text input (the demo, plan and bench use 64).")
@click.option("--data", "data_uri", default=None, help=DATA_HELP + " Its first validation example is the "
              "reference input.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Profile file (.json; a .csv is written too).")
def profile_cmd(backbone_name: str, source: str | None, device_name: str, cpu_quota: float | None,
                worker_uri: str | None, threads: int | None, shapes: int, repeats: int, warmup: int, statistic: str,
                train: bool, max_length: int, data_uri: str | None, seed: int, out: str) -> None:
    """Measure the latency of a pool of sub-model shapes on one device; optionally train its predictor."""
    import coformer
    from coformer.offline.predictor import train_and_score
    from coformer.offline.profiler import (load_teacher, profile_cpu_quota, profile_local, profile_remote,
                                   sample_shapes)

    if cpu_quota is not None and worker_uri is not None:
        raise click.UsageError("--cpu-quota and --worker are exclusive: a quota applies to this host only")
    backbone = coformer.create_backbone(backbone_name)
    teacher = load_teacher(backbone, source, **({"max_length": max_length} if backbone.modality == "text" else {}))
    specs = sample_shapes(backbone.shape(teacher), shapes, seed)
    batch = reference_input(backbone, teacher, choose_dataset(data_uri, backbone.modality) if data_uri else None)
    if cpu_quota is not None:
        prof = profile_cpu_quota(backbone_name, source, specs, cpu_quota, device=device_name, warmup=warmup,
                                 repeats=repeats, batch=batch, progress=True, statistic=statistic)
    elif worker_uri is not None:
        prof = profile_remote(backbone, teacher, specs, worker_uri, device=device_name, warmup=warmup,
                              repeats=repeats, batch=batch, progress=True, statistic=statistic)
    else:
        prof = profile_local(backbone, teacher, specs, device=device_name, threads=threads, warmup=warmup,
                             repeats=repeats, batch=batch, progress=True, statistic=statistic)
    js, cs = prof.save(out)
    console.print(f"profile of {len(prof.records)} shapes on {device_name!r}: {js} and {cs}")
    if train:
        pred, report = train_and_score(prof.records, device_name, seed=seed)
        path = pred.save(Path(js).with_name(f"{device_name}-predictor"))
        Path(js).with_name(f"{device_name}-predictor-report.json").write_text(json.dumps(
            {"device": device_name, "profile": str(js), **report}, indent=2))
        p, b = report["predictor"], report["flops_baseline"]
        console.print(f"predictor {path}: held-out ({report['held_out_shapes']} shapes) RMSE {p['rmse_ms']:.3f} ms, "
                      f"MAPE {p['mape_pct']:.1f}%; FLOPs-proportional baseline RMSE {b['rmse_ms']:.3f} ms, "
                      f"MAPE {b['mape_pct']:.1f}%")


def plot_convergence(result: Any, path: Path) -> None:
    """Best Ψ after each evaluated trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = result.best_so_far()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(range(1, len(curve) + 1), curve, marker="o", ms=3)
    ax.set_xlabel("evaluated trial")
    ax.set_ylabel("best Ψ = L_val + δ·T")
    ax.set_title(f"{result.strategy}: convergence")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@cli.command("plan")
@click.option("--backbone", "backbone_name", default=defaults.BACKBONE, show_default=True)
@click.option("--source", default=None, help="Teacher directory (default: the embedded model).")
@click.option("--teacher", "teacher_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="A teacher saved with its task head (Backbone.save); otherwise a linear head is fitted.")
@click.option("--devices", default="jetson-nano,jetson-tx2,orin-nano", show_default=True,
              help="Built-in device names, comma-separated, or a .toml/.json file of device profiles.")
@click.option("--predictors", "predictor_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Directory of latency predictors (by device name); others use FLOPs / GFLOPS estimates.")
@click.option("--link-mbps", type=float, default=None, help="Link rate for every device (default: each device's).")
@click.option("--delta", type=float, default=0.5, show_default=True, help="δ in Ψ = L_val + δ·T (T in ms).")
@click.option("--trials", type=int, default=30, show_default=True, help="Evaluated (feasible) policies.")
@click.option("--strategy", default=defaults.SEARCH_STRATEGY, show_default=True)
@click.option("--data", "data_uri", default=None, help=DATA_HELP + " Its validation split is L_val's task.")
@click.option("--val-docs", type=int, default=64, show_default=True)
@click.option("--train-docs", type=int, default=160, show_default=True,
              help="Training docs the probe proxy (and the fitted linear head) is fitted on.")
@click.option("--proxy", type=click.Choice(["probe", "uncalibrated"]), default="probe", show_default=True,
              help="L_val: linear probe on the sub-models' features, or the seed's uncalibrated-slice CE.")
@click.option("--topology", default="coordinator", show_default=True,
              help="'coordinator' (a separate node aggregates, as the runtime and bench run) or 'device:INDEX'.")
@click.option("--max-length", type=int, default=64, show_default=True,
              help="Tokens per text (the demo and bench use 64).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False))
def plan_cmd(backbone_name: str, source: str | None, teacher_dir: str | None, devices: str,
             predictor_dir: str | None, link_mbps: float | None, delta: float, trials: int, strategy: str,
             data_uri: str | None, val_docs: int, train_docs: int, proxy: str, topology: str, max_length: int, seed: int,
             out: str) -> None:
    """Search a decomposition policy minimising Ψ; writes OUT/plan.json and OUT/convergence.png."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    import coformer
    from coformer.offline.evaluator import Evaluator
    from coformer.offline.importance import IMPORTANCE_SAMPLES, importance_record
    from coformer.plan_document import SEARCHED, write_plan_document
    from coformer.spec import resolve_devices

    t0 = time.perf_counter()
    devs = resolve_devices(devices)
    topo = parse_topology(topology)
    search = coformer.create_search_strategy(strategy, seed=seed)
    backbone = coformer.create_backbone(backbone_name)
    options = {"max_length": max_length} if backbone.modality == "text" else {}
    teacher = backbone.load(teacher_dir or source, **options).eval()
    data = choose_dataset(data_uri, backbone.modality)
    val, head, data_info = validation_task(backbone, teacher, val_docs=val_docs, train_docs=train_docs,
                                           fit_head=teacher_dir is None, seed=seed, data=data)
    train = training_subset(backbone, teacher, train_docs, seed, data)
    ev = Evaluator(backbone, teacher, devs, val=val, head=head, predictors=load_predictors(predictor_dir),
                   delta=delta, link_mbps=link_mbps, cost_batch=reference_input(backbone, teacher, data),
                   topology=topo, probe_train=train if proxy == "probe" else None, proxy=proxy,
                   calib=train.batch(torch.arange(min(len(train), IMPORTANCE_SAMPLES))))
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("best Ψ {task.fields[best]}"), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task(f"plan ({strategy})", total=trials, best="-")
        best = [float("inf")]

        def on_trial(rec: Any) -> None:
            if rec.feasible:
                best[0] = min(best[0], rec.psi)
                bar.update(task, advance=1, best=f"{best[0]:.4f}")

        result = search.search(ev, trials, on_trial=on_trial)
    out_dir = Path(out)
    policy = result.best_policy
    policy.meta.update({"strategy": strategy, "backbone": backbone_name})
    doc = {
        "policy": policy.to_dict(),
        "predicted": result.best.components(),
        "strategy": strategy,
        "backbone": backbone_name,
        "source": teacher_dir or source,
        "dataset": data.name,
        "delta": delta,
        "link_mbps": link_mbps,
        "topology": topo.to_dict(),
        "proxy": proxy,
        "max_length": max_length,
        "importance": importance_record(ev.importance(), ev.importance_key or "",
                                        min(len(train), IMPORTANCE_SAMPLES)),
        "validation": data_info,
        "model_evaluations": ev.model_evaluations,
        "seconds": time.perf_counter() - t0,
        "trials": [t.to_dict() for t in result.trials],
    }
    write_plan_document(out_dir, doc, SEARCHED)
    plot_convergence(result, out_dir / "convergence.png")
    comp = result.best.components()
    console.print(f"best Ψ {comp['psi']:.4f} = L_val {comp['L_val']:.4f} + {delta}·T {comp['T_ms']:.3f} ms "
                  f"after {ev.model_evaluations} evaluations ({len(result.trials)} proposals)")
    for d in comp["devices"]:
        console.print(f"  [{d['index']}] {d['name']}: t1 {d['t1_ms']:.3f} ms ({d['t1_source']}), t2 {d['t2_ms']:.4f} ms, "
                      f"L_val {d['L_val']:.4f}, {d['gflops']:.3f} GFLOPs")
    console.print(f"wrote {out_dir / 'plan.json'} and {out_dir / 'convergence.png'}")
