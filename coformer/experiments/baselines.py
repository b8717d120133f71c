"""The methods CoFormer is compared with, run over the same transport (:class:`~coformer.transport.WorkerClient`).

* :class:`TeacherAlone` — the whole teacher as one sub-model on the strongest device; its task
  head runs at the coordinator.
* the pipeline and tensor-parallel splits (:mod:`coformer.experiments.split_baselines`);
* :class:`CoFormerMethod` — a plan's sub-models through the real :class:`~coformer.online.coordinator.Coordinator`.

Each request returns a :class:`Trace`: logits, end-to-end time, and every exchange with its
payload bytes (serialized request batch + fp16 response), the worker-reported compute time and
the round trip. Pipeline and tensor-parallel splits are exact (up to fp16 on the wire). The core
only calls the :class:`~coformer.backbone.Backbone` interface (``slice``, ``pipeline_stage``,
``tensor_shard``, ``tensor_host``, ``task_head``): nothing here knows a particular backbone.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from coformer.aggregator import Aggregator
from coformer.artifacts import submodel_artifact
from coformer.backbone import Backbone, Batch, SubModel
from coformer.measure import peak_activation_bytes, state_bytes
from coformer.online.coordinator import Coordinator
from coformer.spec import DeviceProfile, UnitSelection, strongest_index
from coformer.transport import SubModelArtifact, WorkerClient, encode_batch

FP16_BYTES = 2


def proportional_split(count: int, speeds: Sequence[float]) -> list[int]:
    """Split ``count`` units in proportion to ``speeds`` (largest remainder; sums to ``count``)."""
    if count < 0 or not speeds or any(s <= 0 for s in speeds):
        raise ValueError(f"cannot split {count} units by speeds {list(speeds)}: need count ≥ 0 and positive speeds")
    total = sum(speeds)
    shares = [count * s / total for s in speeds]
    out = [int(x) for x in shares]
    order = sorted(range(len(speeds)), key=lambda i: (shares[i] - out[i], speeds[i]), reverse=True)
    for i in order[: count - sum(out)]:
        out[i] += 1
    return out


def contiguous(sizes: Sequence[int]) -> list[list[int]]:
    """Consecutive index ranges of the given sizes: ``[2, 1]`` → ``[[0, 1], [2]]``."""
    out, start = [], 0
    for n in sizes:
        out.append(list(range(start, start + n)))
        start += n
    return out


def payload_bytes(batch: Batch) -> int:
    """Bytes of a request batch as serialized on the wire (safetensors)."""
    return len(encode_batch(batch))


@dataclass
class Exchange:
    """One request to one device and its answer."""

    device: str
    request: Batch
    response_numel: int
    compute_ms: float
    round_trip_ms: float
    serialize_ms: float = 0.0
    _request_bytes: int | None = field(default=None, repr=False)

    @property
    def request_bytes(self) -> int:
        """Serialized request batch (computed lazily, outside the timed path)."""
        if self._request_bytes is None:
            self._request_bytes = payload_bytes(self.request)
        return self._request_bytes

    @property
    def transfer_ms(self) -> float:
        """Round trip beyond the device's compute: serialisation + RPC (+ the wire off loopback)."""
        return max(0.0, self.round_trip_ms - self.compute_ms)

    @property
    def response_bytes(self) -> int:
        """fp16 response tensor bytes."""
        return self.response_numel * FP16_BYTES

    @property
    def bytes(self) -> int:
        """Request + response payload bytes."""
        return self.request_bytes + self.response_bytes


@dataclass
class Trace:
    """One request through one method: the answer, the end-to-end time and every exchange by round.

    Exchanges within a round run concurrently; rounds run one after another. ``local_ms`` is
    the coordinator's own compute (head, aggregation, embedding, combining partials).
    """

    logits: Tensor
    total_ms: float
    rounds: list[list[Exchange]]
    local_ms: float

    @property
    def bytes(self) -> int:
        """Payload bytes sent and received for this request."""
        return sum(e.bytes for r in self.rounds for e in r)

    @property
    def compute_ms(self) -> float:
        """Compute on the critical path: slowest device per round, summed, plus the coordinator's."""
        return sum(max(e.compute_ms for e in r) for r in self.rounds if r) + self.local_ms

    def _critical(self) -> list[Exchange]:
        """Per round, the exchange with the longest round trip (the one the round waited for)."""
        return [max(r, key=lambda e: e.round_trip_ms) for r in self.rounds if r]

    @property
    def transfer_ms(self) -> float:
        """Measured time outside device compute on the critical path (round trip − compute of the slowest).

        This is the runtime's own cost per request: serialisation + RPC (+ the wire off loopback).
        """
        return sum(e.transfer_ms for e in self._critical())

    @property
    def serialize_ms(self) -> float:
        """The part of :attr:`transfer_ms` spent encoding and decoding tensors (transport-reported)."""
        return sum(min(e.serialize_ms, e.transfer_ms) for e in self._critical())

    def wire_ms(self, rate_bps: float | None) -> float:
        """Modelled wire time: per round the largest exchange's bytes over the link rate (each device has its own link)."""
        if not rate_bps:
            return 0.0
        return sum(max(e.bytes for e in r) * 8 / rate_bps * 1000 for r in self.rounds if r)

    def busy_ms(self) -> dict[str, float]:
        """Device name → compute time spent on this request."""
        out: dict[str, float] = {}
        for r in self.rounds:
            for e in r:
                out[e.device] = out.get(e.device, 0.0) + e.compute_ms
        return out


def element_count(t: Tensor) -> int:
    """Elements in ``t`` (what an fp16 reply carries, two bytes each)."""
    return int(t.numel())


class Method(ABC):
    """A way of running the teacher's task over a set of workers, one request at a time."""

    name: str = "method"

    def __init__(self, clients: Sequence[WorkerClient], devices: Sequence[DeviceProfile]):
        if len(clients) != len(devices):
            raise ValueError(f"{len(clients)} workers for {len(devices)} device profiles; give one per worker")
        self.clients = list(clients)
        self.devices = list(devices)
        self.names = [d.name for d in devices]

    @abstractmethod
    def artifacts(self) -> dict[int, list[SubModelArtifact]]:
        """Worker index → the sub-model artifacts it must hold."""

    def deploy(self, *, timeout: float = 300.0) -> None:
        """Load every artifact on its worker (cached by sha256 there)."""
        for i, arts in self.artifacts().items():
            for art in arts:
                self.clients[i].load(art, timeout=timeout)

    @abstractmethod
    def infer(self, batch: Batch, *, timeout: float = 120.0) -> Trace:
        """Answer one request."""

    @abstractmethod
    def module_memory(self, batch: Batch) -> dict[str, int]:
        """Device name → measured module memory: weights + peak activations of one call (coformer.measure)."""

    def used_devices(self) -> list[str]:
        """Names of the devices this method uses."""
        return [self.names[i] for i in self.artifacts()]

    def close(self) -> None:
        """Release anything held beyond the clients (the caller owns the clients)."""


def memory_bytes(module: nn.Module, call: Callable[[], Any]) -> int:
    """``module``'s weights plus the peak activation memory of ``call``."""
    return state_bytes(module) + peak_activation_bytes(call)


def deferred_call(module: nn.Module, inputs: Batch) -> Callable[[], Any]:
    """``module(**inputs)`` as a call to measure."""
    return lambda: module(**inputs)


class TeacherAlone(Method):
    """The whole teacher as one sub-model (``slice`` of the full selection) on the strongest device."""

    name = "teacher"

    def __init__(self, backbone: Backbone, teacher: nn.Module, clients: Sequence[WorkerClient],
                 devices: Sequence[DeviceProfile]):
        super().__init__(clients, devices)
        self.device = strongest_index(devices)
        self.model: SubModel = backbone.slice(teacher, UnitSelection.full(backbone.shape(teacher)))
        self.head = backbone.task_head(teacher).eval()
        self.artifact = submodel_artifact(self.model)

    def artifacts(self) -> dict[int, list[SubModelArtifact]]:
        """Only the strongest device holds anything."""
        return {self.device: [self.artifact]}

    def infer(self, batch: Batch, *, timeout: float = 120.0) -> Trace:
        """One round: input to the strongest device, features back, head here."""
        start = time.perf_counter()
        res = self.clients[self.device].infer(self.artifact.sha256, batch, timeout=timeout)
        rtt = (time.perf_counter() - start) * 1000
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits = self.head(res.features.float())
        local = (time.perf_counter() - t0) * 1000
        ex = Exchange(self.names[self.device], batch, element_count(res.features), res.compute_ms, rtt, res.serialize_ms)
        return Trace(logits, (time.perf_counter() - start) * 1000, [[ex]], local)

    def module_memory(self, batch: Batch) -> dict[str, int]:
        """The full model on the strongest device."""
        return {self.names[self.device]: memory_bytes(self.model, lambda: self.model(**batch))}


class CoFormerMethod(Method):
    """A plan's sub-models, one per device, through the runtime :class:`~coformer.online.coordinator.Coordinator`."""

    name = "coformer"

    def __init__(self, artifacts: Sequence[SubModelArtifact], aggregator: Aggregator,
                 clients: Sequence[WorkerClient], devices: Sequence[DeviceProfile],
                 submodels: Sequence[SubModel] | None = None):
        super().__init__(clients, devices)
        if len(artifacts) != len(clients):
            raise ValueError(f"the plan has {len(artifacts)} sub-models but {len(clients)} workers were given")
        self.arts = list(artifacts)
        self.aggregator = aggregator.eval()
        self.submodels = list(submodels) if submodels is not None else None
        self.coordinator: Coordinator | None = None

    def artifacts(self) -> dict[int, list[SubModelArtifact]]:
        """Sub-model n on worker n."""
        return {i: [a] for i, a in enumerate(self.arts)}

    def deploy(self, *, timeout: float = 300.0) -> None:
        """Load the sub-models and build the coordinator."""
        super().deploy(timeout=timeout)
        self.coordinator = Coordinator(self.clients, [a.sha256 for a in self.arts], self.aggregator,
                                       names=self.names, deadline_s=120.0)

    def infer(self, batch: Batch, *, timeout: float = 120.0) -> Trace:
        """One round: every device at once; the aggregator and task head here."""
        if self.coordinator is None:
            raise RuntimeError("call deploy() before infer()")
        start = time.perf_counter()
        answer = self.coordinator.infer(batch, deadline_s=timeout)
        total = (time.perf_counter() - start) * 1000
        if answer.missing:
            raise RuntimeError(f"CoFormer request degraded: {answer.errors}")
        b = next(iter(batch.values())).shape[0]
        exchanges = [Exchange(t.device, batch, b * self.aggregator.feature_dims[n], t.t1_compute_ms, t.round_trip_ms,
                              t.serialize_ms)
                     for n, t in enumerate(answer.timings)]
        return Trace(answer.logits, total, [exchanges], answer.t3_aggregate_ms)

    def module_memory(self, batch: Batch) -> dict[str, int]:
        """Each sub-model on the input (rebuilt locally from the artifacts when not given)."""
        if self.submodels is None:
            from safetensors.torch import load as st_load

            from coformer.registry import create

            self.submodels = []
            for art in self.arts:
                m = create("backbone", art.config["backbone"]).build_submodel(art.config)
                m.load_state_dict(st_load(art.weights))
                self.submodels.append(m.eval())
        return {self.names[i]: memory_bytes(m, deferred_call(m, batch)) for i, m in enumerate(self.submodels)}

    def close(self) -> None:
        """Stop the coordinator's fan-out pool without closing the shared clients."""
        if self.coordinator is not None:
            self.coordinator._pool.shutdown(wait=False, cancel_futures=True)
