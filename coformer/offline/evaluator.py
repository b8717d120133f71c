"""The evaluator: Ψ(C) = L_val(C) + δ·T(C) for a decomposition policy, constraints checked first.

(410 lines, just over the layout's 400: the latency model below and the accuracy proxy are the
two halves of one objective, kept beside the formula they implement.)

Latency model (seed eqs. 3–6), every time in milliseconds, matching the runtime's data path::

    T    = max_n (t0_n + t1_n + t2_n) + t3
    t0_n                          the runtime's fixed cost of one call to device n (serialisation and
                                  the RPC stack at both ends), measured when the device's predictor
                                  was profiled through its worker; 0 without such a predictor
    t1_n = f_n(C_n)               the device's learned latency predictor; without one, FLOPs(C_n) /
                                  device GFLOPS — labelled ``estimate (FLOPs/GFLOPS)`` in ``t1_source``
    t2_n = (|input| + |X_n|) / r_n  the request broadcast to device n and its features returned,
                                  both over device n's own link r_n: |input| = the wire size of
                                  one prepared example (safetensors, as the coordinator sends it)
                                  × batch; |X_n| = d_n values × 2 bytes (fp16) × batch.
    t3   = 2·M·d_i·d_agg / g      aggregation: M = feature rows per request (= batch; one pooled
                                  vector per sample), d_agg = Σ d_n, d_i = the teacher's width d,
                                  g = the aggregating node's compute rate.

The topology (:class:`Topology`) is part of the plan. ``coordinator`` (the default, what
``Coordinator`` and ``coformer bench`` run): a separate node fans the input out and aggregates,
so every device pays t2; g is ``coordinator_gflops`` (default: the strongest device's GFLOPS).
``device``: the central node is the device at index ``central`` of the policy; *that one
device* neither receives the input over a link nor sends its features (t2 = 0), and g is its
GFLOPS. It is chosen by index, never by name: two devices of the same kind are two devices.

δ is therefore *per millisecond*.

Accuracy proxy L_val (``proxy``):

* ``"probe"`` (default): a linear probe on the *concatenated* features of the sliced,
  uncalibrated sub-models (what the aggregator sees), fitted on a small labelled training
  subset (``probe_train``) and scored as cross-entropy on validation data. Uncalibrated slices
  through the teacher's head sit at chance, so the seed's proxy ranks policies by noise; a probe
  measures how much task information the kept units still carry, which is what calibration can
  recover. Its rank correlation with fully calibrated accuracy is measured by
  ``examples/proxy_correlation.py``. ``losses`` holds each sub-model's own probe CE.
* ``"uncalibrated"`` (the seed's eq. 7): the mean over sub-models of the validation CE of the
  sliced sub-model, its features scattered into the teacher channels it kept, through the
  teacher's head.

Units are assigned by importance computed once (:mod:`coformer.offline.importance`) on a calibration
batch (``calib``, the first training samples) — the same importance deployment uses, stored in
the plan — so Ψ scores exactly the sub-models that will be deployed.

Constraints C1–C6 are checked before anything runs; costs (FLOPs, memory) are measured with
:func:`coformer.measure.measure_cost` on a real module of each spec's size sliced from the teacher
layers the spec will run on (:func:`coformer.assignment.layer_maps`: a Swin block's cost depends on
its stage), cached per (spec, layers). For teachers whose layers differ, C3/C4 are checked per
teacher layer on the same layer maps. An infeasible policy never costs a model evaluation.
Evaluations are cached by policy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from coformer.backbone import Backbone, Batch

from coformer.assignment import UnitImportance
from coformer.data import TensorDataset
from coformer.spec import (
    DeviceProfile,
    Policy,
    SubModelCost,
    SubModelSpec,
    UnitSelection,
    Violation,
    check_resources,
    check_structure,
)

FEATURE_BYTES = 2  # fp16 on the wire
TOPOLOGIES = ("coordinator", "device")
PROXIES = ("probe", "uncalibrated")
ESTIMATE_LABEL = "estimate (FLOPs/GFLOPS)"


@dataclass(frozen=True)
class Topology:
    """Where the request enters and features are aggregated (see the module docstring).

    ``kind="coordinator"``: a separate node (the runtime's ``Coordinator``), compute rate
    ``coordinator_gflops`` (``None``: the strongest device's). ``kind="device"``: the device at
    index ``central`` of the policy aggregates.
    """

    kind: str = "coordinator"
    central: int | None = None
    coordinator_gflops: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in TOPOLOGIES:
            raise ValueError(f"topology {self.kind!r} is unknown; choose one of {', '.join(TOPOLOGIES)}")
        if self.kind == "device" and (self.central is None or self.central < 0):
            raise ValueError("a 'device' topology needs the central device's index (central=0..N-1)")
        if self.kind == "coordinator" and self.central is not None:
            raise ValueError("a 'coordinator' topology has no central device; use kind='device' to aggregate "
                             "on one of the devices")

    def validate(self, n_devices: int) -> None:
        """Raise if the central index does not name one of ``n_devices`` devices."""
        if self.kind == "device" and not 0 <= int(self.central) < n_devices:  # type: ignore[arg-type]
            raise ValueError(f"central device index {self.central} is out of range for {n_devices} devices "
                             f"(0..{n_devices - 1})")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (stored in ``plan.json`` as ``topology``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Topology:
        """Inverse of :meth:`to_dict`; ``None`` (a plan written before topologies) is the coordinator."""
        return cls(**dict(data)) if data else cls()


class LatencyBreakdown(NamedTuple):
    """T (ms) of one policy with its parts; per-device lists are in policy order."""

    T: float
    t1: list[float]
    t1_source: list[str]
    t2: list[float]
    t3: float
    t0: list[float]


@dataclass
class Evaluation:
    """One policy's score: Ψ, T with its t0/t1/t2/t3 breakdown per device, L_val per sub-model."""

    policy: dict[str, Any]
    feasible: bool
    psi: float = math.inf
    T_ms: float = math.inf
    L_val: float = math.inf
    delta: float = 0.0
    t1_ms: list[float] = field(default_factory=list)
    t1_source: list[str] = field(default_factory=list)
    t2_ms: list[float] = field(default_factory=list)
    t3_ms: float = 0.0
    topology: dict[str, Any] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    costs: list[dict[str, Any]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    proxy: str = ""
    wire_bytes: list[int] = field(default_factory=list)
    t0_ms: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    def components(self) -> dict[str, Any]:
        """Ψ, T, L_val and, per device (a list in policy order), t0, t1 (with its source), t2, loss and costs."""
        per = [
            {"index": i, "name": d["name"], "t0_ms": self.t0_ms[i] if self.t0_ms else 0.0,
             "t1_ms": self.t1_ms[i], "t1_source": self.t1_source[i],
             "t2_ms": self.t2_ms[i], "wire_bytes": self.wire_bytes[i] if self.wire_bytes else None,
             "L_val": self.losses[i] if self.losses else None,
             "gflops": self.costs[i]["flops"] / 1e9 if self.costs else None,
             "memory_mib": self.costs[i]["memory_bytes"] / 2**20 if self.costs else None}
            for i, d in enumerate(self.policy["devices"])
        ]
        return {"psi": self.psi, "T_ms": self.T_ms, "L_val": self.L_val, "proxy": self.proxy, "delta": self.delta,
                "t3_ms": self.t3_ms, "topology": self.topology, "devices": per}


def _policy_key(policy: Policy) -> tuple:
    return tuple((s.layers, s.embed_dim, s.heads, s.mlp, d.name) for s, d in zip(policy.specs, policy.devices))


def _standardise(train: torch.Tensor, val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = train.mean(0, keepdim=True), train.std(0, keepdim=True).clamp_min(1e-6)
    return (train - mean) / std, (val - mean) / std


class Evaluator:
    """Scores policies for one teacher, device set and validation set.

    ``predictors`` maps device names to objects with ``predict(spec) -> ms`` and, optionally, a
    ``call_overhead_ms`` attribute, the t0 of that device (e.g.
    :class:`coformer.offline.predictor.LatencyPredictor`); devices without one use the FLOPs estimate.
    ``topology`` places the aggregation (default: a separate coordinator, as the runtime runs);
    ``central`` is a shorthand for ``Topology("device", central)`` (an index). ``head`` replaces
    the teacher's task head for the ``"uncalibrated"`` proxy. ``probe_train`` is the labelled
    training subset the ``"probe"`` proxy is fitted on. ``calib`` is the batch importance is
    scored on (default: the first samples of ``probe_train``, else of ``val``); ``importance``
    skips that. ``link_mbps`` overrides every device's link rate. ``cost_batch`` (default: one
    example of the backbone) is the input FLOPs, memory and the broadcast size are measured on.
    """

    def __init__(self, backbone: Backbone, teacher: nn.Module, devices: Sequence[DeviceProfile], *,
                 val: TensorDataset | None = None, head: nn.Module | None = None,
                 predictors: Mapping[str, Any] | None = None, delta: float = 0.5,
                 link_mbps: float | None = None, batch_size: int = 1, central: int | None = None,
                 topology: Topology | None = None, cost_batch: Batch | None = None,
                 importance: UnitImportance | None = None, calib: Batch | None = None,
                 probe_train: TensorDataset | None = None, proxy: str | None = None,
                 val_batch_size: int = 16, probe_epochs: int = 200):
        if not devices:
            raise ValueError("Evaluator needs at least one device")
        if central is not None and topology is not None:
            raise ValueError("pass either central= (an index) or topology=, not both")
        if isinstance(central, str):
            raise TypeError(f"central={central!r}: the central node is chosen by its index in the device list "
                            f"(0..{len(devices) - 1}), not by name — several devices may share a name")
        self.backbone = backbone
        self.teacher = teacher.eval()
        self.devices = list(devices)
        self.shape = backbone.shape(teacher)
        self.val = val
        self._head = head.eval() if head is not None else None
        self.predictors = dict(predictors or {})
        self.delta = float(delta)
        self.link_mbps = link_mbps
        self.batch_size = batch_size
        self.topology = topology or (Topology("device", central) if central is not None else Topology())
        self.topology.validate(len(self.devices))
        self.cost_batch = cost_batch if cost_batch is not None else backbone.example_batch(teacher, batch_size=1)
        self.proxy = proxy or ("probe" if probe_train is not None else "uncalibrated")
        if self.proxy not in PROXIES:
            raise ValueError(f"proxy {self.proxy!r} is unknown; choose one of {', '.join(PROXIES)}")
        if self.proxy == "probe" and probe_train is None:
            raise ValueError("the 'probe' proxy needs labelled training data: Evaluator(probe_train=...)")
        if probe_train is not None and len(probe_train) < 2:
            raise ValueError(f"probe_train has {len(probe_train)} sample(s); the probe needs at least 2 labelled "
                             f"training samples (more is better: plan uses --train-docs, default 160)")
        self.probe_train = probe_train
        self.probe_epochs = probe_epochs
        self._importance = importance
        self.importance_key: str | None = None
        self._calib = calib
        self.val_batch_size = val_batch_size
        self._costs: dict[tuple[SubModelSpec, tuple[int, ...]], SubModelCost] = {}
        self._cache: dict[tuple, Evaluation] = {}
        #: how many policies had their sub-models run on validation data (infeasible ones never do)
        self.model_evaluations = 0

    # -- constraints ------------------------------------------------------------------
    def layer_order(self) -> tuple[int, ...] | None:
        """Teacher layers from most to least important (what unit assignment follows), or ``None``
        when the teacher's layers are all alike (then which ones run changes no size or cost)."""
        if self.shape.uniform_layers:
            return None
        return tuple(torch.argsort(self.importance().layers, descending=True, stable=True).tolist())

    def layers_for(self, spec: SubModelSpec) -> tuple[int, ...]:
        """The teacher layers ``spec``'s positions run on (the first ``l`` for alike layers)."""
        from coformer.assignment import top_layers

        if self.shape.uniform_layers or spec.layers > self.shape.layers:
            return tuple(range(min(spec.layers, self.shape.layers)))
        return top_layers(self.importance().layers, spec.layers)

    def cost(self, spec: SubModelSpec) -> SubModelCost:
        """Measured FLOPs/params/memory of a module of ``spec``'s size on the cost batch, sliced from the
        teacher layers the spec runs on (cached)."""
        from coformer.assignment import sized_selection
        from coformer.measure import measure_cost

        layers = self.layers_for(spec)
        if (spec, layers) not in self._costs:
            sub = self.backbone.slice(self.teacher, sized_selection(self.shape, spec, layers))
            self._costs[(spec, layers)] = measure_cost(sub, self.cost_batch)
        return self._costs[(spec, layers)]

    def check(self, policy: Policy) -> list[Violation]:
        """Every violated constraint of ``policy``: C1–C4 first, then C5/C6 from measured costs."""
        maps = None
        if not self.shape.uniform_layers and all(s.layers <= self.shape.layers for s in policy.specs):
            maps = [self.layers_for(s) for s in policy.specs]
        violations = check_structure(policy.specs, self.shape, policy.devices, layer_maps=maps)
        if violations:
            return violations  # structure is wrong: no module of these sizes can even be built
        return check_resources([self.cost(s) for s in policy.specs], policy.devices)

    # -- latency ----------------------------------------------------------------------
    def link_rate_mbps(self, device: DeviceProfile) -> float:
        """The link rate r_n used for ``device`` (Mbit/s)."""
        return float(self.link_mbps if self.link_mbps is not None else device.link_mbps)

    def input_bytes(self) -> int:
        """Wire size of one request's input, as the coordinator sends it (safetensors of the batch) × batch."""
        from coformer.transport import encode_batch

        return len(encode_batch(self.cost_batch)) * self.batch_size

    def aggregator_gflops(self, devices: Sequence[DeviceProfile]) -> float:
        """Compute rate g of the node that aggregates, per the topology."""
        if self.topology.kind == "device":
            return devices[int(self.topology.central)].gflops  # type: ignore[arg-type]
        return self.topology.coordinator_gflops or max(d.gflops for d in devices)

    def wire_bytes(self, policy: Policy) -> list[int]:
        """Bytes each device's link carries per request: input in + features out (0 for a central device)."""
        x_in = self.input_bytes()
        return [0 if self.topology.kind == "device" and i == self.topology.central
                else x_in + spec.embed_dim * FEATURE_BYTES * self.batch_size
                for i, spec in enumerate(policy.specs)]

    def latency(self, policy: Policy) -> LatencyBreakdown:
        """T and its parts (ms) for a policy whose structure is valid."""
        self.topology.validate(len(policy.devices))
        wire = self.wire_bytes(policy)
        t0, t1, src, t2 = [], [], [], []
        for i, (spec, dev) in enumerate(zip(policy.specs, policy.devices)):
            pred = self.predictors.get(dev.name)
            if pred is not None:
                t1.append(float(pred.predict(spec)))
                src.append("predictor")
            else:
                t1.append(self.cost(spec).flops / (dev.gflops * 1e9) * 1000.0)
                src.append(ESTIMATE_LABEL)
            t0.append(float(getattr(pred, "call_overhead_ms", 0.0)) if wire[i] else 0.0)
            t2.append(wire[i] * 8 / (self.link_rate_mbps(dev) * 1e6) * 1000.0)
        d_agg = sum(s.embed_dim for s in policy.specs)
        g = self.aggregator_gflops(policy.devices)
        t3 = 2.0 * self.batch_size * self.shape.embed_dim * d_agg / (g * 1e9) * 1000.0
        T = max(a + b + c for a, b, c in zip(t0, t1, t2)) + t3
        return LatencyBreakdown(T, t1, src, t2, t3, t0)

    # -- accuracy proxy ---------------------------------------------------------------
    def calibration_batch(self) -> Batch:
        """The batch importance is scored on: ``calib``, else the first training (probe) samples, else validation."""
        from coformer.offline.importance import IMPORTANCE_SAMPLES

        if self._calib is None:
            data = self.probe_train if self.probe_train is not None else self.val
            if data is None:
                raise ValueError("importance needs calibration data: pass calib=, probe_train=, val= or importance=")
            self._calib = data.batch(torch.arange(min(len(data), IMPORTANCE_SAMPLES)))
        return self._calib

    def importance(self) -> UnitImportance:
        """Unit importance, computed once (cached on disk by content hash) on :meth:`calibration_batch`."""
        if self._importance is None:
            from coformer.offline.importance import shared_importance

            self._importance, self.importance_key = shared_importance(self.backbone, self.teacher,
                                                                      self.calibration_batch())
        return self._importance

    def selections(self, specs: Sequence[SubModelSpec]) -> list[UnitSelection]:
        """The concrete units each spec gets: what is scored here and what deployment slices."""
        from coformer.assignment import assign_units

        return assign_units(self.shape, specs, self.importance())

    def submodel_losses(self, specs: Sequence[SubModelSpec]) -> tuple[float, list[float]]:
        """``(L_val, per-sub-model losses)`` of the policy's sliced sub-models under the evaluator's proxy."""
        if self.val is None:
            raise ValueError("L_val needs labelled validation data (Evaluator(val=...))")
        selections = self.selections(specs)  # importance needs autograd
        with torch.no_grad():
            if self.proxy == "uncalibrated":
                losses = [self._loss(sel) for sel in selections]
                return sum(losses) / len(losses), losses
            return self._probe_losses(selections)

    def _features(self, sub: nn.Module, data: TensorDataset) -> torch.Tensor:
        return torch.cat([sub(**b).float() for _, b in data.batches(self.val_batch_size)])

    def _probe_ce(self, train_x: torch.Tensor, val_x: torch.Tensor) -> float:
        from coformer.heads import ClassifierHead
        from coformer.offline.pipeline import fit_head

        assert self.probe_train is not None and self.val is not None
        tx, vx = _standardise(train_x, val_x)
        n_labels = int(max(self.probe_train.labels.max(), self.val.labels.max())) + 1
        with torch.enable_grad(), torch.random.fork_rng():
            torch.manual_seed(0)  # the probe's initial weights: the same for every policy, whatever ran before
            head = fit_head(ClassifierHead(tx.shape[1], n_labels), tx, self.probe_train.labels,
                            epochs=self.probe_epochs, lr=1e-2, weight_decay=1e-2, seed=0)
        return float(nn.functional.cross_entropy(head(vx), self.val.labels))

    def _probe_losses(self, selections: Sequence[UnitSelection]) -> tuple[float, list[float]]:
        """Linear-probe CE on the concatenated features (L_val) and on each sub-model's alone."""
        assert self.probe_train is not None and self.val is not None
        subs = [self.backbone.slice(self.teacher, sel).eval() for sel in selections]
        train_f = [self._features(s, self.probe_train) for s in subs]
        val_f = [self._features(s, self.val) for s in subs]
        per = [self._probe_ce(t, v) for t, v in zip(train_f, val_f)] if len(subs) > 1 else []
        joint = self._probe_ce(torch.cat(train_f, 1), torch.cat(val_f, 1))
        return joint, per or [joint]

    @property
    def head(self) -> nn.Module:
        """The head the ``"uncalibrated"`` proxy scores through (the teacher's unless one was given)."""
        if self._head is None:
            self._head = self.backbone.task_head(self.teacher).eval()
        return self._head

    def _loss(self, selection: UnitSelection) -> float:
        """Mean CE of one sliced sub-model: features scattered into its teacher channels, teacher head."""
        assert self.val is not None
        from coformer.offline.pipeline import scatter_logits

        sub = self.backbone.slice(self.teacher, selection).eval()
        total = 0.0
        for idx, batch in self.val.batches(self.val_batch_size):
            logits = scatter_logits(sub(**batch).float(), selection.channels, self.shape.embed_dim, self.head)
            total += float(nn.functional.cross_entropy(logits, self.val.labels[idx], reduction="sum"))
        return total / len(self.val)

    # -- Ψ ----------------------------------------------------------------------------
    def evaluate(self, policy: Policy) -> Evaluation:
        """Ψ for ``policy`` (cached); an infeasible policy is returned unevaluated with its violations."""
        key = _policy_key(policy)
        if key in self._cache:
            return self._cache[key]
        violations = self.check(policy)
        if violations:
            ev = Evaluation(policy.to_dict(), False, delta=self.delta, violations=[str(v) for v in violations],
                            proxy=self.proxy)
        else:
            T, t1, src, t2, t3, t0 = self.latency(policy)
            L, losses = self.submodel_losses(policy.specs) if self.val is not None else (0.0, [])
            self.model_evaluations += 1 if self.val is not None else 0
            ev = Evaluation(policy.to_dict(), True, L + self.delta * T, T, L, self.delta, t1, src, t2, t3,
                            self.topology.to_dict(), losses, [self.cost(s).to_dict() for s in policy.specs],
                            proxy=self.proxy, wire_bytes=self.wire_bytes(policy), t0_ms=t0)
        self._cache[key] = ev
        return ev
