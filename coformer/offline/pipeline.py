"""The offline flow end to end: teacher → decompose → calibrate → aggregate → measure → package.

Used by ``coformer demo`` and by scripts in ``examples/``; each step is a plain function so
ablations can swap one piece (aggregator, weight rule, policy) and keep the rest.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, cast

import torch
from torch import Tensor, nn

from coformer.cache import cache_dir
from coformer.backbone import Backbone, Batch, SubModel
from coformer.data import RawDataset, RawSplit, TensorDataset
from coformer.heads import ClassifierHead
from coformer.measure import count_flops, count_params


def encode(backbone: Backbone, model: nn.Module, split: RawSplit, batch_size: int = 256) -> TensorDataset:
    """Turn a raw split into model-ready tensors with ``backbone.prepare``."""
    parts: list[Batch] = []
    for start in range(0, len(split.examples), batch_size):
        parts.append(backbone.prepare(model, cast(Sequence[Any], split.examples[start:start + batch_size])))
    inputs = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return TensorDataset(inputs, torch.tensor(split.labels, dtype=torch.long))


@torch.no_grad()
def compute_features(fn: Callable[[Batch], Tensor], data: TensorDataset, batch_size: int = 64,
                     progress: Callable[[int], None] | None = None) -> Tensor:
    """``fn(batch)`` over the whole dataset in order, concatenated (``[M, d]``)."""
    outs = []
    for idx, batch in data.batches(batch_size):
        outs.append(fn(batch).float())
        if progress:
            progress(len(idx))
    return torch.cat(outs)


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in percent."""
    return float((logits.argmax(-1) == labels).float().mean() * 100)


def fit_head(head: nn.Module, features: Tensor, labels: Tensor, *, epochs: int = 300, lr: float = 1e-2,
             weight_decay: float = 1e-4, seed: int = 0) -> nn.Module:
    """Train a task head on frozen features (full-batch AdamW; deterministic given ``seed``)."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    head.train()
    for _ in range(epochs):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(features), labels)
        loss.backward()
        opt.step()
    return head.eval()


#: Part of every cache key. 2: format 1 saved timm teachers with their unfitted head.
TEACHER_CACHE_FORMAT = 2


def _dataset_key(data: RawDataset, extra: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps({"name": data.name, "classes": data.classes, "n": len(data.train.labels),
                                   "format": TEACHER_CACHE_FORMAT, **extra}, sort_keys=True).encode())
    return h.hexdigest()[:12]


@dataclass
class Teacher:
    """A teacher ready for decomposition, with its features on each split computed once."""

    model: nn.Module
    path: Path
    cached: bool
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    train_logits: Tensor
    val_logits: Tensor
    test_logits: Tensor


def prepare_teacher(backbone: Backbone, data: RawDataset, *, source: str | None = None, seed: int = 0,
                    load_options: dict[str, Any] | None = None, cache: Path | None = None,
                    progress: Callable[[str, int, int], None] | None = None) -> Teacher:
    """Load the teacher, fine-tune its task head on ``data`` (cached; reused next time), encode the splits.

    The encoder is kept frozen: the head is fitted on its features. The fine-tuned teacher is
    saved with ``backbone.save`` under the cache directory keyed by backbone, source, options and data.
    ``load_options`` go to ``backbone.load`` (e.g. ``max_length``).
    """
    load_options = dict(load_options or {})
    key = _dataset_key(data, {"backbone": backbone.name, "source": str(source), "seed": seed, **load_options})
    path = (cache or cache_dir()) / "teachers" / f"{backbone.name}-{data.name}-{key}"
    cached = (path / "coformer_teacher.json").exists()
    model = backbone.load(path if cached else source, num_labels=None if cached else len(data.classes),
                          **load_options)
    model.eval()
    head = backbone.task_head(model)
    if not cached:
        model_params = {id(p) for p in model.parameters()}
        if not all(id(p) in model_params for p in head.parameters()):
            raise TypeError(f"backbone {backbone.name!r}: task_head() returned a copy of the teacher's head, so "
                            f"the fitted head would not be saved with the teacher; the plugin must return the "
                            f"model's own head module (or a wrapper around its parameters)")
    splits = {name: encode(backbone, model, getattr(data, name)) for name in ("train", "val", "test")}
    feats = {}
    for name, ds in splits.items():
        done = [0]

        def tick(n: int, _name: str = name, _total: int = len(ds)) -> None:
            done[0] += n
            if progress:
                progress(f"teacher features ({_name})", done[0], _total)

        feats[name] = compute_features(lambda b: backbone.features(model, b), ds, progress=tick)
    if not cached:
        fit_head(head, feats["train"], splits["train"].labels, seed=seed)
        path.mkdir(parents=True, exist_ok=True)
        backbone.save(model, path)
        (path / "coformer_teacher.json").write_text(json.dumps(
            {"backbone": backbone.name, "source": str(source), "dataset": data.name, "classes": data.classes,
             "seed": seed, "val_accuracy": accuracy(head(feats["val"]), splits["val"].labels)}, indent=2))
    with torch.inference_mode():
        logits = {name: head(f) for name, f in feats.items()}
    return Teacher(model, path, cached, splits["train"], splits["val"], splits["test"],
                   logits["train"], logits["val"], logits["test"])


#: The teacher directory's own description, written next to its weights; not part of its hash.
TEACHER_INFO = "coformer_teacher.json"


class TeacherMismatchError(ValueError):
    """A teacher is not the one a plan was calibrated from; the message names both."""


def teacher_sha256(path: str | Path) -> str:
    """sha256 of a saved teacher: every file under ``path`` (relative name and contents) except its info file.

    Weights, task head, config and tokenizer all define the teacher, so all of them count.
    """
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != TEACHER_INFO)
    if not files:
        raise FileNotFoundError(f"{root} holds no files: it is not a saved teacher (Backbone.save writes one)")
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def teacher_record(teacher_path: str | Path, backbone_name: str, dataset: str) -> dict[str, str]:
    """What a plan records about the teacher it was calibrated from (plan.json's ``teacher``)."""
    return {"sha256": teacher_sha256(teacher_path), "dataset": dataset, "backbone": backbone_name,
            "path": str(teacher_path)}


def _describe(record: dict[str, Any]) -> str:
    return f"sha256 {record.get('sha256')} (data set {record.get('dataset')!r}, {record.get('path')})"


def check_teacher(record: dict[str, Any], path: str | Path) -> None:
    """Raise :class:`TeacherMismatchError` unless the teacher saved at ``path`` is the recorded one."""
    actual = teacher_sha256(path)
    if actual != record.get("sha256"):
        info = Path(path) / TEACHER_INFO
        dataset = json.loads(info.read_text()).get("dataset") if info.exists() else "unknown"
        raise TeacherMismatchError(
            f"teacher {path} has sha256 {actual} (data set {dataset!r}), but the plan was calibrated from "
            f"{_describe(record)}; pass that teacher with --teacher, or re-run `coformer demo` with this one")


def find_teacher(record: dict[str, Any], cache: Path | None = None) -> Path:
    """The cached teacher whose hash is the recorded one (the recorded path first, then every cache entry)."""
    candidates = [Path(record["path"])] if record.get("path") else []
    teachers = (cache or cache_dir()) / "teachers"
    if teachers.is_dir():
        candidates += sorted(d for d in teachers.iterdir() if (d / TEACHER_INFO).exists())
    seen = []
    for d in candidates:
        if d.is_dir() and d not in seen:
            seen.append(d)
            if teacher_sha256(d) == record.get("sha256"):
                return d
    raise TeacherMismatchError(
        f"none of the {len(seen)} cached teacher(s) in {teachers} is the one the plan was calibrated from, "
        f"{_describe(record)}; pass it with --teacher DIR, or re-run `coformer demo` to re-create plan and teacher")


def median_latency_ms(fn: Callable[[], Any], *, warmup: int = 3, repeats: int = 20) -> float:
    """Median wall time of ``fn()`` in ms after ``warmup`` calls."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


@dataclass
class Figures:
    """Accuracy, size, FLOPs and latency of one method (what the demo table shows)."""

    name: str
    accuracy: float
    params: int
    flops: float
    latency_ms: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"name": self.name, "accuracy": round(self.accuracy, 2), "params": self.params,
                "flops": self.flops, "latency_ms": round(self.latency_ms, 3), **self.extra}


def submodel_flops(model: SubModel, batch: Batch) -> float:
    """FLOPs of one forward of ``model`` on ``batch``."""
    return float(count_flops(lambda: model(**batch)))


def teacher_figures(backbone: Backbone, teacher: Teacher, one: Batch, repeats: int) -> Figures:
    """Accuracy on the test split, parameters, FLOPs and median latency of the teacher at batch 1."""
    model = teacher.model
    fwd = lambda: backbone.forward_teacher(model, one)  # noqa: E731
    return Figures("teacher", accuracy(teacher.test_logits, teacher.test.labels), count_params(model),
                   float(count_flops(fwd)), median_latency_ms(fwd, repeats=repeats))


def params_of(modules: Sequence[nn.Module]) -> int:
    """Total parameters of several modules."""
    return sum(count_params(m) for m in modules)


@dataclass
class Decomposition:
    """The sliced sub-models of one policy, which teacher units each kept, and their measured costs."""

    policy: Any  # coformer.spec.Policy
    selections: list[Any]  # coformer.spec.UnitSelection per sub-model
    submodels: list[SubModel]
    costs: list[Any]  # coformer.spec.SubModelCost per sub-model


def calibration_importance(backbone: Backbone, teacher: Teacher, calib_size: int = 32) -> Any:
    """The shared unit importance of the teacher on the first ``calib_size`` training examples
    (:func:`coformer.offline.importance.shared_importance`: computed once, cached by content hash)."""
    from coformer.offline.importance import shared_importance

    calib = teacher.train.batch(range(min(calib_size, len(teacher.train))))
    importance, _ = shared_importance(backbone, teacher.model, calib)
    return importance


def decompose_policy(backbone: Backbone, teacher: Teacher, policy: Any, *, calib_size: int = 32,
                     importance: Any = None) -> Decomposition:
    """Check C1–C4 (per teacher layer the specs will run on), score units on a calibration batch
    (or take ``importance``), slice, then check C5/C6 on the real modules."""
    from coformer.assignment import assign_units, layer_maps
    from coformer.measure import measure_cost
    from coformer.spec import validate

    shape = backbone.shape(teacher.model)
    too_deep = any(s.layers > shape.layers for s in policy.specs)
    if shape.uniform_layers or too_deep:  # no importance pass needed to reject these
        validate(policy.specs, shape, policy.devices)
    if importance is None:
        importance = calibration_importance(backbone, teacher, calib_size)
    validate(policy.specs, shape, policy.devices, layer_maps=layer_maps(policy.specs, importance.layers))
    selections = assign_units(shape, policy.specs, importance)
    submodels = [backbone.slice(teacher.model, s) for s in selections]
    one = teacher.test.batch([0])
    costs = [measure_cost(m, one) for m in submodels]
    validate(policy.specs, shape, policy.devices, costs, layer_maps=[s.layers for s in selections])
    return Decomposition(policy, selections, submodels, costs)


def scatter_logits(features: Tensor, channels: Sequence[int], embed_dim: int, head: nn.Module) -> Tensor:
    """Logits of an *uncalibrated* sub-model: its features placed back in the teacher channels it kept
    (zeros elsewhere), through the teacher's own head.

    Features made of several blocks of ``len(channels)`` values (a distilled DeiT's ``[cls, dist]``
    in concat mode) are placed block by block into blocks of ``embed_dim``.
    """
    idx = torch.as_tensor(channels, dtype=torch.long)
    n = idx.numel()
    if features.shape[-1] % n:
        raise ValueError(f"features of width {features.shape[-1]} are not whole blocks of the {n} kept channels")
    blocks = features.shape[-1] // n
    full = features.new_zeros(features.shape[0], blocks * embed_dim)
    for b in range(blocks):
        full[:, b * embed_dim + idx] = features[:, b * n:(b + 1) * n]
    return head(full)
