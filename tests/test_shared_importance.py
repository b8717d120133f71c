"""Unit importance is computed once per (teacher, data), cached by content hash, and the plan's is what deploys."""

from __future__ import annotations

import json

import pytest
import torch

import coformer
from coformer.data import TensorDataset
from coformer.experiments.demo import load_plan_importance
from coformer.offline.evaluator import Evaluator
from coformer.offline.importance import content_hash, importance_record, plan_importance, shared_importance
from coformer.offline.pipeline import Teacher, decompose_policy
from coformer.plan_document import write_plan_document
from coformer.spec import DeviceProfile, Policy, SubModelSpec


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COFORMER_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny():
    backbone = coformer.create_backbone("bert")
    teacher = backbone.tiny(num_labels=3).eval()
    return backbone, teacher


def _data(backbone, teacher, n, seed):
    return TensorDataset(backbone.example_batch(teacher, batch_size=n, seed=seed), torch.arange(n) % 3)


def test_importance_is_computed_once_and_cached_by_content(tiny, monkeypatch, tmp_path):
    backbone, teacher = tiny
    batch = _data(backbone, teacher, 8, 1).inputs
    first, key = shared_importance(backbone, teacher, batch)
    calls = []
    monkeypatch.setattr(type(backbone), "importance", lambda self, m, b: calls.append(1))
    again, key2 = shared_importance(backbone, teacher, batch)
    assert calls == [] and key2 == key  # read back from the cache, not recomputed
    assert all(torch.equal(a, b) for a, b in zip(again.heads, first.heads)) and torch.equal(again.channels,
                                                                                             first.channels)
    other = _data(backbone, teacher, 8, 2).inputs
    assert content_hash(teacher, other) != key  # other data, other entry


def test_the_plans_importance_deploys_the_units_the_search_scored(tiny, tmp_path):
    """Old code: the search ranked units on 8 validation samples, deployment on 32 training samples."""
    backbone, teacher = tiny
    val, probe_train = _data(backbone, teacher, 6, 3), _data(backbone, teacher, 12, 4)
    devs = [DeviceProfile(n, memory_gb=8, gflops=1000.0, power_w=5) for n in ("x", "y")]
    ev = Evaluator(backbone, teacher, devs, val=val, probe_train=probe_train, probe_epochs=20)
    policy = Policy([SubModelSpec.uniform(2, 16, 2, 32), SubModelSpec.uniform(1, 12, 2, 24)], devs)
    assert ev.evaluate(policy).feasible
    searched = ev.selections(policy.specs)
    write_plan_document(tmp_path, {"policy": policy.to_dict(),
                                    "importance": importance_record(ev.importance(), ev.importance_key, 12)}, "searched")

    # deployment's own data differs from the search's (another split, another size)
    deploy_train = _data(backbone, teacher, 40, 5)
    dummy = torch.zeros(1)
    t = Teacher(teacher, tmp_path, True, deploy_train, val, val, dummy, dummy, dummy)
    deployed = decompose_policy(backbone, t, policy, importance=load_plan_importance(tmp_path))
    assert deployed.selections == searched
    # without the plan's importance the deployed units would differ from the scored ones
    assert decompose_policy(backbone, t, policy).selections != searched
    assert plan_importance({"policy": {}}) is None  # a plan from before importance was stored


@pytest.mark.slow
def test_coformer_plan_stores_the_importance_topology_and_proxy_it_searched_with(tmp_path):
    from click.testing import CliRunner

    from coformer.cli import build_cli
    from coformer.offline.plan_stage import training_subset
    from coformer.offline.importance import IMPORTANCE_SAMPLES

    out = tmp_path / "planned"
    res = CliRunner().invoke(build_cli(), ["plan", "--strategy", "random", "--trials", "2", "--val-docs", "8",
                                           "--train-docs", "20", "--topology", "device:1", "--out", str(out)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "plan.json").read_text())
    assert doc["proxy"] == "probe" and doc["predicted"]["proxy"] == "probe"
    assert doc["topology"] == {"kind": "device", "central": 1, "coordinator_gflops": None}
    devices = doc["predicted"]["devices"]
    assert devices[1]["t2_ms"] == 0.0 and devices[0]["t2_ms"] > 0 and devices[2]["t2_ms"] > 0
    assert all(d["t1_source"] == "estimate (FLOPs/GFLOPS)" for d in devices)  # no --predictors given
    # the stored importance is the one of the plan's first training docs, under the same content key
    backbone = coformer.create_backbone("bert")
    teacher = backbone.load(max_length=doc["max_length"]).eval()
    train = training_subset(backbone, teacher, 20, 0)
    expected, key = shared_importance(backbone, teacher, train.batch(torch.arange(min(20, IMPORTANCE_SAMPLES))))
    assert doc["importance"]["key"] == key
    stored = load_plan_importance(out)
    assert torch.allclose(stored.channels, expected.channels) and torch.allclose(stored.layers, expected.layers)
