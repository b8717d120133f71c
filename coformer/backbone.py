"""The interface a backbone plugin implements: load, shape, importance, slice, task head.

A backbone knows one architecture family. The core never looks inside a model; it only
calls these methods. See ``plugins/backbones/coformer_backbones/_hf_common.py`` for the pattern (a family
on top of it, e.g. ``bert.py``, only says where its weights live).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Sequence

from torch import Tensor, nn

from coformer.assignment import UnitImportance, assign_units
from coformer.spec import ModelShape, SubModelSpec, UnitSelection

Batch = dict[str, Tensor]


class SubModel(nn.Module):
    """A sliced sub-model: ``forward(**batch)`` returns its feature vector ``[B, feature_dim]``.

    ``config`` is JSON data from which :meth:`Backbone.build_submodel` rebuilds the same
    architecture; weights travel separately as safetensors.
    """

    config: dict[str, Any]
    feature_dim: int


class TensorParallelHost(nn.Module):
    """The coordinator's part of a tensor-parallel split (returned by :meth:`Backbone.tensor_host`).

    The coordinator embeds the input, then for every layer and every phase (e.g. attention,
    then MLP) sends the hidden state to each shard, sums their partial outputs and calls
    :meth:`combine` (residual, bias, normalisation); finally :meth:`pool` gives the features.
    """

    #: Layers to run, each in ``phases`` partial-sum rounds.
    num_layers: int
    phases: int
    #: Batch keys every shard call needs besides ``hidden_states``, ``layer`` and ``phase``.
    shard_inputs: tuple[str, ...]

    def embed(self, batch: Batch) -> Tensor:
        """The hidden state entering layer 0."""
        raise NotImplementedError

    def combine(self, layer: int, phase: int, hidden: Tensor, partial: Tensor) -> Tensor:
        """The hidden state after ``phase`` of ``layer``, given the shards' summed partial output."""
        raise NotImplementedError

    def pool(self, hidden: Tensor, batch: Batch) -> Tensor:
        """Features ``[B, d]`` from the last hidden state (what the task head takes)."""
        raise NotImplementedError


class Backbone(ABC):
    """One architecture family, as a plugin sees it.

    Implementations must obey the exactness rule: ``slice(model, UnitSelection.full(shape))``
    reproduces ``features(model, batch)``, and a selection that drops heads, MLP neurons or
    whole layers equals ``features(mask(model, selection), batch)``.
    """

    name: ClassVar[str] = "backbone"
    #: What ``prepare`` accepts: "text" (list of str) or "image" (float tensor [B, C, H, W]).
    modality: ClassVar[str] = "text"
    #: :class:`~coformer.offline.booster.BoosterConfig` fields this family calibrates best with (measured
    #: by the plugin's author); ``BoosterConfig.for_backbone`` applies them under the caller's own.
    calibration_defaults: ClassVar[dict[str, Any]] = {}

    @abstractmethod
    def load(self, source: str | Path | None = None, *, num_labels: int | None = None, **options: Any) -> nn.Module:
        """Load the teacher from a local directory/checkpoint, or the embedded default when ``None``.

        ``num_labels`` attaches a fresh classification task head of that size; ``options`` are
        backbone-specific (e.g. ``max_length`` for text backbones) and unknown ones raise ``TypeError``.
        """

    @abstractmethod
    def shape(self, model: nn.Module) -> ModelShape:
        """The teacher's decomposable dimensions."""

    @abstractmethod
    def features(self, model: nn.Module, batch: Batch) -> Tensor:
        """The teacher's feature vector ``[B, d]``: what the task head takes."""

    @abstractmethod
    def task_head(self, model: nn.Module) -> nn.Module:
        """The teacher's own task head: features ``[B, d]`` → logits.

        Hand out the model's own parameters, not a copy: the demo fits this head and then saves
        the teacher (``prepare_teacher`` refuses a copy). Callers that train a head copy it first.
        """

    @abstractmethod
    def importance(self, model: nn.Module, batch: Batch) -> UnitImportance:
        """Score every unit (layers, channels, heads, MLP neurons) on a calibration batch."""

    @abstractmethod
    def slice(self, model: nn.Module, selection: UnitSelection) -> SubModel:
        """Build a smaller real module holding only the selected units' weights."""

    @abstractmethod
    def build_submodel(self, config: dict[str, Any]) -> SubModel:
        """An untrained sub-model with the architecture ``config`` describes (weights loaded after)."""

    @abstractmethod
    def prepare(self, model: nn.Module, examples: Sequence[Any]) -> Batch:
        """Turn raw examples (texts or images, per :attr:`modality`) into a model batch."""

    @abstractmethod
    def tiny(self, *, num_labels: int = 3, seed: int = 0) -> nn.Module:
        """A small randomly initialised teacher of the exact architecture (for tests)."""

    @abstractmethod
    def example_batch(self, model: nn.Module, batch_size: int = 2, seed: int = 0) -> Batch:
        """A valid input batch for ``model`` (for tests and profiling)."""

    @abstractmethod
    def mask(self, model: nn.Module, selection: UnitSelection) -> nn.Module:
        """A copy of the teacher with unselected heads/MLP neurons zeroed and unselected layers skipped.

        Channels must all be selected: channel removal has no masking identity.
        """

    def save(self, model: nn.Module, path: str | Path) -> Path:
        """Write the teacher (weights as safetensors, config as JSON) so :meth:`load` reads it back.

        Backbones that cannot save raise :class:`NotImplementedError` naming themselves.
        """
        raise NotImplementedError(f"backbone {self.name!r} cannot save teachers")

    # -- optional: baselines (pipeline and tensor-parallel splits) ---------------------------------

    def pipeline_stage(self, model: nn.Module, layers: Sequence[int], *, first: bool, last: bool) -> SubModel:
        """One stage of a pipeline split: the teacher's ``layers`` (ascending), unchanged.

        The first stage takes the model batch and embeds it; later stages take
        ``hidden_states`` plus the batch keys listed in ``config["stage_inputs"]``. The last
        stage returns the features ``[B, d]``; the others return hidden states. Backbones that
        cannot be pipelined raise :class:`NotImplementedError` (the default).
        """
        raise NotImplementedError(f"backbone {self.name!r} has no pipeline stages")

    def tensor_shard(self, model: nn.Module, heads: Sequence[Sequence[int]],
                     neurons: Sequence[Sequence[int]]) -> SubModel:
        """One device's share of a tensor-parallel split: per layer, these heads and MLP neurons.

        ``forward(hidden_states, layer, phase, **shard_inputs)`` (``layer``/``phase`` as integer
        tensors) returns this device's partial sum for that phase of that layer, without bias:
        the shards' outputs add up to the layer's full projection. An empty list of units for a
        layer gives a zero partial. The default raises :class:`NotImplementedError`.
        """
        raise NotImplementedError(f"backbone {self.name!r} has no tensor-parallel shards")

    def tensor_host(self, model: nn.Module) -> TensorParallelHost:
        """The coordinator's side of a tensor-parallel split (embedding, combine, pooling)."""
        raise NotImplementedError(f"backbone {self.name!r} has no tensor-parallel host")

    def forward_teacher(self, model: nn.Module, batch: Batch) -> Tensor:
        """Teacher logits: ``task_head(features)``."""
        return self.task_head(model)(self.features(model, batch))

    def decompose(
        self,
        model: nn.Module,
        specs: Sequence[SubModelSpec],
        *,
        importance: UnitImportance | None = None,
        batch: Batch | None = None,
    ) -> list[SubModel]:
        """Assign units disjointly by importance and slice one sub-model per spec."""
        if importance is None:
            if batch is None:
                raise ValueError("decompose needs either `importance` or a calibration `batch`")
            importance = self.importance(model, batch)
        selections = assign_units(self.shape(model), specs, importance)
        return [self.slice(model, s) for s in selections]
