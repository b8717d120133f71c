"""One split definition: a search or training seed never moves a document between validation and test."""

from __future__ import annotations

from typing import Any

import pytest

import coformer
from coformer.offline.plan_stage import validation_task
from coformer.data import SPLIT_SEED
from coformer_datasets.bbc_news import load_bbc_news
from coformer.experiments.demo import default_dataset


@pytest.mark.parametrize("seed", [0, 1, 7, 123])
def test_plan_validation_docs_never_overlap_the_demo_test_docs(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    backbone = coformer.create_backbone("bert")
    teacher = backbone.tiny(num_labels=5, seed=0)
    seen: list[Any] = []
    real_prepare = backbone.prepare

    def recording_prepare(model: Any, examples: list[Any]) -> Any:
        seen.extend(examples)
        return real_prepare(model, examples)

    monkeypatch.setattr(backbone, "prepare", recording_prepare)
    validation_task(backbone, teacher, val_docs=64, fit_head=False, seed=seed)
    demo = default_dataset("text")
    # BBC News holds a few verbatim duplicate articles, so documents are compared as "is it one of
    # the demo's validation documents" and "is it a document only the demo's test split has"
    test_only = set(demo.test.examples) - set(demo.val.examples) - set(demo.train.examples)
    assert len(seen) == 64
    assert set(seen) <= set(demo.val.examples)
    assert not set(seen) & test_only


def test_every_loader_uses_the_one_split() -> None:
    assert SPLIT_SEED == 0
    a, b = load_bbc_news(), default_dataset("text")
    assert a.test.examples == b.test.examples and a.val.labels == b.val.labels
