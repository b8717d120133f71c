"""``mlp_fusion``: the seed's aggregation module (eq. 2), X_agg = Pool(W · Concat(X_1..X_N) + b).

Missing devices are zero-filled in the concatenation, and a learned offset per device
(``missing_offsets[n]``, zero-initialised) is added in place of its contribution, so with
every device present this is exactly eq. 2, and with one lost the fused vector is moved back
towards where that device's features usually put it. Train with random device drop-out
(:func:`coformer.aggregator.drop_devices`) so the offsets are learned and the answer degrades
gracefully.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from coformer.aggregator import Aggregator, Features
from coformer.heads import ClassifierHead, StudentHead
from coformer.hookspecs import Register, hookimpl
from coformer_aggregators._common import as_dtype, check_features, head_copy, pool_tokens


class MLPFusionAggregator(Aggregator):
    """Concatenate (missing → zeros, plus a learned offset), Linear(Σ d_n → d), mean-pool, then the task head copy.

    Features may be ``[B, d_n]`` or ``[B, T, d_n]``. Because the linear map is affine and
    Pool is a mean, Pool(W·X + b) = W·Pool(X) + b; tokens are therefore pooled per sub-model
    first, which also allows sub-models with different token counts.
    """

    name = "mlp_fusion"
    trainable = True

    def __init__(self, feature_dims: Sequence[int], embed_dim: int, task_head: ClassifierHead,
                 student_heads: Sequence[StudentHead] | None = None, **options: Any):
        if options:
            raise TypeError(f"mlp_fusion takes no options, got {sorted(options)}")
        super().__init__(feature_dims, embed_dim, task_head, student_heads)
        self.fuse = nn.Linear(sum(self.feature_dims), self.embed_dim)
        if student_heads is not None:
            self._start_from_students(student_heads)
        self.missing_offsets = nn.Parameter(torch.zeros(len(self.feature_dims), self.embed_dim))
        self.head = head_copy(task_head)

    @torch.no_grad()
    def _start_from_students(self, student_heads: Sequence[StudentHead]) -> None:
        """Initialise W, b to the mean of the calibrated sub-models' own projections to width d.

        Training then starts from "average the sub-models' projected features" instead of a
        random map, which makes the result far less dependent on the initial random state.
        """
        if len(student_heads) != len(self.feature_dims):
            raise ValueError(f"mlp_fusion: {len(student_heads)} student heads for {len(self.feature_dims)} sub-models")
        n = len(student_heads)
        self.fuse.weight.copy_(torch.cat([h.proj.weight for h in student_heads], dim=1) / n)
        self.fuse.bias.copy_(torch.stack([h.proj.bias for h in student_heads]).mean(dim=0))

    def fused(self, features: Features) -> Tensor:
        """The aggregated feature vector ``X_agg`` ``[B, d]`` (before the task head)."""
        present = set(check_features(self, features))
        b = self.batch_size(features)
        ref = self.fuse.weight
        parts = [as_dtype(self.fuse, pool_tokens(f)) if i in present
                 else ref.new_zeros(b, d) for i, (f, d) in enumerate(zip(features, self.feature_dims))]
        fused = self.fuse(torch.cat(parts, dim=-1))
        missing = [i for i in range(len(self.feature_dims)) if i not in present]
        if missing:
            fused = fused + self.missing_offsets[missing].sum(dim=0)
        return fused

    def forward(self, features: Features) -> Tensor:
        """Logits ``[B, num_labels]``."""
        return self.head(self.fused(features))


@hookimpl
def register_aggregators(register: Register) -> None:
    """Register ``mlp_fusion``."""
    register("mlp_fusion", MLPFusionAggregator)
