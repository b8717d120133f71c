"""The interface an aggregator plugin implements: fuse any non-empty subset of sub-model features."""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor, nn

from coformer.heads import ClassifierHead, StudentHead

Features = Sequence[Tensor | None]


class MissingFeaturesError(ValueError):
    """Every sub-model's features are missing: there is nothing to aggregate."""


class Aggregator(nn.Module):
    """Base class: ``forward(features)`` → logits, where ``features[n]`` is ``[B, d_n]`` or ``None``.

    ``None`` marks a device that did not answer; an aggregator must still answer from the
    rest. Constructed by its registered factory with keyword arguments ``feature_dims``
    (``d_n`` per sub-model), ``embed_dim`` (the teacher's ``d``), ``task_head`` (the teacher's
    :class:`~coformer.heads.ClassifierHead`) and ``student_heads`` (one
    :class:`~coformer.heads.StudentHead` per sub-model, from calibration).
    """

    name: ClassVar[str] = "aggregator"
    #: Whether calibration should train this aggregator's parameters on sub-model features.
    trainable: ClassVar[bool] = True

    def __init__(self, feature_dims: Sequence[int], embed_dim: int, task_head: ClassifierHead,
                 student_heads: Sequence[StudentHead] | None = None, **options: Any):
        super().__init__()
        self.feature_dims = [int(d) for d in feature_dims]
        self.embed_dim = int(embed_dim)
        self.options = dict(options)

    @property
    def config(self) -> dict[str, Any]:
        """JSON data that, with the task and student head configs, rebuilds this aggregator."""
        return {"name": self.name, "feature_dims": self.feature_dims, "embed_dim": self.embed_dim,
                "options": self.options}

    @staticmethod
    def present(features: Features) -> list[int]:
        """Indices of the sub-models whose features arrived; raises if none did."""
        idx = [i for i, f in enumerate(features) if f is not None]
        if not idx:
            raise MissingFeaturesError("no sub-model features arrived; at least one device must answer")
        return idx

    @staticmethod
    def batch_size(features: Features) -> int:
        """Batch size of the first present feature tensor."""
        return next(f for f in features if f is not None).shape[0]

    def forward(self, features: Features) -> Tensor:  # pragma: no cover - abstract
        """Logits ``[B, num_labels]`` from the present features."""
        raise NotImplementedError


def drop_devices(features: Sequence[Tensor], p: float, generator: torch.Generator | None = None) -> list[Tensor | None]:
    """Randomly replace whole sub-models' features by ``None`` (never all of them), for training."""
    n = len(features)
    keep = torch.rand(n, generator=generator) >= p
    if not keep.any():
        keep[torch.randint(n, (1,), generator=generator)] = True
    return [f if k else None for f, k in zip(features, keep.tolist())]
