"""Settings of calibration and aggregator training, and what a calibration run produced."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from torch import Tensor

from coformer.backbone import Backbone, SubModel
from coformer.heads import StudentHead
from coformer.offline.booster.weights import DEPRECATED_WEIGHT_RULES, WEIGHT_RULES, resolve_weight_rule

LR_SCHEDULES = ("constant", "cosine")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")


@dataclass
class BoosterConfig:
    """Settings of calibration and aggregator training.

    ``weight_rule`` picks the sample-weight update (see :func:`~coformer.offline.booster.weights.update_weights`). The default is
    ``"boost"`` (hard samples up-weighted), chosen on measurement: on MiniLM/BBC News with the
    Nano/TX2/Orin Nano split (3 epochs, ``mlp_fusion``), ``"boost"`` gave 95.96% with every
    device and beat the best single sub-model whichever one device was lost (95.06 / 95.96 /
    94.83% vs 93.03%); ``"seed-unweighted"`` (then named ``"seed"``) gave 96.63% with every device but fell to 93.71% — below its
    best sub-model's 94.61% — when the Orin Nano was lost. Graceful degradation is CoFormer's
    promise, so boosting wins (``examples/ablation.py``; tables in BENCHMARKS.md).
    ``lr_schedule`` is "constant" or "cosine" (annealed to 0 over each sub-model's epochs).
    ``feature_weight`` (β, default 0: off) adds the feature distillation term described in
    :mod:`coformer.offline.booster.progressive`. ``device_dropout`` is the probability that each sub-model's features are dropped in an
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
    """What :func:`~coformer.offline.booster.progressive.calibrate` produced.

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
