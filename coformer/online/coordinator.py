"""The coordinator: fans a request out to the workers, survives lost devices, and aggregates once.

It talks only to :class:`~coformer.transport.WorkerClient` objects, whatever the transport.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from coformer.aggregator import Aggregator
from coformer.backbone import Batch
from coformer.limits import rows_per_request
from coformer.transport import (
    BadRequestError,
    InferResult,
    ModelNotLoadedError,
    SubModelArtifact,
    TransportError,
    WorkerClient,
)


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
    """The coordinator's answer to one request.

    ``answered`` names the devices whose features were aggregated, ``missing`` those left out
    (with the reason in ``errors``), and ``retried`` maps each device that needed more than one
    attempt to the number of extra attempts. A batch split into ``chunks`` requests lists a
    device as answered only if it answered every chunk.
    """

    logits: torch.Tensor
    answered: list[str]
    missing: list[str]
    timings: list[DeviceTiming]
    t3_aggregate_ms: float
    total_ms: float
    errors: dict[str, str] = field(default_factory=dict)
    retried: dict[str, int] = field(default_factory=dict)
    chunks: int = 1

    @property
    def degraded(self) -> bool:
        """Whether some device's features were left out."""
        return bool(self.missing)


class CoordinatorBusyError(TransportError):
    """``max_inflight`` requests were already running and none finished within the deadline."""


@dataclass(frozen=True)
class RecoveryPolicy:
    """How the coordinator handles a device that fails (see README, Security).

    - Within a request, a device whose call fails with a transport error (unreachable, reset,
      internal fault) is retried up to ``retries`` times, waiting ``backoff_s``, then twice
      that, …, while the request's deadline allows. Bad input is never retried (the input
      would fail again); a missed deadline is not retried (the time is spent).
    - A device that still fails is marked down: later requests leave it out at once (named in
      ``missing``) instead of paying the retries again.
    - A prober health-checks down devices every ``probe_interval_s`` (doubling per failed
      probe up to ``max_probe_interval_s``). A device that answers and holds its sub-model is
      re-admitted; one that answers without it (restarted empty) gets its artifact reloaded,
      then is re-admitted.
    """

    retries: int = 2
    backoff_s: float = 0.05
    probe_interval_s: float = 0.25
    max_probe_interval_s: float = 2.0

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff_s < 0 or self.probe_interval_s <= 0 or self.max_probe_interval_s <= 0:
            raise ValueError(f"invalid recovery policy {self}: retries/backoff must be >= 0, intervals > 0")


@dataclass
class _DeviceState:
    down_since: float | None = None
    reason: str = ""
    next_probe: float = 0.0
    interval: float = 0.0
    readmissions: int = 0


class Coordinator:
    """Send a batch to every worker at once, wait up to the deadline, aggregate what arrived.

    Thread-safe: :meth:`infer` may be called from many threads; at most ``max_inflight``
    requests run at once (the rest wait for a slot up to their deadline). Failed devices are
    retried and re-admitted per ``recovery`` (:class:`RecoveryPolicy`); a batch larger than a
    worker admits is split into admissible requests using the limits each worker reports.
    """

    def __init__(self, clients: Sequence[WorkerClient], model_digests: Sequence[str],
                 aggregator: Aggregator, *, names: Sequence[str] | None = None, deadline_s: float = 10.0,
                 max_inflight: int = 32, recovery: RecoveryPolicy | None = None,
                 artifacts: Sequence[SubModelArtifact] | None = None,
                 memory_limits: Sequence[int | None] | None = None, load_timeout_s: float = 120.0):
        if len(clients) != len(model_digests):
            raise ValueError(f"{len(clients)} workers for {len(model_digests)} sub-models")
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be at least 1, got {max_inflight}")
        self.clients = list(clients)
        self.digests = list(model_digests)
        self.aggregator = aggregator.eval()
        self.names = list(names) if names else [c.uri for c in clients]
        self.deadline_s = deadline_s
        self.max_inflight = max_inflight
        self.recovery = recovery or RecoveryPolicy()
        self.artifacts = list(artifacts) if artifacts is not None else None
        self.memory_limits = list(memory_limits) if memory_limits is not None else [None] * len(self.clients)
        self.load_timeout_s = load_timeout_s
        self._slots = threading.BoundedSemaphore(max_inflight)
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(clients) * max_inflight),
                                        thread_name_prefix="coformer-fanout")
        self._state = [_DeviceState() for _ in self.clients]
        self._state_lock = threading.Lock()
        self._limits: list[dict[str, Any]] | None = None
        self._closed = threading.Event()
        self._prober = threading.Thread(target=self._probe_loop, name="coformer-prober", daemon=True)
        self._prober.start()

    @classmethod
    def deploy(cls, clients: Sequence[WorkerClient], artifacts: Sequence[SubModelArtifact],
               aggregator: Aggregator, *, memory_limits: Sequence[int | None] | None = None,
               **kwargs: Any) -> Coordinator:
        """Load each artifact on its worker (skipped where already cached) and build a coordinator.

        The coordinator keeps the artifacts, so a worker that restarts empty is reloaded.
        ``memory_limits`` (bytes per device, e.g. the plan's device memory) cap each worker's budget.
        """
        limits = list(memory_limits) if memory_limits is not None else [None] * len(clients)
        for client, art, limit in zip(clients, artifacts, limits, strict=True):
            _load(client, art, limit)
        return cls(clients, [a.sha256 for a in artifacts], aggregator, artifacts=artifacts,
                   memory_limits=limits, **kwargs)

    # -- device health

    def is_down(self, i: int) -> bool:
        """Whether device ``i`` is currently left out, awaiting re-admission."""
        return self._state[i].down_since is not None

    def mark_down(self, i: int, reason: str) -> None:
        """Leave device ``i`` out of requests until a health check re-admits it."""
        with self._state_lock:
            st = self._state[i]
            if st.down_since is None:
                st.down_since = time.monotonic()
                st.interval = self.recovery.probe_interval_s
                st.next_probe = st.down_since + st.interval
            st.reason = reason

    def _probe_loop(self) -> None:
        while not self._closed.wait(self.recovery.probe_interval_s / 2):
            now = time.monotonic()
            for i, st in enumerate(self._state):
                if st.down_since is not None and now >= st.next_probe and not self._closed.is_set():
                    self.probe(i)

    def probe(self, i: int) -> bool:
        """Health-check device ``i`` now; re-admit it (reloading its sub-model if it restarted empty)."""
        st = self._state[i]
        try:
            health = self.clients[i].health(timeout=min(2.0, self.deadline_s))
            if not health.get("ok"):
                raise TransportError(f"{self.names[i]} reports not ok")
            if self.digests[i] not in health.get("models", []):
                if self.artifacts is None:
                    raise TransportError(f"{self.names[i]} lost its sub-model and this coordinator holds no "
                                         f"artifact to reload; deploy with Coordinator.deploy")
                _load(self.clients[i], self.artifacts[i], self.memory_limits[i], timeout=self.load_timeout_s)
        except Exception as exc:  # noqa: BLE001 - still down; try again later
            with self._state_lock:
                st.reason = f"{type(exc).__name__}: {exc}"
                st.interval = min(self.recovery.max_probe_interval_s, max(st.interval, 1e-3) * 2)
                st.next_probe = time.monotonic() + st.interval
            return False
        with self._state_lock:
            st.down_since = None
            st.reason = ""
            st.readmissions += 1
        self._limits = None  # a restarted worker may have other limits
        return True

    def readmissions(self) -> dict[str, int]:
        """How many times each device was re-admitted after being down."""
        return {n: st.readmissions for n, st in zip(self.names, self._state)}

    # -- requests

    def worker_limits(self) -> list[dict[str, Any]]:
        """Each worker's request limits as it reports them (empty where unknown)."""
        if self._limits is None:
            out = []
            for c in self.clients:
                try:
                    out.append(dict(c.info(timeout=2.0).get("limits") or {}))
                except Exception:  # noqa: BLE001 - an unreachable worker reports nothing
                    out.append({})
            self._limits = out
        return self._limits

    def _call(self, i: int, batch: Batch, deadline_at: float) -> tuple[InferResult, float, int]:
        attempts = 0
        while True:
            start = time.perf_counter()
            timeout = max(1e-3, deadline_at - time.monotonic())
            try:
                res = self.clients[i].infer(self.digests[i], batch, timeout=timeout)
                return res, (time.perf_counter() - start) * 1000, attempts
            except ModelNotLoadedError as exc:
                self.mark_down(i, f"{type(exc).__name__}: {exc}")
                raise
            except BadRequestError:
                raise
            except Exception as exc:  # noqa: BLE001 - transport faults are retried, then the device is marked down
                wait_s = self.recovery.backoff_s * (2 ** attempts)
                deadline_missed = "deadline" in str(exc).lower()
                if attempts >= self.recovery.retries or deadline_missed or \
                        time.monotonic() + wait_s >= deadline_at or self._closed.is_set():
                    if not deadline_missed:
                        self.mark_down(i, f"{type(exc).__name__}: {exc}")
                    exc.retries = attempts  # type: ignore[attr-defined]
                    raise
                attempts += 1
                time.sleep(wait_s)

    def infer(self, batch: Batch, *, deadline_s: float | None = None) -> Answer:
        """One request: fan out, one round, aggregate from whoever answered in time.

        A batch over the workers' reported ``max_batch`` or input-byte limit is split into
        admissible requests and the answers concatenated.
        """
        deadline = self.deadline_s if deadline_s is None else deadline_s
        start = time.perf_counter()
        if not self._slots.acquire(timeout=deadline):
            raise CoordinatorBusyError(f"{self.max_inflight} requests in flight and none finished within "
                                       f"{deadline:.2f}s; raise max_inflight or add workers")
        try:
            sizes = {v.shape[0] for v in batch.values() if v.dim()}
            rows = rows_per_request(batch, self.worker_limits())
            total = next(iter(sizes)) if len(sizes) == 1 else 0
            if total <= rows:
                return self._infer_once(batch, deadline, start)
            parts = [self._infer_once({k: v[r:r + rows] for k, v in batch.items()}, deadline, time.perf_counter())
                     for r in range(0, total, rows)]
            return _merge(parts, self.names, (time.perf_counter() - start) * 1000)
        finally:
            self._slots.release()

    def _infer_once(self, batch: Batch, deadline: float, start: float) -> Answer:
        deadline_at = time.monotonic() + deadline
        futures: dict[int, Future] = {}
        errors: dict[str, str] = {}
        for i in range(len(self.clients)):
            if self.is_down(i):
                errors[self.names[i]] = f"down, awaiting re-admission ({self._state[i].reason})"
            else:
                futures[i] = self._pool.submit(self._call, i, batch, deadline_at)
        wait(list(futures.values()), timeout=deadline)
        features: list[torch.Tensor | None] = []
        timings: list[DeviceTiming] = []
        retried: dict[str, int] = {}
        nan = float("nan")
        for i in range(len(self.clients)):
            name = self.names[i]
            fut = futures.get(i)
            if fut is None:
                features.append(None)
                timings.append(DeviceTiming(name, nan, nan, nan, False, errors[name]))
                continue
            if not fut.done():
                fut.cancel()
                errors[name] = f"missed the {deadline:.2f}s deadline"
                features.append(None)
                timings.append(DeviceTiming(name, nan, nan, deadline * 1000, False, errors[name]))
                continue
            try:
                res, rtt, attempts = fut.result()
            except Exception as exc:  # noqa: BLE001 - one lost device must not lose the answer
                errors[name] = f"{type(exc).__name__}: {exc}"
                if getattr(exc, "retries", 0):
                    retried[name] = exc.retries  # type: ignore[attr-defined]
                features.append(None)
                timings.append(DeviceTiming(name, nan, nan, nan, False, errors[name]))
                continue
            if attempts:
                retried[name] = attempts
            features.append(res.features.float())
            timings.append(DeviceTiming(name, res.compute_ms, max(0.0, rtt - res.compute_ms), rtt, True,
                                        serialize_ms=res.serialize_ms))
        answered = [self.names[i] for i, f in enumerate(features) if f is not None]
        t_agg = time.perf_counter()
        with torch.inference_mode():
            logits = self.aggregator(features)  # raises MissingFeaturesError if nobody answered
        t3 = (time.perf_counter() - t_agg) * 1000
        missing = [n for n in self.names if n not in answered]
        return Answer(logits, answered, missing, timings, t3, (time.perf_counter() - start) * 1000, errors, retried)

    def close(self) -> None:
        """Stop the prober, shut the fan-out pool and the clients."""
        self._closed.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        for c in self.clients:
            c.close()


def _load(client: WorkerClient, artifact: SubModelArtifact, memory_limit: int | None, **kwargs: Any) -> bool:
    # clients written before memory limits existed take no such keyword
    if memory_limit is not None:
        kwargs["memory_limit_bytes"] = memory_limit
    return client.load(artifact, **kwargs)


def _merge(parts: list[Answer], names: list[str], total_ms: float) -> Answer:
    """One answer from the answers to the chunks of a split batch."""
    answered = [n for n in names if all(n in p.answered for p in parts)]
    errors: dict[str, str] = {}
    retried: dict[str, int] = {}
    for p in parts:
        errors.update(p.errors)
        for n, k in p.retried.items():
            retried[n] = retried.get(n, 0) + k
    return Answer(torch.cat([p.logits for p in parts]), answered, [n for n in names if n not in answered],
                  [t for p in parts for t in p.timings], sum(p.t3_aggregate_ms for p in parts), total_ms,
                  errors, retried, chunks=len(parts))
