"""Task heads that can be rebuilt from JSON config (so plan directories need no pickle)."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any, Sequence, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class ClassifierHead(nn.Module):
    """features ``[B, in_dim]`` → logits ``[B, num_labels]``: optional LayerNorm, optional hidden layer, linear."""

    def __init__(self, in_dim: int, num_labels: int, *, norm: bool = False, norm_eps: float = 1e-5,
                 hidden: int | None = None, activation: str = "tanh"):
        super().__init__()
        self.cfg = {"in_dim": in_dim, "num_labels": num_labels, "norm": norm, "norm_eps": norm_eps,
                    "hidden": hidden, "activation": activation}
        self.norm = nn.LayerNorm(in_dim, eps=norm_eps) if norm else nn.Identity()
        self.hidden: nn.Module
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


class MeanOfLinears(nn.Module):
    """The mean of several ``nn.Linear`` layers, holding *their own* parameters, seen as one Linear.

    ``split_input=False``: every layer reads the whole input, ``y = mean_i(W_i x + b_i)``;
    ``split_input=True``: layer ``i`` reads the ``i``-th consecutive slice of the input,
    ``y = mean_i(W_i x_i + b_i)``. Either way it is the Linear with ``weight`` = mean of the
    ``W_i`` (or ``[W_1 … W_k] / k``) and ``bias`` = mean of the ``b_i``; its state dict holds
    exactly those two entries, so a :class:`ClassifierHead` rebuilt from config loads it, while
    training it trains the original layers (a teacher's two classifiers, say).
    """

    def __init__(self, linears: Sequence[nn.Linear], *, split_input: bool):
        super().__init__()
        if not linears:
            raise ValueError("MeanOfLinears needs at least one Linear")
        shapes = {(lin.in_features, lin.out_features) for lin in linears}
        if len(shapes) != 1 or any(lin.bias is None for lin in linears):
            raise ValueError(f"MeanOfLinears needs Linears of one shape, each with a bias; got {sorted(shapes)}")
        self.parts = len(linears)
        self.split_input = split_input
        part_in, self.out_features = shapes.pop()
        self.in_features = part_in * self.parts if split_input else part_in
        for i, lin in enumerate(linears):
            # the Linear's own Parameter objects: this module and the Linears train the same tensors
            self.register_parameter(f"weight_{i}", cast(nn.Parameter, lin.weight))
            self.register_parameter(f"bias_{i}", cast(nn.Parameter, lin.bias))

    def _weights(self) -> list[Tensor]:
        return [getattr(self, f"weight_{i}") for i in range(self.parts)]

    def _biases(self) -> list[Tensor]:
        return [getattr(self, f"bias_{i}") for i in range(self.parts)]

    @property
    def weight(self) -> Tensor:
        """The equivalent Linear's weight ``[out_features, in_features]``."""
        ws = self._weights()
        return torch.cat(ws, dim=1) / self.parts if self.split_input else torch.stack(ws).mean(0)

    @property
    def bias(self) -> Tensor:
        """The equivalent Linear's bias (the mean of the parts' biases)."""
        return torch.stack(self._biases()).mean(0)

    def forward(self, x: Tensor) -> Tensor:
        """``F.linear(x, weight, bias)``."""
        return F.linear(x, self.weight, self.bias)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        w, b = self.weight, self.bias
        destination[prefix + "weight"] = w if keep_vars else w.detach()
        destination[prefix + "bias"] = b if keep_vars else b.detach()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        keys = [prefix + "weight", prefix + "bias"]
        absent = [k for k in keys if k not in state_dict]
        if absent:
            missing_keys.extend(absent)
            return
        w, b = state_dict[keys[0]], state_dict[keys[1]]
        if tuple(w.shape) != (self.out_features, self.in_features) or tuple(b.shape) != (self.out_features,):
            error_msgs.append(f"{prefix}weight/bias: shapes {tuple(w.shape)}/{tuple(b.shape)} do not fit "
                              f"a Linear({self.in_features}, {self.out_features})")
            return
        # one solution of "these parts average to (w, b)": equal parts (split ones scaled back up)
        parts = w.chunk(self.parts, dim=1) if self.split_input else [w] * self.parts
        with torch.no_grad():
            for mine, theirs in zip(self._weights(), parts):
                mine.copy_(theirs * self.parts if self.split_input else theirs)
            for mine in self._biases():
                mine.copy_(b)


def head_input_dim(head: nn.Module) -> int:
    """The feature width a task head takes (its ``config["in_dim"]``), which is not always the
    teacher's embedding width (a distilled DeiT's concatenated tokens are 2d wide)."""
    config = getattr(head, "config", None)
    if not isinstance(config, dict) or "in_dim" not in config:
        raise TypeError(f"task head {type(head).__name__} has no config['in_dim']; use a ClassifierHead")
    return int(config["in_dim"])


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
