"""Sub-model sizes for a fixed policy: every dimension of a teacher split in proportion to device compute.

Which units each sub-model then gets is :func:`coformer.assignment.assign_units`.
"""

from __future__ import annotations

from typing import Sequence

from coformer.assignment import top_layers
from coformer.backbone import UnitImportance
from coformer.spec import ModelShape, SubModelSpec


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
    With ``layers`` < L the layers are picked first — the ones :func:`~coformer.assignment.assign_units` will map the
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
