"""Pipeline and tensor-parallel baselines over real loopback gRPC workers reproduce the teacher exactly (fp16 wire)."""

from __future__ import annotations

from typing import Any, Iterator

import pytest
import torch

import coformer
from coformer.experiments.baselines import TeacherAlone, contiguous, proportional_split
from coformer.experiments.split_baselines import PipelineSplit, TensorParallelSplit
from coformer.spec import BUILTIN_DEVICES
from coformer.transport import encode_batch

DEVICES = [BUILTIN_DEVICES[n] for n in ("jetson-nano", "jetson-tx2", "orin-nano")]
BACKBONES = sorted(info.name for info in coformer.list_plugins("backbone"))
# fp16 on every hand-over (hidden states, partial sums, features) over a 3-layer post-LN model
TOL = 3e-2


@pytest.fixture(scope="module")
def bert() -> dict[str, Any]:
    """A tiny randomly initialised BERT teacher, a batch with padding, and its features/logits."""
    backbone = coformer.create_backbone("bert")
    teacher = backbone.tiny(num_labels=3, seed=1)
    batch = backbone.example_batch(teacher, batch_size=3, seed=2)
    with torch.no_grad():
        feats = backbone.features(teacher, batch)
        logits = backbone.task_head(teacher)(feats)
    return {"backbone": backbone, "teacher": teacher, "batch": batch, "features": feats, "logits": logits}


@pytest.fixture(scope="module")
def grpc_clients() -> Iterator[list[Any]]:
    """Three real gRPC workers on loopback and a client for each."""
    from coformer_transports.grpc_transport import serve

    servers = [serve("127.0.0.1:0", name=f"bl{i}") for i in range(3)]
    clients = [coformer.open_transport(s.uri) for s in servers]
    yield clients
    for c in clients:
        c.close()
    for s in servers:
        s.stop(0)


def test_proportional_split_sums_and_follows_speed() -> None:
    assert proportional_split(12, [235.8, 665.6, 640.0]) == [2, 5, 5]
    assert sum(proportional_split(1536, [235.8, 665.6, 640.0, 13.5])) == 1536
    assert proportional_split(6, [1.0, 1.0, 1.0]) == [2, 2, 2]
    assert contiguous([2, 0, 1]) == [[0, 1], [], [2]]
    with pytest.raises(ValueError, match="positive speeds"):
        proportional_split(3, [1.0, 0.0])


def test_pipeline_split_is_exact_over_grpc(bert: dict[str, Any], grpc_clients: list[Any]) -> None:
    method = PipelineSplit(bert["backbone"], bert["teacher"], grpc_clients, DEVICES)
    # 3 layers by speed 235.8 : 665.6 : 640 → shares 0.46, 1.30, 1.25 → one each (largest remainder)
    assert [method.layers[i] for i in method.order] == [[0], [1], [2]]
    method.deploy()
    trace = method.infer(bert["batch"])
    torch.testing.assert_close(trace.logits, bert["logits"], atol=TOL, rtol=0)
    torch.testing.assert_close(method.features_local(bert["batch"]), bert["features"], atol=TOL, rtol=0)
    assert len(trace.rounds) == 3 and trace.total_ms >= trace.rounds[0][0].round_trip_ms
    b, s = bert["batch"]["input_ids"].shape
    first, second = trace.rounds[0][0], trace.rounds[2][0]
    assert first.request_bytes == len(encode_batch(bert["batch"]))
    assert first.response_bytes == b * s * 32 * 2  # fp16 hidden states
    assert second.response_bytes == b * 32 * 2  # pooled features
    assert second.request["hidden_states"].dtype == torch.float16
    mem = method.module_memory(bert["batch"])
    assert set(mem) == {"jetson-nano", "jetson-tx2", "orin-nano"} and all(v > 0 for v in mem.values())
    method.close()


def test_tensor_parallel_split_is_exact_over_grpc(bert: dict[str, Any], grpc_clients: list[Any]) -> None:
    method = TensorParallelSplit(bert["backbone"], bert["teacher"], grpc_clients, DEVICES)
    # the heads (4 per layer) and MLP neurons (64) of every layer are dealt out, all of them, disjointly
    for k in range(3):
        heads = sorted(h for i in method.units for h in method.units[i][0][k])
        neurons = sorted(m for i in method.units for m in method.units[i][1][k])
        assert heads == list(range(4)) and neurons == list(range(64))
    method.deploy()
    trace = method.infer(bert["batch"])
    torch.testing.assert_close(trace.logits, bert["logits"], atol=TOL, rtol=0)
    torch.testing.assert_close(method.features_local(bert["batch"]), bert["features"], atol=TOL, rtol=0)
    # two rounds of communication per layer, each to every device holding units of that phase
    assert len(trace.rounds) == 2 * 3
    assert {e.device for e in trace.rounds[1]} == {"jetson-nano", "jetson-tx2", "orin-nano"}
    assert trace.bytes > 6 * len(encode_batch({"h": torch.zeros(3, 16, 32, dtype=torch.float16)}))
    assert trace.compute_ms > 0 and set(trace.busy_ms()) == {"jetson-nano", "jetson-tx2", "orin-nano"}
    method.close()


def test_teacher_alone_runs_on_strongest_device(bert: dict[str, Any], grpc_clients: list[Any]) -> None:
    method = TeacherAlone(bert["backbone"], bert["teacher"], grpc_clients, DEVICES)
    assert method.used_devices() == ["jetson-tx2"]
    method.deploy()
    trace = method.infer(bert["batch"])
    torch.testing.assert_close(trace.logits, bert["logits"], atol=TOL, rtol=0)
    assert trace.wire_ms(2e6) == pytest.approx(trace.bytes * 8 / 2e6 * 1000)


def test_pipeline_of_one_slow_device_plus_one_fast() -> None:
    """A 4th, very slow device (Raspberry Pi 4B profile) gets no layer and no units rather than a zero-size module."""
    backbone = coformer.create_backbone("bert")
    teacher = backbone.tiny(seed=3)
    devices = [BUILTIN_DEVICES["orin-nano"], BUILTIN_DEVICES["rpi4b"]]
    clients = [coformer.open_transport(f"inproc://bl-pi-{i}") for i in range(2)]
    pipe = PipelineSplit(backbone, teacher, clients, devices)
    assert pipe.used_devices() == ["orin-nano"]
    tp = TensorParallelSplit(backbone, teacher, clients, devices)
    assert tp.used_devices() == ["orin-nano", "rpi4b"]  # 64 neurons × 13.5/653.5 → 1 neuron on the Pi
    batch = backbone.example_batch(teacher, 2)
    for m in (pipe, tp):
        m.deploy()
        torch.testing.assert_close(m.infer(batch).logits, backbone.forward_teacher(teacher, batch), atol=TOL, rtol=0)
        m.close()


def test_mismatched_clients_and_devices_are_refused(bert: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="2 workers for 3 device profiles"):
        PipelineSplit(bert["backbone"], bert["teacher"], [coformer.open_transport("inproc://x")] * 2, DEVICES)


def _declares_baselines(backbone: Any, teacher: Any) -> bool:
    try:
        backbone.pipeline_stage(teacher, [0], first=True, last=False)
    except NotImplementedError:
        return False
    return True


@pytest.mark.parametrize("name", BACKBONES)
def test_every_family_baseline_is_exact_over_grpc(name: str, grpc_clients: list[Any]) -> None:
    """Pipeline stages and tensor shards (rebuilt on the workers from their JSON config) reproduce the teacher."""
    backbone = coformer.create_backbone(name)
    teacher = backbone.tiny(num_labels=3, seed=0)
    if not _declares_baselines(backbone, teacher):
        pytest.skip(f"{name} declares no pipeline stages / tensor shards")
    batch = backbone.example_batch(teacher, batch_size=2, seed=4)
    with torch.no_grad():
        feats = backbone.features(teacher, batch)
        logits = backbone.task_head(teacher)(feats)
    shape = backbone.shape(teacher)
    pipe = PipelineSplit(backbone, teacher, grpc_clients, DEVICES)
    assert sorted(j for i in pipe.order for j in pipe.layers[i]) == list(range(shape.layers))
    assert len(pipe.order) > 1, "the tiny teacher should span several stages"
    tp = TensorParallelSplit(backbone, teacher, grpc_clients, DEVICES)
    for k in range(shape.layers):  # every unit dealt out once
        assert sorted(h for u in tp.units.values() for h in u[0][k]) == list(range(shape.heads[k]))
        assert sorted(m for u in tp.units.values() for m in u[1][k]) == list(range(shape.mlp[k]))
    assert len(tp.units) > 1
    for method in (pipe, tp):
        method.deploy()
        trace = method.infer(batch)
        torch.testing.assert_close(trace.logits, logits, atol=TOL, rtol=0)
        torch.testing.assert_close(method.features_local(batch), feats, atol=TOL, rtol=0)
        method.close()
    assert len(trace.rounds) == 2 * shape.layers


@pytest.mark.parametrize("name", BACKBONES)
def test_every_family_shard_partials_sum_to_the_layer(name: str) -> None:
    """In fp32 (no wire), a layer's shard partials plus the host's bias equal the full block exactly,
    and a shard holding no unit of a phase returns zeros."""
    backbone = coformer.create_backbone(name)
    teacher = backbone.tiny(num_labels=3, seed=1)
    if not _declares_baselines(backbone, teacher):
        pytest.skip(f"{name} declares no pipeline stages / tensor shards")
    shape = backbone.shape(teacher)
    g = shape.head_group
    heads_a = [list(range(0, h, 2 * g)) if h // g > 1 else list(range(h)) for h in shape.heads]
    heads_a = [[x + j for x in hs for j in range(g)] for hs in heads_a]
    heads_b = [[h for h in range(n) if h not in a] for a, n in zip(heads_a, shape.heads)]
    mlp_a = [list(range(0, m, 3)) for m in shape.mlp]
    mlp_b = [[x for x in range(m) if x not in a] for a, m in zip(mlp_a, shape.mlp)]
    shards = [backbone.tensor_shard(teacher, heads_a, mlp_a), backbone.tensor_shard(teacher, heads_b, mlp_b)]
    host = backbone.tensor_host(teacher)
    batch = backbone.example_batch(teacher, batch_size=2, seed=5)
    extra = {k: batch[k] for k in host.shard_inputs if k in batch}
    with torch.no_grad():
        x = host.embed(batch)
        for layer in range(host.num_layers):
            for phase in range(host.phases):
                args = {"hidden_states": x, "layer": torch.tensor(layer), "phase": torch.tensor(phase), **extra}
                parts = [s(**args) for s in shards]
                if not (heads_b if phase == 0 else mlp_b)[layer]:
                    assert torch.count_nonzero(parts[1]) == 0
                x = host.combine(layer, phase, x, parts[0] + parts[1])
        feats = host.pool(x, batch)
        torch.testing.assert_close(feats, backbone.features(teacher, batch), atol=1e-5, rtol=1e-4)
        # a pipeline of one stage per layer, in fp32, is the teacher too
        hidden = None
        for j in range(shape.layers):
            stage = backbone.pipeline_stage(teacher, [j], first=j == 0, last=j == shape.layers - 1)
            inputs = batch if j == 0 else {"hidden_states": hidden,
                                            **{k: batch[k] for k in stage.config["stage_inputs"] if k in batch}}
            hidden = stage(**inputs)
        torch.testing.assert_close(hidden, backbone.features(teacher, batch), atol=1e-5, rtol=1e-4)


def test_stages_and_shards_do_not_carry_what_they_never_run() -> None:
    """A later pipeline stage and a tensor shard hold no token embeddings (the memory they would waste)."""
    backbone = coformer.create_backbone("llama")
    teacher = backbone.tiny(seed=0)
    vocab = teacher.hf.config.vocab_size
    first = backbone.pipeline_stage(teacher, [0], first=True, last=False)
    later = backbone.pipeline_stage(teacher, [1], first=False, last=True)
    shape = backbone.shape(teacher)
    shard = backbone.tensor_shard(teacher, [list(range(h)) for h in shape.heads], [[0]] * shape.layers)

    def has_embedding(m: torch.nn.Module) -> bool:
        return any(p.shape[0] == vocab for p in m.parameters())

    assert has_embedding(first) and not has_embedding(later) and not has_embedding(shard)
    with pytest.raises(ValueError, match="consecutive ascending"):
        backbone.pipeline_stage(teacher, [1, 0], first=True, last=True)
    with pytest.raises(ValueError, match="distinct indices"):
        backbone.tensor_shard(teacher, [[0, 0]] + [[0]] * (shape.layers - 1), [[0]] * shape.layers)
