"""Per-request bounds a worker enforces before compute: batch size, tokens or pixels per example, input bytes.

The bounds come from two places: the worker's flags (:class:`RequestLimits`) and the sub-model's
own limits (:func:`model_input_limits`: its position table and vocabulary). A sub-model may
declare its own with an ``input_limits()`` method returning ``{"max_tokens", "vocab_size",
"max_pixels"}``; otherwise the conventional config keys are read.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from coformer.backbone import Batch
from coformer.transport import BadRequestError


_TOKEN_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class RequestTooLargeError(BadRequestError):
    """A request exceeds a worker limit; it was refused before compute."""


@dataclass(frozen=True)
class RequestLimits:
    """A worker's per-request limits (``coformer worker --max-batch/--max-tokens/--max-pixels/--max-input-mb``)."""

    max_batch: int = 64
    max_tokens: int = 512
    max_pixels: int = 1024 * 1024
    max_input_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def to_dict(self) -> dict[str, int]:
        """JSON-ready form (what a worker reports in ``info``)."""
        return asdict(self)


def model_input_limits(model: nn.Module) -> dict[str, int | None]:
    """The sub-model's own bounds: longest sequence, vocabulary size, largest image (``None`` = none known)."""
    declared = getattr(model, "input_limits", None)
    if callable(declared):
        return {"max_tokens": None, "vocab_size": None, "max_pixels": None, **declared()}
    config = getattr(model, "config", None)
    config = config if isinstance(config, dict) else {}

    def positive(*keys: str) -> int | None:
        for key in keys:
            value = config.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    return {"max_tokens": positive("max_position_embeddings", "max_positions"),
            "vocab_size": positive("vocab_size"), "max_pixels": None}


def forward_inputs(model: nn.Module) -> tuple[set[str], set[str], bool]:
    """Names ``model.forward`` takes: (required, optional, accepts extra keywords)."""
    required, optional, extra = set(), set(), False
    for p in inspect.signature(model.forward).parameters.values():
        if p.kind is p.VAR_KEYWORD:
            extra = True
        elif p.kind is p.VAR_POSITIONAL:
            continue
        elif p.default is p.empty:
            required.add(p.name)
        else:
            optional.add(p.name)
    return required, optional, extra


def check_batch(batch: Batch, model: nn.Module, limits: RequestLimits) -> int:
    """Refuse, before compute, a batch the model cannot take or the worker will not; returns the batch size."""
    if not batch:
        raise BadRequestError("input batch is empty; send the model's named input tensors")
    required, optional, extra = forward_inputs(model)
    missing = sorted(required - set(batch))
    if missing:
        raise BadRequestError(f"input batch lacks {missing}; the sub-model takes {sorted(required | optional)}")
    unknown = sorted(set(batch) - required - optional)
    if unknown and not extra:
        raise BadRequestError(f"input batch has unexpected keys {unknown}; the sub-model takes "
                              f"{sorted(required | optional)}")
    own = model_input_limits(model)
    scalars = {k: v for k, v in batch.items() if v.dim() == 0}  # control values, e.g. a tensor shard's layer
    bad = sorted(k for k, v in scalars.items() if v.dtype not in _TOKEN_DTYPES)
    if bad:
        raise BadRequestError(f"{bad}: a scalar input must be an integer control value")
    sizes = {k: v.shape[0] for k, v in batch.items() if v.dim()}
    if len(set(sizes.values())) != 1:
        raise BadRequestError(f"every input needs the same leading batch dimension; got {sizes}")
    b = next(iter(sizes.values()))
    if b < 1:
        raise BadRequestError("input batch has no examples")
    if b > limits.max_batch:
        raise RequestTooLargeError(f"batch of {b} examples is over this worker's limit of {limits.max_batch}; "
                                   f"split it (the coordinator does) or raise --max-batch")
    for key, t in batch.items():
        if key in scalars:
            continue
        if key.endswith("_ids") and t.dtype not in _TOKEN_DTYPES:
            raise BadRequestError(f"{key}: token ids must be integer, got {t.dtype}")
        if t.is_floating_point() and t.dim() == 4:
            pixels = t.shape[2] * t.shape[3]
            cap = min(limits.max_pixels, own["max_pixels"] or limits.max_pixels)
            if pixels > cap:
                raise RequestTooLargeError(f"{key}: {t.shape[2]}x{t.shape[3]} = {pixels} pixels per example is over "
                                           f"the limit of {cap}")
        elif t.is_floating_point() and t.dim() in (2, 3):  # a float mask, or hidden states [B, T, d]
            cap = min(limits.max_tokens, own["max_tokens"] or limits.max_tokens)
            if t.shape[1] > cap:
                raise RequestTooLargeError(f"{key}: {t.shape[1]} tokens per example is over the limit of {cap}")
        elif not t.is_floating_point() and not t.is_complex():
            if t.dim() != 2:
                raise BadRequestError(f"{key}: token inputs must be [batch, tokens], got rank {t.dim()}")
            if t.dtype not in _TOKEN_DTYPES:
                raise BadRequestError(f"{key}: token inputs must be integer, got {t.dtype}")
            cap = min(limits.max_tokens, own["max_tokens"] or limits.max_tokens)
            if t.shape[1] > cap:
                raise RequestTooLargeError(f"{key}: {t.shape[1]} tokens per example is over the limit of {cap} "
                                           f"(the sub-model's positions and --max-tokens)")
            if t.numel() and key == "input_ids":
                lo, hi = int(t.min()), int(t.max())
                vocab = own["vocab_size"]
                if lo < 0 or (vocab is not None and hi >= vocab):
                    raise BadRequestError(f"{key}: token ids must lie in [0, {vocab if vocab else 'vocab'}); "
                                          f"got {lo}..{hi}")
        else:
            raise BadRequestError(f"{key}: unsupported input of dtype {t.dtype} and rank {t.dim()}")
    return b


def rows_per_request(batch: Batch, limits: list[dict[str, Any]]) -> int:
    """The most examples of ``batch`` one request may carry under every worker's reported limits."""
    per_example = max(1, sum(v.element_size() * math.prod(v.shape[1:]) for v in batch.values()))
    rows: list[int] = []
    for lim in limits:
        if not lim:
            continue
        by_bytes = max(1, (int(lim.get("max_input_bytes", 0)) - 4096) // per_example) if lim.get(
            "max_input_bytes") else None
        rows.extend(r for r in (lim.get("max_batch"), by_bytes) if r)
    return max(1, min(rows)) if rows else 1 << 62
