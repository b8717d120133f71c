"""``ax_gp_ei`` (default): Bayesian optimisation with Ax's ``Client`` API.

What it actually uses (Ax 1.3): a generation strategy built by
``ax.api.utils.generation_strategy_dispatch.choose_generation_strategy`` with
``method="custom"``: first the centre of the search space, then Sobol quasi-random points
(``init_trials``, default 5), then Modular BoTorch with

* surrogate: ``botorch.models.SingleTaskGP`` with a ``gpytorch.kernels.MaternKernel(nu=1.5)``
  (the seed's smoothness ν = 1.5) with one length scale per parameter, *fitted* by marginal
  likelihood (the seed fixes l = 1; Ax normalises inputs and standardises Ψ first);
* acquisition: ``botorch.acquisition.logei.qLogExpectedImprovement`` — the (Monte-Carlo, q=1)
  log of expected improvement, which has the same maximiser as EI and is numerically stable.
  The MC form is needed because abandoned (infeasible) trials stay "pending" in Ax, and the
  analytic EI constructor rejects pending points.

Ax minimises Ψ (objective ``-psi``). Parameters are those of
:class:`~coformer.offline.search.PolicyEncoding`; proposals breaking C5/C6 are marked *abandoned* in
Ax without any model evaluation, so the GP never sees a made-up value. When the GP cannot be
fitted (BoTorch's ``ModelFittingError``, a numerical failure seen on flat Ψ landscapes), that
trial is proposed at random instead and attached to Ax, so the search continues; the indices
of such trials are kept in ``fallback_trials``.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Callable

from coformer.hookspecs import Register, hookimpl
from coformer.offline.search import SearchResult, SearchStrategy, TrialRecord


def _quiet_ax() -> None:
    for name in ("ax", "ax.api", "ax.api.client", "ax.generation_strategy", "ax.core"):
        logging.getLogger(name).setLevel(logging.WARNING)


class AxGpEi(SearchStrategy):
    """GP (Matern ν=1.5) + expected improvement through Ax's ``Client``."""

    name = "ax_gp_ei"

    def __init__(self, *, seed: int = 0, init_trials: int = 5, max_proposals_factor: int = 5):
        super().__init__(seed=seed, max_proposals_factor=max_proposals_factor)
        self.init_trials = init_trials

    def client(self, n_params: int, params: list[dict[str, Any]]):
        """A configured Ax ``Client`` for the encoding's parameters."""
        from ax.api.client import Client
        from ax.api.configs import RangeParameterConfig
        from ax.api.utils.generation_strategy_dispatch import choose_generation_strategy
        from ax.api.utils.structs import GenerationStrategyDispatchStruct
        from ax.generators.torch.botorch_modular.surrogate import ModelConfig
        from botorch.acquisition.logei import qLogExpectedImprovement
        from botorch.models import SingleTaskGP
        from gpytorch.kernels import MaternKernel

        _quiet_ax()
        client = Client(random_seed=self.seed)
        client.configure_experiment(
            parameters=[RangeParameterConfig(p["name"], (p["low"], p["high"]), p["type"]) for p in params],
            name="coformer_policy")
        client.configure_optimization(objective="-psi")
        model = ModelConfig(botorch_model_class=SingleTaskGP, covar_module_class=MaternKernel,
                            covar_module_options={"nu": 1.5, "ard_num_dims": n_params}, name="GP-Matern1.5")
        gs = choose_generation_strategy(
            GenerationStrategyDispatchStruct(method="custom", initialization_budget=self.init_trials,
                                             initialization_random_seed=self.seed),
            model_config=model, botorch_acqf_class=qLogExpectedImprovement)
        client.set_generation_strategy(gs)
        return client

    def search(self, evaluator: Any, trials: int, *,
               on_trial: Callable[[TrialRecord], None] | None = None) -> SearchResult:
        """Run ``trials`` evaluated Ax trials (abandoned infeasible ones do not count)."""
        # lazy: BoTorch is slow to import
        from botorch.exceptions.errors import ModelFittingError, OptimizationGradientError

        enc = self.encoding(evaluator)
        space = enc.parameters()
        client = self.client(len(space), space)
        records: list[TrialRecord] = []
        evaluated = 0
        rng = random.Random(self.seed)
        #: trials whose GP could not be fitted, or whose acquisition optimiser met NaN gradients
        #: (numerical failures): proposed at random instead
        self.fallback_trials: list[int] = []
        while evaluated < trials and len(records) < trials * self.max_proposals_factor:
            try:
                (index, params), = client.get_next_trials(max_trials=1).items()
            except (ModelFittingError, OptimizationGradientError):
                params = enc.sample(rng)
                index = client.attach_trial(params)
                self.fallback_trials.append(len(records))
            rec = self.run_trial(evaluator, enc, dict(params), records)
            if rec.feasible:
                client.complete_trial(index, {"psi": float(rec.psi)})
                evaluated += 1
            else:
                client.mark_trial_abandoned(index)
            if on_trial:
                on_trial(rec)
        return self.result(evaluator, records)


@hookimpl
def register_search_strategies(register: Register) -> None:
    """Register ``ax_gp_ei``."""
    register("ax_gp_ei", AxGpEi)
