"""The split baselines: one teacher cut across the devices, run over the same transport as CoFormer.

* :class:`PipelineSplit` — the teacher's layers cut into consecutive stages, one per device,
  sized in proportion to device speed and run in sequence. Hidden states travel device → device
  *through the coordinator*: stage n's output comes back to the coordinator, which sends it to
  stage n+1. On a star network (the emulated testbed: every device has its own link to the
  central node) that is exactly the path a device-to-device transfer takes, crossing the sender's
  link and then the receiver's.
* :class:`TensorParallelSplit` — Megatron/Galaxy style: every layer's heads and MLP neurons split
  across devices in proportion to speed. For every layer the coordinator sends the hidden state
  to every device twice (attention, then MLP), sums the partial outputs and applies residual,
  bias and LayerNorm: two rounds of communication per layer.

Both are exact up to fp16 on the wire, and use only the :class:`~coformer.backbone.Backbone`
interface (``pipeline_stage``, ``tensor_shard``, ``tensor_host``).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from coformer.artifacts import submodel_artifact
from coformer.backbone import Backbone, Batch, SubModel
from coformer.experiments.baselines import (
    Exchange,
    Method,
    Trace,
    contiguous,
    deferred_call,
    element_count,
    memory_bytes,
    proportional_split,
)
from coformer.measure import peak_activation_bytes, state_bytes
from coformer.spec import DeviceProfile
from coformer.transport import SubModelArtifact, WorkerClient


class PipelineSplit(Method):
    """Consecutive layers per device, in proportion to speed, run in sequence through the coordinator."""

    name = "pipeline"

    def __init__(self, backbone: Backbone, teacher: nn.Module, clients: Sequence[WorkerClient],
                 devices: Sequence[DeviceProfile]):
        super().__init__(clients, devices)
        layers = backbone.shape(teacher).layers
        sizes = proportional_split(layers, [d.gflops for d in devices])
        ranges = contiguous(sizes)
        self.order = [i for i, r in enumerate(ranges) if r]  # devices with no layer sit out
        self.layers = {i: ranges[i] for i in self.order}
        self.stages: dict[int, SubModel] = {
            i: backbone.pipeline_stage(teacher, ranges[i], first=k == 0, last=k == len(self.order) - 1)
            for k, i in enumerate(self.order)}
        self.arts = {i: submodel_artifact(m) for i, m in self.stages.items()}
        self.head = backbone.task_head(teacher).eval()

    def artifacts(self) -> dict[int, list[SubModelArtifact]]:
        """One stage per device that got layers."""
        return {i: [self.arts[i]] for i in self.order}

    def _stage_input(self, k: int, batch: Batch, hidden: Tensor | None) -> Batch:
        if k == 0:
            return batch
        assert hidden is not None, "every stage after the first takes the previous stage's output"
        keys = self.stages[self.order[k]].config.get("stage_inputs", [])
        return {"hidden_states": hidden, **{key: batch[key] for key in keys if key in batch}}

    def infer(self, batch: Batch, *, timeout: float = 120.0) -> Trace:
        """One round per stage; hidden states (fp16) come back to the coordinator and go on to the next stage."""
        start = time.perf_counter()
        rounds, hidden = [], None
        for k, i in enumerate(self.order):
            inputs = self._stage_input(k, batch, hidden)
            t = time.perf_counter()
            res = self.clients[i].infer(self.arts[i].sha256, inputs, timeout=timeout)
            rounds.append([Exchange(self.names[i], inputs, element_count(res.features), res.compute_ms,
                                    (time.perf_counter() - t) * 1000, res.serialize_ms)])
            hidden = res.features
        if hidden is None:
            raise RuntimeError("the pipeline has no stages")
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits = self.head(hidden.float())
        local = (time.perf_counter() - t0) * 1000
        return Trace(logits, (time.perf_counter() - start) * 1000, rounds, local)

    def features_local(self, batch: Batch) -> Tensor:
        """The stages run here in sequence with fp16 hand-over (what the workers compute)."""
        hidden = None
        with torch.inference_mode():
            for k, i in enumerate(self.order):
                hidden = self.stages[i](**self._stage_input(k, batch, hidden)).half()
        if hidden is None:
            raise RuntimeError("the pipeline has no stages")
        return hidden.float()

    def module_memory(self, batch: Batch) -> dict[str, int]:
        """Each stage on its own input."""
        out, hidden = {}, None
        with torch.inference_mode():
            for k, i in enumerate(self.order):
                inputs = self._stage_input(k, batch, hidden)
                out[self.names[i]] = memory_bytes(self.stages[i], deferred_call(self.stages[i], inputs))
                hidden = self.stages[i](**inputs).half()
        return out


class TensorParallelSplit(Method):
    """Every layer's heads and MLP neurons split across devices in proportion to speed; two rounds per layer."""

    name = "tensor-parallel"

    def __init__(self, backbone: Backbone, teacher: nn.Module, clients: Sequence[WorkerClient],
                 devices: Sequence[DeviceProfile]):
        super().__init__(clients, devices)
        shape = backbone.shape(teacher)
        speeds = [d.gflops for d in devices]
        if shape.head_group != 1:
            # heads sharing a key/value group must stay on one device: split whole groups
            groups = [contiguous(proportional_split(h // shape.head_group, speeds)) for h in shape.heads]
            heads = [[[g * shape.head_group + j for g in gs for j in range(shape.head_group)] for gs in per]
                     for per in groups]
        else:
            heads = [contiguous(proportional_split(h, speeds)) for h in shape.heads]
        neurons = [contiguous(proportional_split(m, speeds)) for m in shape.mlp]
        self.units = {i: ([heads[k][i] for k in range(shape.layers)], [neurons[k][i] for k in range(shape.layers)])
                      for i in range(len(devices))}
        self.units = {i: u for i, u in self.units.items() if any(u[0]) or any(u[1])}
        self.shards: dict[int, SubModel] = {i: backbone.tensor_shard(teacher, h, n) for i, (h, n) in self.units.items()}
        self.arts = {i: submodel_artifact(m) for i, m in self.shards.items()}
        self.host = backbone.tensor_host(teacher)
        self.head = backbone.task_head(teacher).eval()
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self.shards)), thread_name_prefix="coformer-tp")

    def artifacts(self) -> dict[int, list[SubModelArtifact]]:
        """One shard per device that got any unit."""
        return {i: [a] for i, a in self.arts.items()}

    def _active(self, layer: int, phase: int) -> list[int]:
        return [i for i, (h, n) in self.units.items() if (h if phase == 0 else n)[layer]]

    def deferred_call(self, i: int, inputs: Batch, timeout: float) -> tuple[Any, float]:
        t = time.perf_counter()
        res = self.clients[i].infer(self.arts[i].sha256, inputs, timeout=timeout)
        return res, (time.perf_counter() - t) * 1000

    def infer(self, batch: Batch, *, timeout: float = 120.0) -> Trace:
        """Embed here; per layer and phase, fan out the fp16 hidden state, sum partials, combine here."""
        start = time.perf_counter()
        local = 0.0
        rounds: list[list[Exchange]] = []
        extra = {k: batch[k] for k in self.host.shard_inputs if k in batch}
        with torch.inference_mode():
            t0 = time.perf_counter()
            x = self.host.embed(batch)
            local += (time.perf_counter() - t0) * 1000
            for layer in range(self.host.num_layers):
                for phase in range(self.host.phases):
                    active = self._active(layer, phase)
                    inputs = {"hidden_states": x.half(), "layer": torch.tensor(layer), "phase": torch.tensor(phase),
                              **extra}
                    futures = [self._pool.submit(self.deferred_call, i, inputs, timeout) for i in active]
                    results = [f.result() for f in futures]
                    t0 = time.perf_counter()
                    partial = torch.zeros_like(x)
                    for res, _ in results:
                        partial += res.features.float()
                    x = self.host.combine(layer, phase, x, partial)
                    local += (time.perf_counter() - t0) * 1000
                    rounds.append([Exchange(self.names[i], inputs, element_count(res.features), res.compute_ms, rtt,
                                            res.serialize_ms) for i, (res, rtt) in zip(active, results)])
            t0 = time.perf_counter()
            logits = self.head(self.host.pool(x, batch))
            local += (time.perf_counter() - t0) * 1000
        return Trace(logits, (time.perf_counter() - start) * 1000, rounds, local)

    def features_local(self, batch: Batch) -> Tensor:
        """The same schedule run here with fp16 on every hand-over (what the workers compute)."""
        extra = {k: batch[k] for k in self.host.shard_inputs if k in batch}
        with torch.inference_mode():
            x = self.host.embed(batch)
            for layer in range(self.host.num_layers):
                for phase in range(self.host.phases):
                    inputs = {"hidden_states": x.half(), "layer": torch.tensor(layer), "phase": torch.tensor(phase),
                              **extra}
                    partial = sum((self.shards[i](**inputs).half().float() for i in self._active(layer, phase)),
                                  torch.zeros_like(x))
                    x = self.host.combine(layer, phase, x, partial)
            return self.host.pool(x, batch)

    def module_memory(self, batch: Batch) -> dict[str, int]:
        """Each shard's weights + the larger peak of its layer-0 attention and MLP calls."""
        x = self.host.embed(batch).half()
        extra = {k: batch[k] for k in self.host.shard_inputs if k in batch}
        out = {}
        for i, shard in self.shards.items():
            peaks = [peak_activation_bytes(deferred_call(shard, {"hidden_states": x, "layer": torch.tensor(0),
                                                         "phase": torch.tensor(p), **extra}))
                     for p in range(self.host.phases)]
            out[self.names[i]] = state_bytes(shard) + max(peaks)
        return out

    def close(self) -> None:
        """Stop the fan-out pool."""
        self._pool.shutdown(wait=False, cancel_futures=True)
