"""The plan stage (``coformer plan``): search a decomposition policy minimising Ψ = L_val + δ·T.

L_val needs a teacher *with a task head*: a teacher saved with its head (``teacher``) is used as
is; otherwise the teacher is not fine-tuned, so a linear head is fitted on its frozen features of
part of the training split (multinomial logistic regression, full-batch Adam). The validation
task is a fixed subset of the data set's validation split (one split definition for every stage;
``seed`` only picks which examples).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from coformer import defaults, registry
from coformer.backbone import Backbone
from coformer.data import RawDataset, TensorDataset
from coformer.heads import ClassifierHead
from coformer.offline.data_choice import choose_dataset
from coformer.offline.evaluator import Evaluator, Topology
from coformer.offline.importance import IMPORTANCE_SAMPLES, importance_record
from coformer.offline.predictor import LatencyPredictor
from coformer.offline.profiler import reference_input
from coformer.offline.search import SearchResult, TrialRecord
from coformer.plan_document import SEARCHED, write_plan_document
from coformer.spec import resolve_devices


@dataclass(frozen=True)
class PlanSettings:
    """Everything ``coformer plan`` takes, with its defaults; a recipe's ``[search]`` sets the same fields."""

    backbone: str = defaults.BACKBONE
    source: str | None = None
    teacher: str | None = None
    devices: str = ",".join(defaults.DEVICES)
    predictors: str | None = None
    link_mbps: float | None = None
    delta: float = 0.5
    trials: int = 30
    strategy: str = defaults.SEARCH_STRATEGY
    data: str | None = None
    val_docs: int = 64
    train_docs: int = 160
    proxy: str = "probe"
    topology: str = "coordinator"
    max_length: int = 64
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what the recipe runner hashes to decide whether the stage re-runs)."""
        return asdict(self)


def _subset(examples: Sequence[Any], labels: Sequence[int], n: int, seed: int) -> tuple[list[Any], list[int]]:
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
    tx, ty = _subset(list(data.train.examples), list(data.train.labels), n, seed)
    return TensorDataset(backbone.prepare(teacher, tx), torch.tensor(ty))


def validation_task(backbone: Backbone, teacher: nn.Module, *, val_docs: int = 64, train_docs: int = 160,
                    fit_head: bool = True, seed: int = 0,
                    data: RawDataset | None = None) -> tuple[TensorDataset, nn.Module, dict[str, Any]]:
    """A validation subset of ``data`` (default: the modality's default data set) and the head L_val is
    computed with (fitted linear head or the teacher's)."""
    data = data or choose_dataset(None, backbone.modality)  # THE split: ``seed`` only picks which examples
    vx, vy = _subset(list(data.val.examples), list(data.val.labels), val_docs, seed)
    val = TensorDataset(backbone.prepare(teacher, vx), torch.tensor(vy))
    info: dict[str, Any] = {"dataset": data.name, "val_docs": len(vy), "classes": data.classes}
    head: nn.Module
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


def parse_topology(text: str) -> Topology:
    """``coordinator`` or ``device:INDEX`` (the central node is the device at that index of the devices)."""
    if text == "coordinator":
        return Topology()
    kind, _, index = text.partition(":")
    if kind != "device" or not index.isdigit():
        raise ValueError(f"topology {text!r}: use 'coordinator' (a separate node aggregates, as `coformer bench` "
                         f"runs) or 'device:INDEX' (the device at INDEX of the devices aggregates)")
    return Topology("device", int(index))


def load_predictors(directory: str | Path | None) -> dict[str, LatencyPredictor]:
    """Every ``*.json`` latency predictor in ``directory``, keyed by its device name."""
    if not directory:
        return {}
    out = {}
    for f in sorted(Path(directory).glob("*.json")):
        doc = json.loads(f.read_text())
        if doc.get("kind") == "coformer-latency-predictor":
            out[doc["device"]] = LatencyPredictor.load(f)
    if not out:
        raise FileNotFoundError(f"{directory}: no latency predictors (*.json written by `coformer profile --train`)")
    return out


def plot_convergence(result: SearchResult, path: Path) -> None:
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


def run_plan(settings: PlanSettings, out: str | Path, *,
             on_trial: Callable[[TrialRecord], None] | None = None) -> dict[str, Any]:
    """Search a policy with ``settings``; writes ``out/plan.json`` (stage ``searched``) and
    ``out/convergence.png`` and returns the plan document."""
    t0 = time.perf_counter()
    s = settings
    devs = resolve_devices(s.devices)
    topo = parse_topology(s.topology)
    search = registry.create("search", s.strategy, seed=s.seed)
    backbone: Backbone = registry.create("backbone", s.backbone)
    options = {"max_length": s.max_length} if backbone.modality == "text" else {}
    teacher = backbone.load(s.teacher or s.source, **options).eval()
    data = choose_dataset(s.data, backbone.modality)
    val, head, data_info = validation_task(backbone, teacher, val_docs=s.val_docs, train_docs=s.train_docs,
                                           fit_head=s.teacher is None, seed=s.seed, data=data)
    train = training_subset(backbone, teacher, s.train_docs, s.seed, data)
    ev = Evaluator(backbone, teacher, devs, val=val, head=head, predictors=load_predictors(s.predictors),
                   delta=s.delta, link_mbps=s.link_mbps, cost_batch=reference_input(backbone, teacher, data),
                   topology=topo, probe_train=train if s.proxy == "probe" else None, proxy=s.proxy,
                   calib=train.batch(torch.arange(min(len(train), IMPORTANCE_SAMPLES))))
    result = search.search(ev, s.trials, on_trial=on_trial)
    out_dir = Path(out)
    policy = result.best_policy
    policy.meta.update({"strategy": s.strategy, "backbone": s.backbone})
    doc = {
        "policy": policy.to_dict(),
        "predicted": result.best.components(),
        "strategy": s.strategy,
        "backbone": s.backbone,
        "source": s.teacher or s.source,
        "dataset": data.name,
        "delta": s.delta,
        "link_mbps": s.link_mbps,
        "topology": topo.to_dict(),
        "proxy": s.proxy,
        "max_length": s.max_length,
        "importance": importance_record(ev.importance(), ev.importance_key or "",
                                        min(len(train), IMPORTANCE_SAMPLES)),
        "validation": data_info,
        "model_evaluations": ev.model_evaluations,
        "seconds": time.perf_counter() - t0,
        "trials": [t.to_dict() for t in result.trials],
    }
    write_plan_document(out_dir, doc, SEARCHED)
    plot_convergence(result, out_dir / "convergence.png")
    return doc
