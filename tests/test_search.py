"""Search strategies: the encoding respects C1–C4, every strategy evaluates only feasible policies, hooks fire."""

from __future__ import annotations

import random

import pytest
import torch

import coformer
from coformer.data import TensorDataset
from coformer.offline.evaluator import Evaluator
from coformer.hookspecs import hookimpl
from coformer.offline.search import PolicyEncoding
from coformer.spec import BUILTIN_DEVICES, DeviceProfile, check_structure, validate

STRATEGIES = [p.name for p in coformer.list_plugins("search")]


def test_builtin_strategies_are_registered():
    assert {"ax_gp_ei", "random", "uniform"} <= set(STRATEGIES)


@pytest.fixture(scope="module")
def tiny():
    backbone = coformer.create_backbone("bert")
    teacher = backbone.tiny(num_labels=3).eval()
    val = TensorDataset(backbone.example_batch(teacher, batch_size=6, seed=2), torch.tensor([0, 1, 2, 2, 1, 0]))
    return backbone, teacher, val


@pytest.mark.parametrize("shared", [False, True])
def test_decoded_policies_satisfy_C1_to_C4_by_construction(tiny, shared):
    backbone, teacher, _ = tiny
    shape = backbone.shape(teacher)
    devs = tuple(BUILTIN_DEVICES[n] for n in ("jetson-nano", "jetson-tx2", "orin-nano"))
    enc = PolicyEncoding(shape, devs, shared)
    rng = random.Random(0)
    for _ in range(300):
        specs = enc.decode(enc.sample(rng))
        assert check_structure(specs, shape, devs) == []
        if shared:
            assert len(set(specs)) == 1
    # extreme corners too: every share at its maximum
    top = {p["name"]: p["high"] for p in enc.parameters()}
    assert check_structure(enc.decode(top), shape, devs) == []


class Recorder:
    """A plugin that records the trial hooks."""

    def __init__(self):
        self.started: list = []
        self.finished: list = []

    @hookimpl
    def search_trial_started(self, strategy, trial, policy):
        self.started.append((strategy, trial, policy))

    @hookimpl
    def search_trial_finished(self, strategy, trial, policy, result):
        self.finished.append((strategy, trial, result))


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_evaluates_only_feasible_policies(tiny, name):
    backbone, teacher, val = tiny
    shape = backbone.shape(teacher)
    probe = Evaluator(backbone, teacher, [DeviceProfile("p", 8, 1000.0, 5)])
    full_flops = probe.cost(shape.full_spec()).flops
    # a tight FLOPs budget on one device makes part of the space infeasible (C5)
    devs = [DeviceProfile("small", 8, 100.0, 5, flops_budget_g=0.08 * full_flops / 1e9),
            DeviceProfile("big", 8, 400.0, 5)]
    ev = Evaluator(backbone, teacher, devs, val=val, delta=0.5)
    rec = Recorder()
    plugin_name = coformer.register_plugin(rec, name=f"recorder-{name}")
    try:
        options = {"init_trials": 2} if name == "ax_gp_ei" else {}
        strategy = coformer.create_search_strategy(name, seed=0, **options)
        seen = []
        result = strategy.search(ev, 4, on_trial=seen.append)
    finally:
        coformer.unregister_plugin(plugin_name)
    feasible = [t for t in result.trials if t.feasible]
    assert len(feasible) == 4 and len(seen) == len(result.trials)
    assert ev.model_evaluations == len({tuple(map(str, t.policy["specs"])) for t in feasible})
    # every evaluated policy satisfies C1–C6 with measured costs
    for _, _, policy in rec.started:
        validate(policy.specs, shape, policy.devices, [ev.cost(s) for s in policy.specs])
    assert [t for _, t, _ in rec.started] == [t.index for t in feasible]
    assert all(r.feasible for _, _, r in rec.finished)
    for t in result.trials:
        if not t.feasible:
            assert t.psi is None and t.violations and all(v.startswith("C5") for v in t.violations)
    assert result.best.psi == min(t.psi for t in feasible)
    curve = result.best_so_far()
    assert len(curve) == 4 and curve == sorted(curve, reverse=True)
    if name == "uniform":
        assert all(len({str(s) for s in t.policy["specs"]}) == 1 for t in result.trials)


def test_random_search_meets_infeasible_proposals_and_skips_them(tiny):
    backbone, teacher, val = tiny
    shape = backbone.shape(teacher)
    probe = Evaluator(backbone, teacher, [DeviceProfile("p", 8, 1000.0, 5)])
    budget = 0.05 * probe.cost(shape.full_spec()).flops / 1e9
    devs = [DeviceProfile("small", 8, 100.0, 5, flops_budget_g=budget), DeviceProfile("big", 8, 400.0, 5)]
    ev = Evaluator(backbone, teacher, devs, val=val)
    result = coformer.create_search_strategy("random", seed=1).search(ev, 5)
    assert any(not t.feasible for t in result.trials)  # the budget really bites
    assert ev.model_evaluations <= 5


@pytest.mark.parametrize("failure", ["ModelFittingError", "OptimizationGradientError"])
def test_ax_gp_ei_proposes_at_random_when_botorch_fails_numerically(tiny, monkeypatch, failure):
    """NaN gradients in the acquisition optimiser (OptimizationGradientError) stopped a 50-trial
    search; like a GP that cannot be fitted, the trial is now proposed at random and recorded."""
    import numpy as np
    from ax.api.client import Client
    from botorch.exceptions import errors

    backbone, teacher, val = tiny
    ev = Evaluator(backbone, teacher, [DeviceProfile("a", 8, 100.0, 5), DeviceProfile("b", 8, 400.0, 5)],
                   val=val, delta=0.5)
    real = Client.get_next_trials
    calls = []

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            extra = {"current_x": np.zeros(3)} if failure == "OptimizationGradientError" else {}
            raise getattr(errors, failure)("numerical trouble", **extra)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Client, "get_next_trials", flaky)
    strategy = coformer.create_search_strategy("ax_gp_ei", seed=0, init_trials=2)
    result = strategy.search(ev, 4)
    assert len([t for t in result.trials if t.feasible]) == 4
    assert strategy.fallback_trials == [2]
