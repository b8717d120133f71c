"""The plan records its teacher; bench uses exactly that one, measures accuracy through the runtime, and runs
the ``compressed`` alternative the demo packages — on a tiny BERT and real BBC News articles (fast)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from rich.console import Console

import coformer
from coformer.artifacts import load_plan
from coformer.experiments.bench import accuracy_of, teacher_logits
from coformer.offline.booster import BoosterConfig
from coformer.cli import build_cli
from coformer.offline.compressed import COMPRESSED_DIR, strongest_device
from coformer.data import RawDataset, RawSplit
from coformer_datasets.bbc_news import load_bbc_news
from coformer.experiments.demo import default_dataset, run_demo
from coformer.offline.pipeline import encode, prepare_teacher, teacher_sha256
from coformer.spec import resolve_devices

ACCURACY_DOCS = 60
WORKERS = "inproc://cmp-0,inproc://cmp-1,inproc://cmp-2"


def _slice(split: RawSplit, n: int) -> RawSplit:
    step = max(1, len(split.labels) // n)
    return RawSplit(split.examples[::step][:n], split.labels[::step][:n])


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A demo run on a tiny BERT, then a SECOND cached teacher for the same backbone and source (newer)."""
    root = tmp_path_factory.mktemp("compressed")
    mp = pytest.MonkeyPatch()
    mp.setenv("COFORMER_CACHE", str(root / "cache"))
    backbone = coformer.create_backbone("bert")
    source = str(backbone.save(backbone.tiny(num_labels=5, seed=3), root / "ckpt"))
    data = load_bbc_news()
    data.train, data.val, data.test = _slice(data.train, 150), _slice(data.val, 20), _slice(data.test, 40)
    config = BoosterConfig(epochs=1, batch_size=16, lr=1e-3, aggregator_epochs=5)
    result = run_demo(source=source, dataset=data, config=config, load_options={"max_length": 32}, layers=2,
                      latency_repeats=2, out=root / "plan", console=Console(width=120, quiet=True))
    # another data set's teacher for the same backbone and source: labels rotated, so it answers BBC wrongly
    rotated = RawDataset("bbc_rotated", data.classes,
                         *(RawSplit(s.examples, [(y + 1) % 5 for y in s.labels]) for s in (data.train, data.val,
                                                                                            data.test)))
    other = prepare_teacher(backbone, rotated, source=source, load_options={"max_length": 32},
                            cache=root / "cache")
    yield {"root": root, "result": result, "backbone": backbone, "other": other}
    mp.undo()


def _bench(root: Path, *extra: str) -> Any:
    return CliRunner().invoke(build_cli(), ["bench", "--plan", str(root / "plan"), "--workers", WORKERS,
                                            "--link-mbps", "2,1000", "--requests", "2", "--warmup", "1",
                                            "--accuracy-limit", str(ACCURACY_DOCS), *extra])


def test_demo_packages_the_compressed_alternative_and_records_its_teacher(demo: dict[str, Any]) -> None:
    result, root = demo["result"], demo["root"]
    plan = load_plan(result.plan_dir)
    record = plan.meta["teacher"]
    assert record["sha256"] == teacher_sha256(record["path"]) and record["dataset"] == "bbc_news"
    compressed = load_plan(root / "plan" / COMPRESSED_DIR)
    assert compressed.meta["teacher"] == record  # calibrated from the same teacher
    strongest = strongest_device(resolve_devices("jetson-nano,jetson-tx2,orin-nano"))
    (spec,) = compressed.meta["policy"]["specs"]
    assert [d["name"] for d in compressed.meta["policy"]["devices"]] == [strongest.name] == ["jetson-tx2"]
    # the proportional rule with N = 1: the whole width, the same 2 layers as CoFormer's sub-models
    assert spec["layers"] == 2 and spec["embed_dim"] == 32
    assert all(s["layers"] == 2 for s in plan.meta["policy"]["specs"])
    doc = result.to_dict()
    assert doc["compressed"]["device"] == "jetson-tx2" and 0 <= doc["compressed"]["accuracy"] <= 100
    assert plan.figures["compressed"] == doc["compressed"]
    # every figure also carries its validation accuracy, the one settings are chosen on
    for fig in [doc["teacher"], *doc["submodels"], doc["coformer"], doc["compressed"]]:
        assert 0 <= fig["val_accuracy"] <= 100


def test_bench_uses_the_teacher_the_plan_was_calibrated_from_not_the_newest(demo: dict[str, Any],
                                                                            tmp_path: Path) -> None:
    root, backbone = demo["root"], demo["backbone"]
    record = load_plan(root / "plan").meta["teacher"]
    assert demo["other"].path.stat().st_mtime >= Path(record["path"]).stat().st_mtime  # the newer entry
    mp = pytest.MonkeyPatch()
    mp.setenv("COFORMER_CACHE", str(root / "cache"))
    try:
        res = _bench(root, "--out", str(tmp_path / "out"))
    finally:
        mp.undo()
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "out" / "bench.json").read_text())
    test = default_dataset("text").test
    docs = RawSplit(test.examples[:ACCURACY_DOCS], test.labels[:ACCURACY_DOCS])
    expected = {}
    for name, path in (("right", record["path"]), ("wrong", demo["other"].path)):
        model = backbone.load(path)
        expected[name] = accuracy_of(teacher_logits(backbone, model, encode(backbone, model, docs)),
                                     torch.tensor(docs.labels))
    assert expected["right"] != expected["wrong"]  # otherwise this test could not tell them apart
    assert doc["accuracy"]["teacher"]["accuracy"] == pytest.approx(expected["right"])
    assert doc["teacher"]["sha256"] == record["sha256"]


def test_bench_refuses_a_teacher_whose_hash_differs_and_names_both(demo: dict[str, Any], tmp_path: Path) -> None:
    root, other = demo["root"], demo["other"]
    record = load_plan(root / "plan").meta["teacher"]
    res = _bench(root, "--teacher", str(other.path), "--out", str(tmp_path / "out"))
    assert res.exit_code != 0
    assert record["sha256"] in res.output and teacher_sha256(other.path) in res.output
    assert "'bbc_rotated'" in res.output and "'bbc_news'" in res.output
    assert not (tmp_path / "out").exists()
    ok = _bench(root, "--teacher", record["path"], "--out", str(tmp_path / "ok"))  # the right one passes the check
    assert ok.exit_code == 0, ok.output


def test_bench_measures_coformer_and_compressed_through_the_runtime(demo: dict[str, Any], tmp_path: Path) -> None:
    root = demo["root"]
    plan_json = root / "plan" / "plan.json"
    original = plan_json.read_text()
    doctored = json.loads(original)
    doctored["figures"]["coformer"]["accuracy"] = 99.99  # a copied figure would show up as this
    plan_json.write_text(json.dumps(doctored))
    try:
        res = _bench(root, "--teacher", doctored["teacher"]["path"], "--out", str(tmp_path / "out"))
    finally:
        plan_json.write_text(original)
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "out" / "bench.json").read_text())
    backbone = demo["backbone"]
    teacher = backbone.load(doctored["teacher"]["path"])
    test = default_dataset("text").test
    data = encode(backbone, teacher, RawSplit(test.examples[:ACCURACY_DOCS], test.labels[:ACCURACY_DOCS]))
    for name, path in (("coformer", root / "plan"), ("compressed", root / "plan" / COMPRESSED_DIR)):
        plan = load_plan(path)
        subs = plan.submodels()
        with torch.inference_mode():  # the same answer computed locally, fp16 features as on the wire
            logits = plan.aggregator([m(**data.inputs).half().float() for m in subs])
        assert doc["accuracy"][name]["accuracy"] == pytest.approx(accuracy_of(logits, data.labels))
        assert doc["accuracy"][name]["source"].startswith("measured through the deployed runtime")
    assert doc["accuracy"]["coformer"]["accuracy"] != 99.99
    runs = {(r["method"], r["rate_mbps"]): r for r in doc["runs"]}
    assert runs[("compressed", 2.0)]["devices"] == ["jetson-tx2"] and runs[("compressed", 2.0)]["rounds"] == 1
    assert runs[("compressed", 1000.0)]["speedup_vs_teacher"] > 0
    table = (tmp_path / "out" / "bench.md").read_text()
    assert table.count("| compressed |") == 2 and "accuracy of compressed" in table


def test_a_searched_policy_gets_a_compressed_model_from_the_same_search_with_one_device(
        demo: dict[str, Any], tmp_path: Path) -> None:
    from coformer.offline.compressed import compressed_policy, search_settings

    record = load_plan(demo["root"] / "plan").meta["teacher"]
    backbone = demo["backbone"]
    data = load_bbc_news()
    data.train, data.val, data.test = _slice(data.train, 30), _slice(data.val, 12), _slice(data.test, 4)
    teacher = prepare_teacher(backbone, data, source=record["path"], cache=tmp_path / "cache")
    # what `coformer plan --strategy random --trials 3 --val-docs 8 --delta 0.2` writes (the parts used)
    (tmp_path / "plan.json").write_text(json.dumps({
        "strategy": "random", "delta": 0.2, "link_mbps": None, "validation": {"val_docs": 8},
        "trials": [{"feasible": True}, {"feasible": False}, {"feasible": True}, {"feasible": True}]}))
    settings = search_settings(tmp_path)
    assert settings is not None and (settings["strategy"], settings["trials"], settings["val_docs"]) == ("random", 3, 8)
    devices = resolve_devices("jetson-nano,jetson-tx2,orin-nano")
    policy = compressed_policy(backbone, teacher, devices, search=settings)
    assert [d.name for d in policy.devices] == ["jetson-tx2"] and len(policy.specs) == 1
    assert policy.meta["strategy"] == "random" and "N = 1, 3 trials" in policy.meta["source"]
    shape = backbone.shape(teacher.model)
    assert 1 <= policy.specs[0].layers <= shape.layers and policy.specs[0].embed_dim <= shape.embed_dim
    assert search_settings(demo["root"] / "plan") is None  # a demo plan's proportional policy was not searched
