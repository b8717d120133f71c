"""``uniform``: every sub-model gets the same shape (the seed's "uniform" baseline).

One set of four parameters (layers, embedding/head/MLP share) is sampled at random and used
for all N sub-models; shares are of 1/N of the teacher so N equal sub-models always satisfy
C2–C4. Draws that break C5/C6 are recorded as infeasible and never evaluated.
"""

from __future__ import annotations

from coformer.hookspecs import Register, hookimpl
from coformer_search.random_search import RandomSearch


class UniformSearch(RandomSearch):
    """Random search restricted to policies whose sub-models all have one shape."""

    name = "uniform"
    shared = True


@hookimpl
def register_search_strategies(register: Register) -> None:
    """Register ``uniform``."""
    register("uniform", UniformSearch)
