"""Profiling: first-k slicing, shape pools, local / remote (inproc) / cgroup-quota measurement, JSON+CSV."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch

import coformer
from coformer.cpu_quota import CFS_PERIOD_US
from coformer.offline import profiler
from coformer.offline.profiler import (
    CgroupUnavailableError,
    Profile,
    first_k_selection,
    profile_cpu_quota,
    profile_local,
    profile_remote,
    sample_shapes,
)
from coformer.spec import SubModelSpec


@pytest.fixture(scope="module")
def tiny():
    backbone = coformer.create_backbone("bert")
    return backbone, backbone.tiny().eval()


def test_first_k_selection_has_the_spec_sizes_and_slices_to_them(tiny):
    backbone, teacher = tiny
    shape = backbone.shape(teacher)
    spec = SubModelSpec((2), 16, (3, 1), (10, 20))
    sel = first_k_selection(shape, spec)
    assert sel.spec == spec
    sub = backbone.slice(teacher, sel)
    out = sub(**backbone.example_batch(teacher, batch_size=2))
    assert out.shape == (2, 16)
    with pytest.raises(ValueError, match="exceed"):
        first_k_selection(shape, SubModelSpec.uniform(1, 8, shape.heads[0] + 1, 4))


def test_sample_shapes_are_distinct_and_fit_the_teacher(tiny):
    backbone, teacher = tiny
    shape = backbone.shape(teacher)
    specs = sample_shapes(shape, 25, seed=3)
    assert len(specs) == len(set(specs)) == 25
    assert specs[0] == shape.full_spec()
    for s in specs:
        first_k_selection(shape, s)  # raises if a shape does not fit


def test_local_profile_round_trips_through_json_and_csv(tiny, tmp_path: Path):
    backbone, teacher = tiny
    specs = sample_shapes(backbone.shape(teacher), 4, seed=0)
    prof = profile_local(backbone, teacher, specs, device="host", warmup=1, repeats=3)
    assert [r.spec for r in prof.records] == specs
    for r in prof.records:
        assert len(r.samples_ms) == 3 and r.latency_ms == sorted(r.samples_ms)[1] > 0
    # the full shape does strictly more work than any smaller one
    assert prof.records[0].flops == max(r.flops for r in prof.records)
    js, cs = prof.save(tmp_path / "host.json")
    back = Profile.load(js)
    assert [r.to_dict() for r in back.records] == [r.to_dict() for r in prof.records]
    rows = list(csv.DictReader(cs.open()))
    assert [float(row["latency_ms"]) for row in rows] == [r.latency_ms for r in prof.records]


def test_remote_profile_uses_the_worker_over_a_transport(tiny):
    from coformer_transports.inprocess import worker

    backbone, teacher = tiny
    specs = sample_shapes(backbone.shape(teacher), 3, seed=1)
    before = worker("profile-test").requests
    prof = profile_remote(backbone, teacher, specs, "inproc://profile-test", device="remote", warmup=1, repeats=2)
    # every warm-up and timed run went through the worker
    assert worker("profile-test").requests - before == 3 * (1 + 2)
    assert len(worker("profile-test").health()["models"]) >= 3
    local = profile_local(backbone, teacher, specs, device="host", warmup=0, repeats=1)
    assert [r.flops for r in prof.records] == [r.flops for r in local.records]
    assert all(r.latency_ms > 0 for r in prof.records) and prof.meta["where"] == "remote"


def test_cpu_quota_without_root_says_why(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(CgroupUnavailableError, match="needs root"):
        profile_cpu_quota("bert", "tiny", [SubModelSpec.uniform(1, 8, 1, 4)], 0.5, device="q")


def test_cpu_quota_rejects_nonpositive_quota():
    with pytest.raises(ValueError, match="positive"):
        profile_cpu_quota("bert", "tiny", [SubModelSpec.uniform(1, 8, 1, 4)], 0.0, device="q")


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0 or not (profiler.CGROUP_CPU_ROOT / "cpu.cfs_quota_us").exists(),
                    reason="needs root and the cgroup v1 cpu controller at /sys/fs/cgroup/cpu")
def test_cpu_quota_profile_runs_in_a_cgroup_and_cleans_up(tiny):
    backbone, teacher = tiny
    specs = sample_shapes(backbone.shape(teacher), 3, seed=0)
    batch = backbone.example_batch(teacher, batch_size=1, seed=3)
    batch = {k: v[:, :12] for k, v in batch.items()}
    prof = profile_cpu_quota("bert", "tiny", specs, 0.5, device="half-core", warmup=1, repeats=3, batch=batch)
    assert (prof.meta["cfs_quota_us"], prof.meta["cfs_period_us"]) == (CFS_PERIOD_US // 2, CFS_PERIOD_US)
    assert prof.meta["threads"] == 1
    # the child timed the input it was handed, not its own example batch
    assert prof.meta["input_shapes"] == {"input_ids": [1, 12], "attention_mask": [1, 12]}
    assert [r.spec for r in prof.records] == specs
    assert all(r.latency_ms > 0 for r in prof.records)
    # the group the child ran in is gone afterwards
    assert not Path(prof.meta["cgroup"]).exists()
    assert profiler.threads_for_quota(1.5) == 2 and profiler.threads_for_quota(0.25) == 1


def test_profile_command_times_the_input_plans_are_costed_on(tiny, tmp_path: Path):
    """`coformer profile` and `coformer plan` must time the same input, or predictors mislead the search."""
    from click.testing import CliRunner

    from coformer.cli import build_cli
    from coformer.offline.profiler import reference_input

    backbone, teacher = tiny
    out = tmp_path / "dev.json"
    res = CliRunner().invoke(build_cli(), ["profile", "--source", "tiny", "--device-name", "dev", "--shapes", "3",
                                           "--repeats", "1", "--warmup", "0", "--no-train", "--out", str(out)])
    assert res.exit_code == 0, res.output
    meta = Profile.load(out).meta
    expected = {k: list(v.shape) for k, v in reference_input(backbone, teacher).items()}
    assert meta["input_shapes"] == expected
    # a real article fills the teacher's max_length; the example batch would be shorter or padded differently
    assert expected["input_ids"][1] == teacher.max_length


def test_the_mean_statistic_is_the_expected_latency_of_bimodal_samples():
    from coformer.offline.profiler import summarise

    # one shape's repeats on the 0.35-core testbed Nano: within a tick, or throttled to the next period
    samples = [2.9, 12.4, 2.7, 11.1, 2.8]
    assert summarise(samples, "median") == 2.9
    assert summarise(samples, "mean") == pytest.approx(6.38)
    assert summarise(samples, "min") == 2.7
    with pytest.raises(ValueError, match="median, mean, min"):
        summarise(samples, "p90")


def test_a_profile_through_a_worker_gives_its_predictor_the_call_overhead(tmp_path: Path):
    """The plan's latency model had no per-call runtime cost (t0); a worker's profile now measures it."""
    from coformer.offline.predictor import LatencyPredictor
    from coformer.offline.profile_stage import ProfileSettings, run_profile

    settings = ProfileSettings(device_name="dev", source="tiny", worker="inproc://call-overhead-test", shapes=5,
                               repeats=2, warmup=1)
    outcome = run_profile(settings, tmp_path / "dev.json")
    overhead = outcome.profile.meta["call_overhead_ms"]
    assert overhead > 0
    assert outcome.predictor is not None
    assert LatencyPredictor.load(outcome.predictor).call_overhead_ms == pytest.approx(overhead)
