"""Constraint checks C1–C6 name the constraint, the device and the amount over; device profiles load."""

from __future__ import annotations

import json

import pytest

from coformer.assignment import deal

from coformer.offline.decompose import proportional_specs
from coformer.spec import (
    BUILTIN_DEVICES,
    ConstraintError,
    DeviceProfile,
    ModelShape,
    Policy,
    SubModelCost,
    SubModelSpec,
    check_resources,
    check_structure,
    load_devices,
    resolve_devices,
    validate,
)

import torch

SHAPE = ModelShape(layers=6, embed_dim=384, heads=(12,) * 6, mlp=(1536,) * 6, head_dim=32)
DEVICES = resolve_devices("jetson-nano,jetson-tx2,orin-nano")


def test_builtin_devices_match_the_seed_table():
    nano, tx2, orin, pi = (BUILTIN_DEVICES[n] for n in ("jetson-nano", "jetson-tx2", "orin-nano", "rpi4b"))
    assert (nano.memory_gb, nano.gflops, nano.power_w) == (4, 235.8, 10)
    assert (tx2.memory_gb, tx2.gflops, tx2.power_w) == (8, 665.6, 15)
    assert (orin.memory_gb, orin.gflops, orin.power_w) == (4, 640.0, 10)
    assert (pi.memory_gb, pi.gflops, pi.power_w) == (8, 13.5, 7.3)


def test_proportional_policy_is_feasible_and_uses_every_unit():
    specs = proportional_specs(SHAPE, [d.gflops for d in DEVICES])
    assert check_structure(specs, SHAPE, DEVICES) == []
    assert sum(s.embed_dim for s in specs) == 384
    assert all(sum(s.heads[k] for s in specs) == 12 for k in range(6))
    assert specs[0].embed_dim < specs[2].embed_dim  # the Nano gets the smallest share


def test_c1_layers_over_teacher():
    specs = [SubModelSpec.uniform(7, 100, 4, 500)]
    [v] = check_structure(specs, SHAPE, DEVICES[:1])
    assert v.constraint == "C1" and v.device == "jetson-nano" and v.excess == 1
    assert "7 layers > L=6 by 1" in v.message


def test_c2_c3_c4_sums_name_the_layer_and_amount():
    specs = [SubModelSpec.uniform(6, 200, 7, 800), SubModelSpec.uniform(6, 200, 6, 800)]
    violations = check_structure(specs, SHAPE, DEVICES[:2])
    by = {(v.constraint, v.message.split(":")[0]) for v in violations}
    assert ("C2", "embedding channels 200 + 200 = 400 > d=384 by 16") in {(v.constraint, v.message) for v in violations}
    assert ("C3", "layer 1") in by and ("C4", "layer 6") in by
    c3 = next(v for v in violations if v.constraint == "C3")
    assert c3.excess == 1 and "jetson-nano" in c3.message and "jetson-tx2" in c3.message


def test_c5_c6_resources_per_device():
    nano = BUILTIN_DEVICES["jetson-nano"]
    over_flops = SubModelCost(flops=nano.flops_budget + 2e9, params=1, memory_bytes=1)
    over_mem = SubModelCost(flops=1.0, params=1, memory_bytes=nano.memory_bytes + 2**20)
    [c5] = check_resources([over_flops], [nano])
    [c6] = check_resources([over_mem], [nano])
    assert c5.constraint == "C5" and c5.device == "jetson-nano" and "by 2.000 GFLOPs" in c5.message
    assert c6.constraint == "C6" and c6.device == "jetson-nano" and "by 1.0 MiB" in c6.message


def test_validate_raises_with_every_violation():
    specs = [SubModelSpec.uniform(7, 400, 13, 2000)]
    with pytest.raises(ConstraintError) as err:
        validate(specs, SHAPE, DEVICES[:1], [SubModelCost(1e15, 1, 1)])
    kinds = [v.constraint for v in err.value.violations]
    assert kinds[:1] == ["C1"] and {"C2", "C3", "C4", "C5"} <= set(kinds)
    assert "infeasible" in str(err.value)


def test_group_size_enforced_for_grouped_query_attention():
    shape = ModelShape(2, 64, (9, 9), (128, 128), head_dim=8, head_group=3)
    [v] = check_structure([SubModelSpec(2, 32, (4, 3), (64, 64))], shape)
    assert v.constraint == "C3" and "multiples of the key/value group size 3" in v.message


def test_spec_validation_and_round_trip():
    with pytest.raises(ValueError, match="one entry per kept layer"):
        SubModelSpec(2, 10, (1,), (4, 4))
    s = SubModelSpec(2, 10, (1, 2), (4, 5))
    assert SubModelSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    p = Policy([s], [DEVICES[0]], {"why": "test"})
    assert Policy.from_dict(json.loads(json.dumps(p.to_dict()))).specs == [s]


def test_device_files_toml_and_json(tmp_path):
    toml = tmp_path / "devs.toml"
    toml.write_text('[[device]]\nname = "box"\nmemory_gb = 2\ngflops = 50\npower_w = 5\n')
    [box] = resolve_devices(str(toml))
    assert box == DeviceProfile("box", 2, 50, 5)
    js = tmp_path / "devs.json"
    js.write_text(json.dumps({"devices": [{"name": "b", "memory_gb": 1, "gflops": 2, "power_w": 3, "speed": 1}]}))
    with pytest.raises(ValueError, match="unknown fields \\['speed'\\]"):
        load_devices(js)
    with pytest.raises(ValueError, match="unknown device 'tpu'; built-in devices: jetson-nano"):
        resolve_devices("tpu")


def test_deal_is_disjoint_proportional_and_mixes_importance():
    scores = torch.arange(12, 0, -1).float()  # unit 0 most important
    parts = deal(scores, [2, 4, 6])
    assert [len(p) for p in parts] == [2, 4, 6]
    assert sorted(u for p in parts for u in p) == list(range(12))
    # every member gets one of the top-3 units: importance is mixed, not hoarded
    assert all(min(p) < 3 for p in parts)
    grouped = deal(torch.tensor([1.0, 1, 1, 9, 9, 9]), [3, 3], group=3)
    assert grouped == [(3, 4, 5), (0, 1, 2)]
    with pytest.raises(ValueError, match="need 13 units but only 12 exist"):
        deal(scores, [6, 7])
