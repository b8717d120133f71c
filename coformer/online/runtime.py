"""The worker loop (transport-independent) and the coordinator that fans a request out and aggregates.

A transport's server side wraps :class:`WorkerState`; its client side implements
:class:`~coformer.transport.WorkerClient`. The coordinator talks only to clients.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from coformer.admission import (
    AdmissionError,
    LoadCancelledError,
    admit_memory,
    build_on_meta,
    check_config_sanity,
    compare_to_weights,
    default_memory_budget,
    materialise,
    parse_config_json,
    resident_bytes,
    safetensors_header,
)
from coformer.aggregator import Aggregator
from coformer.backbone import Batch, SubModel
from coformer.limits import RequestLimits, check_batch, rows_per_request
from coformer.transport import (
    BadRequestError,
    InferResult,
    ModelNotLoadedError,
    SubModelArtifact,
    TransportError,
    WorkerClient,
    sha256,
    sha256_file,
)


@dataclass(frozen=True)
class Admitted:
    """A sub-model that passed admission: how to build it and the bytes it will take."""

    digest: str
    factory: Callable[[], SubModel]
    footprint: int


class WorkerState:
    """What a worker holds: sub-models by sha256, kept loaded; thread-safe.

    Admission before allocation: a load is checked on the meta device against the weights'
    header and against ``max_memory_bytes`` (default: half the memory available at start)
    before any parameter memory exists. Requests are checked against ``limits`` and the
    sub-model's own limits before compute. Setting :attr:`cancel` aborts loads in progress.

    The loaded models are a cache bounded by ``max_memory_bytes`` (tensors plus per-module
    overhead, :func:`~coformer.admission.resident_bytes`): a load that does not fit evicts the
    least-recently-used models that no request is using; it is refused only if the models in use
    leave no room. A coordinator whose model was evicted reloads it (see :class:`RecoveryPolicy`).
    """

    def __init__(self, name: str = "worker", threads: int | None = None, *,
                 limits: RequestLimits | None = None, max_memory_bytes: int | None = None):
        self.name = name
        self.threads = threads
        self.limits = limits or RequestLimits()
        self.max_memory_bytes = default_memory_budget() if max_memory_bytes is None else int(max_memory_bytes)
        if self.max_memory_bytes < 1:
            raise ValueError(f"max_memory_bytes must be positive, got {max_memory_bytes}")
        self._models: OrderedDict[str, SubModel] = OrderedDict()  # least recently used first
        self._footprints: dict[str, int] = {}
        self._in_use: dict[str, int] = {}
        self.evicted = 0
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()  # one materialisation at a time, so the budget holds
        self.cancel = threading.Event()
        self.requests = 0
        self.errors = 0
        self.refused = 0
        self._thread_set = threading.local()

    def has(self, digest: str) -> bool:
        """Whether the sub-model with this weights hash is loaded."""
        return digest in self._models

    @property
    def used_memory_bytes(self) -> int:
        """Bytes the loaded sub-models take."""
        with self._lock:
            return sum(self._footprints.values())

    def _pinned_bytes(self) -> int:
        """Bytes of the models a request is using now (never evicted); call with ``_lock`` held."""
        return sum(self._footprints[d] for d, n in self._in_use.items() if n and d in self._footprints)

    def _make_room(self, need: int, budget: int, what: str) -> None:
        """Evict least-recently-used idle models until ``need`` fits ``budget``; refuse if it cannot."""
        with self._lock:
            admit_memory(need, budget, self._pinned_bytes(), what)
            for digest in list(self._models):
                if sum(self._footprints.values()) + need <= budget:
                    break
                if not self._in_use.get(digest):
                    del self._models[digest], self._footprints[digest]
                    self.evicted += 1

    def admit(self, config_json: str | dict[str, Any], header: dict[str, dict[str, Any]], digest: str, *,
              memory_limit_bytes: int | None = None) -> Admitted:
        """Check a config against a weights header and the memory budget; allocates no parameters."""
        config = check_config_sanity(parse_config_json(config_json) if isinstance(config_json, str) else config_json)
        if not isinstance(config.get("backbone"), str):
            raise AdmissionError("config must name its 'backbone' (a SubModel.config)")
        from coformer.registry import create

        try:
            backbone = create("backbone", config["backbone"])
        except Exception as exc:  # noqa: BLE001 - unknown plugin names are the caller's error
            raise AdmissionError(f"cannot load sub-model: {type(exc).__name__}: {exc}") from exc

        def factory() -> SubModel:
            return backbone.build_submodel(config)

        meta = build_on_meta(factory, max_tensors=len(header))
        compare_to_weights(meta, header)
        need = resident_bytes(meta)
        budget = self.max_memory_bytes if memory_limit_bytes is None else min(self.max_memory_bytes,
                                                                               int(memory_limit_bytes))
        with self._lock:  # idle models can be evicted to make room, models in use cannot
            admit_memory(need, budget, self._pinned_bytes(), f"sub-model {digest[:12]}…")
        return Admitted(digest, factory, need)

    def install(self, admitted: Admitted, weights: bytes | str | Path, *,
                memory_limit_bytes: int | None = None) -> bool:
        """Materialise an admitted sub-model from verified weights; ``True`` if it was already held."""
        with self._load_lock:
            if self.has(admitted.digest):
                return True
            budget = self.max_memory_bytes if memory_limit_bytes is None else min(self.max_memory_bytes,
                                                                                   int(memory_limit_bytes))
            self._make_room(admitted.footprint, budget, f"sub-model {admitted.digest[:12]}…")
            if self.cancel.is_set():
                raise LoadCancelledError("load cancelled: the worker is shutting down")
            try:
                model = materialise(admitted.factory, weights, self.cancel)
            except (LoadCancelledError, AdmissionError):
                raise
            except Exception as exc:  # noqa: BLE001 - weights that do not fit are the caller's error
                raise AdmissionError(f"cannot load sub-model: {type(exc).__name__}: {exc}") from exc
            with self._lock:
                self._models[admitted.digest] = model
                self._footprints[admitted.digest] = admitted.footprint
        return False

    def load(self, config_json: str | dict[str, Any], weights: bytes | str | Path, digest: str, *,
             memory_limit_bytes: int | None = None) -> bool:
        """Verify, admit and load a sub-model; returns ``True`` if it was already cached.

        ``weights`` is safetensors bytes or a file. Raises :class:`BadRequestError` (an
        :class:`AdmissionError`) for a hash mismatch, bad config, weights that do not fit the
        config, or a model over the memory budget — before any parameter memory is allocated.
        """
        if self.has(digest):
            return True
        actual = sha256(weights) if not isinstance(weights, (str, Path)) else sha256_file(weights)
        if actual != digest:
            raise AdmissionError(f"weights sha256 {actual} does not match the declared {digest}")
        admitted = self.admit(config_json, safetensors_header(weights), digest, memory_limit_bytes=memory_limit_bytes)
        return self.install(admitted, weights, memory_limit_bytes=memory_limit_bytes)

    def infer(self, digest: str, batch: Batch) -> InferResult:
        """Run one sub-model on ``batch`` after checking it against the limits; features come back as fp16."""
        with self.using(digest) as model:
            return self._run(model, batch)

    @contextmanager
    def using(self, digest: str) -> Iterator[SubModel]:
        """Hold a loaded sub-model for a request: it becomes most recently used and cannot be evicted meanwhile."""
        with self._lock:
            model = self._models.get(digest)
            if model is None:
                raise ModelNotLoadedError(f"no sub-model with sha256 {digest[:12]}… is loaded; call load first")
            self._models.move_to_end(digest)
            self._in_use[digest] = self._in_use.get(digest, 0) + 1
        try:
            yield model
        finally:
            with self._lock:
                self._in_use[digest] -= 1
                if not self._in_use[digest]:
                    del self._in_use[digest]

    def _run(self, model: SubModel, batch: Batch) -> InferResult:
        try:
            check_batch(batch, model, self.limits)
        except BadRequestError:
            self.refused += 1
            raise
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
        with self._lock:
            models = sorted(self._models)
        return {"ok": True, "name": self.name, "models": models,
                "requests": self.requests, "errors": self.errors, "evicted": self.evicted}

    def info(self) -> dict[str, Any]:
        """Name, loaded models, request limits and the memory budget (what a coordinator plans with)."""
        return {"name": self.name, "models": sorted(self._models), "limits": self.limits.to_dict(),
                "max_memory_bytes": self.max_memory_bytes, "used_memory_bytes": self.used_memory_bytes}


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
