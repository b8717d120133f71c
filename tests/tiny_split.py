"""Small shared test inputs: a tiny BERT cut into sub-models (worker, recovery, testbed tests),
linearly separable block images (DeiT flow and pipeline tests), and a tiny BERT checkpoint with a
three-topic CSV (a user's own model and data: stage-flow and recipe tests)."""

from __future__ import annotations

import csv
from pathlib import Path
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


TOPICS = {"sport": "the team scored a late goal and won the match at the stadium",
          "business": "shares in the bank fell as markets reacted to the profit warning",
          "film": "the actor won an award for the film and the director thanked the cast"}


def write_topic_csv(path: Path, per_class: int = 30) -> str:
    """A header row and ``per_class`` rotated sentences per topic; returns its csv: data set URI."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["body", "topic"])
        for i in range(per_class):
            for topic, text in TOPICS.items():
                words = text.split()
                w.writerow([" ".join(words[i % len(words):] + words[: i % len(words)]), topic])
    return f"csv:{path}?text=body&label=topic"


def tiny_text_project(root: Path) -> dict[str, str]:
    """A tiny BERT checkpoint (``root/ckpt``, 3 labels) and a topic CSV (``root/news.csv``): their
    paths as ``ckpt`` and the CSV's data set URI as ``data``."""
    backbone = coformer.create_backbone("bert")
    ckpt = str(backbone.save(backbone.tiny(num_labels=3, seed=1), root / "ckpt"))
    return {"ckpt": ckpt, "data": write_topic_csv(root / "news.csv")}
