"""The in-process cluster: deploy once (cached by sha256), fan out, aggregate, survive a lost device;
and plan directories that refuse corrupted files."""

from __future__ import annotations

import json

import pytest
import torch

import coformer
from coformer.aggregator import MissingFeaturesError
from coformer.artifacts import ArtifactError, load_plan, save_plan, submodel_artifact
from coformer.offline.decompose import proportional_specs
from coformer.heads import StudentHead
from coformer.online.coordinator import Coordinator
from coformer.online.worker_state import WorkerState
from coformer.transport import BadRequestError, decode_features, encode_features
from coformer_transports import inprocess


@pytest.fixture(scope="module")
def cluster():
    bert = coformer.create_backbone("bert")
    teacher = bert.tiny(num_labels=3)
    batch = bert.example_batch(teacher, batch_size=4)
    specs = proportional_specs(bert.shape(teacher), [1, 2, 2])
    subs = bert.decompose(teacher, specs, batch=batch)
    head = bert.task_head(teacher)
    students = [StudentHead(m.feature_dim, 32, head) for m in subs]
    agg = coformer.create_aggregator("averaging", feature_dims=[m.feature_dim for m in subs], embed_dim=32,
                                     task_head=head, student_heads=students)
    return bert, teacher, batch, subs, head, students, agg


def _clients(prefix: str, n: int):
    return [coformer.open_transport(f"inproc://{prefix}-{i}") for i in range(n)]


def test_answers_equal_local_aggregation_and_report_timings(cluster):
    _, _, batch, subs, _, _, agg = cluster
    clients = _clients("eq", 3)
    coord = Coordinator.deploy(clients, [submodel_artifact(m) for m in subs], agg, names=["nano", "tx2", "orin"])
    answer = coord.infer(batch)
    with torch.inference_mode():
        local = agg([m(**batch).half().float() for m in subs])  # features cross the wire as fp16
    torch.testing.assert_close(answer.logits, local)
    assert answer.answered == ["nano", "tx2", "orin"] and not answer.degraded
    assert all(t.ok and t.t1_compute_ms > 0 and t.t2_transfer_ms >= 0 for t in answer.timings)
    assert answer.t3_aggregate_ms > 0 and answer.total_ms >= max(t.round_trip_ms for t in answer.timings)
    coord.close()


def test_second_deploy_is_served_from_cache(cluster):
    subs = cluster[3]
    client = _clients("cache", 1)[0]
    art = submodel_artifact(subs[0])
    assert client.load(art) is False
    assert client.load(art) is True
    assert client.health()["models"] == [art.sha256]


def test_a_failing_device_is_left_out_and_named(cluster):
    _, _, batch, subs, _, _, agg = cluster
    clients = _clients("lost", 3)
    coord = Coordinator.deploy(clients, [submodel_artifact(m) for m in subs], agg, names=["nano", "tx2", "orin"])
    inprocess.shutdown("lost-1")  # the TX2 disappears: its worker no longer holds the model
    clients[1].state = inprocess.worker("lost-1")
    answer = coord.infer(batch)
    assert answer.answered == ["nano", "orin"] and answer.missing == ["tx2"]
    assert "no sub-model" in answer.errors["tx2"]
    with torch.inference_mode():
        expected = agg([subs[0](**batch).half().float(), None, subs[2](**batch).half().float()])
    torch.testing.assert_close(answer.logits, expected)
    coord.close()


def test_no_device_answering_is_an_error_not_a_silent_answer(cluster):
    _, _, batch, subs, _, _, agg = cluster
    clients = _clients("none", 3)
    coord = Coordinator(clients, [submodel_artifact(m).sha256 for m in subs], agg)  # never deployed
    with pytest.raises(MissingFeaturesError, match="no sub-model features arrived"):
        coord.infer(batch)
    coord.close()


def test_worker_rejects_bad_artifacts_and_inputs_and_stays_up(cluster):
    subs = cluster[3]
    batch = cluster[2]
    state = WorkerState("w")
    art = submodel_artifact(subs[0])
    with pytest.raises(BadRequestError, match="does not match the declared"):
        state.load(art.config, art.weights[:-1], art.sha256)
    from safetensors.torch import save as st_save

    from coformer.transport import sha256

    partial = dict(list(subs[0].state_dict().items())[1:])  # one tensor short of the architecture
    short = st_save({k: v.contiguous() for k, v in partial.items()})
    missing = next(iter(subs[0].state_dict()))
    with pytest.raises(BadRequestError, match=f"the weights lack tensor '{missing}'"):
        state.load(art.config, short, sha256(short))
    with pytest.raises(BadRequestError, match="unknown backbone 'nope'"):
        state.load(dict(art.config, backbone="nope"), art.weights, art.sha256)
    state.load(art.config, art.weights, art.sha256)
    with pytest.raises(BadRequestError, match="must be \\[batch, tokens\\], got rank 4"):
        state.infer(art.sha256, {"input_ids": torch.zeros(1, 3, 3, 3, dtype=torch.long)})
    assert state.infer(art.sha256, batch).features.dtype == torch.float16
    assert state.refused == 1 and state.health()["errors"] == 0  # refused before compute


def test_feature_encoding_is_fp16_bytes_with_shape():
    x = torch.randn(2, 5)
    data, shape, dtype = encode_features(x)
    assert len(data) == 2 * 5 * 2 and shape == [2, 5] and dtype == "float16"
    torch.testing.assert_close(decode_features(data, shape, dtype), x.half())
    with pytest.raises(BadRequestError, match="do not match shape"):
        decode_features(data[:-2], shape, dtype)


def test_plan_directory_round_trip_and_corruption(cluster, tmp_path):
    _, _, batch, subs, head, students, agg = cluster
    plan_dir = save_plan(tmp_path / "plan", submodels=subs, aggregator=agg, task_head=head, student_heads=students,
                         meta={"backbone": "bert", "policy": None})
    plan = load_plan(plan_dir)
    rebuilt = plan.submodels()
    with torch.inference_mode():
        for a, b in zip(subs, rebuilt):
            torch.testing.assert_close(a(**batch), b(**batch), rtol=0, atol=0)
        feats = [m(**batch) for m in subs]
        torch.testing.assert_close(plan.aggregator(feats), agg(feats))
    doc = json.loads((plan_dir / "plan.json").read_text())
    assert set(doc["sha256"]) == {"submodel_0.safetensors", "submodel_1.safetensors", "submodel_2.safetensors",
                                  "aggregator.safetensors"}
    assert doc["versions"]["coformer"] == coformer.__version__
    raw = bytearray((plan_dir / "submodel_1.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (plan_dir / "submodel_1.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match=r"submodel_1\.safetensors: sha256 .* does not match plan\.json"):
        load_plan(plan_dir)
    (plan_dir / "aggregator.safetensors").unlink()
    (plan_dir / "submodel_1.safetensors").write_bytes(bytes(raw[:-1]) + bytes([raw[-1] ^ 0xFF]))
    with pytest.raises(ArtifactError, match="aggregator.safetensors is missing"):
        load_plan(plan_dir)
    assert not list(plan_dir.glob("*.pkl")) and not list(plan_dir.glob("*.pt"))
