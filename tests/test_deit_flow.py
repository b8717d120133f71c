"""DeiT (plain and distilled, ``mean`` and ``concat`` features) through decompose → calibrate → aggregate →
package → load on a tiny model (issue #15, item 3).

On the seed's code the distilled ``mean`` mode handed out a copied task head, which
``prepare_teacher`` refuses, and ``concat`` built student heads projecting to d while the head
takes 2d, so calibration crashed with a shape error.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import coformer
from coformer.artifacts import load_plan, save_plan
from coformer.offline.booster import BoosterConfig, calibrate, submodel_features, train_aggregator
from coformer.data import RawDataset
from coformer.offline.decompose import proportional_specs
from coformer.heads import ClassifierHead, MeanOfLinears, head_input_dim
from coformer.offline.pipeline import decompose_policy, prepare_teacher
from coformer.spec import BUILTIN_DEVICES, Policy
from tiny_split import block_images

CASES = [("distilled", "mean"), ("distilled", "concat"), ("plain", "mean")]


@pytest.fixture(scope="module")
def images() -> RawDataset:
    return RawDataset("blocks", ["top", "bottom", "left"], block_images(36, 0), block_images(9, 1), block_images(12, 2))


def _backbone(kind: str, mode: str):
    backbone = coformer.create_backbone("deit", features=mode)
    if kind == "plain":
        backbone.tiny_arch = "deit_tiny_patch16_224"
    return backbone


@pytest.mark.parametrize(("kind", "mode"), CASES)
def test_deit_runs_the_whole_flow_and_the_packaged_plan_answers_the_same(kind, mode, images, tmp_path: Path):
    backbone = _backbone(kind, mode)
    tiny = backbone.tiny(num_labels=3, seed=0)
    assert (getattr(tiny, "dist_token", None) is not None) == (kind == "distilled")
    source = backbone.save(tiny, tmp_path / "ckpt")
    teacher = prepare_teacher(backbone, images, source=str(source), cache=tmp_path / "cache", seed=0)
    head = backbone.task_head(teacher.model)
    width = 2 * tiny.embed_dim if (kind, mode) == ("distilled", "concat") else tiny.embed_dim
    assert head_input_dim(head) == width

    devices = [BUILTIN_DEVICES[n] for n in ("jetson-nano", "orin-nano")]
    policy = Policy(proportional_specs(backbone.shape(teacher.model), [d.gflops for d in devices]), devices)
    parts = decompose_policy(backbone, teacher, policy, calib_size=8)
    config = BoosterConfig(epochs=1, batch_size=12, aggregator_epochs=3, seed=0, mixed_precision="no")
    hard = teacher.train_logits.argmax(-1)
    result = calibrate(backbone, teacher.model, parts.submodels, teacher.train, config=config,
                       teacher_labels=hard, on_progress=False)
    assert all(h.proj.out_features == width for h in result.student_heads)
    feats = submodel_features(result.submodels, teacher.train)
    aggregator = coformer.create_aggregator("mlp_fusion", feature_dims=[m.feature_dim for m in result.submodels],
                                            embed_dim=head_input_dim(head), task_head=head,
                                            student_heads=result.student_heads)
    train_aggregator(aggregator, feats, teacher.train.labels, config=config, teacher_labels=hard, on_progress=False)
    aggregator.eval()
    save_plan(tmp_path / "plan", submodels=result.submodels, aggregator=aggregator, task_head=head,
              student_heads=result.student_heads, meta={"backbone": "deit", "figures": {}})

    plan = load_plan(tmp_path / "plan")
    loaded = plan.submodels()
    test = teacher.test.batch(range(len(teacher.test)))
    with torch.no_grad():
        before = aggregator([m(**test) for m in result.submodels])
        after = plan.aggregator([m(**test) for m in loaded])
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)
    assert isinstance(plan.aggregator.head.out, torch.nn.Linear)  # rebuilt as a plain head from config


def test_distilled_task_head_holds_the_teachers_own_heads_and_fitting_fits_them(images, tmp_path: Path):
    backbone = _backbone("distilled", "mean")
    source = backbone.save(backbone.tiny(num_labels=3, seed=0), tmp_path / "ckpt")
    fresh = prepare_teacher(backbone, images, source=str(source), cache=tmp_path / "cache")
    again = prepare_teacher(backbone, images, source=str(source), cache=tmp_path / "cache")
    assert (fresh.cached, again.cached) == (False, True)
    torch.testing.assert_close(again.test_logits, fresh.test_logits, atol=1e-5, rtol=1e-5)
    assert (fresh.train_logits.argmax(-1) == fresh.train.labels).float().mean() > 0.5


def test_concat_head_reproduces_timm_and_round_trips_as_a_plain_linear():
    backbone = _backbone("distilled", "concat")
    model = backbone.tiny(num_labels=3, seed=1)
    with torch.no_grad():  # distinct heads, so the average is not trivially either one
        model.head_dist.weight.add_(0.3)
    batch = backbone.example_batch(model, 3)
    head = backbone.task_head(model)
    assert isinstance(head.out, MeanOfLinears)
    with torch.no_grad():
        torch.testing.assert_close(backbone.forward_teacher(model, batch), model(batch["pixel_values"]),
                                   atol=1e-5, rtol=1e-4)
    owned = {id(p) for p in model.parameters()}
    assert all(id(p) in owned for p in head.parameters())
    plain = ClassifierHead.from_config(head.config)
    plain.load_state_dict(head.state_dict())
    feats = backbone.features(model, batch)
    with torch.no_grad():
        torch.testing.assert_close(plain(feats), head(feats))
    # loading back into the merged head sets both timm heads so that they average to the state
    snapshot = {k: v.clone() for k, v in head.state_dict().items()}
    with torch.no_grad():
        model.head.weight.zero_()
    head.load_state_dict(snapshot)
    with torch.no_grad():
        torch.testing.assert_close(head(feats), plain(feats))


@pytest.mark.parametrize("mode", ["mean", "concat"])
def test_evaluator_scores_distilled_deit_policies_in_both_modes(mode: str):
    """L_val scatters a sub-model's features into the head's input, block by block in concat mode
    (the seed scattered 2·d_n values into d_n channels: a shape error)."""
    from coformer.data import TensorDataset
    from coformer.offline.evaluator import Evaluator

    backbone = _backbone("distilled", mode)
    model = backbone.tiny(num_labels=3, seed=0)
    batch = backbone.example_batch(model, 6, seed=2)
    with torch.no_grad():
        labels = backbone.forward_teacher(model, batch).argmax(-1)
    devices = [BUILTIN_DEVICES[n] for n in ("jetson-nano", "orin-nano")]
    val = TensorDataset(batch, labels)
    ev = Evaluator(backbone, model, devices, val=val)
    alone = Evaluator(backbone, model, devices[:1], val=val)
    full = alone.evaluate(Policy([backbone.shape(model).full_spec()], devices[:1]))
    with torch.no_grad():  # the full spec is the teacher: its loss is the teacher's own CE on its labels
        teacher_ce = torch.nn.functional.cross_entropy(backbone.forward_teacher(model, batch), labels)
    assert full.L_val == pytest.approx(float(teacher_ce), rel=1e-4, abs=1e-5)
    policy = Policy(proportional_specs(backbone.shape(model), [1.0, 2.0]), devices)
    assert torch.isfinite(torch.tensor(ev.evaluate(policy).L_val))
