"""An example third-party CoFormer plugin (install with ``pip install ./examples/third_party_plugin``).

It adds the ``max_confidence`` aggregator — answer with the single most confident sub-model —
and a ``coformer hello`` command. Everything goes through the same hooks the built-ins use.
"""

from __future__ import annotations

import click
import torch
from torch import Tensor

from coformer import hookimpl
from coformer.aggregator import Aggregator, Features


class MaxConfidence(Aggregator):
    """Per sample, the logits of the present sub-model whose softmax peak is highest."""

    name = "max_confidence"
    trainable = False

    def __init__(self, feature_dims, embed_dim, task_head, student_heads=None, **options):
        super().__init__(feature_dims, embed_dim, task_head, student_heads, **options)
        if not student_heads:
            raise ValueError("max_confidence needs the sub-models' student heads (from calibration)")
        self.heads = torch.nn.ModuleList(student_heads)

    def forward(self, features: Features) -> Tensor:
        """Logits of the most confident present sub-model, per sample."""
        idx = self.present(features)
        logits = torch.stack([self.heads[i](features[i]) for i in idx])  # [n, B, C]
        best = logits.softmax(-1).amax(-1).argmax(0)  # [B]
        return logits[best, torch.arange(logits.shape[1])]


@hookimpl
def register_aggregators(register):
    """Register ``max_confidence``."""
    register("max_confidence", MaxConfidence)


@hookimpl
def register_commands(cli):
    """Add ``coformer hello``."""

    @cli.command()
    def hello() -> None:
        """Say hello from a third-party plugin."""
        click.echo("hello from coformer-max-confidence")
