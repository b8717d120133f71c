"""``coformer worker`` belongs to the core and serves with any transport that can serve.

- a real ``coformer worker --transport grpc`` process answers a load and an inference through
  ``coformer.open_transport`` and stops cleanly on SIGTERM;
- a transport that only connects (``inproc``, a third-party bare factory) is refused with the
  names of the transports that can serve;
- a third-party transport registered the old way, as a bare ``factory(uri)``, still connects;
- the generic serve loop (signals, grace, exit codes) works for any served worker, not only gRPC;
- no core module names a transport plugin except ``coformer/defaults.py``.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from click.testing import CliRunner

import coformer
from coformer import defaults
from coformer.backbone import Batch
from coformer.cli import build_cli
from coformer.online.serve import (
    EXIT_CALLS_CUT,
    EXIT_CLEAN,
    ServedWorker,
    ServeUnsupportedError,
    ServingTransport,
    serve_until_signalled,
    serving_transport,
    serving_transports,
)
from coformer.online.worker_state import WorkerState
from coformer.transport import FactoryTransport, InferResult, SubModelArtifact, Transport, WorkerClient, get_transport
from coformer_transports.worker_process import start_worker, stop_worker

from tiny_split import tiny_bert_split

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def tiny() -> dict[str, Any]:
    """A tiny BERT split in two, with artifacts."""
    return tiny_bert_split([2, 1])


def test_worker_process_serves_load_and_infer_over_grpc(tiny: dict[str, Any]) -> None:
    proc, uri = start_worker("--threads", "1", "--name", "served", transport="grpc", listen="127.0.0.1:0")
    try:
        assert uri.startswith("grpc://127.0.0.1:") and not uri.endswith(":0")
        client = coformer.open_transport(uri)
        try:
            for sub, art in zip(tiny["subs"], tiny["arts"]):
                assert client.load(art) is False and client.load(art) is True  # sent once, then cached
                result = client.infer(art.sha256, tiny["batch"])
                with torch.inference_mode():
                    expected = sub(**tiny["batch"])
                assert result.meta["worker"] == "served" and result.compute_ms > 0
                torch.testing.assert_close(result.features.float(), expected, atol=2e-3, rtol=2e-3)
            assert client.health()["ok"]
        finally:
            client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == EXIT_CLEAN
        assert proc.stderr is not None and "stopped cleanly" in proc.stderr.read()
    finally:
        stop_worker(proc)


def test_a_transport_that_cannot_serve_is_refused_naming_those_that_can() -> None:
    able = serving_transports()
    assert defaults.TRANSPORT in able and defaults.LOCAL_TRANSPORT not in able
    result = CliRunner().invoke(build_cli(), ["worker", "--transport", defaults.LOCAL_TRANSPORT,
                                              "--listen", "127.0.0.1:0"])
    assert result.exit_code == 2, result.output
    assert "cannot serve" in result.output and f"transports that can serve: {', '.join(able)}" in result.output
    unknown = CliRunner().invoke(build_cli(), ["worker", "--transport", "no-such-transport"])
    assert unknown.exit_code == 2 and "known transports" in unknown.output


class EchoClient(WorkerClient):
    """A third-party client: its features are the input ids as floats; it holds whatever it is sent."""

    def __init__(self, uri: str):
        super().__init__(uri)
        self.held: set[str] = set()

    def load(self, artifact: SubModelArtifact, *, timeout: float = 60.0, memory_limit_bytes: int | None = None) -> bool:
        cached = artifact.sha256 in self.held
        self.held.add(artifact.sha256)
        return cached

    def infer(self, model_sha256: str, batch: Batch, *, timeout: float = 10.0) -> InferResult:
        return InferResult(batch["input_ids"].to(torch.float16), 0.0)

    def health(self, *, timeout: float = 2.0) -> dict[str, Any]:
        return {"ok": True, "models": sorted(self.held)}


class BareFactoryPlugin:
    """A third-party plugin that registers its transport the old way: a bare ``factory(uri)``."""

    @coformer.hookimpl
    def register_transports(self, register: Any) -> None:
        register("echo", EchoClient)


@pytest.fixture
def echo_plugin() -> Iterator[None]:
    name = coformer.register_plugin(BareFactoryPlugin(), name="echo-transport")
    try:
        yield
    finally:
        coformer.unregister_plugin(name)


def test_a_bare_factory_transport_still_connects_and_cannot_serve(echo_plugin: None, tiny: dict[str, Any]) -> None:
    client = coformer.open_transport("echo://anywhere")
    assert isinstance(client, EchoClient) and client.uri == "echo://anywhere"
    art = tiny["arts"][0]
    assert client.load(art) is False and client.load(art) is True
    assert torch.equal(client.infer(art.sha256, tiny["batch"]).features.long(), tiny["batch"]["input_ids"])
    transport = get_transport("echo")
    assert isinstance(transport, FactoryTransport) and isinstance(transport.connect("echo://x"), EchoClient)
    assert "echo" not in serving_transports()
    with pytest.raises(ServeUnsupportedError, match="transport 'echo' cannot serve.*grpc"):
        serving_transport("echo")
    result = CliRunner().invoke(build_cli(), ["worker", "--transport", "echo", "--listen", "127.0.0.1:0"])
    assert result.exit_code == 2 and "transport 'echo' cannot serve" in result.output


def test_registered_transports_are_typed() -> None:
    for info in coformer.list_plugins("transport"):
        transport = get_transport(info.name)
        assert isinstance(transport, Transport)
        if isinstance(transport, ServingTransport):
            uri = transport.worker_uri("10.1.2.3", 5)
            assert uri.startswith(f"{info.name}://") and "10.1.2.3" in uri
    assert get_transport(defaults.TRANSPORT).worker_uri("::1", 7) == f"{defaults.TRANSPORT}://[::1]:7"


class StubServed(ServedWorker):
    """A served worker with a fixed number of calls in flight that drain leaves cut."""

    def __init__(self, cut: int):
        self.state = WorkerState("stub", max_memory_bytes=2**20)
        self.cut = cut
        self.drained_with: float | None = None

    @property
    def uri(self) -> str:
        return "stub://here"

    @property
    def inflight(self) -> int:
        return self.cut

    def drain(self, grace: float) -> int:
        self.drained_with = grace
        return self.cut

    def stop(self, grace: float | None = 0.5) -> None:
        pass


@pytest.mark.parametrize(("cut", "code"), [(0, EXIT_CLEAN), (2, EXIT_CALLS_CUT)])
def test_the_serve_loop_drains_on_sigterm_for_any_transport(cut: int, code: int, capsys: Any) -> None:
    old = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    server = StubServed(cut)
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        assert serve_until_signalled(server, 4.0, announce="stub listening on stub://here") == code
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, old[0])
        signal.signal(signal.SIGINT, old[1])
    assert server.drained_with is not None and 0 < server.drained_with <= 4.0
    out = capsys.readouterr()
    assert "listening on stub://here" in out.out
    assert ("cut after the 4s grace" if cut else "stopped cleanly") in out.err


def test_no_core_module_names_a_transport_plugin() -> None:
    """Only ``coformer/defaults.py`` may name a built-in transport; everything else asks the registry."""
    names = {"grpc", "inproc"}  # the built-in transports (pyproject.toml's entry points)
    offenders = [f"{path.relative_to(ROOT)}: {name}" for path in sorted((ROOT / "coformer").rglob("*.py"))
                 if path != ROOT / "coformer" / "defaults.py"
                 for name in names if name.lower() in path.read_text().lower()]
    assert not offenders, offenders
