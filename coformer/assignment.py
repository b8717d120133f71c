"""Disjoint assignment of a teacher's units to N sub-models, guided by importance.

Every sub-model should get a *mix* of important units rather than one getting all the best:
units are dealt in order of importance to whichever sub-model is furthest from its quota,
proportionally. Layers are not disjoint (C1 only bounds each l_n); every other unit is.

Bottom layer: :meth:`coformer.backbone.Backbone.decompose` runs it; sizing the sub-models (the
policy) is an offline stage, :mod:`coformer.offline.decompose`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from coformer.spec import ConstraintError, ModelShape, SubModelSpec, UnitSelection, check_structure


@dataclass
class UnitImportance:
    """Importance scores for every decomposable unit of a teacher (higher = more important)."""

    layers: Tensor
    channels: Tensor
    heads: list[Tensor]
    mlp: list[Tensor]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"layers": self.layers.tolist(), "channels": self.channels.tolist(),
                "heads": [h.tolist() for h in self.heads], "mlp": [m.tolist() for m in self.mlp]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UnitImportance:
        """Inverse of :meth:`to_dict`."""
        return cls(torch.tensor(data["layers"]), torch.tensor(data["channels"]),
                   [torch.tensor(h) for h in data["heads"]], [torch.tensor(m) for m in data["mlp"]])


def deal(scores: Tensor, quotas: Sequence[int], group: int = 1) -> list[tuple[int, ...]]:
    """Split units ``0..len(scores)-1`` disjointly so member ``i`` gets ``quotas[i]`` of them.

    Units go in descending score order, each to the member with the largest unfilled share
    of its quota; with ``group > 1`` units move in consecutive groups of that size (scored
    by their sum). Returns sorted indices per member.
    """
    n_units = scores.numel()
    if n_units % group:
        raise ValueError(f"{n_units} units do not split into groups of {group}")
    if any(q % group for q in quotas):
        raise ValueError(f"quotas {list(quotas)} must be multiples of the group size {group}")
    group_scores = scores.reshape(-1, group).sum(dim=1)
    g_quota = [q // group for q in quotas]
    if sum(g_quota) > group_scores.numel():
        raise ValueError(f"quotas {list(quotas)} need {sum(quotas)} units but only {n_units} exist")
    order = torch.argsort(group_scores, descending=True, stable=True).tolist()
    taken = [0] * len(quotas)
    out: list[list[int]] = [[] for _ in quotas]
    for g in order:
        open_members = [i for i, q in enumerate(g_quota) if taken[i] < q]
        if not open_members:
            break
        i = min(open_members, key=lambda m: (taken[m] / g_quota[m], m))
        out[i].extend(range(g * group, (g + 1) * group))
        taken[i] += 1
    return [tuple(sorted(units)) for units in out]


def top_layers(layer_scores: Tensor, k: int) -> tuple[int, ...]:
    """The ``k`` most important teacher layers in ascending order: the layers :func:`assign_units`
    gives a sub-model with ``k`` layers (its position ``i`` runs on the ``i``-th of them)."""
    n = int(layer_scores.numel())
    if not 1 <= k <= n:
        raise ValueError(f"a sub-model needs 1..{n} layers, got {k}")
    order = torch.argsort(layer_scores, descending=True, stable=True).tolist()
    return tuple(sorted(order[:k]))


def layer_maps(specs: Sequence[SubModelSpec], layer_scores: Tensor) -> list[tuple[int, ...]]:
    """For each spec, the teacher layer each of its positions maps to (see :func:`top_layers`)."""
    return [top_layers(layer_scores, s.layers) for s in specs]


def sized_selection(shape: ModelShape, spec: SubModelSpec, layers: Sequence[int]) -> UnitSelection:
    """A selection of ``spec``'s sizes on the given teacher ``layers`` (first units of each kind).

    Costs depend on sizes *and* on which layers run (a Swin stage's block differs from another's
    by resolution and width), so costs are measured on the layers the spec will really use.
    """
    layers = tuple(int(j) for j in layers)
    if len(layers) != spec.layers or list(layers) != sorted(set(layers)) or \
            not all(0 <= j < shape.layers for j in layers):
        raise ValueError(f"layers {list(layers)} must be {spec.layers} distinct ascending teacher layers "
                         f"< {shape.layers}")
    if spec.embed_dim > shape.embed_dim:
        raise ValueError(f"spec keeps {spec.embed_dim} embedding channels but the teacher has {shape.embed_dim}")
    for k, j in enumerate(layers):
        if spec.heads[k] > shape.heads[j] or spec.mlp[k] > shape.mlp[j]:
            raise ValueError(f"spec position {k} (teacher layer {j}): {spec.heads[k]} heads / {spec.mlp[k]} MLP "
                             f"neurons exceed the layer's {shape.heads[j]} / {shape.mlp[j]}")
    return UnitSelection(layers, tuple(range(spec.embed_dim)),
                         tuple(tuple(range(h)) for h in spec.heads), tuple(tuple(range(m)) for m in spec.mlp))


def assign_units(
    shape: ModelShape, specs: Sequence[SubModelSpec], importance: UnitImportance
) -> list[UnitSelection]:
    """Choose concrete units for each spec: top-l_n layers, then disjoint channels/heads/neurons.

    Embedding channels are dealt in groups of ``shape.channel_group`` (a Swin's channels must
    stay disjoint in every stage, not only the last).
    """
    layers = layer_maps(specs, importance.layers)
    violations = check_structure(specs, shape, layer_maps=layers)
    if violations:
        raise ConstraintError(violations)
    channels = deal(importance.channels, [s.embed_dim for s in specs], shape.channel_group)

    heads: list[list[tuple[int, ...]]] = [[] for _ in specs]
    mlp: list[list[tuple[int, ...]]] = [[] for _ in specs]
    for j in range(shape.layers):
        members = [(n, layers[n].index(j)) for n in range(len(specs)) if j in layers[n]]
        if not members:
            continue
        h_quota = [specs[n].heads[k] for n, k in members]
        m_quota = [specs[n].mlp[k] for n, k in members]
        for (n, _), hs in zip(members, deal(importance.heads[j], h_quota, shape.head_group)):
            heads[n].append(hs)
        for (n, _), ms in zip(members, deal(importance.mlp[j], m_quota)):
            mlp[n].append(ms)
    return [UnitSelection(layers[n], channels[n], tuple(heads[n]), tuple(mlp[n])) for n in range(len(specs))]
