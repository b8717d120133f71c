"""The worker loop (transport-independent) and the coordinator that fans a request out and aggregates.

A transport's server side wraps :class:`WorkerState`; its client side implements
:class:`~coformer.transport.WorkerClient`. The coordinator talks only to clients.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from safetensors.torch import load as st_load

from coformer.aggregator import Aggregator
from coformer.backbone import Batch, SubModel
from coformer.transport import (
    BadRequestError,
    InferResult,
    SubModelArtifact,
    WorkerClient,
    sha256,
)


class WorkerState:
    """What a worker holds: sub-models by sha256, kept loaded; thread-safe."""

    def __init__(self, name: str = "worker", threads: int | None = None):
        self.name = name
        self.threads = threads
        self._models: dict[str, SubModel] = {}
        self._lock = threading.Lock()
        self.requests = 0
        self.errors = 0
        self._thread_set = threading.local()

    def has(self, digest: str) -> bool:
        """Whether the sub-model with this weights hash is loaded."""
        return digest in self._models

    def load(self, config_json: str | dict[str, Any], weights: bytes, digest: str) -> bool:
        """Verify and load a sub-model; returns ``True`` if it was already cached.

        Raises :class:`BadRequestError` for a hash mismatch, bad config or weights that do not fit.
        """
        if self.has(digest):
            return True
        actual = sha256(weights)
        if actual != digest:
            raise BadRequestError(f"weights sha256 {actual} does not match the declared {digest}")
        try:
            config = json.loads(config_json) if isinstance(config_json, str) else config_json
            from coformer.registry import create

            backbone = create("backbone", config["backbone"])
            model = backbone.build_submodel(config)
            state = st_load(weights)
            model.load_state_dict(state, strict=True)
        except BadRequestError:
            raise
        except Exception as exc:  # noqa: BLE001 - any bad artifact is the caller's error
            raise BadRequestError(f"cannot load sub-model: {type(exc).__name__}: {exc}") from exc
        model.eval()
        with self._lock:
            self._models[digest] = model
        return False

    def infer(self, digest: str, batch: Batch) -> InferResult:
        """Run one sub-model on ``batch``; features come back as fp16."""
        model = self._models.get(digest)
        if model is None:
            raise BadRequestError(f"no sub-model with sha256 {digest[:12]}… is loaded; call load first")
        if self.threads and not getattr(self._thread_set, "done", False):
            # OpenMP's thread count is per calling thread: set it once in each RPC thread
            torch.set_num_threads(self.threads)
            self._thread_set.done = True
        self.requests += 1
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                out = model(**batch)
        except Exception as exc:  # noqa: BLE001 - a bad input must not kill the worker
            self.errors += 1
            raise BadRequestError(f"sub-model rejected the input: {type(exc).__name__}: {exc}") from exc
        compute_ms = (time.perf_counter() - start) * 1000
        # fp16, as on every wire; a network transport encodes this tensor once, in its own format
        return InferResult(out.detach().to(torch.float16).contiguous().cpu(), compute_ms)

    def health(self) -> dict[str, Any]:
        """Liveness, loaded models and counters."""
        return {"ok": True, "name": self.name, "models": sorted(self._models),
                "requests": self.requests, "errors": self.errors}


@dataclass
class DeviceTiming:
    """Per-device breakdown of one request (ms): compute, transfer (+ queueing), total round trip.

    ``serialize_ms`` is the part of t2 spent encoding and decoding tensors (both ends).
    """

    device: str
    t1_compute_ms: float
    t2_transfer_ms: float
    round_trip_ms: float
    ok: bool
    error: str | None = None
    serialize_ms: float = 0.0


@dataclass
class Answer:
    """The coordinator's answer to one request."""

    logits: torch.Tensor
    answered: list[str]
    missing: list[str]
    timings: list[DeviceTiming]
    t3_aggregate_ms: float
    total_ms: float
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def degraded(self) -> bool:
        """Whether some device's features were left out."""
        return bool(self.missing)


class Coordinator:
    """Send a batch to every worker at once, wait up to the deadline, aggregate what arrived."""

    def __init__(self, clients: Sequence[WorkerClient], model_digests: Sequence[str],
                 aggregator: Aggregator, *, names: Sequence[str] | None = None, deadline_s: float = 10.0):
        if len(clients) != len(model_digests):
            raise ValueError(f"{len(clients)} workers for {len(model_digests)} sub-models")
        self.clients = list(clients)
        self.digests = list(model_digests)
        self.aggregator = aggregator.eval()
        self.names = list(names) if names else [c.uri for c in clients]
        self.deadline_s = deadline_s
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(clients)), thread_name_prefix="coformer-fanout")

    @classmethod
    def deploy(cls, clients: Sequence[WorkerClient], artifacts: Sequence[SubModelArtifact],
               aggregator: Aggregator, **kwargs: Any) -> Coordinator:
        """Load each artifact on its worker (skipped where already cached) and build a coordinator."""
        for client, art in zip(clients, artifacts, strict=True):
            client.load(art)
        return cls(clients, [a.sha256 for a in artifacts], aggregator, **kwargs)

    def _call(self, i: int, batch: Batch, timeout: float) -> tuple[InferResult, float]:
        start = time.perf_counter()
        res = self.clients[i].infer(self.digests[i], batch, timeout=timeout)
        return res, (time.perf_counter() - start) * 1000

    def infer(self, batch: Batch, *, deadline_s: float | None = None) -> Answer:
        """One request: fan out, one round, aggregate from whoever answered in time."""
        deadline = self.deadline_s if deadline_s is None else deadline_s
        start = time.perf_counter()
        futures = [self._pool.submit(self._call, i, batch, deadline) for i in range(len(self.clients))]
        wait(futures, timeout=deadline)
        features: list[torch.Tensor | None] = []
        timings, errors = [], {}
        for i, fut in enumerate(futures):
            name = self.names[i]
            if not fut.done():
                fut.cancel()
                errors[name] = f"missed the {deadline:.2f}s deadline"
                features.append(None)
                timings.append(DeviceTiming(name, float("nan"), float("nan"), deadline * 1000, False, errors[name]))
                continue
            try:
                res, rtt = fut.result()
            except Exception as exc:  # noqa: BLE001 - one lost device must not lose the answer
                errors[name] = f"{type(exc).__name__}: {exc}"
                features.append(None)
                timings.append(DeviceTiming(name, float("nan"), float("nan"), float("nan"), False, errors[name]))
                continue
            features.append(res.features.float())
            timings.append(DeviceTiming(name, res.compute_ms, max(0.0, rtt - res.compute_ms), rtt, True,
                                        serialize_ms=res.serialize_ms))
        answered = [self.names[i] for i, f in enumerate(features) if f is not None]
        t_agg = time.perf_counter()
        with torch.inference_mode():
            logits = self.aggregator(features)  # raises MissingFeaturesError if nobody answered
        t3 = (time.perf_counter() - t_agg) * 1000
        missing = [n for n in self.names if n not in answered]
        return Answer(logits, answered, missing, timings, t3, (time.perf_counter() - start) * 1000, errors)

    def close(self) -> None:
        """Shut the fan-out pool and the clients."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        for c in self.clients:
            c.close()
