"""A user's own flow from the command line on a tiny BERT and a CSV: plan --data, calibrate, demo --data, bench."""

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
from coformer.offline.booster import BoosterConfig
from coformer.cli import build_cli
from coformer.experiments.demo import run_demo
from coformer.offline.pipeline import accuracy, encode
from coformer.plan_document import PlanDocumentError
from coformer.spec import Policy
from tiny_split import TOPICS, tiny_text_project

@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("flow")
    mp = pytest.MonkeyPatch()
    mp.setenv("COFORMER_CACHE", str(root / "cache"))
    yield {"root": root, **tiny_text_project(root)}
    mp.undo()


def _cli(*args: str) -> Any:
    res = CliRunner().invoke(build_cli(), list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


def test_plan_then_calibrate_on_a_csv_packages_the_searched_policy(flow: Any) -> None:
    root, uri = flow["root"], flow["data"]
    _cli("plan", "--source", flow["ckpt"], "--data", uri, "--devices", "jetson-nano,jetson-tx2",
         "--strategy", "random", "--trials", "2", "--val-docs", "8", "--train-docs", "20", "--max-length", "16",
         "--out", str(root / "searched"))
    searched = json.loads((root / "searched" / "plan.json").read_text())
    canonical = coformer.create_dataset(uri).uri
    assert searched["stage"] == "searched" and searched["dataset"] == canonical
    assert searched["validation"]["dataset"] == canonical and searched["validation"]["classes"] == sorted(TOPICS)
    with pytest.raises(PlanDocumentError, match="coformer calibrate --plan DIR"):
        load_plan(root / "searched")

    # no --data: calibrate on the data set the plan was searched on
    res = _cli("calibrate", "--plan", str(root / "searched"), "--epochs", "1", "--out", str(root / "packaged"))
    assert "CoFormer validation accuracy" in " ".join(res.output.split())
    plan = load_plan(root / "packaged")
    assert plan.meta["stage"] == "packaged" and plan.meta["dataset"] == canonical
    assert plan.meta["policy"]["specs"] == searched["policy"]["specs"]  # the searched policy, not another
    assert plan.meta["source"] == flow["ckpt"] and plan.meta["load_options"] == {"max_length": 16}
    # the recorded validation accuracy is what the packaged sub-models and aggregator give on the CSV's val split
    backbone = coformer.create_backbone("bert")
    teacher = backbone.load(plan.meta["teacher"]["path"], max_length=16).eval()
    val = encode(backbone, teacher, coformer.load_dataset(uri).val)
    submodels = plan.submodels()
    with torch.inference_mode():
        logits = plan.aggregator([m(**val.batch(torch.arange(len(val)))) for m in submodels])
    assert plan.figures["coformer"]["val_accuracy"] == pytest.approx(accuracy(logits, val.labels), abs=0.01)
    # every sub-model has its validation and test accuracy in the plan, as the teacher and CoFormer do
    assert [s["device"] for s in plan.figures["submodels"]] == [d["name"] for d in plan.meta["policy"]["devices"]]
    for row in [plan.figures["teacher"], plan.figures["coformer"], *plan.figures["submodels"]]:
        assert 0 <= row["val_accuracy"] <= 100 and 0 <= row["accuracy"] <= 100


def test_calibrate_without_a_plan_uses_the_proportional_default(flow: Any) -> None:
    root = flow["root"]
    _cli("calibrate", "--data", flow["data"], "--source", flow["ckpt"], "--devices", "jetson-nano,orin-nano",
         "--max-length", "16", "--layers", "1", "--epochs", "1", "--out", str(root / "proportional"))
    plan = load_plan(root / "proportional")
    policy = Policy.from_dict(plan.meta["policy"])
    assert [d.name for d in policy.devices] == ["jetson-nano", "orin-nano"]
    assert all(s.layers == 1 for s in policy.specs) and "proportional" in policy.meta["source"]
    assert plan.meta["searched"] is None

    # bench without --data measures accuracy on the data set the plan records: the CSV's test split
    _cli("bench", "--plan", str(root / "proportional"), "--workers", "inproc://flow-0,inproc://flow-1",
         "--link-mbps", "1000", "--requests", "1", "--warmup", "0", "--out", str(root / "bench"))
    doc = json.loads((root / "bench" / "bench.json").read_text())
    assert doc["command"]["data"] == coformer.create_dataset(flow["data"]).uri
    backbone = coformer.create_backbone("bert")
    teacher = backbone.load(plan.meta["teacher"]["path"], max_length=16).eval()
    test = encode(backbone, teacher, coformer.load_dataset(flow["data"]).test)
    with torch.inference_mode():
        logits = backbone.task_head(teacher)(backbone.features(teacher, test.batch(torch.arange(len(test)))))
    assert doc["accuracy"]["teacher"]["accuracy"] == pytest.approx(accuracy(logits, test.labels), abs=0.01)
    assert f"measured on {len(test)} test examples" in doc["accuracy"]["teacher"]["source"]


def test_calibrate_refuses_a_missing_data_file_clearly(flow: Any, tmp_path: Path) -> None:
    res = CliRunner().invoke(build_cli(), ["calibrate", "--data", f"csv:{tmp_path / 'nope.csv'}", "--source",
                                           flow["ckpt"], "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "nope.csv" in str(res.exception or res.output)
    assert not (tmp_path / "o").exists()  # nothing packaged


def test_demo_runs_on_a_csv_and_records_its_uri(flow: Any) -> None:
    root = flow["root"]
    config = BoosterConfig(epochs=1, batch_size=16, lr=1e-3, aggregator_epochs=3)
    result = run_demo(source=flow["ckpt"], data_uri=flow["data"], config=config, max_length=16, layers=1,
                      devices="jetson-nano,jetson-tx2", latency_repeats=1, compressed=False, out=root / "demo",
                      console=Console(quiet=True))
    canonical = coformer.create_dataset(flow["data"]).uri
    assert result.meta["dataset"] == canonical and result.meta["classes"] == sorted(TOPICS)
    assert result.meta["test_size"] == len(coformer.load_dataset(flow["data"]).test.labels)
    plan = load_plan(result.plan_dir)
    assert plan.meta["dataset"] == canonical and plan.meta["teacher"]["dataset"] == canonical


def test_profile_measures_on_the_chosen_data_sets_first_validation_example(flow: Any) -> None:
    from coformer.offline.profiler import reference_input

    backbone = coformer.create_backbone("bert")
    teacher = backbone.load(flow["ckpt"], max_length=16).eval()
    data = coformer.load_dataset(flow["data"])
    batch = reference_input(backbone, teacher, data)
    expected = backbone.prepare(teacher, data.val.examples[:1])
    assert batch.keys() == expected.keys() and all(torch.equal(batch[k], expected[k]) for k in batch)
    assert not torch.equal(batch["input_ids"], reference_input(backbone, teacher)["input_ids"])  # not BBC's
    out = flow["root"] / "profile.json"
    _cli("profile", "--source", flow["ckpt"], "--data", flow["data"], "--device-name", "cpu-test", "--shapes", "3",
         "--repeats", "1", "--warmup", "0", "--no-train", "--max-length", "16", "--out", str(out))
    assert len(json.loads(out.read_text())["records"]) == 3
