"""`coformer bench` end to end on a tiny BERT plan through in-process workers: every method, two link rates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import coformer
from coformer.artifacts import load_plan, save_plan
from coformer.experiments.bench import BenchConfig, BenchSetup, make_sample, percentile, run_bench
from coformer.experiments.bench_report import write_outputs
from coformer.data import TensorDataset
from coformer.offline.decompose import proportional_specs
from coformer.offline.pipeline import teacher_record
from coformer.spec import BUILTIN_DEVICES

DEVICE_NAMES = ("jetson-nano", "jetson-tx2", "orin-nano")


def _tiny_setup(name: str, root: Path) -> dict[str, Any]:
    """A tiny teacher of backbone ``name`` saved to disk, a 3-device plan from it, and a small labelled test split."""
    backbone = coformer.create_backbone(name)
    teacher = backbone.tiny(num_labels=3, seed=4)
    backbone.save(teacher, root / "teacher")
    devices = [BUILTIN_DEVICES[n] for n in DEVICE_NAMES]
    shape = backbone.shape(teacher)
    specs = proportional_specs(shape, [d.gflops for d in devices])
    calib = backbone.example_batch(teacher, 8, seed=5)
    subs = backbone.decompose(teacher, specs, batch=calib)
    head = backbone.task_head(teacher)
    agg = coformer.create_aggregator("mlp_fusion", feature_dims=[m.feature_dim for m in subs],
                                     embed_dim=shape.embed_dim, task_head=head, student_heads=None)
    policy = {"specs": [s.to_dict() for s in specs], "devices": [d.to_dict() for d in devices], "meta": {}}
    save_plan(root / "plan", submodels=subs, aggregator=agg, task_head=head, student_heads=None,
              meta={"backbone": name, "source": str(root / "teacher"), "policy": policy, "figures": {},
                    "teacher": teacher_record(root / "teacher", name, "synthetic")})
    batch = backbone.example_batch(teacher, 10, seed=6)
    with torch.no_grad():
        labels = backbone.forward_teacher(teacher, batch).argmax(-1)
    labels[::3] = (labels[::3] + 1) % 3  # a teacher that is right on only about 2/3 of them
    return {"backbone": backbone, "teacher": teacher, "root": root, "devices": devices,
            "test": TensorDataset(batch, labels)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny BERT setup (BERT has every baseline)."""
    return _tiny_setup("bert", tmp_path_factory.mktemp("bench"))


def test_percentile() -> None:
    assert percentile([1, 2, 3, 4, 5], 50) == 3
    assert percentile([1, 2, 3, 4, 5], 90) == pytest.approx(4.6)
    assert percentile([7.0], 90) == 7.0


def test_bench_runs_every_method_at_two_rates(tiny: dict[str, Any], tmp_path: Path) -> None:
    plan = load_plan(tiny["root"] / "plan")
    clients = [coformer.open_transport(f"inproc://bench-{i}") for i in range(3)]
    setup = BenchSetup(tiny["backbone"], tiny["teacher"], plan, tiny["devices"], clients, tiny["test"])
    cfg = BenchConfig(rates_mbps=[2.0, 1000.0], requests=4, warmup=1)
    doc = run_bench(setup, cfg, log=lambda _m: None)
    paths = write_outputs(doc, tmp_path)

    runs = doc["runs"]
    assert set(doc["skipped_methods"]) == {"compressed"}  # this plan directory carries no compressed/ plan
    assert "`coformer demo` builds one" in doc["skipped_methods"]["compressed"]
    assert {(r["method"], r["rate_mbps"]) for r in runs} == {(m, r) for m in ("teacher", "coformer", "pipeline",
                                                                              "tensor-parallel") for r in (2.0, 1000.0)}
    by = {(r["method"], r["rate_mbps"]): r for r in runs}
    # exact baselines agree with the teacher on every request; so their accuracy is the teacher's, verified
    for m in ("pipeline", "tensor-parallel"):
        assert by[(m, 2.0)]["agreement_with_teacher"] == 100.0
        assert doc["accuracy"][m]["accuracy"] == doc["accuracy"]["teacher"]["accuracy"]
    assert doc["accuracy"]["teacher"]["accuracy"] == pytest.approx(60.0)  # 4 of 10 labels flipped
    assert by[("teacher", 2.0)]["sample_accuracy"] == pytest.approx(50.0)  # first 4: indices 0 and 3 flipped
    # tensor parallelism talks every layer: many more bytes and rounds than CoFormer's single round
    assert by[("tensor-parallel", 2.0)]["rounds"] == 6 and by[("coformer", 2.0)]["rounds"] == 1
    assert by[("tensor-parallel", 2.0)]["bytes_per_request"] > 10 * by[("coformer", 2.0)]["bytes_per_request"]
    # modelled links: the slow link costs exactly the modelled wire time more
    for m in ("teacher", "coformer", "pipeline", "tensor-parallel"):
        slow, fast = by[(m, 2.0)], by[(m, 1000.0)]
        assert slow["breakdown_ms"]["wire_modelled"] == pytest.approx(500 * fast["breakdown_ms"]["wire_modelled"])
        # every request has the same shape, so the modelled wire time is the same for each of them
        assert slow["latency_ms"]["median"] == pytest.approx(slow["measured_ms_median"]
                                                             + slow["breakdown_ms"]["wire_modelled"])
        assert slow["energy_j_estimate"] > 0 and slow["module_memory_bytes"]
        b = slow["breakdown_ms"]
        assert b["serialize"] == 0.0  # in-process workers: tensors by reference
        assert b["rpc"] == pytest.approx(b["transfer_measured"]) and 0 < slow["runtime_share"] < 1
    assert by[("teacher", 2.0)]["speedup_vs_teacher"] == 1.0
    assert set(by[("coformer", 2.0)]["module_memory_bytes"]) == set(DEVICE_NAMES)
    saved = json.loads(paths["json"].read_text())
    assert len(saved["runs"]) == 8
    table = paths["table"].read_text()
    assert table.count("| tensor-parallel |") == 2 and "ESTIMATE" in table
    for key in ("breakdown", "accuracy"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", ["vit", "llama", "mpnet"])
def test_bench_runs_all_four_methods_for_vit_llama_and_mpnet(name: str, tmp_path: Path) -> None:
    """The baselines written once per family reach `coformer bench`: four rows, exact baselines verified."""
    if name not in {info.name for info in coformer.list_plugins("backbone")}:
        pytest.skip(f"backbone {name!r} is not installed")
    tiny_setup = _tiny_setup(name, tmp_path)
    plan = load_plan(tmp_path / "plan")
    clients = [coformer.open_transport(f"inproc://bench4-{name}-{i}") for i in range(3)]
    setup = BenchSetup(tiny_setup["backbone"], tiny_setup["teacher"], plan, tiny_setup["devices"], clients,
                       tiny_setup["test"])
    doc = run_bench(setup, BenchConfig(rates_mbps=[1000.0], requests=3, warmup=1), log=lambda _m: None)
    assert {k: v for k, v in doc["skipped_methods"].items() if k != "compressed"} == {}
    assert sorted(r["method"] for r in doc["runs"]) == sorted(("teacher", "coformer", "pipeline", "tensor-parallel"))
    for r in doc["runs"]:
        if r["method"] in ("pipeline", "tensor-parallel"):
            assert r["agreement_with_teacher"] == 100.0
            assert doc["accuracy"][r["method"]]["accuracy"] == doc["accuracy"]["teacher"]["accuracy"]
    rounds = {r["method"]: r["rounds"] for r in doc["runs"]}
    assert rounds["tensor-parallel"] == 2 * tiny_setup["backbone"].shape(tiny_setup["teacher"]).layers


def test_bench_skips_the_baselines_a_backbone_cannot_run_and_says_why(tmp_path: Path, monkeypatch) -> None:
    from coformer.backbone import Backbone

    tiny_bert = _tiny_setup("bert", tmp_path)
    backbone = tiny_bert["backbone"]
    # a backbone that declares no baselines: the Backbone defaults
    for hook in ("pipeline_stage", "tensor_shard", "tensor_host"):
        monkeypatch.setattr(backbone, hook, getattr(Backbone, hook).__get__(backbone))
    plan = load_plan(tmp_path / "plan")
    clients = [coformer.open_transport(f"inproc://bench-nobase-{i}") for i in range(3)]
    setup = BenchSetup(backbone, tiny_bert["teacher"], plan, tiny_bert["devices"], clients, tiny_bert["test"])
    logged: list[str] = []
    doc = run_bench(setup, BenchConfig(rates_mbps=[1000.0], requests=3, warmup=1), log=logged.append)
    paths = write_outputs(doc, tmp_path / "out")

    assert {r["method"] for r in doc["runs"]} == {"teacher", "coformer"}
    assert {k: v for k, v in doc["skipped_methods"].items() if k != "compressed"} == {
        "pipeline": "backbone 'bert' has no pipeline stages",
        "tensor-parallel": "backbone 'bert' has no tensor-parallel shards"}
    assert set(doc["accuracy"]) == {"teacher", "coformer"}
    assert "skipping pipeline: backbone 'bert' has no pipeline stages" in logged
    assert "- tensor-parallel: not run (backbone 'bert' has no tensor-parallel shards)" in paths["table"].read_text()
    assert paths["accuracy"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runtime_cost_is_the_critical_exchange_split_into_serialisation_and_rpc() -> None:
    from coformer.experiments.baselines import Exchange, Trace

    x = {"input_ids": torch.zeros(1, 4, dtype=torch.long)}
    # round 1: b's round trip is the longest, so the request waited for b (not for a's longer compute)
    r1 = [Exchange("a", x, 8, compute_ms=5.0, round_trip_ms=6.0, serialize_ms=0.5),
          Exchange("b", x, 8, compute_ms=4.0, round_trip_ms=7.0, serialize_ms=0.25)]
    r2 = [Exchange("c", x, 8, compute_ms=1.0, round_trip_ms=2.0, serialize_ms=2.0)]  # clipped to its 1 ms
    trace = Trace(torch.zeros(1, 2), total_ms=10.0, rounds=[r1, r2], local_ms=0.0)
    assert trace.transfer_ms == pytest.approx(3.0 + 1.0)
    assert trace.serialize_ms == pytest.approx(0.25 + 1.0)


def test_bench_batches_several_examples_per_request(tiny: dict[str, Any]) -> None:
    plan = load_plan(tiny["root"] / "plan")
    clients = [coformer.open_transport(f"inproc://bench-batch-{i}") for i in range(3)]
    setup = BenchSetup(tiny["backbone"], tiny["teacher"], plan, tiny["devices"], clients, tiny["test"])
    one = {r["method"]: r for r in run_bench(setup, BenchConfig(rates_mbps=[1000.0], requests=2, warmup=1),
                                              log=lambda _m: None)["runs"]}
    doc = run_bench(setup, BenchConfig(rates_mbps=[1000.0], requests=2, warmup=1, batch_size=4), log=lambda _m: None)
    by = {r["method"]: r for r in doc["runs"]}
    # each request carries 4 examples; the exact splits still agree with the teacher on every one of them
    for m in ("teacher", "coformer", "pipeline", "tensor-parallel"):
        assert [len(p) for p in by[m]["predictions"]] == [4, 4]
    for m in ("pipeline", "tensor-parallel"):
        assert by[m]["agreement_with_teacher"] == 100.0
    # of the first 8 labels, 0, 3 and 6 are flipped (see the fixture): the teacher gets 5 right
    assert by["teacher"]["sample_accuracy"] == pytest.approx(62.5)
    # CoFormer's features grow with the batch: 4 examples' fp16 features instead of one
    assert by["coformer"]["bytes_per_request"] > 2 * one["coformer"]["bytes_per_request"]
    assert "4 example(s)" in doc["notes"]["latency"]
    with pytest.raises(ValueError, match="needs that many test examples"):
        make_sample(tiny["test"], 2, batch_size=len(tiny["test"]) + 1)


def test_bench_cli_with_inproc_workers(tiny: dict[str, Any], tmp_path: Path) -> None:
    from coformer.cli import build_cli

    out = tmp_path / "out"
    args = ["bench", "--plan", str(tiny["root"] / "plan"), "--workers", "inproc://c0,inproc://c1,inproc://c2",
            "--link-mbps", "2,1000", "--requests", "3", "--warmup", "1", "--accuracy-limit", "8",
            "--teacher", str(tiny["root"] / "teacher"), "--out", str(out),
            "--device-plans", str(tiny["root"] / "plan"), "--device-count-rate", "100"]
    res = CliRunner().invoke(build_cli(), args)
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "bench.json").read_text())
    assert {r["method"] for r in doc["runs"]} == {"teacher", "coformer", "pipeline", "tensor-parallel"}
    # the device-count table: the main plan and each extra plan, CoFormer alone at the chosen rate
    assert [(len(r["devices"]), r["rate_mbps"], r["link"])
            for r in doc["device_count"]] == [(3, 100.0, "modelled")] * 2
    assert "| CoFormer devices |" in (out / "bench.md").read_text()
    bad = CliRunner().invoke(build_cli(), [*args[:4], "inproc://c0", *args[5:]])
    assert bad.exit_code != 0 and "one URI per sub-model" in bad.output


def test_requests_are_timed_with_the_coordinator_thread_count(tiny: dict[str, Any], monkeypatch) -> None:
    import coformer.experiments.bench as bench

    seen: list[int] = []
    real = bench._measure

    def spy(*args: Any, **kwargs: Any) -> dict[str, Any]:
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "_measure", spy)
    plan = load_plan(tiny["root"] / "plan")
    clients = [coformer.open_transport(f"inproc://bench-threads-{i}") for i in range(3)]
    setup = BenchSetup(tiny["backbone"], tiny["teacher"], plan, tiny["devices"], clients, tiny["test"])
    before = torch.get_num_threads()
    run_bench(setup, BenchConfig(rates_mbps=[1000.0], requests=1, warmup=0, coordinator_threads=1),
              log=lambda _m: None)
    assert seen == [1, 1, 1, 1]  # one timing phase per method
    assert torch.get_num_threads() == before  # restored for the caller
