"""``random``: feasible random sampling of per-sub-model shapes.

Each proposal draws every parameter of the shared :class:`~coformer.offline.search.PolicyEncoding`
uniformly; C1–C4 hold by construction, and a draw that breaks C5/C6 is recorded as
infeasible (never evaluated) and another is drawn, until ``trials`` policies were evaluated
or ``max_proposals_factor × trials`` draws were made.
"""

from __future__ import annotations

import random
from typing import Any, Callable

from coformer.hookspecs import Register, hookimpl
from coformer.offline.search import SearchResult, SearchStrategy, TrialRecord


class RandomSearch(SearchStrategy):
    """Uniform random feasible policies; the best Ψ wins."""

    name = "random"

    def search(self, evaluator: Any, trials: int, *,
               on_trial: Callable[[TrialRecord], None] | None = None) -> SearchResult:
        """Evaluate ``trials`` random feasible policies."""
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
    """Register ``random``."""
    register("random", RandomSearch)
