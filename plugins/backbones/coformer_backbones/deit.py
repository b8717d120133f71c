"""timm DeiT (``deit``): ViTs, including the distilled ones with a distillation token and a second head.

Everything but the features is the ``vit`` backbone's. A distilled DeiT classifies with
``(head(cls) + head_dist(dist)) / 2``; two feature layouts are offered (option ``features``):

* ``"mean"`` (default): features ``(cls + dist) / 2`` of width d. The task head is the mean of
  the two heads, so its logits equal timm's exactly when the two heads are equal and are
  otherwise the mean-token approximation of them.
* ``"concat"``: features ``[cls, dist]`` of width 2d with a head ``[W, W_dist] / 2``: logits
  equal timm's eval output exactly. The flow takes the feature width from the task head
  (:func:`coformer.heads.head_input_dim`), not from ``shape(model).embed_dim``.

In both modes the task head is a :class:`~coformer.heads.MeanOfLinears` over timm's own
``head`` and ``head_dist``: it holds the teacher's parameters (fitting it fits the teacher, which
``prepare_teacher`` requires) and its state dict is that of one plain Linear, so a packaged plan
rebuilds it as an ordinary :class:`~coformer.heads.ClassifierHead`.

No package carries DeiT weights: load a timm checkpoint directory or ``timm:NAME``.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from coformer.heads import ClassifierHead, MeanOfLinears
from coformer.hookspecs import Register, hookimpl
from coformer.spec import ModelShape, UnitSelection

from ._timm_common import linear_head, own_head
from .vit import VitBackbone

FEATURE_MODES = ("mean", "concat")


def is_distilled(net: nn.Module) -> bool:
    """Whether a timm ViT carries a distillation token."""
    return getattr(net, "dist_token", None) is not None


class DeitBackbone(VitBackbone):
    """timm DeiT models (``VisionTransformer`` / ``VisionTransformerDistilled``)."""

    name: ClassVar[str] = "deit"
    tiny_arch: ClassVar[str] = "deit_tiny_distilled_patch16_224"
    tiny_args: ClassVar[dict[str, Any]] = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3,
                                           "num_heads": 4, "mlp_ratio": 2.0}

    def __init__(self, arch: str | None = None, img_size: int | None = None, features: str = "mean"):
        super().__init__(arch=arch, img_size=img_size)
        if features not in FEATURE_MODES:
            raise ValueError(f"deit features={features!r}: choose one of {FEATURE_MODES}")
        self.feature_mode = features

    def default_teacher(self, num_labels: int | None) -> nn.Module:
        """No package carries DeiT weights."""
        raise FileNotFoundError(
            "no installed package carries DeiT weights; pass a timm checkpoint directory (config.json + "
            "model.safetensors), a .safetensors file with arch='deit_small_distilled_patch16_224', "
            "or 'timm:deit_small_distilled_patch16_224' for an untrained model")

    @staticmethod
    def distilled_pool(mode: str) -> Callable[[nn.Module, Tensor], Tensor]:
        """Pooling for a feature mode: class and distillation tokens averaged or concatenated."""
        def pool(net: nn.Module, tokens: Tensor) -> Tensor:
            if not is_distilled(net):
                return net.forward_head(tokens, pre_logits=True)
            cls, dist = tokens[:, 0], tokens[:, 1]
            return (cls + dist) / 2 if mode == "mean" else torch.cat([cls, dist], dim=-1)
        return pool

    def pool(self, net: nn.Module, tokens: Tensor) -> Tensor:
        """This plugin's feature mode applied to the final-norm tokens."""
        return self.distilled_pool(self.feature_mode)(net, tokens)

    def pool_for(self, config: dict[str, Any]) -> Callable[[nn.Module, Tensor], Tensor]:
        """A sub-model pools as its config says (the mode it was sliced with)."""
        return self.distilled_pool(config.get("distilled_features", "mean"))

    def task_head(self, model: nn.Module) -> ClassifierHead:
        """The timm head(s) themselves (not copies) as one :class:`ClassifierHead` over this plugin's features."""
        fc = linear_head(model.head, self.name)
        if not is_distilled(model):
            return own_head(fc)
        fd = linear_head(model.head_dist, self.name)
        merged = MeanOfLinears([fc, fd], split_input=self.feature_mode == "concat")
        head = ClassifierHead(merged.in_features, merged.out_features)
        head.out = merged
        return head

    def submodel_config(self, model: nn.Module, shape: ModelShape, selection: UnitSelection) -> dict[str, Any]:
        """The ViT config plus the feature mode (and a doubled width in concat mode)."""
        config = super().submodel_config(model, shape, selection)
        config["distilled_features"] = self.feature_mode
        if is_distilled(model) and self.feature_mode == "concat":
            config["feature_dim"] = 2 * len(selection.channels)
        return config


@hookimpl
def register_backbones(register: Register) -> None:
    """Register the ``deit`` backbone."""
    register("deit", DeitBackbone)
