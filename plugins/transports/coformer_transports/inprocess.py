"""``inproc://NAME``: workers living in this process (tests, the demo, single-machine runs).

Each name maps to one :class:`~coformer.online.worker_state.WorkerState`; requests run on the caller's
thread pool, so N workers compute concurrently. Tensors are passed by reference; features
still come back as fp16, exactly as over a network transport. It connects only: there is no
wire, so it cannot serve a worker to another process (``coformer worker`` refuses it).
"""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import urlparse

from coformer.backbone import Batch
from coformer.hookspecs import Register, hookimpl
from coformer.online.worker_state import WorkerState
from coformer.transport import InferResult, SubModelArtifact, Transport, WorkerClient

_workers: dict[str, WorkerState] = {}
_lock = threading.Lock()


def worker(name: str) -> WorkerState:
    """The in-process worker called ``name``, created on first use."""
    with _lock:
        if name not in _workers:
            _workers[name] = WorkerState(name)
        return _workers[name]


def shutdown(name: str | None = None) -> None:
    """Drop one in-process worker (or all), releasing its sub-models."""
    with _lock:
        if name is None:
            _workers.clear()
        else:
            _workers.pop(name, None)


class InProcessClient(WorkerClient):
    """A client for an in-process worker."""

    def __init__(self, uri: str):
        super().__init__(uri)
        parsed = urlparse(uri)
        name = (parsed.netloc + parsed.path).strip("/")
        if not name:
            raise ValueError(f"{uri!r}: an in-process worker needs a name, e.g. inproc://device0")
        self.state = worker(name)

    def load(self, artifact: SubModelArtifact, *, timeout: float = 60.0, memory_limit_bytes: int | None = None) -> bool:
        """Admit and load (or find cached) the artifact in the named worker."""
        return self.state.load(artifact.config, artifact.weights, artifact.sha256,
                               memory_limit_bytes=memory_limit_bytes)

    def infer(self, model_sha256: str, batch: Batch, *, timeout: float = 10.0) -> InferResult:
        """Run the sub-model in this process."""
        return self.state.infer(model_sha256, batch)

    def health(self, *, timeout: float = 2.0) -> dict[str, Any]:
        """The worker's counters and loaded models."""
        return self.state.health()

    def info(self, *, timeout: float = 2.0) -> dict[str, Any]:
        """The worker's loaded models, request limits and memory budget."""
        return self.state.info()


class InProcessTransport(Transport):
    """``inproc://NAME``: connects to the in-process worker of that name."""

    def connect(self, uri: str) -> InProcessClient:
        """A client for the in-process worker ``uri`` names (created on first use)."""
        return InProcessClient(uri)


@hookimpl
def register_transports(register: Register) -> None:
    """Register the ``inproc`` scheme."""
    register("inproc", InProcessTransport())
