"""Task heads that can be rebuilt from JSON config (so plan directories need no pickle)."""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor, nn


class ClassifierHead(nn.Module):
    """features ``[B, in_dim]`` → logits ``[B, num_labels]``: optional LayerNorm, optional hidden layer, linear."""

    def __init__(self, in_dim: int, num_labels: int, *, norm: bool = False, norm_eps: float = 1e-5,
                 hidden: int | None = None, activation: str = "tanh"):
        super().__init__()
        self.cfg = {"in_dim": in_dim, "num_labels": num_labels, "norm": norm, "norm_eps": norm_eps,
                    "hidden": hidden, "activation": activation}
        self.norm = nn.LayerNorm(in_dim, eps=norm_eps) if norm else nn.Identity()
        if hidden:
            act = {"tanh": nn.Tanh(), "gelu": nn.GELU(), "relu": nn.ReLU()}[activation]
            self.hidden = nn.Sequential(nn.Linear(in_dim, hidden), act)
        else:
            self.hidden = nn.Identity()
        self.out = nn.Linear(hidden or in_dim, num_labels)

    @property
    def config(self) -> dict[str, Any]:
        """Arguments that rebuild this head."""
        return dict(self.cfg)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ClassifierHead:
        """Inverse of :attr:`config` (weights are loaded separately)."""
        cfg = dict(config)
        return cls(cfg.pop("in_dim"), cfg.pop("num_labels"), **cfg)

    def forward(self, x: Tensor) -> Tensor:
        """Logits for features ``x``."""
        return self.out(self.hidden(self.norm(x)))


class StudentHead(nn.Module):
    """A sub-model's own head: project ``d_n`` features to the teacher's width, then the teacher's head."""

    def __init__(self, in_dim: int, embed_dim: int, task_head: ClassifierHead):
        super().__init__()
        self.proj = nn.Linear(in_dim, embed_dim)
        self.head = copy.deepcopy(task_head)

    @property
    def config(self) -> dict[str, Any]:
        """Arguments that rebuild this head."""
        return {"in_dim": self.proj.in_features, "embed_dim": self.proj.out_features,
                "task_head": self.head.config}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> StudentHead:
        """Inverse of :attr:`config`."""
        return cls(config["in_dim"], config["embed_dim"], ClassifierHead.from_config(config["task_head"]))

    def forward(self, x: Tensor) -> Tensor:
        """Logits for one sub-model's features."""
        return self.head(self.proj(x))
