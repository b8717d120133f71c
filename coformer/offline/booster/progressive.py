"""Progressive boosting distillation (seed Alg. 1, lines 12–15): the sub-models calibrated in sequence.

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

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from coformer.backbone import Backbone, SubModel
from coformer.data import TensorDataset
from coformer.heads import ClassifierHead, StudentHead, head_input_dim
from coformer.offline.booster.checkpoint import Checkpoint, fingerprint
from coformer.offline.booster.config import BoosterConfig, CalibrationResult
from coformer.offline.booster.training import (Student, device_of, make_accelerator, pair_loss, per_sample_loss,
                                               progress_bar, seeded, sub_seed, teacher_features,
                                               teacher_hard_labels, to_device)
from coformer.offline.booster.weights import update_weights
from coformer.plugins import get_plugin_manager


@dataclass
class _TeacherTargets:
    """What the frozen teacher gives every train sample: hard labels, and features when β > 0."""

    labels: Tensor
    features: Tensor | None
    feature_scale: float  # mean(f_T²): makes β independent of the features' scale


@dataclass
class _Calibrated:
    """One sub-model's calibration: its loss per epoch, mean per-sample loss before and after, ℓ_i after."""

    student: Student
    epochs: list[float]
    initial: float
    per_sample: Tensor


def _classifier_head(backbone: Backbone, teacher: nn.Module) -> ClassifierHead:
    task_head = backbone.task_head(teacher)
    if not isinstance(task_head, ClassifierHead):
        raise TypeError(f"backbone {backbone.name!r} returned a {type(task_head).__name__} task head; "
                        f"calibration needs a coformer.heads.ClassifierHead")
    return task_head


def _teacher_targets(backbone: Backbone, teacher: nn.Module, train: TensorDataset, config: BoosterConfig,
                     accelerator: Any, teacher_labels: Tensor | None) -> _TeacherTargets:
    """The teacher's hard labels (unless given) and, with β > 0, its features, computed once."""
    target_feats: Tensor | None = None
    if teacher_labels is None or config.feature_weight > 0:
        teacher_home = device_of(teacher)
        teacher.to(accelerator.device)
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
    scale = float(target_feats.pow(2).mean().clamp_min(1e-12)) if target_feats is not None else 1.0
    return _TeacherTargets(teacher_labels, target_feats, scale)


class _StudentTrainer:
    """Trains one student after another on the same train set, teacher targets and settings."""

    def __init__(self, train: TensorDataset, targets: _TeacherTargets, config: BoosterConfig, accelerator: Any,
                 prog: Any):
        self.train, self.targets, self.config = train, targets, config
        self.accelerator, self.prog = accelerator, prog
        self.dev = accelerator.device
        self.hook = get_plugin_manager().hook

    def _per_sample_loss(self, student: nn.Module) -> Tensor:
        return per_sample_loss(student, self.train, self.targets.labels, self.config.batch_size, self.accelerator)

    def fit(self, n: int, student: Student, sample_weights: Tensor, gen: torch.Generator) -> _Calibrated:
        """Train sub-model ``n``'s student with ``sample_weights`` (W_n); the caller seeds the RNGs."""
        config, m = self.config, len(self.train)
        student.to(self.dev)
        w_scaled = (sample_weights * m).float()  # mean 1 over the train set (see module docstring)
        initial = float(self._per_sample_loss(student).mean())
        steps_per_epoch = math.ceil(m / config.batch_size)
        opt = torch.optim.AdamW(student.parameters(), lr=config.lr)
        model, opt = self.accelerator.prepare(student, opt)
        sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, config.epochs * steps_per_epoch))
                 if config.lr_schedule == "cosine" else None)
        task = self.prog.add_task(f"calibrate sub-model {n}", total=config.epochs * steps_per_epoch, loss="-")
        model.train()
        epochs: list[float] = []
        step = 0
        for epoch in range(config.epochs):
            total, count = 0.0, 0
            for idx, batch in self.train.batches(config.batch_size, shuffle=True, generator=gen):
                value = self._step(model, opt, sched, idx, batch, w_scaled)
                total += value * len(idx)
                count += len(idx)
                step += 1
                self.prog.update(task, advance=1, loss=f"{value:.4f}")
                self.hook.calibration_step(submodel=n, epoch=epoch, step=step, loss=value)
            epochs.append(total / count)
        student = self.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        student.eval()
        return _Calibrated(student, epochs, initial, self._per_sample_loss(student))

    def _step(self, model: nn.Module, opt: Any, sched: Any, idx: Tensor, batch: dict[str, Tensor],
              w_scaled: Tensor) -> float:
        """One optimiser step on one batch; returns the batch loss."""
        dev, targets = self.dev, self.targets
        with self.accelerator.autocast():
            if targets.features is None:
                logits = model(to_device(batch, dev))
            else:
                projected, logits = model(to_device(batch, dev), with_projection=True)
        per = pair_loss(logits, self.train.labels[idx].to(dev), targets.labels[idx].to(dev))
        loss = (w_scaled[idx].to(dev) * per).mean()
        if targets.features is not None:
            gap = (projected.float() - targets.features[idx].to(dev)).pow(2).mean(dim=-1)
            loss = loss + self.config.feature_weight * gap.mean() / targets.feature_scale
        opt.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        opt.step()
        if sched is not None:
            sched.step()
        return float(loss.detach())


def _initial_weights(ckpt: Checkpoint | None, done: int, m: int) -> list[Tensor]:
    """W_1 (uniform), or W_1..W_{done+1} of a resumed run's finished sub-models."""
    if ckpt is None or not done:
        return [torch.full((m,), 1.0 / m, dtype=torch.float64)]
    saved = ckpt.weights()
    return [saved[f"w_{i}"] for i in range(done + 1)]


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
    task_head = _classifier_head(backbone, teacher)
    embed_dim = head_input_dim(task_head)  # what the student heads project to: the task head's input width
    accelerator = make_accelerator(config)
    targets = _teacher_targets(backbone, teacher, train, config, accelerator, teacher_labels)
    ckpt = (Checkpoint(config.checkpoint_dir, fingerprint(config, train, submodels, targets.labels))
            if config.checkpoint_dir is not None else None)
    done = ckpt.completed if ckpt else 0
    weights = _initial_weights(ckpt, done, len(train))

    heads: list[StudentHead] = []
    history: list[list[float]] = []
    initial: list[float] = []
    final: list[float] = []
    with progress_bar(on_progress) as prog:
        trainer = _StudentTrainer(train, targets, config, accelerator, prog)
        for n, sub in enumerate(submodels):
            home = device_of(sub)
            with seeded(sub_seed(config.seed, "submodel", n), accelerator.device) as gen:
                head = StudentHead(int(sub.feature_dim), embed_dim, task_head)
                student = Student(sub, head)
                if ckpt and n < done:
                    ckpt.restore(n, student)
                    history.append(list(ckpt.state["loss_history"][n]))
                    initial.append(float(ckpt.state["initial_loss"][n]))
                    final.append(float(ckpt.state["final_loss"][n]))
                    heads.append(head.to(home))
                    sub.eval()
                    continue
                fit = trainer.fit(n, student, weights[n], gen)
            history.append(fit.epochs)
            initial.append(fit.initial)
            final.append(float(fit.per_sample.mean()))
            weights.append(update_weights(weights[n], fit.per_sample, config.weight_rule))
            fit.student.to(home)
            heads.append(fit.student.head)
            if ckpt:
                ckpt.save(n, fit.student, weights, targets.labels, fit.epochs, initial[n], final[n])
            trainer.hook.calibration_finished(submodel=n, sample_weights=weights[n + 1])
    accelerator.free_memory()
    return CalibrationResult(list(submodels), heads, weights[:-1], weights[-1], history, initial, final,
                             targets.labels, config.weight_rule, list(range(done)))
