"""``se``: squeeze-and-excitation gating over sub-models.

Each sub-model's features are projected to the teacher's width d (z_n); *squeeze* reduces
z_n to one scalar s_n (its mean over channels); *excitation* is an MLP on
[s_1..s_N, m_1..m_N] (m_n = 1 if sub-model n answered) followed by a sigmoid, giving a gate
g_n per sub-model; missing sub-models get s_n = 0 and g_n = 0. The fused vector is the
gate-weighted mean over present sub-models, (1/k) Σ_n g_n·z_n, which goes to a copy of the
teacher's head.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from coformer.aggregator import Aggregator, Features
from coformer.heads import ClassifierHead, StudentHead
from coformer.hookspecs import Register, hookimpl
from coformer_aggregators._common import as_dtype, check_features, head_copy, pool_tokens


class SEAggregator(Aggregator):
    """Project to d, squeeze to one scalar per sub-model, excite → sigmoid gates, gated mean → head.

    Options: ``hidden`` — width of the excitation MLP (default ``max(4·N, 8)``).
    """

    name = "se"
    trainable = True

    def __init__(self, feature_dims: Sequence[int], embed_dim: int, task_head: ClassifierHead,
                 student_heads: Sequence[StudentHead] | None = None, *, hidden: int | None = None,
                 **options: Any):
        if options:
            raise TypeError(f"se takes only the option hidden, got {sorted(options)}")
        n = len(feature_dims)
        hidden = int(hidden) if hidden is not None else max(4 * n, 8)
        super().__init__(feature_dims, embed_dim, task_head, student_heads, hidden=hidden)
        self.proj = nn.ModuleList(nn.Linear(dn, self.embed_dim) for dn in self.feature_dims)
        # The presence mask is an input so the gates can re-balance when devices drop out.
        self.excite = nn.Sequential(nn.Linear(2 * n, hidden), nn.ReLU(), nn.Linear(hidden, n))
        self.head = head_copy(task_head)

    def gates(self, features: Features) -> tuple[Tensor, Tensor, Tensor]:
        """``(z [B, N, d], gates [B, N], mask [N])`` for the present features."""
        present = set(check_features(self, features))
        b = self.batch_size(features)
        ref = self.excite[0].weight
        z = torch.stack([self.proj[i](as_dtype(self.proj[i], pool_tokens(f))) if i in present
                         else ref.new_zeros(b, self.embed_dim) for i, f in enumerate(features)], dim=1)
        mask = ref.new_tensor([1.0 if i in present else 0.0 for i in range(len(features))])
        squeeze = z.mean(dim=-1) * mask                                   # [B, N]
        g = torch.sigmoid(self.excite(torch.cat([squeeze, mask.expand(b, -1)], dim=-1))) * mask
        return z, g, mask

    def fused(self, features: Features) -> Tensor:
        """The gated mean ``(1/k) Σ g_n z_n`` ``[B, d]`` (before the task head)."""
        z, g, mask = self.gates(features)
        return (g.unsqueeze(-1) * z).sum(dim=1) / mask.sum()

    def forward(self, features: Features) -> Tensor:
        """Logits ``[B, num_labels]``."""
        return self.head(self.fused(features))


@hookimpl
def register_aggregators(register: Register) -> None:
    """Register ``se``."""
    register("se", SEAggregator)
