"""prepare_teacher: the head fitted on frozen features is the one saved, so a cached teacher answers the same."""

from __future__ import annotations

import pytest
import torch

import coformer
from coformer.data import RawDataset
from coformer.heads import ClassifierHead
from coformer.offline.pipeline import prepare_teacher
from tiny_split import block_images


@pytest.fixture(scope="module")
def images() -> RawDataset:
    return RawDataset("blocks", ["top", "bottom", "left"], block_images(48, 0), block_images(12, 1), block_images(24, 2))


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_cached_teacher_keeps_the_fitted_head(name: str, images: RawDataset, tmp_path) -> None:
    backbone = coformer.create_backbone(name)
    source = backbone.save(backbone.tiny(num_labels=3, seed=0), tmp_path / "ckpt")
    fresh = prepare_teacher(backbone, images, source=str(source), cache=tmp_path / "cache")
    again = prepare_teacher(backbone, images, source=str(source), cache=tmp_path / "cache")
    assert (fresh.cached, again.cached) == (False, True)
    # the fitted head reached the saved teacher: the reloaded one gives the same logits
    torch.testing.assert_close(again.test_logits, fresh.test_logits, atol=1e-5, rtol=1e-5)
    fitted = (fresh.train_logits.argmax(-1) == fresh.train.labels).float().mean()
    assert fitted > 0.5  # three classes: the head learned something worth saving


def test_a_task_head_that_is_a_copy_is_refused_before_any_work(images: RawDataset, tmp_path) -> None:
    from coformer_backbones.vit import VitBackbone

    class CopyingVit(VitBackbone):
        """The seed's distilled-DeiT mistake: a task head holding a copy of the teacher's weights."""

        def task_head(self, model: torch.nn.Module) -> ClassifierHead:
            head = ClassifierHead(model.head.in_features, model.head.out_features)
            head.load_state_dict({"out.weight": model.head.weight.detach(), "out.bias": model.head.bias.detach()})
            return head

    backbone = CopyingVit()
    source = backbone.save(backbone.tiny(num_labels=3, seed=0), tmp_path / "ckpt")
    with pytest.raises(TypeError, match="task_head\\(\\) returned a copy .* must return the model's own head"):
        prepare_teacher(backbone, images, source=str(source), cache=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
