"""Recovery, concurrency and clean shutdown over real gRPC on loopback.

- A worker that dies is retried with backoff, then left out (named) until a health check
  re-admits it; a worker that comes back empty gets its sub-model reloaded; no request fails.
- ``Coordinator.infer`` from many threads gives the same answers as one thread, and never runs
  more than ``max_inflight`` requests at once.
- ``coformer worker`` on SIGTERM finishes in-flight calls within ``--grace`` (exit 0), cuts them
  after it (exit 3, still within the grace), and a second signal exits at once (130).
"""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

from coformer.limits import RequestLimits
from coformer.online.coordinator import Coordinator, RecoveryPolicy
from coformer.transport import WorkerClient
from coformer_transports.grpc_transport import GrpcClient, serve
from coformer_transports.worker_process import start_worker, stop_worker

from tiny_split import tiny_bert_split

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def bert() -> dict[str, Any]:
    """A tiny BERT teacher cut into 3 sub-models, their artifacts, an aggregator and a batch."""
    return tiny_bert_split([2, 1, 1])


def _expected(bert: dict[str, Any], batch: dict[str, torch.Tensor], keep: list[bool]) -> torch.Tensor:
    with torch.inference_mode():
        return bert["agg"]([s(**batch).half().float() if k else None for s, k in zip(bert["subs"], keep)])


def test_killed_worker_is_retried_left_out_then_readmitted_with_its_model(bert: dict[str, Any]) -> None:
    servers = [serve("127.0.0.1:0", name=f"w{i}") for i in range(3)]
    port = servers[1].address.rsplit(":", 1)[1]
    names = ["w0", "w1", "w2"]
    coord = Coordinator.deploy([GrpcClient(s.uri) for s in servers], bert["arts"], bert["agg"], names=names,
                               deadline_s=5.0, recovery=RecoveryPolicy(retries=2, backoff_s=0.02,
                                                                      probe_interval_s=0.1))
    batch = bert["batch"]
    try:
        full = coord.infer(batch)
        torch.testing.assert_close(full.logits, _expected(bert, batch, [True, True, True]))
        servers[1].stop(0)  # the worker dies
        first = coord.infer(batch)
        assert first.missing == ["w1"] and first.retried == {"w1": 2}  # retried twice with backoff, then left out
        torch.testing.assert_close(first.logits, _expected(bert, batch, [True, False, True]))
        assert coord.is_down(1)
        second = coord.infer(batch)  # no retry cost while it is known down
        assert second.missing == ["w1"] and not second.retried and "down, awaiting" in second.errors["w1"]
        servers[1] = serve(f"127.0.0.1:{port}", name="w1")  # back on the same address, empty
        back = time.monotonic()
        while coord.is_down(1) and time.monotonic() - back < 10:
            time.sleep(0.02)
        readmitted_after = time.monotonic() - back
        assert not coord.is_down(1) and readmitted_after < 5.0, readmitted_after
        assert servers[1].state.health()["models"] == [bert["arts"][1].sha256]  # reloaded by the coordinator
        again = coord.infer(batch)
        assert again.answered == names and not again.degraded
        assert torch.equal(again.logits, full.logits)
        assert coord.readmissions()["w1"] == 1
    finally:
        coord.close()
        for s in servers:
            s.stop(0)


class _CountingClient(WorkerClient):
    """Wraps a client and records the most calls it saw at once."""

    def __init__(self, inner: WorkerClient):
        super().__init__(inner.uri)
        self.inner, self.now, self.peak = inner, 0, 0
        self._lock = threading.Lock()

    def load(self, artifact: Any, **kw: Any) -> bool:
        return self.inner.load(artifact, **kw)

    def infer(self, model_sha256: str, batch: Any, **kw: Any) -> Any:
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        try:
            time.sleep(0.01)  # widen the window in which overlapping calls would be seen
            return self.inner.infer(model_sha256, batch, **kw)
        finally:
            with self._lock:
                self.now -= 1

    def health(self, **kw: Any) -> dict[str, Any]:
        return self.inner.health(**kw)

    def info(self, **kw: Any) -> dict[str, Any]:
        return self.inner.info(**kw)


def test_infer_is_thread_safe_and_bounded_by_max_inflight(bert: dict[str, Any]) -> None:
    servers = [serve("127.0.0.1:0") for _ in range(3)]
    clients = [_CountingClient(GrpcClient(s.uri)) for s in servers]
    coord = Coordinator.deploy(clients, bert["arts"], bert["agg"], deadline_s=30.0, max_inflight=3)
    torch.manual_seed(5)
    batches = [{"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
               for _ in range(8)]
    try:
        serial = [coord.infer(b).logits for b in batches]
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda k: (k % 8, coord.infer(batches[k % 8])), range(96)))
        for k, ans in answers:
            assert ans.answered == coord.names and torch.equal(ans.logits, serial[k])
        assert max(c.peak for c in clients) <= 3  # never more than max_inflight requests at once
        assert max(c.peak for c in clients) >= 2  # and they did overlap
    finally:
        coord.close()
        for s in servers:
            s.stop(0)


def _slow_batch(tokens: int = 64, rows: int = 4096) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 100, (rows, tokens)), "attention_mask": torch.ones(rows, tokens,
                                                                                              dtype=torch.long)}


def _busy(uri: str, digest: str, batch: dict[str, torch.Tensor], out: list[Any]) -> threading.Thread:
    def call() -> None:
        try:
            out.append(GrpcClient(uri + "?max_message_mb=64").infer(digest, batch, timeout=60))
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion
            out.append(exc)

    t = threading.Thread(target=call)
    t.start()
    return t


def _wait_inflight(uri: str, timeout: float = 10.0) -> None:
    client = GrpcClient(uri)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if client.health()["inflight"] > 0:
            return
        time.sleep(0.01)
    raise AssertionError("the slow request never started")


@pytest.mark.slow
def test_sigterm_drains_within_grace_and_reports_cut_calls(bert: dict[str, Any]) -> None:
    art = bert["arts"][0]
    limits = ["--max-batch", "100000", "--max-input-mb", "64", "--max-message-mb", "64", "--threads", "1"]
    # 1) a short call finishes inside a long grace: exit 0, the client gets its answer
    proc, uri = start_worker(*limits, "--grace", "20")
    try:
        GrpcClient(uri).load(art)
        out: list[Any] = []
        t = _busy(uri, art.sha256, _slow_batch(rows=256), out)
        _wait_inflight(uri)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        t.join(20)
        assert out and not isinstance(out[0], Exception)
        assert "finished" in proc.stderr.read()
    finally:
        stop_worker(proc)
    # 2) a call longer than the grace is cut: exit 3, the process gone within the grace counted from the
    #    signal (it used to drain for the whole grace and exit after it)
    proc, uri = start_worker(*limits, "--grace", "0.5")
    try:
        GrpcClient(uri).load(art)
        out = []
        t = _busy(uri, art.sha256, _slow_batch(rows=20000), out)
        _wait_inflight(uri)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 3
        took = time.monotonic() - start
        assert took <= 0.5, f"exited {took:.3f}s after SIGTERM, over the 0.5s grace"
        assert "cut after the 0.5s grace" in proc.stderr.read()
        t.join(20)
    finally:
        stop_worker(proc)
    # 3) a second signal exits at once
    proc, uri = start_worker(*limits, "--grace", "60")
    try:
        GrpcClient(uri).load(art)
        out = []
        t = _busy(uri, art.sha256, _slow_batch(rows=20000), out)
        _wait_inflight(uri)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert proc.poll() is None  # draining, inside its 60 s grace
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 130 and time.monotonic() - start < 2.0
        t.join(20)
    finally:
        stop_worker(proc)


def test_requests_are_split_to_the_smallest_worker_limit_over_grpc(bert: dict[str, Any]) -> None:
    servers = [serve("127.0.0.1:0", limits=RequestLimits(max_batch=2)) for _ in range(3)]
    coord = Coordinator.deploy([GrpcClient(s.uri) for s in servers], bert["arts"], bert["agg"])
    try:
        big = {k: v.repeat(3, 1) for k, v in bert["batch"].items()}
        ans = coord.infer(big)
        assert ans.chunks == 3 and not ans.degraded
        torch.testing.assert_close(ans.logits, _expected(bert, big, [True] * 3))
    finally:
        coord.close()
        for s in servers:
            s.stop(0)
