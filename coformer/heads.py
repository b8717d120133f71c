"""Task heads that can be rebuilt from JSON config (so plan directories need no pickle)."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
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


HEAD_WEIGHTS = "coformer_head.safetensors"
HEAD_CONFIG = "coformer_head.json"


def save_head(head: ClassifierHead, directory: str | Path) -> None:
    """Write a task head next to a teacher checkpoint: config as JSON, weights as safetensors."""
    from safetensors.torch import save_file

    out = Path(directory)
    state = {k: v.detach().contiguous().clone() for k, v in head.state_dict().items()}
    save_file(state, str(out / HEAD_WEIGHTS))
    (out / HEAD_CONFIG).write_text(json.dumps(head.config))


def load_head(directory: str | Path, num_labels: int | None = None) -> ClassifierHead | None:
    """The task head saved by :func:`save_head` in ``directory``, or ``None``.

    When ``num_labels`` is given and differs from the saved head's, the saved head is for another
    task: a warning says so and ``None`` is returned so the caller attaches a fresh head.
    """
    from safetensors.torch import load_file

    path = Path(directory)
    if not (path / HEAD_CONFIG).exists():
        return None
    cfg = json.loads((path / HEAD_CONFIG).read_text())
    if num_labels is not None and cfg["num_labels"] != num_labels:
        warnings.warn(f"{path}: saved head has {cfg['num_labels']} labels; attaching a fresh "
                      f"{num_labels}-label head instead", stacklevel=3)
        return None
    head = ClassifierHead.from_config(cfg)
    head.load_state_dict(load_file(str(path / HEAD_WEIGHTS)), strict=True)
    return head
