"""Helpers shared by the built-in aggregators: input checks, token pooling, head copies."""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor, nn

from coformer.aggregator import Aggregator, Features
from coformer.heads import ClassifierHead, StudentHead


def pool_tokens(x: Tensor) -> Tensor:
    """Mean over tokens for ``[B, T, d]`` features; ``[B, d]`` passes through unchanged."""
    if x.dim() == 3:
        return x.mean(dim=1)
    if x.dim() != 2:
        raise ValueError(f"aggregator features must be [B, d] or [B, T, d], got shape {tuple(x.shape)}")
    return x


def check_features(agg: Aggregator, features: Features) -> list[int]:
    """Validate ``features`` against ``agg.feature_dims``; return the indices of present ones.

    Raises :class:`~coformer.aggregator.MissingFeaturesError` when every entry is ``None`` and
    :class:`ValueError` naming the sub-model when a count, width or batch size does not match.
    """
    if len(features) != len(agg.feature_dims):
        raise ValueError(
            f"{agg.name}: got {len(features)} feature entries but the aggregator was built for "
            f"{len(agg.feature_dims)} sub-models; pass one entry per sub-model (None for a missing device)")
    present = agg.present(features)
    batch = features[present[0]].shape[0]
    for i in present:
        f = features[i]
        if f.shape[-1] != agg.feature_dims[i]:
            raise ValueError(f"{agg.name}: sub-model {i} sent features of width {f.shape[-1]}, "
                             f"expected d_{i} = {agg.feature_dims[i]}")
        if f.shape[0] != batch:
            raise ValueError(f"{agg.name}: sub-model {i} sent batch size {f.shape[0]}, "
                             f"sub-model {present[0]} sent {batch}")
    return present


def as_dtype(module: nn.Module, x: Tensor) -> Tensor:
    """``x`` cast to the dtype/device of ``module``'s first parameter (wire features arrive as fp16)."""
    p = next(module.parameters(), None)
    return x if p is None else x.to(device=p.device, dtype=p.dtype)


def head_copy(task_head: ClassifierHead) -> ClassifierHead:
    """An independent copy of the teacher's task head (trained along with the aggregator)."""
    if not isinstance(task_head, nn.Module):
        raise TypeError(f"task_head must be a ClassifierHead module, got {type(task_head).__name__}")
    return copy.deepcopy(task_head)


def require_student_heads(name: str, student_heads: Sequence[StudentHead] | None,
                          feature_dims: Sequence[int]) -> nn.ModuleList:
    """The student heads as a ModuleList, checked against ``feature_dims``; a clear error if absent."""
    if student_heads is None:
        raise ValueError(
            f"aggregator {name!r} combines each sub-model's own predictions and needs `student_heads` "
            f"(one StudentHead per sub-model, produced by calibration: coformer.offline.booster.calibrate)")
    if len(student_heads) != len(feature_dims):
        raise ValueError(f"aggregator {name!r}: got {len(student_heads)} student heads for "
                         f"{len(feature_dims)} sub-models; pass one per sub-model")
    for i, (h, d) in enumerate(zip(student_heads, feature_dims)):
        if h.proj.in_features != d:
            raise ValueError(f"aggregator {name!r}: student head {i} takes width {h.proj.in_features}, "
                             f"but sub-model {i} has d_{i} = {d}")
    return nn.ModuleList(student_heads)


def student_log_probs(agg: Aggregator, heads: nn.ModuleList, features: Features) -> Tensor:
    """``[k, B, C]`` log-softmax of each present sub-model's own head, in sub-model order."""
    present = check_features(agg, features)
    out = []
    for i in present:
        x = as_dtype(heads[i], pool_tokens(features[i]))
        out.append(torch.log_softmax(heads[i](x), dim=-1))
    return torch.stack(out)
