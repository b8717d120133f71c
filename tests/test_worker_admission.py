"""Admission before allocation, bounded requests and streamed loading, against real tiny BERT sub-models.

A config that does not fit its weights, or a model over the memory budget, is refused with a
typed error naming the tensor or the MB, before any parameter memory exists (the worker process's
RSS does not move); requests over a limit are refused before compute; the coordinator splits a
batch into admissible requests; weights stream in chunks, so a model over the message limit loads.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import grpc
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from coformer.admission import AdmissionError, LoadCancelledError, MemoryBudgetError, build_on_meta, safetensors_header
from coformer.artifacts import ArtifactError, load_plan, save_plan, submodel_artifact
from coformer.limits import RequestLimits, RequestTooLargeError
from coformer.online.coordinator import Coordinator
from coformer.online.worker_state import WorkerState
from coformer.transport import BadRequestError, ModelNotLoadedError, SubModelArtifact, sha256
from coformer_transports.grpc_transport import GrpcBadRequestError, GrpcClient, GrpcTransportError, serve
from coformer_transports.proto import coformer_pb2 as pb
from coformer_transports.worker_process import peak_rss_bytes, reset_peak_rss, rss_bytes, start_worker, stop_worker

from tiny_split import tiny_bert_split

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def bert() -> dict[str, Any]:
    """A tiny BERT teacher cut into 2 sub-models, their artifacts, an aggregator and a batch."""
    return tiny_bert_split([2, 1])


def _features(sub: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return sub(**batch).half()


def _absurd(config: dict[str, Any]) -> dict[str, Any]:
    """The issue's config: a million heads per layer."""
    return {**config, "heads": [1_000_000] * len(config["heads"])}


def _deep(config: dict[str, Any], layers: int) -> dict[str, Any]:
    """A consistent config of ``layers`` one-head, one-neuron layers (far more than the weights hold)."""
    return {**config, "heads": [1] * layers, "mlp": [1] * layers, "scaling": [config["scaling"][0]] * layers}


def test_config_not_matching_weights_is_refused_naming_the_tensor(bert: dict[str, Any]) -> None:
    art = bert["arts"][0]
    state = WorkerState("w", max_memory_bytes=1 << 30)
    with pytest.raises(AdmissionError, match=r"tensor 'layers\.0\.attn\.q\.weight' is F32\[\d+, \d+\] in the weights but "
                                             r"the config makes it \[8000000, \d+\]"):
        state.load(_absurd(art.config), art.weights, art.sha256)
    few = b"\x10\x00\x00\x00\x00\x00\x00\x00{}"  # a few bytes whose sha256 matches: the request
    with pytest.raises(AdmissionError, match="weights header claims 16 bytes"):
        state.load(_absurd(art.config), few, sha256(few))
    for bad, what in (({**art.config, "embed_dim": -4}, "cannot be negative"),
                      ({**art.config, "embed_dim": 2.5}, "cannot build"),
                      (_deep(art.config, 5000), "config builds over"),
                      ({**art.config, "norm_eps": float("nan")}, "must be finite"),
                      ({**art.config, "vocab_size": 10**30}, "absurdly large")):
        with pytest.raises(AdmissionError, match=what):
            state.load(bad, art.weights, art.sha256)
    assert state.health()["models"] == [] and state.used_memory_bytes == 0
    assert state.load(art.config, art.weights, art.sha256) is False  # the right pair still loads


def _need(art: SubModelArtifact) -> int:
    """Bytes a worker's budget charges for ``art`` (tensors plus per-module overhead)."""
    return WorkerState("probe", max_memory_bytes=1 << 30).admit(art.config, safetensors_header(art.weights),
                                                                  art.sha256).footprint


def test_memory_budget_and_plan_device_memory_refuse_with_mb_figures(bert: dict[str, Any]) -> None:
    a0, a1 = bert["arts"]
    state = WorkerState("w", max_memory_bytes=_need(a0) + 1000)
    state.load(a0.config, a0.weights, a0.sha256)
    with state.using(a0.sha256):  # a model in use is never evicted, so a1 has no room
        with pytest.raises(MemoryBudgetError, match=r"needs 0\.\d+ MB but 0\.0\d+ MB of the 0\.\d+ MB budget") as err:
            state.load(a1.config, a1.weights, a1.sha256)
    assert err.value.needed_bytes > err.value.available_bytes
    assert state.health()["models"] == [a0.sha256]
    roomy = WorkerState("w2", max_memory_bytes=1 << 30)
    with pytest.raises(MemoryBudgetError):  # the plan's device memory caps the worker's own budget
        roomy.load(a1.config, a1.weights, a1.sha256, memory_limit_bytes=1000)
    assert roomy.load(a1.config, a1.weights, a1.sha256, memory_limit_bytes=10 << 20) is False


def _variants(art: SubModelArtifact, n: int) -> list[SubModelArtifact]:
    """``n`` artifacts with ``art``'s tensors and config but distinct sha256 (a metadata tag each)."""
    state = st_load(art.weights)
    return [SubModelArtifact.from_parts(art.config, st_save(state, metadata={"v": str(i)})) for i in range(n)]


def test_model_cache_evicts_least_recently_used_never_one_in_use(bert: dict[str, Any]) -> None:
    v0, v1, v2 = _variants(bert["arts"][1], 3)
    need = _need(v0)
    state = WorkerState("w", max_memory_bytes=2 * need + need // 2)  # room for two
    for v in (v0, v1):
        state.load(v.config, v.weights, v.sha256)
    expected = state.infer(v0.sha256, bert["batch"]).features  # v0 is now the most recently used
    state.load(v2.config, v2.weights, v2.sha256)
    assert set(state.health()["models"]) == {v0.sha256, v2.sha256} and state.evicted == 1
    assert state.used_memory_bytes == 2 * need <= state.max_memory_bytes
    with state.using(v0.sha256):  # v0 in use: the idle v2 goes, then v0 is the LRU but pinned
        state.load(v1.config, v1.weights, v1.sha256)
        assert set(state.health()["models"]) == {v0.sha256, v1.sha256}
        state.load(v2.config, v2.weights, v2.sha256)
        assert set(state.health()["models"]) == {v0.sha256, v2.sha256} and state.evicted == 3
    assert torch.equal(state.infer(v0.sha256, bert["batch"]).features, expected)
    with pytest.raises(ModelNotLoadedError):  # an evicted model is gone until loaded again
        state.infer(v1.sha256, bert["batch"])
    with pytest.raises(MemoryBudgetError, match="needs"):  # over the whole budget: refused, nothing evicted
        WorkerState("small", max_memory_bytes=need - 1).load(v0.config, v0.weights, v0.sha256)


def test_many_small_models_keep_worker_rss_bounded_by_its_budget(bert: dict[str, Any]) -> None:
    """120 distinct small models through a 4 MB budget: the cache evicts and RSS stays near loaded + budget."""
    art = bert["arts"][0]
    proc, uri = start_worker("--threads", "1", "--max-memory-mb", "4")
    try:
        client = GrpcClient(uri)
        client.load(art)
        expected = client.infer(art.sha256, bert["batch"]).features
        before = rss_bytes(proc.pid)
        for v in _variants(bert["arts"][1], 120):
            client.load(v)
            assert torch.equal(client.infer(art.sha256, bert["batch"]).features, expected)  # keeps `art` recent
        info = client.info()
        assert info["used_memory_bytes"] <= info["max_memory_bytes"] and art.sha256 in info["models"]
        assert len(info["models"]) < 120
        grown = rss_bytes(proc.pid) - before
        assert grown < 4 * 2**20 + 24 * 2**20, f"RSS grew {grown / 2**20:.1f} MB (bound: 4 MB budget + 24 MB)"
    finally:
        stop_worker(proc)


def test_meta_build_is_bounded_by_the_weights_tensor_count(bert: dict[str, Any]) -> None:
    cfg = _deep(bert["arts"][0].config, 100_000)
    with pytest.raises(AdmissionError, match="config builds over"):
        build_on_meta(lambda: bert["backbone"].build_submodel(cfg), max_tensors=40)


def test_absurd_load_over_grpc_leaves_worker_rss_unchanged(bert: dict[str, Any]) -> None:
    art, other = bert["arts"]
    proc, uri = start_worker("--threads", "1", "--max-memory-mb", "256")
    try:
        client = GrpcClient(uri)
        client.load(art)
        expected = client.infer(art.sha256, bert["batch"]).features
        before = rss_bytes(proc.pid)
        for _ in range(3):
            with pytest.raises(GrpcBadRequestError, match=r"q\.weight") as err:
                client.load(SubModelArtifact.from_parts(_absurd(other.config), other.weights))
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        huge = {**other.config, "vocab_size": 16_000_000}  # 2 GB of embeddings, under MAX_CONFIG_INT
        with pytest.raises(GrpcBadRequestError, match=r"tensor 'embed\.weight'"):
            client.load(SubModelArtifact.from_parts(huge, other.weights))
        grown = rss_bytes(proc.pid) - before
        assert grown < 32 * 2**20, f"RSS grew by {grown / 2**20:.1f} MB on refused loads (bound: 32 MB)"
        assert torch.equal(client.infer(art.sha256, bert["batch"]).features, expected)
        assert proc.poll() is None
    finally:
        stop_worker(proc)


def test_config_with_a_huge_list_is_refused_before_it_costs_memory(bert: dict[str, Any]) -> None:
    """A 3M-entry ``heads`` list (a 9 MB config) once cost the worker ~480 MB of transient RSS while
    its values were counted; it is now refused on the text's size and the peak RSS barely moves."""
    art, other = bert["arts"]
    proc, uri = start_worker("--threads", "1", "--max-memory-mb", "256")
    try:
        client = GrpcClient(uri)
        client.load(art)
        expected = client.infer(art.sha256, bert["batch"]).features
        reset_peak_rss(proc.pid)
        before = rss_bytes(proc.pid)
        huge = {**other.config, "heads": [4] * 3_000_000}
        with pytest.raises(GrpcBadRequestError, match="config_json is .* bytes, over") as err:
            client.load(SubModelArtifact.from_parts(huge, other.weights))
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        peak = peak_rss_bytes(proc.pid) - before
        assert peak < 64 * 2**20, f"peak RSS rose by {peak / 2**20:.0f} MB on a refused config (bound: 64 MB)"
        assert torch.equal(client.infer(art.sha256, bert["batch"]).features, expected)
    finally:
        stop_worker(proc)


def test_config_sanity_counts_a_container_before_walking_it() -> None:
    from coformer.admission import MAX_CONFIG_SCALARS, check_config_sanity, parse_config_json

    with pytest.raises(AdmissionError, match="values; not a sub-model config"):
        check_config_sanity({"backbone": "bert", "heads": [4] * (MAX_CONFIG_SCALARS + 1)})
    with pytest.raises(AdmissionError, match=r"config\.heads\[1\] = -3"):
        check_config_sanity({"backbone": "bert", "heads": [4, -3]})
    with pytest.raises(AdmissionError, match="over the 1,048,576"):
        parse_config_json(" " * (2**20 + 1))


def _bigger_bert(bert: dict[str, Any], vocab: int) -> torch.nn.Module:
    torch.manual_seed(3)
    return bert["backbone"].build_submodel({**bert["arts"][0].config, "vocab_size": vocab}).eval()


def test_streamed_load_of_a_model_over_the_message_limit(bert: dict[str, Any]) -> None:
    sub = _bigger_bert(bert, 12_000)
    art = submodel_artifact(sub)
    limit = 256 * 1024
    assert len(art.weights) > 3 * limit  # the model is over the configured message limit
    srv = serve("127.0.0.1:0", max_message_bytes=limit)
    try:
        client = GrpcClient(srv.uri + "?max_message_mb=1")
        client.max_message_bytes = limit  # chunks sized to the worker's limit
        with pytest.raises(GrpcBadRequestError, match="RESOURCE_EXHAUSTED"):  # one message cannot carry it
            client._call("LoadModel", pb.LoadModelRequest(sha256=art.sha256, config_json=json.dumps(art.config),
                                                          weights=art.weights), 10)
        assert client.load(art) is False
        got = client.infer(art.sha256, bert["batch"]).features
        assert torch.equal(got, _features(sub, bert["batch"]))
        assert client.load(art) is True  # resend is free: the probe finds it cached
        assert srv.state.health()["models"] == [art.sha256]
    finally:
        srv.stop(0)


def test_stream_errors_are_typed_and_leave_nothing_loaded(bert: dict[str, Any]) -> None:
    art = bert["arts"][0]
    srv = serve("127.0.0.1:0")
    try:
        client = GrpcClient(srv.uri)
        cfg = json.dumps(art.config)
        w = art.weights

        def first(**kw: Any) -> bytes:
            return pb.LoadModelChunk(**{"sha256": art.sha256, "config_json": cfg, "total_bytes": len(w), **kw}
                                     ).SerializeToString()

        cases = {
            "truncated": ([first(data=w[:100]), pb.LoadModelChunk(data=w[100:-5]).SerializeToString()],
                          "stream ended after"),
            "overlong": ([first(data=w), pb.LoadModelChunk(data=b"xx").SerializeToString()], "more than the declared"),
            "wrong hash": ([first(data=w[:-1] + bytes([w[-1] ^ 1]))], "does not match the declared"),
            "config mismatch": ([pb.LoadModelChunk(sha256=art.sha256, config_json=json.dumps(_absurd(art.config)),
                                                   total_bytes=len(w), data=w).SerializeToString()], r"q\.weight"),
            "garbage chunk": ([first(data=w[:50]), b"\xff\xfe garbage"], "not a valid message"),
            "no chunks": ([], "needs a first chunk"),
            "over budget": ([first(total_bytes=1 << 50, data=w[:10])], "cannot fit"),
        }
        for what, (payloads, message) in cases.items():
            with pytest.raises(GrpcBadRequestError, match=message):
                client.call_raw_stream("LoadModelStream", payloads)
            assert srv.state.health()["models"] == [], what
        assert client.load(art) is False
    finally:
        srv.stop(0)


def test_a_load_in_progress_is_cancelled_by_shutdown(bert: dict[str, Any]) -> None:
    art = bert["arts"][0]
    srv = serve("127.0.0.1:0")
    client = GrpcClient(srv.uri)
    first_sent, resume = threading.Event(), threading.Event()

    def chunks() -> Any:
        yield pb.LoadModelChunk(sha256=art.sha256, config_json=json.dumps(art.config), total_bytes=len(art.weights),
                                data=art.weights[:1000])
        first_sent.set()
        resume.wait(10)
        yield pb.LoadModelChunk(data=art.weights[1000:])

    errors: list[Exception] = []

    def load() -> None:
        try:
            client._call_stream("LoadModelStream", chunks(), 20)
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion
            errors.append(exc)

    t = threading.Thread(target=load)
    t.start()
    assert first_sent.wait(10)
    drained: list[int] = []
    d = threading.Thread(target=lambda: drained.append(srv.drain(5.0)))
    d.start()
    assert srv.state.cancel.wait(5)  # shutdown began while the load was in progress
    resume.set()
    t.join(15)
    d.join(15)
    assert errors and isinstance(errors[0], GrpcTransportError)
    assert errors[0].code == grpc.StatusCode.UNAVAILABLE and "cancelled" in str(errors[0])
    assert drained == [0] and srv.state.health()["models"] == []
    state = WorkerState("w", max_memory_bytes=1 << 30)
    state.cancel.set()
    with pytest.raises(LoadCancelledError):
        state.load(art.config, art.weights, art.sha256)


def test_requests_over_limits_are_refused_before_compute(bert: dict[str, Any]) -> None:
    art, batch = bert["arts"][0], bert["batch"]
    srv = serve("127.0.0.1:0", limits=RequestLimits(max_batch=4, max_tokens=32, max_input_bytes=20_000))
    try:
        client = GrpcClient(srv.uri)
        client.load(art)
        ids = batch["input_ids"]
        over = {
            "batch": ({k: v.repeat(3, 1) for k, v in batch.items()}, "batch of 6 examples is over"),
            "tokens (worker flag)": ({k: v.repeat(1, 3) for k, v in batch.items()}, "48 tokens per example is over"),
            "input bytes": ({k: v.repeat(4, 30) for k, v in batch.items()}, "bytes is over this worker's limit"),
        }
        for what, (b, message) in over.items():
            with pytest.raises(GrpcBadRequestError, match=message) as err:
                client.infer(art.sha256, b)
            assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, what
        bad = {
            "negative id": ({**batch, "input_ids": ids - 100}, r"token ids must lie in \[0, 100\)"),
            "out of vocabulary": ({**batch, "input_ids": ids + 1000}, r"token ids must lie in \[0, 100\)"),
            "float ids": ({**batch, "input_ids": ids.float()}, "unsupported input|must be integer"),
            "rank 3": ({**batch, "input_ids": ids[:, :, None]}, "rank 3"),
            "extra key": ({**batch, "pixel_values": torch.zeros(2, 3, 4, 4)}, "unexpected keys"),
            "missing key": ({"attention_mask": batch["attention_mask"]}, r"lacks \['input_ids'\]"),
            "ragged batch": ({**batch, "attention_mask": batch["attention_mask"][:1]}, "same leading batch"),
        }
        for what, (b, message) in bad.items():
            with pytest.raises(GrpcBadRequestError, match=message) as err:
                client.infer(art.sha256, b)
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, what
        assert srv.state.health()["requests"] == 0  # nothing reached the model
        assert srv.state.refused == len(over) + len(bad) - 1  # the byte limit is checked before decoding
        info = client.info()
        assert info["limits"] == {"max_batch": 4, "max_tokens": 32, "max_pixels": RequestLimits.max_pixels,
                                  "max_input_bytes": 20_000}
    finally:
        srv.stop(0)
    # the sub-model's own position table caps tokens below the worker flag
    state = WorkerState("w", limits=RequestLimits(max_tokens=10_000), max_memory_bytes=1 << 30)
    state.load(art.config, art.weights, art.sha256)
    long = {k: v.repeat(1, 5) for k, v in batch.items()}  # 80 tokens; tiny BERT has 64 positions
    with pytest.raises(RequestTooLargeError, match="80 tokens per example is over the limit of 64"):
        state.infer(art.sha256, long)


def test_coordinator_splits_a_large_batch_into_admissible_requests(bert: dict[str, Any]) -> None:
    servers = [serve("127.0.0.1:0", limits=RequestLimits(max_batch=b)) for b in (4, 3)]
    try:
        clients = [GrpcClient(s.uri) for s in servers]
        coord = Coordinator.deploy(clients, bert["arts"], bert["agg"], names=["a", "b"])
        big = {k: v.repeat(5, 1) for k, v in bert["batch"].items()}  # 10 examples
        answer = coord.infer(big)
        assert answer.chunks == 4 and not answer.degraded and answer.answered == ["a", "b"]
        with torch.inference_mode():
            local = bert["agg"]([s(**big).half().float() for s in bert["subs"]])
        torch.testing.assert_close(answer.logits, local)
        assert all(s.state.refused == 0 for s in servers)
        coord.close()
    finally:
        for s in servers:
            s.stop(0)


def test_load_plan_and_submodels_refuse_a_config_edited_to_mismatch(bert: dict[str, Any], tmp_path: Any) -> None:
    plan_dir = save_plan(tmp_path / "plan", submodels=bert["subs"], aggregator=bert["agg"], task_head=bert["head"],
                         student_heads=bert["students"], meta={"backbone": "bert"})
    plan = load_plan(plan_dir)
    for a, b in zip(plan.submodels(), bert["subs"]):
        assert torch.equal(_features(a, bert["batch"]), _features(b, bert["batch"]))
    doc = json.loads((plan_dir / "plan.json").read_text())
    doc["submodels"][1]["config"]["heads"] = [1_000_000] * len(doc["submodels"][1]["config"]["heads"])
    (plan_dir / "plan.json").write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match=r"submodel_1\.safetensors: tensor 'layers\.0\.attn\.q\.weight'"):
        load_plan(plan_dir)
    doc["submodels"][1]["config"] = bert["arts"][1].config
    doc["aggregator"]["student_heads"][0]["in_dim"] = 10**7
    (plan_dir / "plan.json").write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="aggregator.safetensors from its config: .*student head 0 takes width"):
        load_plan(plan_dir)
    with pytest.raises(BadRequestError):  # AdmissionError is a BadRequestError: typed for every caller
        raise AdmissionError("x")
