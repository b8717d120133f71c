"""Pipeline stages and tensor-parallel shards for every backbone family, written once.

The baselines CoFormer is compared with (:mod:`coformer.experiments.baselines`) need, from a backbone, the
teacher's consecutive layers as a *pipeline stage* and, per layer, a subset of heads and MLP
neurons as a *tensor shard* whose outputs add up to the layer's projections. Both are built here
from the family's own sliced sub-model (``backbone.slice``), so a family only has to let its
compact sub-model be run block by block — the :class:`LayeredModel` protocol:

* ``embed_input(batch)`` — the hidden state entering block 0;
* ``context(hidden, batch)`` — per-call data every block needs (masks, rotary tables, ...);
* ``run_block(k, hidden, ctx)`` — block ``k`` in full (and any downsampling before it);
* ``branch(k, phase, hidden, ctx)`` — phase 0 (attention) / 1 (MLP) output of block ``k``;
* ``output_bias(k, phase)`` — the part of that output that does not depend on the units
  (output-projection bias, scaled where the block scales its branch);
* ``merge(k, phase, hidden, out)`` — residual (and post-norm, downsampling) given the branch output;
* ``finish(hidden, batch)`` — final norm and pooling: the features;
* ``zero_output_biases()`` and ``drop_parts(embed=..., finish=...)`` — what a shard or a later
  stage does not need;
* optionally ``layered`` — False when this particular sub-model cannot be run block by block.

Everything is the teacher's own weights, so the baselines are exact up to the fp16 of the wire.
The mixin :class:`ParallelBaselines` gives a :class:`~coformer.backbone.Backbone` the three
methods; ``build_parallel`` rebuilds the worker-side modules from JSON config.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn

from coformer.backbone import Batch, SubModel, TensorParallelHost
from coformer.spec import UnitSelection

PIPELINE_STAGE = "pipeline_stage"
TENSOR_SHARD = "tensor_shard"
PARALLEL_KINDS = (PIPELINE_STAGE, TENSOR_SHARD)


@runtime_checkable
class LayeredModel(Protocol):
    """A compact sub-model that can be run block by block (see the module docstring)."""

    config: dict[str, Any]
    #: batch keys a block needs besides the hidden state (e.g. the attention mask)
    block_inputs: tuple[str, ...]

    def embed_input(self, batch: Batch) -> Tensor:
        """The hidden state entering block 0."""

    def context(self, hidden: Tensor, batch: Batch) -> Any:
        """Per-call data every block needs (masks, rotary tables, ...)."""

    def run_block(self, k: int, hidden: Tensor, ctx: Any) -> Tensor:
        """Block ``k`` in full."""

    def branch(self, k: int, phase: int, hidden: Tensor, ctx: Any) -> Tensor:
        """Phase 0 (attention) / 1 (MLP) output of block ``k``."""

    def output_bias(self, k: int, phase: int) -> Tensor | float:
        """The part of that output that does not depend on the units."""

    def merge(self, k: int, phase: int, hidden: Tensor, out: Tensor) -> Tensor:
        """Residual (and post-norm, downsampling) given the branch output."""

    def finish(self, hidden: Tensor, batch: Batch) -> Tensor:
        """Final norm and pooling: the features."""

    def zero_output_biases(self) -> None:
        """Drop the output-projection biases (a shard returns partial sums without them)."""

    def drop_parts(self, *, embed: bool, finish: bool) -> None:
        """Free the embedding and/or final parts a stage or shard never runs."""


def _batch(inputs: dict[str, Tensor | None]) -> Batch:
    return {k: v for k, v in inputs.items() if v is not None}


class PipelineStage(SubModel):
    """Consecutive teacher blocks at full width; the first stage embeds, the last one pools."""

    def __init__(self, model: LayeredModel, config: dict[str, Any]):
        super().__init__()
        self.model = model
        self.config = config
        self.first, self.last = bool(config["first"]), bool(config["last"])
        self.feature_dim = int(config["feature_dim"])

    def forward(self, hidden_states: Tensor | None = None, **inputs: Tensor) -> Tensor:
        """First stage: the model batch; later stages: ``hidden_states`` (any float dtype) + ``stage_inputs``.

        Returns the hidden state after the stage's blocks, or the features from the last stage.
        """
        batch = _batch(inputs)
        if self.first:
            x = self.model.embed_input(batch)
        elif hidden_states is None:
            raise ValueError("a later pipeline stage needs hidden_states from the stage before it")
        else:
            x = hidden_states.float()
        ctx = self.model.context(x, batch)
        for k in range(len(self.config["teacher_layers"])):
            x = self.model.run_block(k, x, ctx)
        return self.model.finish(x, batch) if self.last else x


class TensorShard(SubModel):
    """A device's heads and MLP neurons in every block; ``forward`` returns one phase's partial sum (no bias)."""

    def __init__(self, model: LayeredModel, config: dict[str, Any]):
        super().__init__()
        self.model = model
        self.config = config
        self.active = [[bool(a) for a in pair] for pair in config["active"]]
        self.feature_dim = int(config["feature_dim"])

    def forward(self, hidden_states: Tensor, layer: Tensor, phase: Tensor, **inputs: Tensor) -> Tensor:
        """Σ over this shard's units of ``phase`` in block ``layer``: zero when it holds none there."""
        k, p = int(layer), int(phase)
        if not 0 <= k < len(self.active) or p not in (0, 1):
            raise ValueError(f"layer {k} / phase {p} out of range: {len(self.active)} layers, phases 0 and 1")
        x = hidden_states.float()
        if not self.active[k][p]:
            return torch.zeros_like(x)
        return self.model.branch(k, p, x, self.model.context(x, _batch(inputs)))


class LayeredHost(TensorParallelHost):
    """The coordinator's side of a tensor-parallel split: embed, add bias + residual (+ norm), pool."""

    phases = 2

    def __init__(self, model: LayeredModel, num_layers: int):
        super().__init__()
        self.model = model
        self.num_layers = num_layers
        self.shard_inputs = tuple(model.block_inputs)

    def embed(self, batch: Batch) -> Tensor:
        """The hidden state entering block 0."""
        return self.model.embed_input(batch)

    def combine(self, layer: int, phase: int, hidden: Tensor, partial: Tensor) -> Tensor:
        """The block's residual update given the shards' summed partial output."""
        out = partial.float() + self.model.output_bias(layer, phase)
        return self.model.merge(layer, phase, hidden, out)

    def pool(self, hidden: Tensor, batch: Batch) -> Tensor:
        """The teacher's final norm and pooling."""
        return self.model.finish(hidden, batch)


def _wrap(model: SubModel, config: dict[str, Any]) -> SubModel:
    kind = config["kind"]
    if kind == PIPELINE_STAGE:
        model.drop_parts(embed=not config["first"], finish=not config["last"])  # type: ignore[attr-defined]
        return PipelineStage(model, config).eval()  # type: ignore[arg-type]
    model.zero_output_biases()  # type: ignore[attr-defined]
    model.drop_parts(embed=True, finish=True)  # type: ignore[attr-defined]
    return TensorShard(model, config).eval()  # type: ignore[arg-type]


def build_parallel(backbone: Any, config: dict[str, Any]) -> SubModel:
    """Rebuild a pipeline stage or tensor shard from its JSON config (weights are loaded after)."""
    kind = config.get("kind")
    if kind not in PARALLEL_KINDS:
        raise ValueError(f"unknown parallel module kind {kind!r}; expected one of {PARALLEL_KINDS}")
    return _wrap(backbone.build_submodel(config["compact"]), config)


def _distinct(idx: Sequence[int], n: int) -> bool:
    return all(0 <= i < n for i in idx) and len(set(idx)) == len(idx)


class ParallelBaselines:
    """``pipeline_stage``, ``tensor_shard``, ``tensor_host`` and the config dispatch, for any backbone whose
    ``slice`` returns a :class:`LayeredModel`."""

    name: str

    def _layered(self, model: nn.Module, selection: UnitSelection) -> Any:
        sub = self.slice(model, selection)  # type: ignore[attr-defined]
        if not isinstance(sub, LayeredModel) or not getattr(sub, "layered", True):
            raise NotImplementedError(f"backbone {self.name!r}: its sub-models ({type(sub).__name__}) cannot be run "
                                      f"block by block, so it has no pipeline stages or tensor-parallel shards")
        return sub

    def _full(self, model: nn.Module, layers: Sequence[int]) -> UnitSelection:
        shape = self.shape(model)  # type: ignore[attr-defined]
        return UnitSelection(tuple(layers), tuple(range(shape.embed_dim)),
                             tuple(tuple(range(shape.heads[j])) for j in layers),
                             tuple(tuple(range(shape.mlp[j])) for j in layers))

    def layer_starts_stage(self, model: nn.Module, layer: int) -> bool:
        """Whether teacher layer ``layer`` opens a stage of a staged model (Swin); True for plain stacks."""
        return True

    def pipeline_stage(self, model: nn.Module, layers: Sequence[int], *, first: bool, last: bool) -> SubModel:
        """Teacher layers ``layers`` (consecutive, ascending) at full width as one pipeline stage."""
        n = self.shape(model).layers  # type: ignore[attr-defined]
        layers = [int(i) for i in layers]
        if not layers or layers != list(range(layers[0], layers[-1] + 1)) or not 0 <= layers[0] <= layers[-1] < n:
            raise ValueError(f"pipeline stage layers {layers} must be consecutive ascending indices in [0, {n})")
        sub = self._layered(model, self._full(model, layers))
        if not self.layer_starts_stage(model, layers[0]):
            sub.config["starts_mid_stage"] = True
        config = {"backbone": self.name, "kind": PIPELINE_STAGE, "first": bool(first), "last": bool(last),
                  "teacher_layers": layers, "feature_dim": sub.feature_dim,
                  "stage_inputs": list(sub.block_inputs), "compact": sub.config}
        return _wrap(sub, config)

    def tensor_shard(self, model: nn.Module, heads: Sequence[Sequence[int]],
                     neurons: Sequence[Sequence[int]]) -> SubModel:
        """Per teacher layer, the heads ``heads[k]`` and MLP neurons ``neurons[k]`` (possibly empty)."""
        shape = self.shape(model)  # type: ignore[attr-defined]
        if len(heads) != shape.layers or len(neurons) != shape.layers:
            raise ValueError(f"a tensor shard needs one head list and one neuron list per layer ({shape.layers}); "
                             f"got {len(heads)} and {len(neurons)}")
        for k in range(shape.layers):
            if not _distinct(heads[k], shape.heads[k]):
                raise ValueError(f"layer {k}: heads {list(heads[k])} must be distinct indices in [0, {shape.heads[k]})")
            if not _distinct(neurons[k], shape.mlp[k]):
                raise ValueError(f"layer {k}: MLP neurons must be distinct indices in [0, {shape.mlp[k]})")
        # slicing keeps at least one unit per layer; a layer/phase without units is marked inactive instead
        g = shape.head_group
        sel_heads = tuple(tuple(sorted(h)) if h else tuple(range(g)) for h in heads)
        sel_mlp = tuple(tuple(sorted(m)) if m else (0,) for m in neurons)
        sel = UnitSelection(tuple(range(shape.layers)), tuple(range(shape.embed_dim)), sel_heads, sel_mlp)
        sub = self._layered(model, sel)
        config = {"backbone": self.name, "kind": TENSOR_SHARD, "feature_dim": sub.feature_dim,
                  "active": [[bool(h), bool(m)] for h, m in zip(heads, neurons)],
                  "teacher_heads": [sorted(map(int, h)) for h in heads],
                  "teacher_neurons": [sorted(map(int, m)) for m in neurons], "compact": sub.config}
        return _wrap(sub, config)

    def tensor_host(self, model: nn.Module) -> TensorParallelHost:
        """The whole teacher, run by the coordinator as embed → combine per block and phase → pool."""
        n = self.shape(model).layers  # type: ignore[attr-defined]
        return LayeredHost(self._layered(model, self._full(model, range(n))), n).eval()


__all__ = ["LayeredHost", "LayeredModel", "PARALLEL_KINDS", "ParallelBaselines", "PipelineStage", "TensorShard",
           "build_parallel"]
