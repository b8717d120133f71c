"""Batch helpers shared by the backbone families and their block-by-block (baseline) adapters."""

from __future__ import annotations

import torch
from torch import Tensor

from coformer.backbone import Batch

#: The batch key of a vision model's image tensor.
PIXELS = "pixel_values"


def pixels(batch: Batch) -> Tensor:
    """The image tensor of a batch, with a clear error when it is missing."""
    if PIXELS not in batch:
        raise KeyError(f"a vision batch needs {PIXELS!r} (got {sorted(batch)}); build it with backbone.prepare()")
    return batch[PIXELS]


def pool(hidden: Tensor, attention_mask: Tensor | None, how: str) -> Tensor:
    """``hidden [B, T, d]`` → ``[B, d]``: ``"last"`` real token (either padding side) or ``"mean"`` over real tokens."""
    if how == "mean":
        if attention_mask is None:
            return hidden.mean(dim=1)
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
    if how == "last":
        if attention_mask is None:
            return hidden[:, -1]
        pos = torch.arange(hidden.shape[1], device=hidden.device)
        last = (attention_mask.long() * (pos + 1)).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {how!r}; use 'last' or 'mean'")
