"""The contract every registered backbone obeys, checked on its tiny model through the Backbone API only.

A new built-in or third-party backbone gets these tests for free: exactness (full selection =
teacher; removed heads / MLP neurons / layers = masked teacher), disjoint decomposition within
C1–C4, real data-driven importance, calibration defaults the booster accepts, safetensors round
trip of sub-models, and measured costs below the teacher's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load as st_load
from torch import Tensor, nn

import coformer
from coformer.artifacts import submodel_artifact
from coformer.backbone import Backbone, Batch
from coformer.assignment import UnitImportance
from coformer.offline.booster import BoosterConfig
from coformer.assignment import assign_units
from coformer.offline.decompose import proportional_specs
from coformer.measure import measure_cost
from coformer.spec import ModelShape, UnitSelection, check_structure

BACKBONES = sorted(info.name for info in coformer.list_plugins("backbone"))
ATOL, RTOL = 1e-5, 1e-4


@dataclass
class Case:
    """One backbone's tiny teacher, a batch, and the teacher's reference outputs."""

    name: str
    backbone: Backbone
    model: nn.Module
    batch: Batch
    shape: ModelShape
    features: Tensor
    importance: UnitImportance


@pytest.fixture(scope="module", params=BACKBONES)
def case(request: pytest.FixtureRequest) -> Case:
    """Build each registered backbone's tiny teacher once per module."""
    torch.manual_seed(0)
    backbone = coformer.create_backbone(request.param)
    model = backbone.tiny(num_labels=3, seed=0)
    batch = backbone.example_batch(model, batch_size=2, seed=0)
    with torch.no_grad():
        feats = backbone.features(model, batch).detach().clone()
    imp = backbone.importance(model, backbone.example_batch(model, batch_size=4, seed=1))
    return Case(request.param, backbone, model, batch, backbone.shape(model), feats, imp)


def _run(module: nn.Module, batch: Batch) -> Tensor:
    with torch.no_grad():
        return module(**batch)


def _masked(case: Case, sel: UnitSelection) -> Tensor:
    try:
        masked = case.backbone.mask(case.model, sel)
    except NotImplementedError as exc:
        pytest.skip(f"{case.name}: mask() does not support this removal: {exc}")
    with torch.no_grad():
        return case.backbone.features(masked, case.batch)


def _every_other(n_units: int, group: int = 1) -> tuple[int, ...]:
    """Keep even-numbered groups of ``group`` units (all of them when there is only one group)."""
    groups = n_units // group
    kept = range(0, groups, 2) if groups > 1 else range(groups)
    return tuple(g * group + i for g in kept for i in range(group))


def _selection(shape: ModelShape, *, heads: bool = False, mlp: bool = False, layers: bool = False) -> UnitSelection:
    kept_layers = tuple(j for j in range(shape.layers) if not (layers and shape.layers > 1 and j == shape.layers // 2))
    return UnitSelection(
        kept_layers,
        tuple(range(shape.embed_dim)),
        tuple(_every_other(shape.heads[j], shape.head_group) if heads else tuple(range(shape.heads[j]))
              for j in kept_layers),
        tuple(_every_other(shape.mlp[j]) if mlp else tuple(range(shape.mlp[j])) for j in kept_layers),
    )


def _decompose(case: Case, n: int) -> tuple[list, list[UnitSelection]]:
    groups = min(h // case.shape.head_group for h in case.shape.heads)
    if n > groups:
        pytest.skip(f"{case.name}: the tiny model has {groups} head group(s) per layer, fewer than N={n}")
    specs = proportional_specs(case.shape, [1.0 + i for i in range(n)])
    return specs, assign_units(case.shape, specs, case.importance)


def test_registered_name_and_modality(case: Case) -> None:
    assert case.backbone.name == case.name
    assert case.backbone.modality in {"text", "image"}


def test_calibration_defaults_are_booster_settings(case: Case) -> None:
    config = BoosterConfig.for_backbone(case.backbone)  # raises on a field BoosterConfig lacks
    assert all(getattr(config, k) == v for k, v in case.backbone.calibration_defaults.items())


def test_tiny_is_deterministic(case: Case) -> None:
    again = case.backbone.tiny(num_labels=3, seed=0)
    with torch.no_grad():
        torch.testing.assert_close(case.backbone.features(again, case.batch), case.features, atol=0, rtol=0)


def test_features_and_task_head(case: Case) -> None:
    assert case.features.shape == (2, case.shape.embed_dim)
    assert torch.isfinite(case.features).all()
    with torch.no_grad():
        logits = case.backbone.forward_teacher(case.model, case.batch)
    assert logits.shape == (2, 3)


def test_full_selection_reproduces_teacher(case: Case) -> None:
    sub = case.backbone.slice(case.model, UnitSelection.full(case.shape))
    assert sub.feature_dim == case.shape.embed_dim
    torch.testing.assert_close(_run(sub, case.batch), case.features, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("removed", ["heads", "mlp", "layers", "all"])
def test_removed_units_equal_masked_teacher(case: Case, removed: str) -> None:
    flags = {"heads": removed in ("heads", "all"), "mlp": removed in ("mlp", "all"),
             "layers": removed in ("layers", "all")}
    sel = _selection(case.shape, **flags)
    assert sel != UnitSelection.full(case.shape), "the tiny model is too small to remove any unit"
    sliced = _run(case.backbone.slice(case.model, sel), case.batch)
    masked = _masked(case, sel)
    torch.testing.assert_close(sliced, masked, atol=ATOL, rtol=RTOL)
    # the removal must matter, or the comparison above proves nothing
    assert not torch.allclose(masked, case.features, atol=1e-4)


def test_slice_and_mask_leave_teacher_untouched(case: Case) -> None:
    sel = _selection(case.shape, heads=True, mlp=True, layers=True)
    case.backbone.slice(case.model, sel)
    try:
        case.backbone.mask(case.model, sel)
    except NotImplementedError:
        pass
    with torch.no_grad():
        torch.testing.assert_close(case.backbone.features(case.model, case.batch), case.features, atol=0, rtol=0)


def test_importance_is_data_driven(case: Case) -> None:
    imp, shape = case.importance, case.shape
    assert imp.layers.shape == (shape.layers,)
    assert imp.channels.shape == (shape.embed_dim,)
    assert [h.shape[0] for h in imp.heads] == list(shape.heads)
    assert [m.shape[0] for m in imp.mlp] == list(shape.mlp)
    for scores in (imp.channels, torch.cat(imp.heads), torch.cat(imp.mlp)):
        assert torch.isfinite(scores).all()
        assert scores.std() > 0, "importance scores are constant: they were not measured from data"
    other = case.backbone.importance(case.model, case.backbone.example_batch(case.model, batch_size=4, seed=7))
    assert not torch.allclose(torch.cat(other.mlp), torch.cat(imp.mlp)), "scores ignore the calibration batch"
    assert UnitImportance.from_dict(json.loads(json.dumps(imp.to_dict()))).channels.shape == imp.channels.shape


@pytest.mark.parametrize("n", [2, 3])
def test_decomposition_is_disjoint_and_within_teacher(case: Case, n: int) -> None:
    specs, sels = _decompose(case, n)
    assert check_structure(specs, case.shape) == []
    assert [s.spec for s in sels] == specs
    channels = [c for s in sels for c in s.channels]
    assert len(channels) == len(set(channels)) <= case.shape.embed_dim
    for j in range(case.shape.layers):
        heads = [h for s in sels if j in s.layers for h in s.heads[s.layers.index(j)]]
        mlp = [m for s in sels if j in s.layers for m in s.mlp[s.layers.index(j)]]
        assert len(heads) == len(set(heads)) <= case.shape.heads[j]
        assert len(mlp) == len(set(mlp)) <= case.shape.mlp[j]
    subs = case.backbone.decompose(case.model, specs, importance=case.importance)
    for sub, sel, spec in zip(subs, sels, specs, strict=True):
        out = _run(sub, case.batch)
        assert sub.feature_dim == spec.embed_dim
        assert out.shape == (2, spec.embed_dim) and torch.isfinite(out).all()
        torch.testing.assert_close(out, _run(case.backbone.slice(case.model, sel), case.batch), atol=0, rtol=0)


def test_submodel_safetensors_round_trip(case: Case) -> None:
    specs, sels = _decompose(case, 2)
    sub = case.backbone.slice(case.model, sels[0])
    art = submodel_artifact(sub)
    config = json.loads(json.dumps(art.config))
    assert config["backbone"] == case.name
    rebuilt = case.backbone.build_submodel(config)
    rebuilt.load_state_dict(st_load(art.weights), strict=True)
    rebuilt.eval()
    torch.testing.assert_close(_run(rebuilt, case.batch), _run(sub, case.batch), atol=0, rtol=0)


class _TeacherFeatures(nn.Module):
    """``forward(**batch)`` = the teacher's features, so the teacher can be measured like a sub-model."""

    def __init__(self, backbone: Backbone, model: nn.Module):
        super().__init__()
        self.backbone, self.model = backbone, model

    def forward(self, **batch: Tensor) -> Tensor:
        return self.backbone.features(self.model, batch)


def test_submodel_costs_below_teacher(case: Case) -> None:
    teacher = measure_cost(_TeacherFeatures(case.backbone, case.model), case.batch)
    assert teacher.flops > 0 and teacher.params > 0
    _, sels = _decompose(case, 2)
    for sel in sels:
        cost = measure_cost(case.backbone.slice(case.model, sel), case.batch)
        assert 0 < cost.flops < teacher.flops
        assert 0 < cost.params < teacher.params


def test_teacher_save_load_round_trip(case: Case, tmp_path) -> None:
    try:
        case.backbone.save(case.model, tmp_path / "teacher")
    except NotImplementedError as exc:
        pytest.skip(str(exc))
    loaded = case.backbone.load(tmp_path / "teacher")
    assert case.backbone.shape(loaded) == case.shape
    with torch.no_grad():
        torch.testing.assert_close(case.backbone.features(loaded, case.batch), case.features, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(case.backbone.forward_teacher(loaded, case.batch),
                                   case.backbone.forward_teacher(case.model, case.batch), atol=ATOL, rtol=RTOL)


def test_builtin_backbone_modules_import_cleanly() -> None:
    """A built-in backbone module that exists must import; missing ones are merely not written yet."""
    broken = [f"{f.name}: {f.error}" for f in coformer.load_failures()
              if f.value.startswith("coformer_backbones.") and f"No module named '{f.value}'" not in f.error]
    assert not broken, "backbone plugins failed to import:\n" + "\n".join(broken)
