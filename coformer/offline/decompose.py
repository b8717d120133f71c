"""Disjoint assignment of a teacher's units to N sub-models, guided by importance.

Every sub-model should get a *mix* of important units rather than one getting all the best:
units are dealt in order of importance to whichever sub-model is furthest from its quota,
proportionally. Layers are not disjoint (C1 only bounds each l_n); every other unit is.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from coformer.backbone import UnitImportance
from coformer.spec import ConstraintError, ModelShape, SubModelSpec, UnitSelection, check_structure


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


def _split_units(fracs: Sequence[float], n_units: int, group: int = 1) -> list[int]:
    """``n_units`` split in proportion to ``fracs`` (summing to 1), whole groups, at least one group each."""
    groups = n_units // group
    alloc = [max(1, int(f * groups)) for f in fracs]
    # hand out what flooring left over to the largest remainders
    rema = sorted(range(len(fracs)), key=lambda i: -(fracs[i] * groups - int(fracs[i] * groups)))
    for i in rema:
        if sum(alloc) >= groups:
            break
        alloc[i] += 1
    while sum(alloc) > groups:
        alloc[alloc.index(max(alloc))] -= 1
    return [a * group for a in alloc]


def proportional_specs(shape: ModelShape, weights: Sequence[float], layers: int | None = None,
                       importance: UnitImportance | None = None) -> list[SubModelSpec]:
    """Split every dimension of ``shape`` across sub-models in proportion to ``weights``.

    The demo's fixed policy: sizes proportional to device compute. Every sub-model keeps
    ``layers`` layers (all by default) and at least one head group, neuron and channel group.
    With ``layers`` < L the layers are picked first — the ones :func:`assign_units` will map the
    positions to, from ``importance`` — and heads and MLP neurons are sized from *those* layers,
    so a teacher whose layers differ (a Swin's stages) is fully used. ``importance`` is required
    then, unless every teacher layer has the same heads and MLP width.
    """
    if not weights or any(w <= 0 for w in weights):
        raise ValueError(f"weights must be positive numbers, one per sub-model; got {list(weights)}")
    total = float(sum(weights))
    fracs = [w / total for w in weights]
    n_layers = layers or shape.layers
    if not 1 <= n_layers <= shape.layers:
        raise ValueError(f"layers={n_layers}: choose 1..{shape.layers}")
    if n_layers == shape.layers:
        chosen: tuple[int, ...] = tuple(range(shape.layers))
    elif importance is not None:
        chosen = top_layers(importance.layers, n_layers)
    elif shape.uniform_layers:
        chosen = tuple(range(n_layers))
    else:
        raise ValueError(f"proportional_specs(layers={n_layers}): this teacher's layers differ in heads/MLP width, "
                         f"so the sizes depend on which layers are kept; pass importance= (the UnitImportance "
                         f"assign_units will use) so they are sized from those layers")
    d = _split_units(fracs, shape.embed_dim, shape.channel_group)
    per_layer_h = [_split_units(fracs, shape.heads[j], shape.head_group) for j in chosen]
    per_layer_m = [_split_units(fracs, shape.mlp[j]) for j in chosen]
    return [
        SubModelSpec(n_layers, d[n], tuple(per_layer_h[k][n] for k in range(n_layers)),
                     tuple(per_layer_m[k][n] for k in range(n_layers)))
        for n in range(len(weights))
    ]
