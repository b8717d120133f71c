"""The worker loop, independent of any transport: admit, load and run sub-models under limits.

A transport plugin's server side wraps :class:`WorkerState` (as the built-in transports do);
its client side implements :class:`~coformer.transport.WorkerClient`.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

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
from coformer.backbone import Batch, SubModel
from coformer.limits import RequestLimits, check_batch
from coformer.transport import BadRequestError, InferResult, ModelNotLoadedError, sha256, sha256_file


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
