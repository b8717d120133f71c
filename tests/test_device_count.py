"""The device-count table (Table V) with accuracy: every row a calibrated plan, timed, with bytes and energy."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

from coformer.data import RawDataset, RawSplit
from coformer.experiments.device_count import DEVICE_SETS, shrink

ROOT = Path(__file__).resolve().parents[1]


def test_shrink_spreads_the_kept_examples_over_each_split() -> None:
    split = RawSplit([f"t{i}" for i in range(10)], [i // 5 for i in range(10)])  # two classes, in order
    data = RawDataset("toy", ["a", "b"], split, split, split)
    small = shrink(data, 4, 2, 10)
    assert small.train.examples == ["t0", "t2", "t5", "t7"] and small.train.labels == [0, 0, 1, 1]
    assert small.val.labels == [0, 1] and small.test is split  # asking for everything keeps the split
    assert small.name == "toy-4-2-10"  # a different data set name: a different cached teacher


@pytest.mark.slow
def test_quick_table_has_one_calibrated_row_per_device_count(tmp_path: Path, monkeypatch) -> None:
    """examples/bench_devices.py --quick on MiniLM / a BBC News subset: four calibrated plans, 1 to 4 devices."""
    out = tmp_path / "t5"
    monkeypatch.setattr(sys, "argv", ["bench_devices.py", "--out", str(out), "--quick"])
    runpy.run_path(str(ROOT / "examples" / "bench_devices.py"), run_name="__main__")
    doc = json.loads((out / "device_count.json").read_text())
    rows = doc["device_count"]
    assert [len(r["devices"]) for r in rows] == [1, 2, 3, 4]
    assert [",".join(r["devices"]) for r in rows] == list(DEVICE_SETS.values())
    for r in rows:
        plan = json.loads((Path(r["plan"]) / "plan.json").read_text())
        assert plan.get("calibrated", True) is True and len(plan["submodels"]) == len(r["devices"])
        assert 0.0 <= r["accuracy"] <= 100.0 and len(r["submodel_accuracy"]) == len(r["devices"])
        assert r["accuracy"] == plan["figures"]["coformer"]["accuracy"]
        assert r["latency_ms"]["median"] > 0 and r["energy_j_estimate"] > 0
    # more devices, more sub-model features coming back: bytes grow with the device count
    sizes = [r["bytes_per_request"] for r in rows]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    table = (out / "device_count.md").read_text()
    assert table.count("\n| ") == 5 and "estimate" in table
