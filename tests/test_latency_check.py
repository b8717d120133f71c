"""Predicted T from a plan against a bench's measured medians: the same T the evaluator computed, ratio per rate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import coformer
from coformer.offline.evaluator import Evaluator, Topology
from coformer.offline.latency_check import compare, predicted_T_ms
from coformer.spec import DeviceProfile, Policy, SubModelSpec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def planned():
    backbone = coformer.create_backbone("bert")
    teacher = backbone.tiny(num_labels=3).eval()
    devs = [DeviceProfile("jetson-tx2", 8, 665.6, 15), DeviceProfile("jetson-tx2", 8, 665.6, 15),
            DeviceProfile("jetson-nano", 4, 235.8, 10)]
    specs = [SubModelSpec.uniform(2, 12, 2, 20), SubModelSpec.uniform(1, 8, 1, 16), SubModelSpec.uniform(1, 8, 1, 8)]
    out = {}
    for topo in (Topology(), Topology("device", 1)):
        for rate in (2.0, 1000.0):
            ev = Evaluator(backbone, teacher, devs, link_mbps=rate, topology=topo)
            out[(topo.kind, rate)] = ev.evaluate(Policy(specs, devs))
    return out


def _bench(medians: dict[float, float]) -> dict:
    runs = [{"method": "coformer", "rate_mbps": r, "link": "shaped", "latency_ms": {"median": m}}
            for r, m in medians.items()]
    runs.append({"method": "teacher", "rate_mbps": 2.0, "latency_ms": {"median": 99.0}})
    return {"runs": runs}


@pytest.mark.parametrize("kind", ["coordinator", "device"])
def test_plan_T_is_re_evaluated_at_each_benched_rate(planned, kind):
    at_2 = planned[(kind, 2.0)]
    # the plan was searched at 2 Mb/s; its components give the evaluator's T there and at 1 Gb/s
    assert predicted_T_ms(at_2.components(), 2.0) == pytest.approx(at_2.T_ms)
    assert predicted_T_ms(at_2.components(), 1000.0) == pytest.approx(planned[(kind, 1000.0)].T_ms)


def test_ratio_and_tolerance_per_rate(planned):
    plan = {"predicted": planned[("coordinator", 2.0)].components()}
    t2, t1000 = planned[("coordinator", 2.0)].T_ms, planned[("coordinator", 1000.0)].T_ms
    rows = compare(plan, _bench({1000.0: t1000 * 1.5, 2.0: t2 * 1.1}))
    assert [r["rate_mbps"] for r in rows] == [2.0, 1000.0]
    assert rows[0]["ratio"] == pytest.approx(1.1) and rows[0]["within"]
    assert rows[1]["ratio"] == pytest.approx(1.5) and not rows[1]["within"]


def test_bad_documents_are_named(planned):
    plan = {"predicted": planned[("coordinator", 2.0)].components()}
    with pytest.raises(ValueError, match="no runs of method 'coformer'"):
        compare(plan, {"runs": []})
    with pytest.raises(ValueError, match="not a `coformer plan` document"):
        compare({}, _bench({2.0: 1.0}))
    old = {"t3_ms": 0.1, "devices": [{"t1_ms": 1.0, "t2_ms": 0.0}]}
    with pytest.raises(ValueError, match="re-run `coformer plan`"):
        predicted_T_ms(old, 2.0)


def test_the_script_reports_and_fails_outside_the_target(planned, tmp_path):
    plan = {"predicted": planned[("coordinator", 2.0)].components()}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    (tmp_path / "bench.json").write_text(json.dumps(_bench({2.0: planned[("coordinator", 2.0)].T_ms * 1.3})))
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "predicted_vs_measured.py"),
                          str(tmp_path / "plan.json"), str(tmp_path / "bench.json")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr
    assert "1.30  NO" in res.stdout


class _CallOverheadPredictor:
    call_overhead_ms = 3.0

    def predict(self, spec: SubModelSpec) -> float:
        return 0.5 * spec.layers


def test_the_call_overhead_is_part_of_the_re_evaluated_T():
    backbone = coformer.create_backbone("bert")
    teacher = backbone.tiny(num_labels=3).eval()
    devs = [DeviceProfile("jetson-nano", 4, 235.8, 10), DeviceProfile("jetson-tx2", 8, 665.6, 15)]
    policy = Policy([SubModelSpec.uniform(2, 12, 2, 20), SubModelSpec.uniform(1, 8, 1, 16)], devs)
    predictors = {"jetson-nano": _CallOverheadPredictor()}
    at = {r: Evaluator(backbone, teacher, devs, link_mbps=r, predictors=predictors).evaluate(policy)
          for r in (2.0, 1000.0)}
    assert at[1000.0].T_ms > 3.0
    assert predicted_T_ms(at[2.0].components(), 1000.0) == pytest.approx(at[1000.0].T_ms)
