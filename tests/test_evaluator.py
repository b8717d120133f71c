"""The evaluator: T against its formula by hand, L_val exactness, precise constraint messages, no wasted work."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import coformer
from coformer.data import TensorDataset
from coformer.offline.evaluator import Evaluator, Topology
from coformer.heads import ClassifierHead
from coformer.offline.pipeline import fit_head
from coformer.transport import encode_batch
from coformer.spec import DeviceProfile, Policy, SubModelSpec


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COFORMER_CACHE", str(tmp_path / "cache"))


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
    T, t1, src, t2, t3, t0 = ev.latency(Policy([sa, sb], [a, b]))
    assert ev.topology == Topology("coordinator")  # the runtime's: a separate coordinator
    flops_b = ev.cost(sb).flops
    assert t1 == pytest.approx([2 * 2 + 0.1 * 12, flops_b / 400e9 * 1000])
    assert src == ["predictor", "estimate (FLOPs/GFLOPS)"]
    # every device receives the input (safetensors bytes × batch 2) and returns d_n fp16 values × batch 2
    x_in = len(encode_batch(ev.cost_batch)) * 2
    assert x_in > 0 and ev.input_bytes() == x_in
    assert t2 == pytest.approx([(x_in + 48) * 8 / 8e6 * 1000, (x_in + 80) * 8 / 16e6 * 1000])
    d = backbone.shape(teacher).embed_dim
    # the coordinator's rate defaults to the strongest device's GFLOPS
    assert t3 == pytest.approx(2 * 2 * d * (12 + 20) / 400e9 * 1000)
    assert T == pytest.approx(max(t1[0] + t2[0], t1[1] + t2[1]) + t3)
    ev_link = Evaluator(backbone, teacher, [a, b], link_mbps=1000.0, batch_size=2)
    assert ev_link.latency(Policy([sa, sb], [a, b]))[3][0] == pytest.approx((x_in + 48) * 8 / 1e9 * 1000)
    # central node on device a (index 0): a's t2 is 0, b pays its own link, t3 runs at a's rate
    ev_dev = Evaluator(backbone, teacher, [a, b], topology=Topology("device", 0), batch_size=2)
    _, _, _, t2d, t3d, _ = ev_dev.latency(Policy([sa, sb], [a, b]))
    assert t2d == pytest.approx([0.0, (x_in + 80) * 8 / 16e6 * 1000])
    assert t3d == pytest.approx(2 * 2 * d * (12 + 20) / 100e9 * 1000)


class CallOverheadPredictor(LayersPredictor):
    """As profiled through a worker: each call also costs 3 ms of serialisation and RPC."""

    call_overhead_ms = 3.0


def test_T_includes_the_call_overhead_of_devices_profiled_through_their_worker(tiny):
    """Old T had no per-call runtime cost: a plan of 1 ms sub-models predicted 1.1 ms where the
    testbed measured 4.4 ms at 1 Gb/s."""
    backbone, teacher, _ = tiny
    a = DeviceProfile("a", memory_gb=4, gflops=100.0, power_w=5, link_mbps=1000.0)
    b = DeviceProfile("b", memory_gb=4, gflops=400.0, power_w=5, link_mbps=1000.0)
    policy = Policy([SubModelSpec.uniform(1, 12, 2, 20), SubModelSpec.uniform(1, 20, 2, 30)], [a, b])
    ev = Evaluator(backbone, teacher, [a, b], predictors={"a": CallOverheadPredictor()})
    T, t1, _, t2, t3, t0 = ev.latency(policy)
    assert t0 == [3.0, 0.0]  # b has no profiled predictor: no measured call cost
    assert T == pytest.approx(max(3.0 + t1[0] + t2[0], t1[1] + t2[1]) + t3)
    assert [d["t0_ms"] for d in ev.evaluate(policy).components()["devices"]] == [3.0, 0.0]
    # the central device is called by no one
    central = Evaluator(backbone, teacher, [a, b], predictors={"a": CallOverheadPredictor()},
                        topology=Topology("device", 0))
    assert central.latency(policy).t0 == [0.0, 0.0]


def test_only_the_central_device_skips_t2_even_when_devices_share_its_name(tiny):
    """Old code gave t2 = 0 to every device named like the central node: two TX2s both counted as central."""
    backbone, teacher, _ = tiny
    tx2 = DeviceProfile("jetson-tx2", memory_gb=8, gflops=665.6, power_w=15, link_mbps=2.0)
    nano = DeviceProfile("jetson-nano", memory_gb=4, gflops=235.8, power_w=10, link_mbps=2.0)
    devs = [tx2, tx2, nano]
    spec = SubModelSpec.uniform(1, 8, 1, 16)
    policy = Policy([spec] * 3, devs)
    ev = Evaluator(backbone, teacher, devs, central=0)
    t2 = ev.latency(policy)[3]
    assert t2[0] == 0.0
    assert t2[1] > 0.0 and t2[1] == pytest.approx(t2[2])  # the second TX2 crosses its link like the Nano
    # with the runtime's separate coordinator nobody is central: every device pays its link
    assert all(t > 0 for t in Evaluator(backbone, teacher, devs).latency(policy)[3])
    comp = ev.evaluate(policy).components()
    assert [d["index"] for d in comp["devices"]] == [0, 1, 2]  # duplicate names are not merged
    assert comp["topology"] == {"kind": "device", "central": 0, "coordinator_gflops": None}


def test_topology_round_trips_and_rejects_bad_input(tiny):
    backbone, teacher, _ = tiny
    topo = Topology("device", 2)
    assert Topology.from_dict(topo.to_dict()) == topo and Topology.from_dict(None) == Topology()
    with pytest.raises(ValueError, match="needs the central device's index"):
        Topology("device")
    with pytest.raises(ValueError, match="topology 'star' is unknown"):
        Topology("star")
    with pytest.raises(ValueError, match="index 3 is out of range for 1 devices"):
        Evaluator(backbone, teacher, [DeviceProfile("a", 1, 1.0, 1)], topology=Topology("device", 3))
    with pytest.raises(TypeError, match="chosen by its index in the device list"):
        Evaluator(backbone, teacher, [DeviceProfile("a", 1, 1.0, 1)], central="a")


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


def test_probe_proxy_is_a_linear_probe_on_the_deployed_units(tiny):
    backbone, teacher, val = tiny
    train = TensorDataset(backbone.example_batch(teacher, batch_size=12, seed=2), torch.arange(12) % 3)
    devs = [DeviceProfile(n, memory_gb=8, gflops=1000.0, power_w=5) for n in ("x", "y")]
    ev = Evaluator(backbone, teacher, devs, val=val, probe_train=train, probe_epochs=50)
    assert ev.proxy == "probe"
    specs = [SubModelSpec.uniform(1, 16, 2, 32), SubModelSpec.uniform(2, 12, 2, 16)]
    res = ev.evaluate(Policy(specs, devs))
    # by hand: slice the units the evaluator assigns, standardise on train, fit the same head, CE on val
    with torch.no_grad():
        subs = [backbone.slice(teacher, sel).eval() for sel in ev.selections(specs)]
        tx = torch.cat([s(**train.inputs) for s in subs], 1)
        vx = torch.cat([s(**val.inputs) for s in subs], 1)
    mean, std = tx.mean(0, keepdim=True), tx.std(0, keepdim=True).clamp_min(1e-6)
    torch.manual_seed(0)
    head = fit_head(ClassifierHead(tx.shape[1], 3), (tx - mean) / std, train.labels, epochs=50, lr=1e-2,
                    weight_decay=1e-2, seed=0)
    with torch.no_grad():
        expected = float(nn.functional.cross_entropy(head((vx - mean) / std), val.labels))
    assert res.proxy == "probe" and res.L_val == pytest.approx(expected, rel=1e-4)
    assert len(res.losses) == 2
    # importance was scored on the first training samples, not on validation data
    assert ev.calibration_batch()["input_ids"].equal(train.inputs["input_ids"])
    with pytest.raises(ValueError, match="'probe' proxy needs labelled training data"):
        Evaluator(backbone, teacher, devs, val=val, proxy="probe")
