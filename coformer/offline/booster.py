"""Progressive boosting distillation (seed Alg. 1, lines 12–15) and aggregator training.

Sub-models are calibrated one after another. Sub-model n is trained on the train set with
sample weights W_n (W_1 uniform) and the DeiT-style objective (seed eq. 14)

    L_n = ½ · Σ_i w_i · [CE(student_n(x_i), y_i) + CE(student_n(x_i), ŷ_i)]

where ŷ_i is the teacher's hard label (computed once; the teacher is frozen). Each batch
uses the *scaled* weights M·w_i, which average to 1 over the train set whatever the update
rule did, so the loss has the scale of an unweighted mean and one learning rate suits both
rules: batch loss = ½ · mean_b(M·w_b · [CE_y + CE_ŷ]). After sub-model n, its per-sample
loss ℓ_i = ½[CE_y + CE_ŷ] (unweighted, eval mode) updates the weights (seed eq. 13):

- ``"paper"``: w_i ← w_i · exp[(1/M − 1) · w_i·ℓ_i]  — eq. 13 exactly as written: the exponent is
  L_Bo,i, which by eq. 14 carries the sample weight (L_Bo,i = w_i·ℓ_i). With w_i ≈ 1/M the step
  is tiny (max/min weight ratio about 1.004 after one step at M = 1,335);
- ``"seed-unweighted"``: w_i ← w_i · exp[(1/M − 1) · ℓ_i]  — the seed implementation's rule: the
  paper's sign, but the *unweighted* loss in the exponent, so it moves the weights far more and
  *lowers* the weight of samples the previous sub-model found hard. ``"seed"`` is a deprecated
  alias of it;
- ``"boost"``: w_i ← w_i · exp[(1 − 1/M) · ℓ_i]  — the usual boosting intent: hard samples
  gain weight;

both renormalised to sum 1. The student is the sub-model followed by its own
:class:`~coformer.heads.StudentHead` (Linear d_n → d, then a copy of the teacher's head).

With ``BoosterConfig.feature_weight`` β > 0 the batch loss also gets a feature distillation
term, β · mean_b mean_j (P_n f_n(x_b) − f_T(x_b))_j² / mean(f_T²), where P_n is the student
head's projection and f_T the frozen teacher's features (computed once; the normaliser makes β
independent of the features' scale). Hard labels alone carry ~log2(classes) bits per sample;
the teacher's d-dimensional features carry far more. The term is *not* sample-weighted: the
boosting weights steer which samples the classification loss attends to, while every sub-model
should still reproduce the teacher's features everywhere; the weights are updated from the
classification loss ℓ_i alone.

Runs are deterministic given ``BoosterConfig.seed``: sub-model n's shuffling and any
dropout draw from an RNG seeded by (seed, n) alone, so a run resumed from a checkpoint
repeats the uninterrupted one bit for bit. With ``checkpoint_dir`` set, each finished
sub-model is written there (weights and sample weights as safetensors, state as JSON; no
pickle) and a later call with the same settings skips the finished ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from coformer.aggregator import Aggregator, drop_devices
from coformer.backbone import Backbone, Batch, SubModel
from coformer.data import TensorDataset
from coformer.heads import ClassifierHead, StudentHead, head_input_dim
from coformer.plugins import get_plugin_manager

WEIGHT_RULES = ("paper", "seed-unweighted", "boost")
#: Old rule names still accepted (with a DeprecationWarning) and what they mean now.
DEPRECATED_WEIGHT_RULES = {"seed": "seed-unweighted"}
LR_SCHEDULES = ("constant", "cosine")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
CHECKPOINT_FORMAT = 1


# -- sample weights -------------------------------------------------------------------------


def resolve_weight_rule(rule: str) -> str:
    """The current name of weight rule ``rule``: deprecated aliases warn and map to their new name."""
    if rule in DEPRECATED_WEIGHT_RULES:
        new = DEPRECATED_WEIGHT_RULES[rule]
        warnings.warn(f"weight rule {rule!r} is deprecated: it is {new!r} (the unweighted loss in eq. 13's "
                      f"exponent); use {new!r}, or 'paper' for eq. 13 exactly as written", DeprecationWarning,
                      stacklevel=3)
        return new
    if rule not in WEIGHT_RULES:
        raise ValueError(f"unknown weight rule {rule!r}; choose one of {', '.join(WEIGHT_RULES)}")
    return rule


def update_weights(weights: Tensor, losses: Tensor, rule: str = "boost") -> Tensor:
    """One boosting step on sample weights (seed eq. 13), renormalised to sum 1.

    ``losses`` are the unweighted per-sample losses ℓ_i = ½[CE_y + CE_ŷ]; M = ``len(weights)``.
    ``rule="paper"``: w_i·exp[(1/M − 1)·w_i·ℓ_i] (eq. 13 with eq. 14's weighted L_Bo);
    ``rule="seed-unweighted"``: w_i·exp[(1/M − 1)·ℓ_i] (hard samples lose weight fast);
    ``rule="boost"``: w_i·exp[(1 − 1/M)·ℓ_i] (hard samples gain weight). ``"seed"`` is a
    deprecated alias of ``"seed-unweighted"``. Computed in float64 in log space, so large losses
    do not overflow.
    """
    rule = resolve_weight_rule(rule)
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    loss = torch.as_tensor(losses, dtype=torch.float64).flatten().to(w.device)
    if w.shape != loss.shape:
        raise ValueError(f"weights ({w.numel()}) and losses ({loss.numel()}) must have one entry per sample")
    if w.numel() == 0:
        raise ValueError("update_weights needs at least one sample")
    if (w < 0).any() or not torch.isfinite(w).all() or w.sum() <= 0:
        raise ValueError("sample weights must be finite, non-negative and not all zero")
    if not torch.isfinite(loss).all():
        raise ValueError("per-sample losses must be finite (a NaN/inf loss usually means the learning rate "
                         "is too high or mixed precision overflowed)")
    m = w.numel()
    if rule == "boost":
        exponent = (1.0 - 1.0 / m) * loss
    elif rule == "seed-unweighted":
        exponent = (1.0 / m - 1.0) * loss
    else:  # paper: L_Bo,i = w_i·ℓ_i, with the weights as they stand (summing to 1)
        exponent = (1.0 / m - 1.0) * (w / w.sum()) * loss
    logw = torch.log(w) + exponent  # log 0 = -inf keeps zero weights at zero
    logw = logw - logw.max()
    out = torch.exp(logw)
    return out / out.sum()


# -- configuration and results ----------------------------------------------------------------


@dataclass
class BoosterConfig:
    """Settings of calibration and aggregator training.

    ``weight_rule`` picks the sample-weight update (see :func:`update_weights`). The default is
    ``"boost"`` (hard samples up-weighted), chosen on measurement: on MiniLM/BBC News with the
    Nano/TX2/Orin Nano split (3 epochs, ``mlp_fusion``), ``"boost"`` gave 95.96% with every
    device and beat the best single sub-model whichever one device was lost (95.06 / 95.96 /
    94.83% vs 93.03%); ``"seed-unweighted"`` (then named ``"seed"``) gave 96.63% with every device but fell to 93.71% — below its
    best sub-model's 94.61% — when the Orin Nano was lost. Graceful degradation is CoFormer's
    promise, so boosting wins (``examples/ablation.py``; tables in BENCHMARKS.md).
    ``lr_schedule`` is "constant" or "cosine" (annealed to 0 over each sub-model's epochs).
    ``feature_weight`` (β, default 0: off) adds the feature distillation term described in the
    module docstring. ``device_dropout`` is the probability that each sub-model's features are dropped in an
    aggregator training batch; ``mixed_precision`` is "auto" (bf16 on a CUDA GPU that has it,
    otherwise off), "no", "fp16" or "bf16"; ``checkpoint_dir`` enables checkpoint/resume.
    """

    epochs: int = 3
    lr: float = 3e-4
    batch_size: int = 32
    weight_rule: str = "boost"
    seed: int = 0
    aggregator_epochs: int = 30
    aggregator_lr: float = 1e-3
    device_dropout: float = 0.2
    checkpoint_dir: str | Path | None = None
    mixed_precision: str = "auto"
    feature_weight: float = 0.0
    lr_schedule: str = "constant"

    @classmethod
    def for_backbone(cls, backbone: Backbone, **overrides: Any) -> BoosterConfig:
        """The defaults, then ``backbone.calibration_defaults``, then ``overrides`` (the caller's choices)."""
        known = {f.name for f in fields(cls)}
        settings = {**backbone.calibration_defaults, **overrides}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise TypeError(f"unknown BoosterConfig field(s) {', '.join(unknown)} (from backbone "
                            f"{backbone.name!r} or the caller); known: {', '.join(sorted(known))}")
        return cls(**settings)

    def __post_init__(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule {self.lr_schedule!r} is unknown; choose one of {', '.join(LR_SCHEDULES)}")
        if self.weight_rule not in WEIGHT_RULES and self.weight_rule not in DEPRECATED_WEIGHT_RULES:
            raise ValueError(f"weight_rule {self.weight_rule!r} is unknown; choose one of {', '.join(WEIGHT_RULES)}")
        self.weight_rule = resolve_weight_rule(self.weight_rule)
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision {self.mixed_precision!r} is unknown; "
                             f"choose one of {', '.join(MIXED_PRECISION)}")
        for name in ("epochs", "batch_size", "aggregator_epochs"):
            if int(getattr(self, name)) < (0 if "epochs" in name else 1):
                raise ValueError(f"{name} must be {'>= 0' if 'epochs' in name else '>= 1'}, "
                                 f"got {getattr(self, name)}")
        if not self.lr > 0 or not self.aggregator_lr > 0:
            raise ValueError(f"learning rates must be > 0, got lr={self.lr}, aggregator_lr={self.aggregator_lr}")
        if not (self.feature_weight >= 0 and math.isfinite(self.feature_weight)):
            raise ValueError(f"feature_weight must be a finite number >= 0, got {self.feature_weight}")
        if not 0.0 <= self.device_dropout < 1.0:
            raise ValueError(f"device_dropout must be in [0, 1), got {self.device_dropout}")


@dataclass
class CalibrationResult:
    """What :func:`calibrate` produced.

    ``sample_weights[n]`` is W_{n+1}, the weights sub-model n was trained with (W_1 uniform);
    ``final_weights`` the update after the last one. ``loss_history[n]`` holds sub-model n's
    mean weighted training loss per epoch; ``initial_loss``/``final_loss`` its unweighted
    mean per-sample loss on the train set before and after calibration. ``resumed`` lists
    the sub-models loaded from the checkpoint instead of trained.
    """

    submodels: list[SubModel]
    student_heads: list[StudentHead]
    sample_weights: list[Tensor]
    final_weights: Tensor
    loss_history: list[list[float]]
    initial_loss: list[float]
    final_loss: list[float]
    teacher_labels: Tensor
    weight_rule: str
    resumed: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no tensors but the weight statistics)."""
        def stats(w: Tensor) -> dict[str, float]:
            return {"min": float(w.min()), "max": float(w.max()),
                    "effective_samples": float(1.0 / (w ** 2).sum())}

        return {"weight_rule": self.weight_rule, "loss_history": self.loss_history,
                "initial_loss": self.initial_loss, "final_loss": self.final_loss, "resumed": self.resumed,
                "sample_weights": [stats(w) for w in self.sample_weights],
                "final_weights": stats(self.final_weights)}


# -- plumbing -------------------------------------------------------------------------------


def _sub_seed(seed: int, *key: Any) -> int:
    """A stable 63-bit seed derived from ``(seed, *key)`` (independent of Python's hash salt)."""
    digest = hashlib.sha256(json.dumps([int(seed), *map(str, key)]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _accelerator(config: BoosterConfig) -> Any:
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
def _seeded(seed: int, device: torch.device) -> Iterator[torch.Generator]:
    """Seed the global RNGs (dropout) for one stage, restoring the caller's RNG state afterwards."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield torch.Generator().manual_seed(seed)


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(),
                  disable=not enabled, transient=False) as prog:
        yield prog


def _to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class _Student(nn.Module):
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


def _pair_loss(logits: Tensor, labels: Tensor, teacher: Tensor) -> Tensor:
    """Per-sample ½[CE(logits, y) + CE(logits, ŷ)] in float32."""
    logits = logits.float()
    return 0.5 * (F.cross_entropy(logits, labels, reduction="none")
                  + F.cross_entropy(logits, teacher, reduction="none"))


@torch.no_grad()
def _per_sample_loss(student: nn.Module, train: TensorDataset, teacher_labels: Tensor,
                     batch_size: int, accelerator: Any) -> Tensor:
    """Unweighted per-sample loss of ``student`` over the train set (eval mode), ``[M]`` float64."""
    was_training = student.training
    student.eval()
    out = torch.empty(len(train), dtype=torch.float64)
    dev = accelerator.device
    for idx, batch in train.batches(batch_size):
        with accelerator.autocast():
            logits = student(_to(batch, dev))
        out[idx] = _pair_loss(logits, train.labels[idx].to(dev), teacher_labels[idx].to(dev)).double().cpu()
    student.train(was_training)
    return out


@torch.no_grad()
def _eval_pass(model: nn.Module, data: TensorDataset, batch_size: int, fn: Callable[[Batch], Tensor]) -> Tensor:
    """``fn`` over ``data`` in order with ``model`` in eval mode (its mode restored after), on the CPU."""
    was_training = model.training
    model.eval()
    dev = _device_of(model)
    out = [fn(_to(b, dev)).cpu() for _, b in data.batches(batch_size)]
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
    return [_eval_pass(m, data, batch_size, lambda b, m=m: m(**b).float()) for m in submodels]


# -- checkpoints ----------------------------------------------------------------------------


class CheckpointMismatchError(ValueError):
    """A checkpoint directory holds a run with different settings or data."""


def _fingerprint(config: BoosterConfig, train: TensorDataset, submodels: Sequence[nn.Module],
                 teacher_labels: Tensor) -> dict[str, Any]:
    h = hashlib.sha256()
    for key in sorted(train.inputs):
        h.update(key.encode())
        h.update(train.inputs[key].detach().cpu().contiguous().numpy().tobytes())
    h.update(train.labels.cpu().numpy().tobytes())
    h.update(teacher_labels.cpu().long().numpy().tobytes())
    return {"format": CHECKPOINT_FORMAT, "seed": config.seed, "epochs": config.epochs, "lr": config.lr,
            "batch_size": config.batch_size, "weight_rule": config.weight_rule,
            "feature_weight": config.feature_weight, "lr_schedule": config.lr_schedule, "samples": len(train),
            "data_sha256": h.hexdigest(),
            "submodels": [getattr(m, "config", None) or type(m).__name__ for m in submodels]}


def _atomic_save(tensors: dict[str, Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


class _Checkpoint:
    """``state.json`` + ``weights.safetensors`` + ``submodel_<n>.safetensors`` in one directory."""

    def __init__(self, directory: str | Path, fingerprint: dict[str, Any]):
        self.dir = Path(directory)
        self.fingerprint = fingerprint
        self.state: dict[str, Any] = {"fingerprint": fingerprint, "completed": 0, "loss_history": [],
                                      "initial_loss": [], "final_loss": []}
        state_path = self.dir / "state.json"
        if state_path.exists():
            state = json.loads(state_path.read_text())
            if state.get("fingerprint") != fingerprint:
                old = state.get("fingerprint", {})
                diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
                raise CheckpointMismatchError(
                    f"{self.dir} holds a calibration run with different {', '.join(diff)}; "
                    f"use another checkpoint_dir or delete this one to start over")
            self.state = state

    @property
    def completed(self) -> int:
        return int(self.state["completed"])

    def weights(self) -> dict[str, Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.dir / "weights.safetensors"))

    def restore(self, n: int, student: _Student) -> None:
        from safetensors.torch import load_file

        tensors = load_file(str(self.dir / f"submodel_{n}.safetensors"))
        student.load_state_dict(tensors, strict=True)

    def save(self, n: int, student: _Student, weights: list[Tensor], teacher_labels: Tensor,
             history: list[float], initial: float, final: float) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_save(dict(student.state_dict()), self.dir / f"submodel_{n}.safetensors")
        blob = {f"w_{i}": w for i, w in enumerate(weights)}
        blob["teacher_labels"] = teacher_labels
        _atomic_save(blob, self.dir / "weights.safetensors")
        self.state["completed"] = n + 1
        for key, value in (("loss_history", history), ("initial_loss", initial), ("final_loss", final)):
            self.state[key] = self.state[key][:n] + [value]
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self.dir / "state.json")  # written last: marks sub-model n as finished


# -- calibration ----------------------------------------------------------------------------


def calibrate(backbone: Backbone, teacher: nn.Module, submodels: Sequence[SubModel], train: TensorDataset, *,
              config: BoosterConfig | None = None, teacher_labels: Tensor | None = None,
              on_progress: bool = True) -> CalibrationResult:
    """Calibrate ``submodels`` in sequence by progressive boosting distillation (see module docstring).

    ``teacher_labels`` (the teacher's hard labels on ``train``) are computed once if not given.
    Sub-models are trained in place and returned with their student heads on their original
    device. Notification hooks ``calibration_step`` (each optimiser step) and
    ``calibration_finished`` (after each sub-model is trained and checkpointed; not for
    sub-models loaded from a checkpoint) are called through the plugin manager.
    """
    config = config or BoosterConfig()
    if not submodels:
        raise ValueError("calibrate needs at least one sub-model")
    if len(train) == 0:
        raise ValueError("calibrate needs a non-empty training set")
    task_head = backbone.task_head(teacher)
    if not isinstance(task_head, ClassifierHead):
        raise TypeError(f"backbone {backbone.name!r} returned a {type(task_head).__name__} task head; "
                        f"calibration needs a coformer.heads.ClassifierHead")
    embed_dim = head_input_dim(task_head)  # what the student heads project to: the task head's input width
    m = len(train)
    accelerator = _accelerator(config)
    dev = accelerator.device
    hook = get_plugin_manager().hook

    target_feats: Tensor | None = None
    if teacher_labels is None or config.feature_weight > 0:
        teacher_home = _device_of(teacher)
        teacher.to(dev)
        with accelerator.autocast():
            if teacher_labels is None:
                teacher_labels = teacher_hard_labels(backbone, teacher, train, config.batch_size)
            if config.feature_weight > 0:
                target_feats = teacher_features(backbone, teacher, train, config.batch_size)
        teacher.to(teacher_home)
    teacher_labels = torch.as_tensor(teacher_labels, dtype=torch.long).cpu()
    if teacher_labels.shape != train.labels.shape:
        raise ValueError(f"teacher_labels has shape {tuple(teacher_labels.shape)}, "
                         f"expected one label per train sample {tuple(train.labels.shape)}")
    feat_scale = float(target_feats.pow(2).mean().clamp_min(1e-12)) if target_feats is not None else 1.0

    ckpt = (_Checkpoint(config.checkpoint_dir, _fingerprint(config, train, submodels, teacher_labels))
            if config.checkpoint_dir is not None else None)
    done = ckpt.completed if ckpt else 0
    weights = [torch.full((m,), 1.0 / m, dtype=torch.float64)]
    if done:
        saved = ckpt.weights()
        weights = [saved[f"w_{i}"] for i in range(done + 1)]

    heads: list[StudentHead] = []
    history: list[list[float]] = []
    initial: list[float] = []
    final: list[float] = []
    steps_per_epoch = math.ceil(m / config.batch_size)
    with _progress(on_progress) as prog:
        for n, sub in enumerate(submodels):
            home = _device_of(sub)
            with _seeded(_sub_seed(config.seed, "submodel", n), dev) as gen:
                head = StudentHead(int(sub.feature_dim), embed_dim, task_head)
                student = _Student(sub, head)
                if n < done:
                    ckpt.restore(n, student)
                    history.append(list(ckpt.state["loss_history"][n]))
                    initial.append(float(ckpt.state["initial_loss"][n]))
                    final.append(float(ckpt.state["final_loss"][n]))
                    heads.append(head.to(home))
                    sub.eval()
                    continue
                student.to(dev)
                w_scaled = (weights[n] * m).float()  # mean 1 over the train set (see module docstring)
                initial.append(float(_per_sample_loss(student, train, teacher_labels, config.batch_size,
                                                      accelerator).mean()))
                opt = torch.optim.AdamW(student.parameters(), lr=config.lr)
                student, opt = accelerator.prepare(student, opt)
                sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, config.epochs * steps_per_epoch))
                         if config.lr_schedule == "cosine" else None)
                task = prog.add_task(f"calibrate sub-model {n}", total=config.epochs * steps_per_epoch, loss="-")
                student.train()
                epochs: list[float] = []
                step = 0
                for epoch in range(config.epochs):
                    total, count = 0.0, 0
                    for idx, batch in train.batches(config.batch_size, shuffle=True, generator=gen):
                        with accelerator.autocast():
                            if target_feats is None:
                                logits = student(_to(batch, dev))
                            else:
                                projected, logits = student(_to(batch, dev), with_projection=True)
                        per = _pair_loss(logits, train.labels[idx].to(dev), teacher_labels[idx].to(dev))
                        loss = (w_scaled[idx].to(dev) * per).mean()
                        if target_feats is not None:
                            gap = (projected.float() - target_feats[idx].to(dev)).pow(2).mean(dim=-1)
                            loss = loss + config.feature_weight * gap.mean() / feat_scale
                        opt.zero_grad(set_to_none=True)
                        accelerator.backward(loss)
                        opt.step()
                        if sched is not None:
                            sched.step()
                        value = float(loss.detach())
                        total += value * len(idx)
                        count += len(idx)
                        step += 1
                        prog.update(task, advance=1, loss=f"{value:.4f}")
                        hook.calibration_step(submodel=n, epoch=epoch, step=step, loss=value)
                    epochs.append(total / count)
                student = accelerator.unwrap_model(student, keep_fp32_wrapper=False)
                student.eval()
                per_sample = _per_sample_loss(student, train, teacher_labels, config.batch_size, accelerator)
            history.append(epochs)
            final.append(float(per_sample.mean()))
            weights.append(update_weights(weights[n], per_sample, config.weight_rule))
            student.to(home)
            heads.append(student.head)
            if ckpt:
                ckpt.save(n, student, weights, teacher_labels, epochs, initial[n], final[n])
            hook.calibration_finished(submodel=n, sample_weights=weights[n + 1])
    accelerator.free_memory()
    return CalibrationResult(list(submodels), heads, weights[:-1], weights[-1], history, initial, final,
                             teacher_labels, config.weight_rule, list(range(done)))


# -- aggregator training --------------------------------------------------------------------


def train_aggregator(aggregator: Aggregator, features: Sequence[Tensor], labels: Tensor, *,
                     config: BoosterConfig | None = None, teacher_labels: Tensor | None = None,
                     on_progress: bool = True) -> list[float]:
    """Train a trainable aggregator on precomputed features ``[M, d_n]`` with random device drop-out.

    Each batch drops every sub-model's features with probability ``config.device_dropout``
    (never all; :func:`coformer.aggregator.drop_devices`) so the aggregator learns to answer
    from any subset. Loss: CE with ``labels``, or ½[CE(y) + CE(teacher's hard label)] when
    ``teacher_labels`` is given. Returns the mean loss per epoch; an aggregator whose
    ``trainable`` is False is returned untouched (empty list).
    """
    config = config or BoosterConfig()
    if not aggregator.trainable:
        return []
    if len(features) != len(aggregator.feature_dims):
        raise ValueError(f"got features of {len(features)} sub-models, the aggregator takes "
                         f"{len(aggregator.feature_dims)}")
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    m = labels.shape[0]
    for i, f in enumerate(features):
        if f.shape[0] != m:
            raise ValueError(f"sub-model {i} has features for {f.shape[0]} samples, labels have {m}")
    if teacher_labels is not None:
        teacher_labels = torch.as_tensor(teacher_labels, dtype=torch.long).cpu()
        if teacher_labels.shape != labels.shape:
            raise ValueError("teacher_labels must have one entry per sample, like labels")
    accelerator = _accelerator(config)
    dev = accelerator.device
    home = _device_of(aggregator)
    feats = [f.detach().float().cpu() for f in features]
    losses: list[float] = []
    with _seeded(_sub_seed(config.seed, "aggregator"), dev) as gen, _progress(on_progress) as prog:
        model = aggregator.to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=config.aggregator_lr)
        model, opt = accelerator.prepare(model, opt)
        model.train()
        task = prog.add_task("train aggregator", total=config.aggregator_epochs, loss="-")
        for _ in range(config.aggregator_epochs):
            total = 0.0
            order = torch.randperm(m, generator=gen)
            for start in range(0, m, config.batch_size):
                idx = order[start:start + config.batch_size]
                batch = drop_devices([f[idx].to(dev) for f in feats], config.device_dropout, generator=gen)
                with accelerator.autocast():
                    logits = model(batch).float()
                y = labels[idx].to(dev)
                loss = F.cross_entropy(logits, y)
                if teacher_labels is not None:
                    loss = 0.5 * (loss + F.cross_entropy(logits, teacher_labels[idx].to(dev)))
                opt.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                opt.step()
                total += float(loss.detach()) * len(idx)
            losses.append(total / m)
            prog.update(task, advance=1, loss=f"{losses[-1]:.4f}")
        model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    model.to(home).eval()
    accelerator.free_memory()
    return losses


__all__ = ["BoosterConfig", "CalibrationResult", "CheckpointMismatchError", "DEPRECATED_WEIGHT_RULES", "LR_SCHEDULES",
           "WEIGHT_RULES", "calibrate", "resolve_weight_rule",
           "submodel_features", "teacher_features", "teacher_hard_labels", "train_aggregator", "update_weights"]
