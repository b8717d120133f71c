"""Unit importance computed once per (teacher, calibration data) and shared by search and deployment.

The search scores sub-models whose units were chosen by importance; deployment must slice the
*same* units, or the Ψ in ``plan.json`` describes sub-models that are never deployed. So
importance is computed on one calibration batch (the first ``IMPORTANCE_SAMPLES`` training
samples), cached on disk as JSON keyed by the sha256 of the teacher's weights and the batch,
and stored in the plan; deployment reads it from there.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from coformer.backbone import Backbone, Batch

from coformer.assignment import UnitImportance

#: Training samples importance is scored on (what deployment always used).
IMPORTANCE_SAMPLES = 32


def content_hash(teacher: nn.Module, batch: Batch) -> str:
    """sha256 over the teacher's state (names, shapes, dtypes, bytes) and the calibration batch."""
    h = hashlib.sha256()
    for part in (teacher.state_dict(), batch):
        for name in sorted(part):
            t = part[name].detach().cpu().contiguous()
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _cache_root() -> Path:
    from coformer.cache import cache_dir

    return cache_dir() / "importance"


def shared_importance(backbone: Backbone, teacher: nn.Module, batch: Batch, *,
                      cache: Path | None = None) -> tuple[UnitImportance, str]:
    """``(importance, key)`` for ``teacher`` on ``batch``: read from the cache or computed and cached.

    ``key`` is :func:`content_hash`; the same teacher weights and batch always give the same units.
    """
    key = content_hash(teacher, batch)
    path = (cache or _cache_root()) / f"{backbone.name}-{key[:24]}.json"
    if path.exists():
        doc = json.loads(path.read_text())
        if doc.get("key") == key:
            return UnitImportance.from_dict(doc["importance"]), key
    imp = backbone.importance(teacher, batch)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "backbone": backbone.name, "importance": imp.to_dict()}))
    tmp.replace(path)
    return imp, key


def importance_record(importance: UnitImportance, key: str, samples: int) -> dict[str, Any]:
    """The ``plan.json`` entry deployment reads back with :func:`plan_importance`."""
    return {"key": key, "samples": samples, "scores": importance.to_dict()}


def plan_importance(doc: dict[str, Any]) -> UnitImportance | None:
    """The importance a plan document was searched with, or ``None`` for a plan written before it was stored."""
    rec = doc.get("importance")
    if rec is None:
        return None
    if "scores" not in rec:
        raise ValueError("plan.json 'importance' has no 'scores'; re-run `coformer plan`")
    return UnitImportance.from_dict(rec["scores"])
