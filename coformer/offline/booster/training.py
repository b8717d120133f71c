"""Training plumbing shared by sub-model calibration and aggregator training: seeds, accelerator,
progress, the student (sub-model + head), its losses, and feature passes over a data set."""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from coformer.backbone import Backbone, Batch
from coformer.data import TensorDataset
from coformer.heads import StudentHead
from coformer.offline.booster.config import BoosterConfig


def sub_seed(seed: int, *key: Any) -> int:
    """A stable 63-bit seed derived from ``(seed, *key)`` (independent of Python's hash salt)."""
    digest = hashlib.sha256(json.dumps([int(seed), *map(str, key)]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def make_accelerator(config: BoosterConfig) -> Any:
    """An ``accelerate.Accelerator`` on the GPU when there is one, with the configured precision."""
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    mp = config.mixed_precision
    if mp == "auto":
        mp = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if not cuda and mp == "fp16":
        raise ValueError("mixed_precision='fp16' needs a CUDA GPU; use 'no' or 'bf16' on the CPU")
    try:
        return Accelerator(cpu=not cuda, mixed_precision=mp)
    except ValueError as exc:
        # accelerate keeps one process-wide state; a second precision in one process is refused.
        if "already been initialized" not in str(exc):
            raise
        acc = Accelerator(cpu=not cuda)
        warnings.warn(f"accelerate is already set up with mixed_precision={acc.mixed_precision!r} in this "
                      f"process; using it instead of {mp!r}", stacklevel=3)
        return acc


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[torch.Generator]:
    """Seed the global RNGs (dropout) for one stage, restoring the caller's RNG state afterwards."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield torch.Generator().manual_seed(seed)


@contextlib.contextmanager
def progress_bar(enabled: bool) -> Iterator[Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(),
                  disable=not enabled, transient=False) as prog:
        yield prog


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class Student(nn.Module):
    """A sub-model followed by its student head: inputs → logits."""

    def __init__(self, submodel: nn.Module, head: StudentHead):
        super().__init__()
        self.submodel = submodel
        self.head = head

    def forward(self, batch: dict[str, Tensor], with_projection: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Logits, or (features projected to the teacher's width, logits) with ``with_projection``.

        A flag rather than a second method, so calls go through accelerate's wrapper.
        """
        projected = self.head.proj(self.submodel(**batch))
        logits = self.head.head(projected)
        return (projected, logits) if with_projection else logits


def pair_loss(logits: Tensor, labels: Tensor, teacher: Tensor) -> Tensor:
    """Per-sample ½[CE(logits, y) + CE(logits, ŷ)] in float32."""
    logits = logits.float()
    return 0.5 * (F.cross_entropy(logits, labels, reduction="none")
                  + F.cross_entropy(logits, teacher, reduction="none"))


@torch.no_grad()
def per_sample_loss(student: nn.Module, train: TensorDataset, teacher_labels: Tensor,
                     batch_size: int, accelerator: Any) -> Tensor:
    """Unweighted per-sample loss of ``student`` over the train set (eval mode), ``[M]`` float64."""
    was_training = student.training
    student.eval()
    out = torch.empty(len(train), dtype=torch.float64)
    dev = accelerator.device
    for idx, batch in train.batches(batch_size):
        with accelerator.autocast():
            logits = student(to_device(batch, dev))
        out[idx] = pair_loss(logits, train.labels[idx].to(dev), teacher_labels[idx].to(dev)).double().cpu()
    student.train(was_training)
    return out


@torch.no_grad()
def _eval_pass(model: nn.Module, data: TensorDataset, batch_size: int, fn: Callable[[Batch], Tensor]) -> Tensor:
    """``fn`` over ``data`` in order with ``model`` in eval mode (its mode restored after), on the CPU."""
    was_training = model.training
    model.eval()
    dev = device_of(model)
    out = [fn(to_device(b, dev)).cpu() for _, b in data.batches(batch_size)]
    model.train(was_training)
    return torch.cat(out)


def teacher_hard_labels(backbone: Backbone, teacher: nn.Module, data: TensorDataset,
                        batch_size: int = 64) -> Tensor:
    """argmax of the teacher's logits over ``data`` (eval mode, in order), ``[M]`` long."""
    return _eval_pass(teacher, data, batch_size, lambda b: backbone.forward_teacher(teacher, b).argmax(-1))


def teacher_features(backbone: Backbone, teacher: nn.Module, data: TensorDataset, batch_size: int = 64) -> Tensor:
    """The teacher's features over ``data`` (eval mode, in order), float32 ``[M, d]`` on the CPU."""
    return _eval_pass(teacher, data, batch_size, lambda b: backbone.features(teacher, b).float())


def submodel_features(submodels: Sequence[nn.Module], data: TensorDataset, batch_size: int = 64) -> list[Tensor]:
    """Every sub-model's features over ``data`` in order: one float32 ``[M, d_n]`` tensor each (eval mode)."""
    return [_eval_pass(m, data, batch_size, _float_output(m)) for m in submodels]


def _float_output(model: nn.Module) -> Callable[[Batch], Tensor]:
    return lambda batch: model(**batch).float()
