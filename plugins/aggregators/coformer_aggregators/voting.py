"""``voting``: majority vote of the present sub-models' predicted classes.

Each present sub-model votes argmax(student_head_n(f_n)). Ties in the vote count are broken
by the mean probability p̄_c = mean_n softmax(student_head_n(f_n))_c. The returned logits are

    logits_c = log((votes_c + p̄_c) / (k + 1))

where k is the number of present sub-models. Σ_c votes_c = k and Σ_c p̄_c = 1, so the
argument of the log is a proper distribution; since 0 < p̄_c < 1, a class with more votes
always scores higher and among equal vote counts the higher p̄_c wins. Exact ties of both
fall to the lowest class index (``argmax``). Nothing is trained.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from coformer.aggregator import Aggregator, Features
from coformer.heads import ClassifierHead, StudentHead
from coformer.hookspecs import Register, hookimpl
from coformer_aggregators._common import require_student_heads, student_log_probs


class VotingAggregator(Aggregator):
    """Majority vote with mean-probability tie-break; logits = log((votes + p̄) / (k + 1))."""

    name = "voting"
    trainable = False

    def __init__(self, feature_dims: Sequence[int], embed_dim: int, task_head: ClassifierHead,
                 student_heads: Sequence[StudentHead] | None = None, **options: Any):
        if options:
            raise TypeError(f"voting takes no options, got {sorted(options)}")
        super().__init__(feature_dims, embed_dim, task_head, student_heads)
        self.student_heads = require_student_heads(self.name, student_heads, self.feature_dims)

    def forward(self, features: Features) -> Tensor:
        """Logits whose argmax is the voted class, ``[B, num_labels]``."""
        logp = student_log_probs(self, self.student_heads, features)  # [k, B, C]
        k, _, c = logp.shape
        votes = torch.nn.functional.one_hot(logp.argmax(dim=-1), c).sum(dim=0).to(logp.dtype)
        mean_p = logp.exp().mean(dim=0)
        # clamp: a class with no votes whose probability underflows would otherwise give -inf
        return torch.log((votes + mean_p).clamp_min(torch.finfo(logp.dtype).tiny)) - math.log(k + 1)


@hookimpl
def register_aggregators(register: Register) -> None:
    """Register ``voting``."""
    register("voting", VotingAggregator)
