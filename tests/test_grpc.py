"""The gRPC transport over real loopback sockets, with tiny BERT sub-models.

Covers: load-once caching (nothing resent), bit-level round trip vs the local sub-model (fp16
tolerance), health/info, token and TLS, malformed/truncated/oversized requests (typed errors,
the worker stays up), a worker process killed mid-run (answers continue, degraded, naming who
answered), 1,000 requests at concurrency 8 across 3 workers, and ``coformer infer`` on a plan.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
import torch
from click.testing import CliRunner

import coformer
from coformer.artifacts import load_plan, save_plan
from coformer.heads import StudentHead
from coformer.limits import RequestLimits
from coformer.online.coordinator import Coordinator
from coformer.transport import BadRequestError, SubModelArtifact, TransportError, encode_batch
from coformer_transports.grpc_transport import (
    GrpcBadRequestError,
    GrpcClient,
    GrpcTransportError,
    WorkerServer,
    is_loopback,
    serve,
)
from coformer_transports.proto import coformer_pb2 as pb

from tiny_split import tiny_bert_split

pytestmark = pytest.mark.timeout(120)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bert() -> dict[str, Any]:
    """A tiny BERT teacher decomposed into 3 sub-models, their artifacts and an example batch."""
    return tiny_bert_split([3, 2, 1])


@pytest.fixture()
def server() -> Iterator[WorkerServer]:
    """An in-process gRPC worker on a free loopback port."""
    srv = serve("127.0.0.1:0", name="w-test")
    yield srv
    srv.stop(0)


class RecordingClient(GrpcClient):
    """A GrpcClient that records each call's method and request size (to prove nothing is resent)."""

    def __init__(self, uri: str, **kw: Any):
        super().__init__(uri, **kw)
        self.sent: list[tuple[str, int, int]] = []

    def _call(self, method: str, request: Any, timeout: float) -> Any:
        weights = len(getattr(request, "weights", b""))
        self.sent.append((method, request.ByteSize(), weights))
        return super()._call(method, request, timeout)

    def _call_stream(self, method: str, requests: Any, timeout: float) -> Any:
        chunks = list(requests)
        self.chunks = len(chunks)
        self.sent.append((method, sum(c.ByteSize() for c in chunks), sum(len(c.data) for c in chunks)))
        return super()._call_stream(method, iter(chunks), timeout)


def _local(sub: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return sub(**batch)


def _student_heads(bert: dict[str, Any]) -> list[StudentHead]:
    head = bert["backbone"].task_head(bert["teacher"])
    torch.manual_seed(1)
    return [StudentHead(s.feature_dim, head.cfg["in_dim"], head) for s in bert["subs"]]


def _averaging(bert: dict[str, Any]) -> Any:
    head = bert["backbone"].task_head(bert["teacher"])
    return coformer.create_aggregator("averaging", feature_dims=[s.feature_dim for s in bert["subs"]],
                                      embed_dim=head.cfg["in_dim"], task_head=head,
                                      student_heads=_student_heads(bert)).eval()


def _start_worker_process(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
    """`coformer worker` as a subprocess on a free port; returns it and its grpc:// URI (from its output)."""
    cmd = [sys.executable, "-c", "from coformer.cli import main; main()", "worker", "--listen", "127.0.0.1:0",
           "--threads", "1", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"})
    line = proc.stdout.readline() if proc.stdout else ""
    if "listening on" not in line:
        proc.kill()
        raise AssertionError(f"worker did not start: {line}{proc.stdout.read() if proc.stdout else ''}")
    uri = line.split("listening on ")[1].split()[0]
    return proc, uri


# --------------------------------------------------------------------------- load / infer / health


def test_second_load_sends_no_weights(server: WorkerServer, bert: dict[str, Any]) -> None:
    art = bert["arts"][0]
    client = RecordingClient(server.uri)
    assert client.has(art.sha256) is False
    assert client.load(art) is False  # first time: probe, then the weights
    assert [m for m, _, _ in client.sent] == ["HasModel", "LoadModel", "LoadModelStream"]
    assert client.sent[1][2] == 0 and client.sent[2][2] == len(art.weights) > 10_000
    client.sent.clear()
    assert client.load(art) is True  # the worker says it has it
    assert client.sent == [("LoadModel", client.sent[0][1], 0)]
    assert client.sent[0][1] < 2_000  # sha256 + config only
    # a second, independent client finds it cached too
    assert GrpcClient(server.uri).load(art) is True
    client.close()


def test_infer_round_trip_matches_local_submodel(server: WorkerServer, bert: dict[str, Any]) -> None:
    client = coformer.open_transport(server.uri)
    assert isinstance(client, GrpcClient)
    for sub, art in zip(bert["subs"], bert["arts"]):
        client.load(art)
        res = client.infer(art.sha256, bert["batch"], timeout=10)
        expected = _local(sub, bert["batch"])
        assert res.features.dtype == torch.float16
        assert res.features.shape == expected.shape == (2, sub.feature_dim)
        torch.testing.assert_close(res.features.float(), expected.half().float(), atol=2e-3, rtol=2e-3)
        assert res.compute_ms > 0 and res.meta["worker"] == "w-test"
    client.close()


def test_infer_reports_serialisation_apart_from_compute(server: WorkerServer, bert: dict[str, Any]) -> None:
    """Both ends' tensor encode/decode is measured and fits, with compute, inside the round trip."""
    import time

    client = coformer.open_transport(server.uri)
    art = bert["arts"][0]
    client.load(art)
    client.infer(art.sha256, bert["batch"], timeout=10)  # warm-up
    start = time.perf_counter()
    res = client.infer(art.sha256, bert["batch"], timeout=10)
    round_trip_ms = (time.perf_counter() - start) * 1000
    assert 0 < res.serialize_ms and res.compute_ms + res.serialize_ms < round_trip_ms
    inproc = coformer.open_transport("inproc://serialise-test")
    inproc.load(art)
    assert inproc.infer(art.sha256, bert["batch"]).serialize_ms == 0.0  # tensors passed by reference
    client.close()


def test_health_and_info(server: WorkerServer, bert: dict[str, Any]) -> None:
    client = GrpcClient(server.uri)
    art = bert["arts"][1]
    client.load(art)
    client.infer(art.sha256, bert["batch"])
    h = client.health()
    assert h["ok"] and h["name"] == "w-test" and h["models"] == [art.sha256] and h["requests"] == 1
    info = client.info()
    assert set(info["versions"]) >= {"coformer", "torch", "grpc", "protobuf", "python"}
    assert info["versions"]["coformer"] == coformer.__version__
    assert info["models"] == [art.sha256] and info["threads"] >= 1
    assert info["tls"] is False and info["auth"] is False and info["max_message_bytes"] >= 64 * 1024 * 1024


def test_unreachable_worker_and_deadline(bert: dict[str, Any]) -> None:
    srv = serve("127.0.0.1:0")
    uri = srv.uri
    srv.stop(0)  # nothing listens there any more
    client = GrpcClient(uri)
    with pytest.raises(TransportError) as err:
        client.health(timeout=1.0)
    assert err.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert uri in str(err.value)


# --------------------------------------------------------------------------- security


def test_loopback_by_default() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    with pytest.raises(ValueError, match="non-loopback"):
        serve("0.0.0.0:0")


def test_token_required_and_checked(bert: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    srv = serve("127.0.0.1:0", token="s3cret-token")
    try:
        monkeypatch.delenv("COFORMER_TOKEN", raising=False)
        assert GrpcClient(srv.uri, token="s3cret-token").health()["ok"]
        for client in (GrpcClient(srv.uri, token="wrong"), GrpcClient(srv.uri)):
            for call in (client.health, lambda c=client: c.load(bert["arts"][0])):
                with pytest.raises(GrpcTransportError) as err:
                    call()
                assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
                assert "token" in str(err.value)
        monkeypatch.setenv("COFORMER_TOKEN", "s3cret-token")
        client = coformer.open_transport(srv.uri)  # the token comes from the environment
        assert client.load(bert["arts"][0]) is False
        assert client.info()["auth"] is True
    finally:
        srv.stop(0)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1/localhost (openssl CLI; `cryptography` is not installed)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to generate a self-signed test certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
    return cert, key


def test_tls_with_token(tls_files: tuple[Path, Path], bert: dict[str, Any]) -> None:
    cert, key = tls_files
    srv = serve("127.0.0.1:0", tls_cert=cert, tls_key=key, token="tok")
    try:
        assert srv.uri.endswith("?tls=1")
        with pytest.raises(GrpcTransportError):  # TLS alone is not enough: the token is still required
            GrpcClient(f"{srv.uri}&ca={cert}").health()
        client = GrpcClient(f"{srv.uri}&ca={cert}", token="tok")
        art = bert["arts"][2]
        client.load(art)
        res = client.infer(art.sha256, bert["batch"])
        torch.testing.assert_close(res.features.float(), _local(bert["subs"][2], bert["batch"]).half().float(),
                                   atol=2e-3, rtol=2e-3)
        assert client.info()["tls"] is True
        with pytest.raises(GrpcTransportError):  # a plaintext client cannot talk to a TLS worker
            GrpcClient(f"grpc://{srv.address}", token="tok").health(timeout=2)
    finally:
        srv.stop(0)


# --------------------------------------------------------------------------- bad requests


def test_message_limit_is_raised_on_both_sides_through_the_uri(bert: dict[str, Any]) -> None:
    art, sub = bert["arts"][0], bert["subs"][0]
    big = {k: v.repeat(5000 // len(v) + 1, *([1] * (v.dim() - 1)))[:5000] for k, v in bert["batch"].items()}
    assert sum(t.numel() * t.element_size() for t in big.values()) > 1024 * 1024  # over 1 MiB, under 8
    hint = r"--max-message-mb N.*\?max_message_mb=N"
    small_srv = serve("127.0.0.1:0", max_message_bytes=1024 * 1024)
    srv = serve("127.0.0.1:0", max_message_bytes=8 * 1024 * 1024, limits=RequestLimits(max_batch=5000))
    try:
        # the client's own limit comes from the URI: it refuses to send before the (larger) worker limit applies
        small_client = GrpcClient(srv.uri + "?max_message_mb=1")
        small_client.load(art)
        with pytest.raises(GrpcBadRequestError, match=r"Sent message larger than max \(\d+ vs\. 1048576\).*" + hint):
            small_client.infer(art.sha256, big)
        # the worker's limit: refused there, with the same advice, and the worker stays up
        to_small_worker = GrpcClient(small_srv.uri)
        to_small_worker.load(art)
        with pytest.raises(GrpcBadRequestError, match=r"RESOURCE_EXHAUSTED.*" + hint):
            to_small_worker.infer(art.sha256, big)
        assert to_small_worker.health()["ok"]
        # both raised: the request goes through and the features are right
        client = GrpcClient(srv.uri + "?max_message_mb=8")
        res = client.infer(art.sha256, big)
        torch.testing.assert_close(res.features.float(), _local(sub, big).half().float(), atol=2e-3, rtol=2e-3)
    finally:
        small_srv.stop(0)
        srv.stop(0)
    with pytest.raises(ValueError, match="max_message_mb must be a positive whole number"):
        GrpcClient("grpc://127.0.0.1:1?max_message_mb=lots")


def test_bad_requests_get_typed_errors_and_worker_stays_up(bert: dict[str, Any]) -> None:
    srv = serve("127.0.0.1:0", max_message_bytes=256 * 1024)
    try:
        client = GrpcClient(srv.uri)
        art, sub, batch = bert["arts"][0], bert["subs"][0], bert["batch"]
        client.load(art)
        good = pb.InferRequest(model_sha256=art.sha256, batch=encode_batch(batch)).SerializeToString()

        def good_request_works() -> None:
            res = client.infer(art.sha256, batch)
            torch.testing.assert_close(res.features.float(), _local(sub, batch).half().float(), atol=2e-3,
                                       rtol=2e-3)

        bad_calls = {
            "garbage protobuf": lambda: client.call_raw("Infer", b"\xff\xfe\xfd garbage"),
            "truncated protobuf": lambda: client.call_raw("Infer", good[: len(good) // 2]),
            "truncated safetensors": lambda: client._call(
                "Infer", pb.InferRequest(model_sha256=art.sha256, batch=encode_batch(batch)[:-7]), 5),
            "empty batch": lambda: client._call("Infer", pb.InferRequest(model_sha256=art.sha256), 5),
            "wrong tensor names": lambda: client.infer(art.sha256, {"pixels": torch.zeros(2, 3)}),
            "wrong dtype": lambda: client.infer(art.sha256, {k: v.float() for k, v in batch.items()}),
            "oversized": lambda: client.infer(art.sha256, {**batch, "junk": torch.zeros(300_000, dtype=torch.uint8)}),
            "hash mismatch": lambda: client.load(SubModelArtifact(art.config, art.weights, "0" * 64)),
            "bad sha256": lambda: client._call("LoadModel", pb.LoadModelRequest(sha256="abc", weights=b"x"), 5),
            "bad config json": lambda: client._call(
                "LoadModel", pb.LoadModelRequest(sha256="1" * 64, config_json="{nope", weights=b"x"), 5),
            "weights not safetensors": lambda: client.load(SubModelArtifact.from_parts(art.config, b"\x00" * 64)),
            "unknown backbone": lambda: client.load(SubModelArtifact.from_parts({"backbone": "nope"}, b"\x01" * 9)),
        }
        for what, call in bad_calls.items():
            with pytest.raises(BadRequestError) as err:
                call()
            assert isinstance(err.value, GrpcBadRequestError), what
            expected = grpc.StatusCode.RESOURCE_EXHAUSTED if what == "oversized" else grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.code == expected, (what, err.value)
            assert srv.uri in str(err.value)
            good_request_works()
        with pytest.raises(GrpcTransportError) as unknown:
            client.infer("f" * 64, batch)
        assert unknown.value.code == grpc.StatusCode.FAILED_PRECONDITION and "LoadModel" in str(unknown.value)
        good_request_works()
        assert client.health()["ok"]
    finally:
        srv.stop(0)


# --------------------------------------------------------------------------- reliability


def test_worker_process_killed_mid_run(bert: dict[str, Any]) -> None:
    servers = [serve("127.0.0.1:0", name=f"w{i}") for i in range(2)]
    proc, uri = _start_worker_process("--name", "victim")
    try:
        uris = [servers[0].uri, servers[1].uri, uri]
        clients = [coformer.open_transport(u) for u in uris]
        agg = _averaging(bert)
        coord = Coordinator.deploy(clients, bert["arts"], agg, names=uris, deadline_s=5.0)
        feats = [_local(s, bert["batch"]).half().float() for s in bert["subs"]]
        answers = []
        for i in range(20):
            if i == 8:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
            answers.append(coord.infer(bert["batch"]))
        coord.close()
        assert all(a.answered == uris and not a.degraded for a in answers[:8])
        for a in answers[8:]:
            assert a.degraded and a.answered == uris[:2] and a.missing == [uri] and uri in a.errors
            with torch.inference_mode():
                expected = agg([feats[0], feats[1], None])
            torch.testing.assert_close(a.logits, expected, atol=1e-4, rtol=1e-4)
        with torch.inference_mode():
            full = agg(feats)
        torch.testing.assert_close(answers[0].logits, full, atol=1e-4, rtol=1e-4)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for s in servers:
            s.stop(0)


def test_thousand_requests_concurrency_8_three_workers(bert: dict[str, Any]) -> None:
    servers = [serve("127.0.0.1:0", name=f"w{i}", max_workers=8) for i in range(3)]
    try:
        clients = [GrpcClient(s.uri) for s in servers]
        agg = _averaging(bert)
        Coordinator.deploy(clients, bert["arts"], agg)
        # one coordinator per caller thread over the shared channels: 8 requests (24 calls) in flight
        coords = [Coordinator(clients, [a.sha256 for a in bert["arts"]], agg, deadline_s=30.0) for _ in range(8)]
        batch = {k: v[:1] for k, v in bert["batch"].items()}
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: coords[i % 8].infer(batch), range(1000)))
        for c in coords:
            c._pool.shutdown()
        assert len(answers) == 1000
        assert [a for a in answers if a.degraded or a.errors] == []
        first = answers[0].logits
        assert all(torch.equal(a.logits, first) for a in answers)
        assert sum(GrpcClient(s.uri).health()["requests"] for s in servers) == 3000
    finally:
        for s in servers:
            s.stop(0)


# --------------------------------------------------------------------------- coformer infer


@pytest.fixture()
def plan_dir(tmp_path: Path, bert: dict[str, Any]) -> Path:
    """A plan directory of the 3 tiny BERT sub-models with an averaging aggregator."""
    agg = _averaging(bert)
    head = bert["backbone"].task_head(bert["teacher"])
    return save_plan(tmp_path / "plan", submodels=bert["subs"], aggregator=agg, task_head=head,
                     student_heads=list(agg.student_heads), meta={"backbone": "bert", "labels": ["a", "b", "c"]})


def test_cli_infer_on_plan_with_a_dead_worker(plan_dir: Path, tmp_path: Path, bert: dict[str, Any]) -> None:
    from coformer.cli import build_cli

    plan = load_plan(plan_dir)
    servers = [serve("127.0.0.1:0", name=f"w{i}") for i in range(2)]
    dead = serve("127.0.0.1:0")
    dead_uri = dead.uri
    dead.stop(0)
    input_file = tmp_path / "batch.safetensors"
    input_file.write_bytes(encode_batch(bert["batch"]))
    try:
        uris = [servers[0].uri, dead_uri, servers[1].uri]
        result = CliRunner().invoke(build_cli(), ["infer", "--plan", str(plan_dir), "--workers", ",".join(uris),
                                                  "--input", str(input_file), "--repeat", "2", "--deadline", "5",
                                                  "--json"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        records = [json.loads(line) for line in result.stdout.splitlines()]
        assert len(records) == 2
        feats = [_local(s, bert["batch"]).half().float() for s in plan.submodels()]
        with torch.inference_mode():
            expected = plan.aggregator([feats[0], None, feats[2]]).argmax(-1).tolist()
        for rec in records:
            assert rec["answered"] == [uris[0], uris[2]] and rec["missing"] == [dead_uri]
            assert dead_uri in rec["errors"] and rec["prediction"] == expected
            assert rec["labels"] == [["a", "b", "c"][p] for p in expected]
            by_device = {d["device"]: d for d in rec["devices"]}
            assert by_device[uris[0]]["ok"] and by_device[uris[0]]["t1_ms"] > 0
            assert by_device[dead_uri]["ok"] is False and rec["t3_ms"] >= 0
        assert f"deploy to {dead_uri} failed" in result.output
        # a second deployment finds every sub-model cached on the live workers
        again = CliRunner().invoke(build_cli(), ["infer", "--plan", str(plan_dir), "--workers",
                                                 ",".join([servers[0].uri, servers[1].uri, servers[1].uri]),
                                                 "--input", str(input_file)], catch_exceptions=False)
        assert again.exit_code == 0, again.output
        assert again.output.count("cached, nothing sent") == 2 and "complete" in again.output
    finally:
        for s in servers:
            s.stop(0)


def test_cli_worker_subprocess_with_token_from_env(bert: dict[str, Any]) -> None:
    proc, uri = _start_worker_process("--name", "tokened", env={"COFORMER_TOKEN": "envtok"})
    try:
        assert uri.startswith("grpc://127.0.0.1:")
        with pytest.raises(GrpcTransportError) as err:
            GrpcClient(uri, token="nope").health(timeout=5)
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        client = GrpcClient(uri, token="envtok")
        info = client.info(timeout=5)
        assert info["name"] == "tokened" and info["threads"] == 1 and info["auth"]
    finally:
        proc.terminate()
        assert proc.wait(15) == 0  # SIGTERM stops it cleanly


def test_cli_infer_text_is_tokenised_by_the_plans_teacher(tmp_path: Path, bert: dict[str, Any]) -> None:
    from coformer.cli import build_cli

    backbone, teacher = bert["backbone"], bert["teacher"]
    source = backbone.save(teacher, tmp_path / "teacher")
    agg = _averaging(bert)
    plan_dir = save_plan(tmp_path / "plan", submodels=bert["subs"], aggregator=agg,
                         task_head=backbone.task_head(teacher), student_heads=list(agg.student_heads),
                         meta={"backbone": "bert", "source": str(source), "classes": ["x", "y", "z"]})
    servers = [serve("127.0.0.1:0", name=f"t{i}") for i in range(3)]
    try:
        texts = ["the match ended in a draw", "shares fell sharply"]
        args = ["infer", "--plan", str(plan_dir), "--workers", ",".join(s.uri for s in servers), "--json"]
        for t in texts:
            args += ["--text", t]
        result = CliRunner().invoke(build_cli(), args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        (rec,) = [json.loads(line) for line in result.stdout.splitlines()]
        batch = backbone.prepare(teacher, texts)
        with torch.inference_mode():
            expected = agg([_local(s, batch).half().float() for s in bert["subs"]]).argmax(-1).tolist()
        assert rec["prediction"] == expected and rec["labels"] == [["x", "y", "z"][p] for p in expected]
        assert rec["missing"] == [] and len(rec["answered"]) == 3
        no_input = CliRunner().invoke(build_cli(), args[:6])
        assert no_input.exit_code != 0 and "--text" in no_input.output
    finally:
        for s in servers:
            s.stop(0)
