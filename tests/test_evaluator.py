"""The evaluator: T against its formula by hand, L_val exactness, precise constraint messages, no wasted work."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import coformer
from coformer.data import TensorDataset
from coformer.evaluator import Evaluator
from coformer.spec import DeviceProfile, Policy, SubModelSpec


@pytest.fixture(scope="module")
def tiny():
    backbone = coformer.create_backbone("bert")
    teacher = backbone.tiny(num_labels=3).eval()
    batch = backbone.example_batch(teacher, batch_size=6, seed=1)
    val = TensorDataset(batch, torch.tensor([0, 1, 2, 0, 1, 2]))
    return backbone, teacher, val


class LayersPredictor:
    """A hand latency model: 2 ms per layer + 0.1 ms per embedding channel."""

    def predict(self, spec: SubModelSpec) -> float:
        return 2.0 * spec.layers + 0.1 * spec.embed_dim


def test_T_matches_the_formula_on_a_hand_example(tiny):
    backbone, teacher, _ = tiny
    a = DeviceProfile("a", memory_gb=4, gflops=100.0, power_w=5, link_mbps=8.0)
    b = DeviceProfile("b", memory_gb=4, gflops=400.0, power_w=5, link_mbps=16.0)
    ev = Evaluator(backbone, teacher, [a, b], predictors={"a": LayersPredictor()}, batch_size=2)
    sa, sb = SubModelSpec.uniform(2, 12, 2, 20), SubModelSpec.uniform(1, 20, 2, 30)
    T, t1, src, t2, t3 = ev.latency(Policy([sa, sb], [a, b]))
    assert ev.central == "b"  # the device with the most GFLOPS
    flops_b = ev.cost(sb).flops
    assert t1 == pytest.approx([2 * 2 + 0.1 * 12, flops_b / 400e9 * 1000])
    assert src[0] == "predictor" and src[1].startswith("estimate")
    # |X_a| = 12 values * 2 bytes * batch 2 = 48 bytes over 8 Mbit/s; b is the central node
    assert t2 == pytest.approx([48 * 8 / 8e6 * 1000, 0.0])
    d = backbone.shape(teacher).embed_dim
    assert t3 == pytest.approx(2 * 2 * d * (12 + 20) / 400e9 * 1000)
    assert T == pytest.approx(max(t1[0] + t2[0], t1[1] + t2[1]) + t3)
    ev_link = Evaluator(backbone, teacher, [a, b], link_mbps=1000.0, batch_size=2)
    assert ev_link.latency(Policy([sa, sb], [a, b]))[3][0] == pytest.approx(48 * 8 / 1e9 * 1000)


def test_L_val_of_the_full_spec_is_the_teachers_loss(tiny):
    backbone, teacher, val = tiny
    dev = DeviceProfile("big", memory_gb=8, gflops=1000.0, power_w=5)
    ev = Evaluator(backbone, teacher, [dev], val=val, delta=0.25)
    res = ev.evaluate(Policy([backbone.shape(teacher).full_spec()], [dev]))
    with torch.no_grad():
        expected = nn.functional.cross_entropy(backbone.forward_teacher(teacher, val.inputs), val.labels)
    assert res.feasible and res.L_val == pytest.approx(float(expected), rel=1e-5)
    assert res.psi == pytest.approx(res.L_val + 0.25 * res.T_ms)
    assert ev.model_evaluations == 1
    ev.evaluate(Policy([backbone.shape(teacher).full_spec()], [dev]))
    assert ev.model_evaluations == 1  # cached by policy


def test_uncalibrated_submodels_lose_more_than_the_teacher(tiny):
    backbone, teacher, val = tiny
    devs = [DeviceProfile(n, memory_gb=8, gflops=1000.0, power_w=5) for n in ("x", "y")]
    ev = Evaluator(backbone, teacher, devs, val=val)
    full = ev.evaluate(Policy([backbone.shape(teacher).full_spec()], devs[:1]))
    half = ev.evaluate(Policy([SubModelSpec.uniform(1, 16, 2, 32)] * 2, devs))
    assert len(half.losses) == 2 and half.L_val == pytest.approx(sum(half.losses) / 2)
    assert half.L_val != pytest.approx(full.L_val)


def test_structure_violations_are_precise_and_never_evaluated(tiny):
    backbone, teacher, val = tiny
    devs = [DeviceProfile(n, memory_gb=8, gflops=1000.0, power_w=5) for n in ("nano", "tx2")]
    ev = Evaluator(backbone, teacher, devs, val=val)
    shape = backbone.shape(teacher)
    bad = Policy([SubModelSpec.uniform(1, 20, 2, 40), SubModelSpec.uniform(shape.layers + 1, 20, 3, 10)], devs)
    res = ev.evaluate(bad)
    text = "\n".join(res.violations)
    assert not res.feasible
    assert f"C1: sub-model 1 on 'tx2' has {shape.layers + 1} layers > L={shape.layers} by 1" in text
    assert f"C2: embedding channels 20 + 20 = 40 > d={shape.embed_dim} by {40 - shape.embed_dim}" in text
    assert "C3: layer 1: heads 2 (nano) + 3 (tx2) = 5 > h=4 by 1" in text
    assert not any(v.startswith("C4") for v in res.violations)  # 40 + 10 MLP neurons fit D=64
    assert ev.model_evaluations == 0 and ev._importance is None and not ev._costs


def test_resource_violations_name_device_and_amount(tiny):
    backbone, teacher, val = tiny
    spec = SubModelSpec.uniform(2, 16, 2, 32)
    probe = Evaluator(backbone, teacher, [DeviceProfile("p", 8, 1000.0, 5)])
    cost = probe.cost(spec)
    tight = DeviceProfile("tight", memory_gb=cost.memory_bytes / 2 / 2**30, gflops=1000.0, power_w=5,
                          flops_budget_g=cost.flops / 2 / 1e9)
    ev = Evaluator(backbone, teacher, [tight], val=val)
    res = ev.evaluate(Policy([spec], [tight]))
    c5 = next(v for v in res.violations if v.startswith("C5"))
    c6 = next(v for v in res.violations if v.startswith("C6"))
    assert f"sub-model 0 on 'tight' needs {cost.flops / 1e9:.3f} GFLOPs" in c5
    assert f"by {cost.flops / 2 / 1e9:.3f} GFLOPs" in c5
    assert "sub-model 0 on 'tight'" in c6 and "MiB" in c6
    assert ev.model_evaluations == 0 and ev._importance is None


def test_unknown_central_node_is_rejected(tiny):
    backbone, teacher, _ = tiny
    with pytest.raises(ValueError, match="central node 'z' is not one of the devices"):
        Evaluator(backbone, teacher, [DeviceProfile("a", 1, 1.0, 1)], central="z")
