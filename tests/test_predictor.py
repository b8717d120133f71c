"""The MLP latency predictor against the FLOPs-proportional baseline, on a real profile of tiny BERT."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

import coformer
from coformer.offline.predictor import FlopsBaseline, LatencyPredictor, errors, split_records, train_and_score
from coformer.offline.profiler import ProfileRecord, profile_local, sample_shapes
from coformer.spec import SubModelSpec


@pytest.fixture(scope="module")
def profile():
    """A real profile of tiny BERT on this host; the minimum of repeats, since the test machine is shared."""
    backbone = coformer.create_backbone("bert")
    teacher = backbone.tiny().eval()
    specs = sample_shapes(backbone.shape(teacher), 48, seed=0)
    return profile_local(backbone, teacher, specs, device="host", warmup=2, repeats=7, statistic="min")


def _launch_bound(records: list[ProfileRecord]) -> list[ProfileRecord]:
    """The profile's shapes and FLOPs, with a deterministic latency: a fixed cost per layer plus one per FLOP.

    That is how a small device behaves (each layer launches kernels whatever its width), and it is what
    a FLOPs-proportional model cannot express. Measured latencies would make the comparison a timed test,
    which a shared CI machine decides by chance; the held-out MAPE on real devices is a benchmark figure.
    """
    mean_flops = sum(r.flops for r in records) / len(records)
    return [replace(r, latency_ms=0.3 * r.spec.layers + 2.0 * r.flops / mean_flops, samples_ms=[])
            for r in records]


def test_predictor_beats_flops_baseline_on_held_out_shapes(profile):
    records = _launch_bound(profile.records)
    pred, report = train_and_score(records, "host", test_fraction=0.25, seed=0, epochs=800)
    train, test = split_records(records, 0.25, 0)
    assert report["held_out_shapes"] == len(test) == 12
    assert not {r.spec for r in train} & {r.spec for r in test}
    assert report["predictor"]["mape_pct"] < report["flops_baseline"]["mape_pct"]
    assert report["predictor"]["rmse_ms"] < report["flops_baseline"]["rmse_ms"]


def test_predictor_round_trips_through_safetensors_and_json(profile, tmp_path: Path):
    pred = LatencyPredictor("host.v1").fit(profile.records, epochs=100)
    path = pred.save(tmp_path / "host.v1")  # dots in device names survive
    assert path.name == "host.v1.json" and (tmp_path / "host.v1.safetensors").exists()
    back = LatencyPredictor.load(path)
    specs = [r.spec for r in profile.records[:5]]
    assert back.predict_many(specs) == pred.predict_many(specs)
    assert back.device_name == "host.v1"


def test_flops_baseline_is_least_squares_through_the_origin(profile):
    base = FlopsBaseline().fit(profile.records)
    # the residual is orthogonal to the FLOPs vector at the least-squares optimum
    resid = sum((r.latency_ms - base.predict_record(r)) * r.flops for r in profile.records)
    scale = sum(r.latency_ms * r.flops for r in profile.records)
    assert abs(resid) < 1e-9 * scale


def test_errors_and_bad_input():
    assert errors([1.0, 3.0], [2.0, 2.0]) == {"rmse_ms": 1.0, "mape_pct": 50.0, "n": 2}
    with pytest.raises(ValueError, match="at least 4"):
        LatencyPredictor().fit([])
    with pytest.raises(FileNotFoundError, match="not a saved latency predictor"):
        LatencyPredictor.load("/nonexistent/predictor")


def test_predictions_stay_positive_below_the_profiled_range(profile):
    """A linear target extrapolated below zero for tiny shapes, which a search then took as free."""
    pred = LatencyPredictor("host").fit(profile.records, epochs=300)
    tiniest = SubModelSpec(1, 1, (1,), (1,))
    assert pred.predict(tiniest) > 0
    assert all(p > 0 for p in pred.predict_many([r.spec for r in profile.records] + [tiniest]))


def test_predictors_saved_with_a_linear_target_still_load(profile, tmp_path: Path):
    old = LatencyPredictor("old", log_target=False).fit(profile.records, epochs=100)
    path = old.save(tmp_path / "old")
    doc = json.loads(path.read_text())
    doc.pop("target")  # files written before the log target carry no "target" key
    path.write_text(json.dumps(doc))
    loaded = LatencyPredictor.load(path)
    assert loaded.log_target is False
    specs = [r.spec for r in profile.records[:5]]
    assert loaded.predict_many(specs) == pytest.approx(old.predict_many(specs))
