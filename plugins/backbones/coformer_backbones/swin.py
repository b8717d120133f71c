"""timm Swin Transformers (``swin``): hierarchical stages, shifted-window attention, patch merging.

Units and how they map onto the hierarchy:

* **layers** are the blocks of all stages in depth order (``ModelShape.layers = sum(depths)``);
  dropping one removes that block from its stage (the stage's patch merging stays, and every
  kept block keeps its own window shift);
* **heads** are per block (qkv rows and projection columns of each head, and that head's
  column of the relative-position bias table); **MLP neurons** per block (``fc1`` rows,
  ``fc2`` columns);
* **channels**: ``ModelShape.embed_dim`` is the width the classifier takes, the last stage's
  ``C_last = C·2^(S-1)``, so features are ``[B, embed_dim]`` like every backbone's. Stage-``s``
  channel ``g`` stands for the last-stage group ``g·r_s … (g+1)·r_s − 1`` (``r_s = C_last / C_s``);
  a selection of ``k`` last-stage channels keeps ``max(1, round(k / r_s))`` stage-``s`` channels,
  the groups holding most selected channels (ties: lower index). Full selection keeps every
  channel, widths shrink in proportion at every stage, and sub-models dealt disjoint last-stage
  channels by importance get (mostly) disjoint earlier channels. Patch merging (4C→2C) is cut
  consistently: its norm and input columns take the kept channels of each of the four merged
  positions, its rows the next stage's kept channels. ``shape().channel_group`` is
  ``r_1 = C_last / C_1``: sub-models are dealt whole groups of last-stage channels, so their
  channels are disjoint in *every* stage and C2 holds per stage (:func:`stage_overlap` reports
  it for any selections);
* **costs** differ by stage (resolution and width), so the evaluator measures each spec on the
  teacher blocks it will really run on, not the first ``l`` blocks.

Features are the final-norm tokens averaged over the spatial grid (timm's ``avg`` pooling),
so ``task_head`` is timm's ``head.fc``. No package carries Swin weights: load a timm
checkpoint directory or ``timm:NAME``.
"""

from __future__ import annotations

import dataclasses
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


def stage_widths(model: nn.Module) -> list[int]:
    """Channel width of each stage."""
    widths = []
    for s, stage in enumerate(model.layers):
        down = getattr(stage, "downsample", None)
        if s == 0 or down is None or isinstance(down, nn.Identity):
            widths.append(int(model.patch_embed.proj.out_channels) if s == 0 else widths[-1])
        else:
            widths.append(int(down.reduction.out_features))
    return widths


def stage_channels(channels: tuple[int, ...], widths: list[int]) -> list[list[int]]:
    """Kept channels per stage for kept last-stage ``channels`` (see module docstring)."""
    last = widths[-1]
    out = []
    for w in widths:
        if last % w:
            raise ValueError(f"stage widths {widths} do not divide the last stage's {last}")
        r = last // w
        counts = [0] * w
        for c in channels:
            counts[c // r] += 1
        n = max(1, round(len(channels) / r))
        ranked = sorted(range(w), key=lambda g: (-counts[g], g))
        out.append(sorted(ranked[:n]))
    return out


def stage_overlap(channel_sets: list[tuple[int, ...]], widths: list[int]) -> list[int]:
    """Per stage, how many stage channels more than one of the given last-stage ``channel_sets``
    keeps (0 everywhere means C2 holds in every stage)."""
    per_model = [stage_channels(c, widths) for c in channel_sets]
    out = []
    for s in range(len(widths)):
        seen: dict[int, int] = {}
        for chans in per_model:
            for c in chans[s]:
                seen[c] = seen.get(c, 0) + 1
        out.append(sum(1 for v in seen.values() if v > 1))
    return out


def _layer_norm(like: nn.LayerNorm, dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=like.eps, elementwise_affine=like.elementwise_affine)


class SwinBackbone(TimmVisionBackbone):
    """timm ``SwinTransformer`` (v1)."""

    name: ClassVar[str] = "swin"
    tiny_arch: ClassVar[str] = "swin_tiny_patch4_window7_224"
    tiny_args: ClassVar[dict[str, Any]] = {"img_size": 32, "embed_dim": 16, "depths": (2, 2), "num_heads": (4, 4),
                                           "head_dim": 4, "window_size": 4, "mlp_ratio": 2.0}

    def check_model(self, model: nn.Module) -> None:
        """Only timm SwinTransformer (v1) models with standard blocks."""
        from timm.models.swin_transformer import SwinTransformer

        if not isinstance(model, SwinTransformer):
            raise ValueError(f"the 'swin' backbone takes timm SwinTransformer models, got {type(model).__name__}")
        for i, (_, _, blk) in enumerate(self.blocks(model)):
            check_standard_block(blk, f"block {i}")
        stage_channels(tuple(range(stage_widths(model)[-1])), stage_widths(model))

    def shape(self, model: nn.Module) -> ModelShape:
        """Blocks of every stage with their own heads/MLP widths; channels move in groups of
        ``C_last / C_1`` (see module docstring)."""
        base = super().shape(model)
        widths = stage_widths(model)
        return dataclasses.replace(base, channel_group=widths[-1] // widths[0])

    def set_img_size(self, model: nn.Module, size: int) -> None:
        """timm's own resize (window sizes and masks follow the new grid)."""
        model.set_input_size(img_size=(size, size))

    def blocks(self, model: nn.Module) -> list[tuple[nn.Module, int, nn.Module]]:
        """Blocks of every stage, in depth order."""
        return [(stage.blocks, b, blk) for stage in model.layers for b, blk in enumerate(stage.blocks)]

    def _stage_of(self, model: nn.Module) -> list[tuple[int, int]]:
        return [(s, b) for s, stage in enumerate(model.layers) for b in range(len(stage.blocks))]

    def pool(self, net: nn.Module, tokens: Tensor) -> Tensor:
        """Spatial mean of the final-norm tokens (timm's pre-logits)."""
        return net.forward_head(tokens, pre_logits=True)

    def task_head(self, model: nn.Module) -> ClassifierHead:
        """timm's ``head.fc`` itself (not a copy) as a :class:`ClassifierHead`: fitting it fits the teacher."""
        return own_head(linear_head(model.head, self.name))

    def submodel_config(self, model: nn.Module, shape: ModelShape, selection: UnitSelection) -> dict[str, Any]:
        """Per-stage kept widths and depths, per-block heads, MLP widths and window shifts."""
        where = self._stage_of(model)
        blocks = self.blocks(model)
        depths = [0] * len(model.layers)
        for j in selection.layers:
            depths[where[j][0]] += 1
        return {"backbone": self.name, "arch": architecture(model), "model_args": model_args(model),
                "img_size": img_size(model),
                "stage_dims": [len(c) for c in stage_channels(selection.channels, stage_widths(model))],
                "depths": depths, "heads": [len(h) for h in selection.heads],
                "mlp": [len(m) for m in selection.mlp], "head_dim": shape.head_dim,
                "shifts": [list(blocks[j][2].shift_size) for j in selection.layers],
                "feature_dim": len(selection.channels)}

    def build_net(self, config: dict[str, Any]) -> nn.Module:
        """A timm Swin of the config's architecture, re-sized stage by stage and block by block."""
        dims, depths = [int(d) for d in config["stage_dims"]], [int(d) for d in config["depths"]]
        hd = int(config["head_dim"])
        net = timm_module().create_model(
            config["arch"], pretrained=False, **config["model_args"], img_size=tuple(config["img_size"]),
            embed_dim=dims[0], depths=tuple(depths), num_heads=(1,) * len(depths), head_dim=hd, num_classes=0)
        k = 0
        for s, stage in enumerate(net.layers):
            down = getattr(stage, "downsample", None)
            if s > 0 and down is not None and not isinstance(down, nn.Identity):
                down.norm = _layer_norm(down.norm, 4 * dims[s - 1])
                down.reduction = nn.Linear(4 * dims[s - 1], dims[s], bias=down.reduction.bias is not None)
            for blk in stage.blocks:
                h = int(config["heads"][k])
                blk.norm1 = _layer_norm(blk.norm1, dims[s])
                blk.norm2 = _layer_norm(blk.norm2, dims[s])
                resize_attention(blk.attn, dims[s], h, hd)
                table = blk.attn.relative_position_bias_table
                blk.attn.relative_position_bias_table = nn.Parameter(torch.zeros(table.shape[0], h))
                resize_mlp(blk.mlp, dims[s], int(config["mlp"][k]))
                blk.shift_size = tuple(int(v) for v in config["shifts"][k])
                blk.target_shift_size = blk.shift_size
                blk._init_buffers()
                k += 1
        net.norm = _layer_norm(net.norm, dims[-1])
        net.num_features = dims[-1]
        return net

    def sliced_state(self, model: nn.Module, shape: ModelShape, selection: UnitSelection,
                     sub: TimmSubModel) -> dict[str, Tensor]:
        """Cut the selected units out of the teacher, stage by stage."""
        src = model.state_dict()
        widths = stage_widths(model)
        chans = [torch.tensor(c, dtype=torch.long) for c in stage_channels(selection.channels, widths)]
        where = self._stage_of(model)
        # sub-model (stage, block) → global kept index k
        kept: dict[tuple[int, int], int] = {}
        per_stage = [0] * len(widths)
        for k, j in enumerate(selection.layers):
            s = where[j][0]
            kept[(s, per_stage[s])] = k
            per_stage[s] += 1
        hd = shape.head_dim

        def merged(s: int) -> Tensor:
            return torch.cat([chans[s] + q * widths[s] for q in range(4)])

        out: dict[str, Tensor] = {}
        for key in sub.net.state_dict():
            parts = key.split(".")
            if parts[0] == "layers" and parts[2] == "blocks":
                s, b, rest = int(parts[1]), int(parts[3]), ".".join(parts[4:])
                k = kept[(s, b)]
                j = selection.layers[k]
                t = src[f"layers.{s}.blocks.{where[j][1]}.{rest}"]
                heads, ch = selection.heads[k], chans[s]
                neurons = torch.tensor(selection.mlp[k], dtype=torch.long)
                if rest == "attn.qkv.weight":
                    out[key] = take(take(t, 0, qkv_rows(heads, shape.heads[j], hd)), 1, ch)
                elif rest == "attn.qkv.bias":
                    out[key] = take(t, 0, qkv_rows(heads, shape.heads[j], hd))
                elif rest == "attn.proj.weight":
                    out[key] = take(take(t, 0, ch), 1, head_columns(heads, hd))
                elif rest == "attn.relative_position_bias_table":
                    out[key] = take(t, 1, torch.tensor(heads, dtype=torch.long))
                elif rest == "mlp.fc1.weight":
                    out[key] = take(take(t, 0, neurons), 1, ch)
                elif rest == "mlp.fc1.bias":
                    out[key] = take(t, 0, neurons)
                elif rest == "mlp.fc2.weight":
                    out[key] = take(take(t, 0, ch), 1, neurons)
                else:  # norm1/norm2, projection and fc2 biases
                    out[key] = take(t, 0, ch)
            elif parts[0] == "layers" and parts[2] == "downsample":
                s, t = int(parts[1]), src[key]
                if key.endswith("reduction.weight"):
                    out[key] = take(take(t, 0, chans[s]), 1, merged(s - 1))
                elif key.endswith("reduction.bias"):
                    out[key] = take(t, 0, chans[s])
                else:  # the 4C-wide norm before the reduction
                    out[key] = take(t, 0, merged(s - 1))
            elif key.startswith("patch_embed."):
                out[key] = take(src[key], 0, chans[0])
            elif key.startswith("norm."):
                out[key] = take(src[key], 0, chans[-1])
            else:
                raise RuntimeError(f"swin: no slicing rule for {key!r}")
        return fit_state(sub.net.state_dict(), out)


@hookimpl
def register_backbones(register: Register) -> None:
    """Register the ``swin`` backbone."""
    register("swin", SwinBackbone)
