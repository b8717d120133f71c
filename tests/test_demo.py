"""The demo flow end to end on the real MiniLM and real BBC News articles (a small slice, for CI time)."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console

import coformer
from coformer import hookimpl
from coformer.artifacts import load_plan
from coformer.offline.booster import BoosterConfig
from coformer.data import RawSplit
from coformer_datasets.bbc_news import load_bbc_news
from coformer.experiments.demo import load_policy, render, run_demo
from coformer.plan_document import write_plan_document
from coformer.spec import ConstraintError, Policy, SubModelSpec, resolve_devices


def _slice(split: RawSplit, n: int) -> RawSplit:
    step = max(1, len(split.labels) // n)
    return RawSplit(split.examples[::step][:n], split.labels[::step][:n])


@pytest.fixture(scope="module")
def small_bbc():
    data = load_bbc_news()
    data.train, data.val, data.test = _slice(data.train, 100), _slice(data.val, 20), _slice(data.test, 50)
    return data


@pytest.mark.slow
@pytest.mark.ci
def test_demo_end_to_end_on_real_minilm(small_bbc, tmp_path, monkeypatch):
    monkeypatch.setenv("COFORMER_CACHE", str(tmp_path / "cache"))
    config = BoosterConfig(epochs=2, batch_size=16, lr=1e-3, aggregator_epochs=20)
    # the compressed alternative is covered on a tiny BERT (test_compressed.py); leaving it out keeps this one cheap
    kwargs = dict(dataset=small_bbc, config=config, load_options={"max_length": 48}, latency_repeats=3,
                  compressed=False)
    result = run_demo(out=tmp_path / "plan", **kwargs, console=Console(width=120))
    doc = result.to_dict()
    assert set(doc) >= {"teacher", "submodels", "coformer"}
    for fig in [doc["teacher"], *doc["submodels"], doc["coformer"]]:
        assert set(fig) >= {"accuracy", "params", "flops", "latency_ms"}
        assert 0 <= fig["accuracy"] <= 100 and fig["params"] > 0 and fig["flops"] > 0 and fig["latency_ms"] > 0
    assert len(doc["submodels"]) == 3
    assert doc["compressed"] is None and not (tmp_path / "plan" / "compressed").exists()
    # a real pretrained encoder with a fitted head classifies real news far above chance (20%)
    assert doc["teacher"]["accuracy"] >= 70
    # sub-models are smaller than the teacher, and together they cost less than it (disjoint units)
    assert all(s["params"] < doc["teacher"]["params"] for s in doc["submodels"])
    assert sum(s["flops"] for s in doc["submodels"]) < doc["teacher"]["flops"]
    assert doc["submodels"][0]["flops"] < doc["submodels"][1]["flops"]  # Nano smaller than TX2

    # the teacher was cached: a second run reuses it and reproduces the same figures (same seed)
    again = run_demo(out=tmp_path / "plan2", **kwargs, console=Console(width=120))
    assert (tmp_path / "cache" / "teachers").is_dir()
    assert again.coformer.accuracy == result.coformer.accuracy
    assert [s.accuracy for s in again.submodels] == [s.accuracy for s in result.submodels]

    # the plan directory loads (hash-verified) and its aggregator reproduces the demo's answer path
    plan = load_plan(result.plan_dir)
    assert plan.meta["classes"] == small_bbc.classes and len(plan.artifacts) == 3
    subs = plan.submodels()
    batch = {"input_ids": torch.randint(1000, 2000, (2, 48)), "attention_mask": torch.ones(2, 48, dtype=torch.long)}
    with torch.inference_mode():
        logits = plan.aggregator([m(**batch) for m in subs])
    assert logits.shape == (2, len(small_bbc.classes))
    console = Console(record=True, width=120)
    render(result, console)
    text = console.export_text()
    assert "CoFormer" in text and "teacher" in text and "sub-model 2 (orin-nano)" in text


def test_demo_rejects_an_infeasible_plan_before_calibrating(small_bbc, tmp_path, monkeypatch):
    monkeypatch.setenv("COFORMER_CACHE", str(tmp_path / "cache"))
    devices = resolve_devices("jetson-nano,jetson-tx2")
    bad = Policy([SubModelSpec.uniform(6, 300, 6, 800), SubModelSpec.uniform(6, 200, 7, 800)], devices)
    write_plan_document(tmp_path, {"policy": bad.to_dict()}, "searched")
    assert load_policy(tmp_path).specs == bad.specs
    calibrated = []

    class Spy:
        @hookimpl
        def calibration_step(self, submodel, epoch, step, loss):
            calibrated.append(step)

    from coformer import register_plugin, unregister_plugin

    name = register_plugin(Spy(), name="spy")
    try:
        with pytest.raises(ConstraintError) as err:
            run_demo(dataset=small_bbc, plan=tmp_path, out=tmp_path / "out", load_options={"max_length": 16},
                     console=Console(width=120))
    finally:
        unregister_plugin(name)
    text = str(err.value)
    assert "C2: embedding channels 300 + 200 = 500 > d=384 by 116" in text
    assert "C3: layer 1: heads 6 (jetson-nano) + 7 (jetson-tx2) = 13 > h=12 by 1" in text
    assert calibrated == [] and not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="coformer plan --out DIR"):
        load_policy(tmp_path / "nowhere")


def test_demo_layers_outside_the_teacher_are_refused_before_calibrating(small_bbc, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from coformer.cli import build_cli

    monkeypatch.setenv("COFORMER_CACHE", str(tmp_path / "cache"))
    for layers in (0, 7):
        with pytest.raises(ConstraintError, match=r"C1: .*teacher has 6; choose --layers 1\.\.6"):
            run_demo(dataset=small_bbc, layers=layers, out=tmp_path / "out", load_options={"max_length": 16},
                     console=Console(width=120))
    assert not (tmp_path / "out").exists()
    res = CliRunner().invoke(build_cli(), ["demo", "--plan", str(tmp_path), "--layers", "2"])
    assert res.exit_code == 2 and "--layers applies to the proportional policy" in res.output


@pytest.mark.slow
def test_demo_with_fewer_layers_per_submodel(small_bbc, tmp_path, monkeypatch):
    monkeypatch.setenv("COFORMER_CACHE", str(tmp_path / "cache"))
    config = BoosterConfig(epochs=1, batch_size=16, lr=1e-3, aggregator_epochs=5)
    result = run_demo(dataset=small_bbc, config=config, layers=2, out=tmp_path / "plan",
                      load_options={"max_length": 32}, latency_repeats=2, console=Console(width=120))
    plan = load_plan(result.plan_dir)
    policy = Policy.from_dict(plan.meta["policy"])
    assert [s.layers for s in policy.specs] == [2, 2, 2]
    assert "2 layers each" in policy.meta["source"]
    assert all(len(a.config["heads"]) == len(a.config["mlp"]) == 2 for a in plan.artifacts)


@pytest.mark.slow
@pytest.mark.ci
def test_coformer_plan_output_drives_the_demo(small_bbc, tmp_path, monkeypatch):
    """`coformer plan` writes a feasible policy for the demo's devices; the demo runs it."""
    from click.testing import CliRunner

    from coformer.cli import build_cli
    from coformer.spec import check_structure

    monkeypatch.setenv("COFORMER_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "planned"
    res = CliRunner().invoke(build_cli(), ["plan", "--strategy", "random", "--trials", "2", "--val-docs", "8",
                                           "--train-docs", "20", "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    policy = load_policy(out)
    assert [d.name for d in policy.devices] == ["jetson-nano", "jetson-tx2", "orin-nano"]
    from coformer.spec import ModelShape

    assert check_structure(policy.specs, ModelShape(6, 384, (12,) * 6, (1536,) * 6, head_dim=32), policy.devices) == []
    result = run_demo(dataset=small_bbc, plan=out, out=tmp_path / "demo", load_options={"max_length": 32},
                      config=BoosterConfig(epochs=1, aggregator_epochs=5), latency_repeats=2,
                      console=Console(width=120))
    assert [s.extra["spec"] for s in result.submodels] == [s.to_dict() for s in policy.specs]


# flan_t5's default comes from the traceforge-title-model package (tests/test_onnx_t5.py checks its absence)
@pytest.mark.parametrize("name, says", [("gpt2", "no GPT-2 weights ship with CoFormer")])
def test_demo_on_a_backbone_without_embedded_weights_says_to_pass_a_checkpoint(name, says, tmp_path):
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "coformer", "demo", "--backbone", name, "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "COLUMNS": "300", "COFORMER_CACHE": str(tmp_path / "cache")})
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert says in text and "pass a local directory" in text and "Traceback" not in text


@pytest.mark.slow
def test_image_demo_calibrates_with_the_vit_family_defaults(tmp_path, monkeypatch):
    """ViT's calibration defaults (seed rule, feature distillation) reach the demo; no sub-model collapses."""
    monkeypatch.setenv("COFORMER_CACHE", str(tmp_path / "cache"))
    data = coformer.load_dataset("digits")
    result = run_demo(backbone_name="vit", dataset=data, img_size=28, out=tmp_path / "plan", latency_repeats=2,
                      booster_overrides={"epochs": 2}, console=Console(width=120))
    booster = result.meta["booster"]
    assert (booster["weight_rule"], booster["feature_weight"], booster["lr_schedule"]) == ("seed-unweighted", "1.0", "cosine")
    assert booster["epochs"] == "2"  # the caller's override on top of the family's defaults
    # before the family defaults and the own-head fix the 2nd and 3rd fell to chance (8.5% / 10.0% on Fashion-MNIST)
    assert min(s.accuracy for s in result.submodels) > 50, [s.accuracy for s in result.submodels]
