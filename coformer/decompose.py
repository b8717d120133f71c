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
from coformer.spec import ConstraintError, ModelShape, SubModelSpec, UnitSelection, Violation, check_structure


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


def assign_units(
    shape: ModelShape, specs: Sequence[SubModelSpec], importance: UnitImportance
) -> list[UnitSelection]:
    """Choose concrete units for each spec: top-l_n layers, then disjoint channels/heads/neurons."""
    violations = check_structure(specs, shape)
    if violations:
        raise ConstraintError(violations)
    layer_order = torch.argsort(importance.layers, descending=True, stable=True).tolist()
    layers = [tuple(sorted(layer_order[: s.layers])) for s in specs]
    channels = deal(importance.channels, [s.embed_dim for s in specs])

    heads: list[list[tuple[int, ...]]] = [[] for _ in specs]
    mlp: list[list[tuple[int, ...]]] = [[] for _ in specs]
    for j in range(shape.layers):
        members = [(n, layers[n].index(j)) for n in range(len(specs)) if j in layers[n]]
        if not members:
            continue
        h_quota = [specs[n].heads[k] for n, k in members]
        m_quota = [specs[n].mlp[k] for n, k in members]
        over_h, over_m = sum(h_quota) - shape.heads[j], sum(m_quota) - shape.mlp[j]
        if over_h > 0 or over_m > 0:
            what = "heads" if over_h > 0 else "MLP neurons"
            raise ConstraintError([Violation(
                "C3" if over_h > 0 else "C4",
                f"teacher layer {j}: the sub-models that keep it ask for {sum(h_quota) if over_h > 0 else sum(m_quota)} "
                f"{what} but it has {shape.heads[j] if over_h > 0 else shape.mlp[j]} "
                f"(over by {max(over_h, over_m)}); give fewer {what} to the layers these sub-models share",
                None, float(max(over_h, over_m)))])
        for (n, _), hs in zip(members, deal(importance.heads[j], h_quota, shape.head_group)):
            heads[n].append(hs)
        for (n, _), ms in zip(members, deal(importance.mlp[j], m_quota)):
            mlp[n].append(ms)
    return [UnitSelection(layers[n], channels[n], tuple(heads[n]), tuple(mlp[n])) for n in range(len(specs))]


def proportional_specs(shape: ModelShape, weights: Sequence[float], layers: int | None = None) -> list[SubModelSpec]:
    """Split every dimension of ``shape`` across sub-models in proportion to ``weights``.

    The demo's fixed policy: sizes proportional to device compute. Every sub-model keeps
    ``layers`` layers (all by default) and at least one head group, neuron and channel.
    """
    total = float(sum(weights))
    fracs = [w / total for w in weights]

    def split(n_units: int, group: int = 1) -> list[int]:
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

    n_layers = layers or shape.layers
    d = split(shape.embed_dim)
    per_layer_h = [split(shape.heads[k], shape.head_group) for k in range(n_layers)]
    per_layer_m = [split(shape.mlp[k]) for k in range(n_layers)]
    return [
        SubModelSpec(n_layers, d[n], tuple(per_layer_h[k][n] for k in range(n_layers)),
                     tuple(per_layer_m[k][n] for k in range(n_layers)))
        for n in range(len(weights))
    ]
