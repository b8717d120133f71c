"""The search-strategy interface and the policy encoding every strategy shares.

A policy for N devices is encoded as a small parameter vector: per sub-model ``n``

* ``layers_n``  — integer in [1, L] (C1 holds by construction),
* ``embed_n``   — share of the teacher's embedding channels, in (0, 1],
* ``heads_n``   — share of each layer's heads, in (0, 1],
* ``mlp_n``     — share of each layer's MLP neurons, in (0, 1],

the same share in every layer, applied to *that teacher layer's* heads and neurons: position
``k`` of sub-model ``n`` runs on the teacher layer :func:`coformer.assignment.top_layers` maps it to
(given the evaluator's layer importance), so every stage of a teacher whose layers differ (a
Swin) can be fully used. Shares are normalised across sub-models when they sum above 1, then
floored to whole units (head groups for heads, channel groups for channels), so C2–C4 hold by
construction, per teacher layer. The uniform
strategy uses one set of these four parameters for every sub-model. C5/C6 (FLOPs, memory)
depend on the device and are checked by the evaluator; infeasible proposals are recorded and
never evaluated.
"""

from __future__ import annotations

import math
import random
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from coformer.spec import DeviceProfile, ModelShape, Policy, SubModelSpec

MIN_SHARE = 0.05
PARAM_KINDS = ("layers", "embed", "heads", "mlp")


@dataclass(frozen=True)
class PolicyEncoding:
    """Maps parameter dicts to policies for a teacher shape and device list.

    ``shared`` makes every sub-model use the same parameters (the uniform strategy); its
    shares are then 1/N of the whole so that N equal sub-models fit. ``layer_order`` lists the
    teacher layers from most to least important (a sub-model with ``l`` layers runs on the first
    ``l`` of them, in depth order); ``None`` means depth order, which is what every order gives
    for teachers whose layers are all alike.
    """

    shape: ModelShape
    devices: tuple[DeviceProfile, ...]
    shared: bool = False
    layer_order: tuple[int, ...] | None = None

    def layers_of(self, n_layers: int) -> tuple[int, ...]:
        """The teacher layers a sub-model with ``n_layers`` layers runs on, ascending."""
        order = self.layer_order if self.layer_order is not None else tuple(range(self.shape.layers))
        return tuple(sorted(order[:n_layers]))

    @property
    def n(self) -> int:
        """Number of sub-models."""
        return len(self.devices)

    def parameters(self) -> list[dict[str, Any]]:
        """The search space: ``{"name", "kind", "low", "high", "type"}`` per parameter."""
        ids = [""] if self.shared else [f"_{i}" for i in range(self.n)]
        out = []
        for s in ids:
            out.append({"name": f"layers{s}", "kind": "layers", "low": 1, "high": self.shape.layers, "type": "int"})
            for k in ("embed", "heads", "mlp"):
                out.append({"name": f"{k}{s}", "kind": k, "low": MIN_SHARE, "high": 1.0, "type": "float"})
        return out

    def sample(self, rng: random.Random) -> dict[str, Any]:
        """A uniformly random parameter dict."""
        return {p["name"]: (rng.randint(p["low"], p["high"]) if p["type"] == "int"
                            else rng.uniform(p["low"], p["high"])) for p in self.parameters()}

    def _per_model(self, params: dict[str, Any]) -> list[dict[str, float]]:
        if self.shared:
            return [{k: params[k] for k in PARAM_KINDS}] * self.n
        return [{k: params[f"{k}_{i}"] for k in PARAM_KINDS} for i in range(self.n)]

    @staticmethod
    def _split(shares: Sequence[float], units: int, group: int = 1) -> list[int]:
        """Whole units per sub-model: shares normalised when they sum above 1, floored, ≥ one group."""
        total = sum(shares)
        scale = 1.0 / total if total > 1.0 else 1.0
        groups = units // group
        alloc = [max(1, int(math.floor(s * scale * groups + 1e-9))) for s in shares]
        while sum(alloc) > groups and max(alloc) > 1:  # only when N sub-models exceed the units
            alloc[alloc.index(max(alloc))] -= 1
        return [a * group for a in alloc]

    def decode(self, params: dict[str, Any]) -> list[SubModelSpec]:
        """Sub-model specs for ``params``; C1–C4 hold by construction."""
        per = self._per_model(params)
        sh = self.shape
        scale = 1.0 / self.n if self.shared else 1.0
        layers = [min(sh.layers, max(1, int(round(p["layers"])))) for p in per]
        d = self._split([p["embed"] * scale for p in per], sh.embed_dim, sh.channel_group)
        # each teacher layer is split among all N shares, so any subset of sub-models sharing it fits
        h = [self._split([p["heads"] * scale for p in per], sh.heads[j], sh.head_group) for j in range(sh.layers)]
        m = [self._split([p["mlp"] * scale for p in per], sh.mlp[j]) for j in range(sh.layers)]
        specs = []
        for i in range(self.n):
            where = self.layers_of(layers[i])
            specs.append(SubModelSpec(layers[i], d[i], tuple(h[j][i] for j in where), tuple(m[j][i] for j in where)))
        return specs

    def policy(self, params: dict[str, Any]) -> Policy:
        """The policy ``params`` encodes, with the parameters kept in ``meta``."""
        return Policy(self.decode(params), list(self.devices), {"params": dict(params)})


@dataclass
class TrialRecord:
    """One proposal: its parameters, policy, and either an evaluation or why it was infeasible."""

    index: int
    params: dict[str, Any]
    policy: dict[str, Any]
    feasible: bool
    psi: float | None = None
    T_ms: float | None = None
    L_val: float | None = None
    violations: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"index": self.index, "params": self.params, "policy": self.policy, "feasible": self.feasible,
                "psi": self.psi, "T_ms": self.T_ms, "L_val": self.L_val, "violations": self.violations,
                "seconds": self.seconds}


@dataclass
class SearchResult:
    """The best policy found, its evaluation, and every trial in order."""

    strategy: str
    best_policy: Policy
    best: Any  # coformer.offline.evaluator.Evaluation
    trials: list[TrialRecord]

    def best_so_far(self) -> list[float]:
        """Best Ψ after each *evaluated* trial (the convergence curve)."""
        out, best = [], math.inf
        for t in self.trials:
            if t.feasible and t.psi is not None:
                best = min(best, t.psi)
                out.append(best)
        return out


class NoFeasiblePolicyError(RuntimeError):
    """A search evaluated nothing: every proposal broke a constraint."""


class SearchStrategy(ABC):
    """Proposes decomposition policies and keeps the one with the lowest Ψ.

    Subclasses implement :meth:`search`, building proposals with a :class:`PolicyEncoding`
    and scoring each through :meth:`run_trial` (which checks constraints first, calls the
    ``search_trial_started`` / ``search_trial_finished`` hooks, and records the trial).
    """

    name: str = "strategy"
    #: whether sub-models share one parameter set (the uniform strategy)
    shared: bool = False

    def __init__(self, *, seed: int = 0, max_proposals_factor: int = 20):
        self.seed = seed
        self.max_proposals_factor = max_proposals_factor

    def encoding(self, evaluator: Any) -> PolicyEncoding:
        """The encoding this strategy uses for ``evaluator``'s teacher and devices."""
        order = evaluator.layer_order() if hasattr(evaluator, "layer_order") else None
        return PolicyEncoding(evaluator.shape, tuple(evaluator.devices), self.shared, order)

    @abstractmethod
    def search(self, evaluator: Any, trials: int, *,
               on_trial: Callable[[TrialRecord], None] | None = None) -> SearchResult:
        """Evaluate up to ``trials`` feasible policies; return the best.

        ``on_trial`` is called after each proposal (feasible or not), e.g. to advance a progress bar.
        """

    # -- shared machinery -------------------------------------------------------------
    def run_trial(self, evaluator: Any, encoding: PolicyEncoding, params: dict[str, Any],
                  records: list[TrialRecord]) -> TrialRecord:
        """Check and (only if feasible) evaluate one proposal; appends and returns its record."""
        from coformer.plugins import get_plugin_manager

        t0 = time.perf_counter()
        policy = encoding.policy(params)
        index = len(records)
        violations = evaluator.check(policy)
        if violations:
            rec = TrialRecord(index, dict(params), policy.to_dict(), False,
                              violations=[str(v) for v in violations])
        else:
            hook = get_plugin_manager().hook
            hook.search_trial_started(strategy=self.name, trial=index, policy=policy)
            ev = evaluator.evaluate(policy)
            hook.search_trial_finished(strategy=self.name, trial=index, policy=policy, result=ev)
            rec = TrialRecord(index, dict(params), policy.to_dict(), True, ev.psi, ev.T_ms, ev.L_val)
        rec.seconds = time.perf_counter() - t0
        records.append(rec)
        return rec

    def result(self, evaluator: Any, records: list[TrialRecord]) -> SearchResult:
        """The best evaluated trial of ``records``."""
        done = [r for r in records if r.feasible and r.psi is not None]
        if not done:
            reasons = {v for r in records for v in r.violations}
            raise NoFeasiblePolicyError(
                f"{self.name}: none of {len(records)} proposals was feasible; e.g. "
                + "; ".join(sorted(reasons)[:3])
                + ". Relax the device budgets (latency_budget_ms / flops_budget_g / memory_gb) or use "
                  "fewer/smaller devices")
        best = min(done, key=lambda r: math.inf if r.psi is None else r.psi)
        policy = Policy.from_dict(best.policy)
        return SearchResult(self.name, policy, evaluator.evaluate(policy), records)
