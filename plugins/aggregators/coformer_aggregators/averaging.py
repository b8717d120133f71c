"""``averaging``: the mean of the present sub-models' predicted class distributions.

Each sub-model's own :class:`~coformer.heads.StudentHead` (from calibration) gives
p_n = softmax(head_n(f_n)); the answer is p̄ = mean over present n of p_n, returned as
logits log p̄ (so ``softmax(logits) == p̄``). Nothing is trained.
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


class AveragingAggregator(Aggregator):
    """logits = log(mean_n softmax(student_head_n(f_n))) over the present sub-models."""

    name = "averaging"
    trainable = False

    def __init__(self, feature_dims: Sequence[int], embed_dim: int, task_head: ClassifierHead,
                 student_heads: Sequence[StudentHead] | None = None, **options: Any):
        if options:
            raise TypeError(f"averaging takes no options, got {sorted(options)}")
        super().__init__(feature_dims, embed_dim, task_head, student_heads)
        self.student_heads = require_student_heads(self.name, student_heads, self.feature_dims)

    def forward(self, features: Features) -> Tensor:
        """Log of the mean probabilities, ``[B, num_labels]``."""
        logp = student_log_probs(self, self.student_heads, features)  # [k, B, C]
        # log mean exp, computed stably: log(1/k Σ p_n) = logsumexp_n(log p_n) − log k
        return torch.logsumexp(logp, dim=0) - math.log(logp.shape[0])


@hookimpl
def register_aggregators(register: Register) -> None:
    """Register ``averaging``."""
    register("averaging", AveragingAggregator)
