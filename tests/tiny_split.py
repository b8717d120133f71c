"""Small shared test inputs: a tiny BERT cut into sub-models (worker, recovery, testbed tests) and
linearly separable block images (DeiT flow and pipeline tests)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

import coformer
from coformer.artifacts import submodel_artifact
from coformer.data import RawSplit
from coformer.offline.decompose import proportional_specs
from coformer.heads import StudentHead


def tiny_bert_split(weights: Sequence[float]) -> dict[str, Any]:
    """A tiny BERT (seed 0) decomposed in proportion to ``weights``: the teacher, a batch of 2, the
    sub-models, their artifacts, student heads and an averaging aggregator over them."""
    torch.manual_seed(0)
    backbone = coformer.create_backbone("bert")
    teacher = backbone.tiny(num_labels=3)
    batch = backbone.example_batch(teacher, batch_size=2)
    subs = [s.eval() for s in backbone.decompose(teacher, proportional_specs(backbone.shape(teacher), list(weights)),
                                                 batch=batch)]
    head = backbone.task_head(teacher)
    students = [StudentHead(s.feature_dim, head.cfg["in_dim"], head) for s in subs]
    agg = coformer.create_aggregator("averaging", feature_dims=[s.feature_dim for s in subs],
                                     embed_dim=head.cfg["in_dim"], task_head=head, student_heads=students).eval()
    return {"backbone": backbone, "teacher": teacher, "batch": batch, "subs": subs,
            "arts": [submodel_artifact(s) for s in subs], "agg": agg, "head": head, "students": students}


def block_images(n: int, seed: int) -> RawSplit:
    """``n`` 32×32 grey images of three classes a linear head separates: bright top, bright bottom,
    bright left half."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 32, 32, generator=g) * 0.2
    labels = [i % 3 for i in range(n)]
    for i, y in enumerate(labels):
        region = (slice(0, 16), slice(None)) if y == 0 else (slice(16, 32), slice(None)) if y == 1 else \
            (slice(None), slice(0, 16))
        x[i, 0][region] += 0.8
    return RawSplit(x, labels)
