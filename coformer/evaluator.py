"""The evaluator: Ψ(C) = L_val(C) + δ·T(C) for a decomposition policy, constraints checked first.

Latency model (seed eqs. 3–6), every time in milliseconds::

    T    = max_n (t1_n + t2_n) + t3
    t1_n = f_n(C_n)               the device's latency predictor; without one, FLOPs(C_n) / device
                                  GFLOPS — an *estimate*, labelled so in ``t1_source``
    t2_n = |X_n| / r_n            |X_n| = d_n values × 2 bytes (fp16) × batch; r_n the link rate.
                                  The central node's own features do not cross a link: t2 = 0 there.
    t3   = 2·M·d_i·d_agg / g      aggregation at the central node: M = feature rows per request
                                  (= batch; sub-models send one pooled vector per sample, so the
                                  seed's token count S is 1), d_agg = Σ d_n (concatenated width),
                                  d_i = the teacher's embedding width d (what the task head takes),
                                  g = the central node's compute rate (its GFLOPS, as FLOPs/ms).

δ is therefore *per millisecond*. The central node defaults to the device with the most GFLOPS.

Accuracy proxy (seed eq. 7): L_val is the mean over sub-models of the validation cross-entropy
of the sliced, *uncalibrated* sub-model. Units are assigned by importance computed once on a
calibration batch (:func:`coformer.decompose.assign_units`). An uncalibrated sub-model has no
head of its own, so its logits are obtained by scattering its ``d_n`` features back into the
teacher's channel positions it kept (zeros in every other channel) and applying the teacher's
task head.

Constraints C1–C6 are checked before anything runs; costs (FLOPs, memory) are measured with
:func:`coformer.measure.measure_cost` on a real module of each spec's size sliced from the teacher
layers the spec will run on (:func:`coformer.decompose.layer_maps`: a Swin block's cost depends on
its stage), cached per (spec, layers). For teachers whose layers differ, C3/C4 are checked per
teacher layer on the same layer maps. An infeasible policy never costs a model evaluation.
Evaluations are cached by policy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from coformer.backbone import Backbone, Batch, UnitImportance
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


@dataclass
class Evaluation:
    """One policy's score: Ψ, T with its t1/t2/t3 breakdown per device, L_val per sub-model."""

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
    central: str = ""
    losses: list[float] = field(default_factory=list)
    costs: list[dict[str, Any]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    def components(self) -> dict[str, Any]:
        """Ψ, T, L_val and, per device, t1 (with its source), t2, its sub-model's loss and costs."""
        names = [d["name"] for d in self.policy["devices"]]
        per = {
            n: {"t1_ms": self.t1_ms[i], "t1_source": self.t1_source[i], "t2_ms": self.t2_ms[i],
                "L_val": self.losses[i] if self.losses else None,
                "gflops": self.costs[i]["flops"] / 1e9 if self.costs else None,
                "memory_mib": self.costs[i]["memory_bytes"] / 2**20 if self.costs else None}
            for i, n in enumerate(names)
        }
        return {"psi": self.psi, "T_ms": self.T_ms, "L_val": self.L_val, "delta": self.delta,
                "t3_ms": self.t3_ms, "central": self.central, "devices": per}


def _policy_key(policy: Policy) -> tuple:
    return tuple((s.layers, s.embed_dim, s.heads, s.mlp, d.name) for s, d in zip(policy.specs, policy.devices))


class Evaluator:
    """Scores policies for one teacher, device set and validation set.

    ``predictors`` maps device names to objects with ``predict(spec) -> ms`` (e.g.
    :class:`coformer.predictor.LatencyPredictor`); devices without one use the FLOPs estimate.
    ``head`` replaces the teacher's task head for L_val (e.g. a linear head fitted on frozen
    features when the teacher was never fine-tuned). ``link_mbps`` overrides every device's
    link rate. ``cost_batch`` (default: one example of the backbone) is the input on which
    FLOPs and memory are measured — the same batch-1 input profiling times.
    """

    def __init__(self, backbone: Backbone, teacher: nn.Module, devices: Sequence[DeviceProfile], *,
                 val: TensorDataset | None = None, head: nn.Module | None = None,
                 predictors: Mapping[str, Any] | None = None, delta: float = 0.5,
                 link_mbps: float | None = None, batch_size: int = 1, central: str | None = None,
                 cost_batch: Batch | None = None, importance: UnitImportance | None = None,
                 val_batch_size: int = 16):
        if not devices:
            raise ValueError("Evaluator needs at least one device")
        self.backbone = backbone
        self.teacher = teacher.eval()
        self.devices = list(devices)
        self.shape = backbone.shape(teacher)
        self.val = val
        self.head = (head if head is not None else backbone.task_head(teacher)).eval()
        self.predictors = dict(predictors or {})
        self.delta = float(delta)
        self.link_mbps = link_mbps
        self.batch_size = batch_size
        names = [d.name for d in self.devices]
        if central is not None and central not in names:
            raise ValueError(f"central node {central!r} is not one of the devices {names}")
        self.central = central or max(self.devices, key=lambda d: d.gflops).name
        self.cost_batch = cost_batch if cost_batch is not None else backbone.example_batch(teacher, batch_size=1)
        self._importance = importance
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
        from coformer.decompose import top_layers

        if self.shape.uniform_layers or spec.layers > self.shape.layers:
            return tuple(range(min(spec.layers, self.shape.layers)))
        return top_layers(self.importance().layers, spec.layers)

    def cost(self, spec: SubModelSpec) -> SubModelCost:
        """Measured FLOPs/params/memory of a module of ``spec``'s size on the cost batch, sliced from the
        teacher layers the spec runs on (cached)."""
        from coformer.decompose import sized_selection
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

    def latency(self, policy: Policy) -> tuple[float, list[float], list[str], list[float], float]:
        """``(T, t1, t1_source, t2, t3)`` in ms for a policy whose structure is valid."""
        t1, src, t2 = [], [], []
        for spec, dev in zip(policy.specs, policy.devices):
            pred = self.predictors.get(dev.name)
            if pred is not None:
                t1.append(float(pred.predict(spec)))
                src.append("predictor")
            else:
                t1.append(self.cost(spec).flops / (dev.gflops * 1e9) * 1000.0)
                src.append("estimate: FLOPs / device GFLOPS")
            if dev.name == self.central:
                t2.append(0.0)
            else:
                nbytes = spec.embed_dim * FEATURE_BYTES * self.batch_size
                t2.append(nbytes * 8 / (self.link_rate_mbps(dev) * 1e6) * 1000.0)
        central = next(d for d in policy.devices if d.name == self.central)
        d_agg = sum(s.embed_dim for s in policy.specs)
        t3 = 2.0 * self.batch_size * self.shape.embed_dim * d_agg / (central.gflops * 1e9) * 1000.0
        T = max(a + b for a, b in zip(t1, t2)) + t3
        return T, t1, src, t2, t3

    # -- accuracy proxy ---------------------------------------------------------------
    def importance(self) -> UnitImportance:
        """Unit importance, computed once on the first validation samples."""
        if self._importance is None:
            if self.val is None:
                raise ValueError("importance needs validation data or an explicit `importance=`")
            calib = self.val.batch(torch.arange(min(len(self.val), 8)))
            self._importance = self.backbone.importance(self.teacher, calib)
        return self._importance

    def submodel_losses(self, specs: Sequence[SubModelSpec]) -> list[float]:
        """Mean validation CE of each sliced, uncalibrated sub-model through the teacher's head."""
        from coformer.decompose import assign_units

        if self.val is None:
            raise ValueError("L_val needs labelled validation data (Evaluator(val=...))")
        selections = assign_units(self.shape, specs, self.importance())  # importance needs autograd
        with torch.no_grad():
            return [self._loss(sel) for sel in selections]

    def _loss(self, selection: UnitSelection) -> float:
        """Mean CE of one sliced sub-model: features scattered into its teacher channels, teacher head."""
        assert self.val is not None
        from coformer.pipeline import scatter_logits

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
            ev = Evaluation(policy.to_dict(), False, delta=self.delta, violations=[str(v) for v in violations])
        else:
            T, t1, src, t2, t3 = self.latency(policy)
            losses = self.submodel_losses(policy.specs) if self.val is not None else []
            self.model_evaluations += 1 if self.val is not None else 0
            L = sum(losses) / len(losses) if losses else 0.0
            ev = Evaluation(policy.to_dict(), True, L + self.delta * T, T, L, self.delta, t1, src, t2, t3,
                            self.central, losses, [self.cost(s).to_dict() for s in policy.specs])
        self._cache[key] = ev
        return ev
