"""vit / deit / swin on tiny random timm models of the exact architectures: exactness against timm,
layer-scale and distillation-token handling, Swin's channel mapping, and local checkpoint round trips."""

from __future__ import annotations

import json

import pytest
import timm
import torch

import coformer
from coformer.spec import UnitSelection

NAMES = ["vit", "deit", "swin"]


def _feats(backbone, model, batch):
    with torch.no_grad():
        return backbone.features(model, batch)


@pytest.mark.parametrize("name", NAMES)
def test_task_head_reproduces_timm_logits(name: str) -> None:
    backbone = coformer.create_backbone(name, **({"features": "concat"} if name == "deit" else {}))
    model = backbone.tiny(num_labels=4, seed=3)
    batch = backbone.example_batch(model, 3, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(backbone.forward_teacher(model, batch), model(batch["pixel_values"]),
                                   atol=1e-5, rtol=1e-4)


def test_deit_tiny_is_distilled_and_mean_head_is_the_average_of_heads() -> None:
    backbone = coformer.create_backbone("deit")
    model = backbone.tiny(num_labels=3)
    assert model.dist_token is not None and model.num_prefix_tokens == 2
    head = backbone.task_head(model)
    torch.testing.assert_close(head.out.weight, (model.head.weight + model.head_dist.weight) / 2)
    concat = coformer.create_backbone("deit", features="concat")
    batch = concat.example_batch(model, 2)
    sub = concat.slice(model, UnitSelection.full(concat.shape(model)))
    assert sub.feature_dim == 2 * model.embed_dim
    torch.testing.assert_close(sub(**batch), _feats(concat, model, batch), atol=1e-5, rtol=1e-4)


def test_vit_layer_scale_is_sliced_with_channels() -> None:
    backbone = coformer.create_backbone("vit")
    model = backbone.tiny()
    shape = backbone.shape(model)
    keep = tuple(range(0, shape.embed_dim, 2))
    sel = UnitSelection((0, 2), keep, ((1, 3), (0,)), ((0, 5, 7), tuple(range(20))))
    sub = backbone.slice(model, sel)
    torch.testing.assert_close(sub.net.blocks[1].ls2.gamma, model.blocks[2].ls2.gamma[list(keep)])
    assert sub.net.blocks[0].attn.num_heads == 2 and sub.net.blocks[1].mlp.fc1.out_features == 20
    assert sub(**backbone.example_batch(model, 2)).shape == (2, len(keep))


def test_swin_stage_channels_and_shift_follow_the_teacher() -> None:
    backbone = coformer.create_backbone("swin")
    model = backbone.tiny()
    shape = backbone.shape(model)
    assert shape.embed_dim == model.num_features and shape.layers == sum(len(s.blocks) for s in model.layers)
    # keep only the second (shifted) block of stage 0: the sub-model block must keep that shift
    sel = UnitSelection((1, 2, 3), tuple(range(shape.embed_dim)), ((0, 1), (2,), (3,)),
                        tuple(tuple(range(shape.mlp[j])) for j in (1, 2, 3)))
    sub = backbone.slice(model, sel)
    assert sub.net.layers[0].blocks[0].shift_size == model.layers[0].blocks[1].shift_size != (0, 0)
    batch = backbone.example_batch(model, 2)
    torch.testing.assert_close(sub(**batch), _feats(backbone, backbone.mask(model, sel), batch),
                               atol=1e-5, rtol=1e-4)
    # half the last-stage channels keep the matching earlier-stage channels
    half = UnitSelection.full(shape).__class__(tuple(range(4)), tuple(range(0, shape.embed_dim, 2)),
                                               tuple(tuple(range(h)) for h in shape.heads),
                                               tuple(tuple(range(m)) for m in shape.mlp))
    cfg = backbone.slice(model, half).config
    assert cfg["stage_dims"] == [8, 16] and cfg["stage_dims"][0] == shape.embed_dim // 4 and cfg["feature_dim"] == 16


@pytest.mark.parametrize("name", NAMES)
def test_local_checkpoint_round_trip(name: str, tmp_path) -> None:
    backbone = coformer.create_backbone(name)
    model = backbone.tiny(num_labels=5, seed=1)
    out = backbone.save(model, tmp_path / "ckpt")
    assert json.loads((out / "config.json").read_text())["architecture"] == model.pretrained_cfg["architecture"]
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    loaded = backbone.load(out)
    batch = backbone.example_batch(model, 2)
    torch.testing.assert_close(_feats(backbone, loaded, batch), _feats(backbone, model, batch), atol=0, rtol=0)
    relabelled = backbone.load(out, num_labels=7)
    assert backbone.task_head(relabelled).out.out_features == 7


def test_bare_safetensors_file_needs_an_architecture(tmp_path) -> None:
    from safetensors.torch import save_file

    backbone = coformer.create_backbone("vit")
    model = backbone.tiny()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="which timm architecture"):
        backbone.load(tmp_path / "w.safetensors")
    with pytest.raises(FileNotFoundError, match="config.json"):
        backbone.load(tmp_path)


def test_wrong_architecture_is_refused() -> None:
    backbone = coformer.create_backbone("vit")
    swin = coformer.create_backbone("swin").tiny()
    with pytest.raises(ValueError, match="VisionTransformer"):
        backbone.check_model(swin)
    with pytest.raises(FileNotFoundError, match="DeiT weights"):
        coformer.create_backbone("deit").load(None)


def test_prepare_resizes_grey_images_and_normalises() -> None:
    backbone = coformer.create_backbone("vit")
    model = backbone.tiny()
    batch = backbone.prepare(model, [torch.rand(28, 28), torch.rand(28, 28)])
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    ones = backbone.prepare(model, torch.ones(1, 1, 32, 32))["pixel_values"]
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    torch.testing.assert_close(ones[0, :, 0, 0], torch.tensor([(1 - m) / s for m, s in zip(mean, std)]))
    assert isinstance(timm.__version__, str)
