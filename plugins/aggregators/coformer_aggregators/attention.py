"""``attention``: a learned query attends over the present sub-models' projected features.

Each sub-model's features are projected to the teacher's width d and tagged with a learned
sub-model embedding; one learned query attends over these N tokens with missing sub-models
masked out (``key_padding_mask``); the attended vector goes to a copy of the teacher's head.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from coformer.aggregator import Aggregator, Features
from coformer.heads import ClassifierHead, StudentHead
from coformer.hookspecs import Register, hookimpl
from coformer_aggregators._common import as_dtype, check_features, head_copy, pool_tokens


class AttentionAggregator(Aggregator):
    """Per-sub-model Linear(d_n → d) + sub-model embedding; query attention (missing masked) → head.

    Options: ``num_heads`` (default 1; must divide ``embed_dim``).
    """

    name = "attention"
    trainable = True

    def __init__(self, feature_dims: Sequence[int], embed_dim: int, task_head: ClassifierHead,
                 student_heads: Sequence[StudentHead] | None = None, *, num_heads: int = 1, **options: Any):
        if options:
            raise TypeError(f"attention takes only the option num_heads, got {sorted(options)}")
        if embed_dim % num_heads:
            raise ValueError(f"attention: num_heads={num_heads} must divide embed_dim={embed_dim}")
        super().__init__(feature_dims, embed_dim, task_head, student_heads, num_heads=num_heads)
        d = self.embed_dim
        self.proj = nn.ModuleList(nn.Linear(dn, d) for dn in self.feature_dims)
        self.device_embed = nn.Parameter(torch.randn(len(self.feature_dims), d) * 0.02)
        self.query = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.attn = nn.MultiheadAttention(d, num_heads, batch_first=True)
        self.head = head_copy(task_head)

    def fused(self, features: Features) -> Tensor:
        """The attended feature vector ``[B, d]`` (before the task head)."""
        present = set(check_features(self, features))
        b = self.batch_size(features)
        ref = self.device_embed
        tokens = [self.proj[i](as_dtype(self.proj[i], pool_tokens(f))) if i in present
                  else ref.new_zeros(b, self.embed_dim) for i, f in enumerate(features)]
        x = torch.stack(tokens, dim=1) + self.device_embed  # [B, N, d]
        missing = torch.tensor([i not in present for i in range(len(features))], device=x.device)
        out, _ = self.attn(self.query.expand(b, -1, -1), x, x,
                           key_padding_mask=missing.expand(b, -1), need_weights=False)
        return out[:, 0]

    def forward(self, features: Features) -> Tensor:
        """Logits ``[B, num_labels]``."""
        return self.head(self.fused(features))


@hookimpl
def register_aggregators(register: Register) -> None:
    """Register ``attention``."""
    register("attention", AttentionAggregator)
