"""``uniform``: every sub-model gets the same shape (the seed's "uniform" baseline).

One set of four parameters (layers, embedding/head/MLP share) is sampled at random and used
for all N sub-models; shares are of 1/N of the teacher so N equal sub-models always satisfy
C2–C4. Draws that break C5/C6 are recorded as infeasible and never evaluated.
"""

from __future__ import annotations

import random
from typing import Any, Callable

from coformer.hookspecs import Register, hookimpl
from coformer.search import SearchResult, SearchStrategy, TrialRecord


class UniformSearch(SearchStrategy):
    """Random search restricted to policies whose sub-models all have one shape."""

    name = "uniform"
    shared = True

    def search(self, evaluator: Any, trials: int, *,
               on_trial: Callable[[TrialRecord], None] | None = None) -> SearchResult:
        """Evaluate ``trials`` feasible uniform policies."""
        enc = self.encoding(evaluator)
        rng = random.Random(self.seed)
        records: list[TrialRecord] = []
        evaluated = 0
        while evaluated < trials and len(records) < trials * self.max_proposals_factor:
            rec = self.run_trial(evaluator, enc, enc.sample(rng), records)
            evaluated += rec.feasible
            if on_trial:
                on_trial(rec)
        return self.result(evaluator, records)


@hookimpl
def register_search_strategies(register: Register) -> None:
    """Register ``uniform``."""
    register("uniform", UniformSearch)
