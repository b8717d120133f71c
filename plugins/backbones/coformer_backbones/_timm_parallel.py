"""The timm vision family run block by block: the :class:`~coformer_backbones._parallel.LayeredModel`
protocol for its sliced sub-models, so pipeline stages and tensor shards come from
:mod:`coformer_backbones._parallel` for ``vit``, ``deit`` (plain and distilled) and ``swin``.

ViT blocks are pre-norm with an optional LayerScale after each branch: LayerScale is a
per-channel product, so it distributes over the shards' partial sums and over the bias the host
adds (``ls(Σ partials + b) = Σ ls(partial) + ls(b)``).

Swin's blocks change width between stages (patch merging): see :class:`LayeredTimm`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from coformer.backbone import Batch
from coformer_backbones._inputs import pixels


def _zero_bias(linear: nn.Linear) -> None:
    if linear.bias is not None:
        linear.bias.data.zero_()


class LayeredTimm:
    """Block-by-block access to a sliced timm ``VisionTransformer`` or ``SwinTransformer`` (``TimmSubModel``).

    Swin's blocks are counted across its stages; a stage's patch merging (``downsample``) runs on
    entering its first block: inside ``run_block`` for a pipeline stage, and in ``merge`` after the
    previous block's MLP for the tensor-parallel host (so shards always see the block's own width).
    A pipeline stage that starts mid-way through a teacher stage has ``starts_mid_stage`` in its
    config and does not merge before its first block.
    """

    block_inputs: tuple[str, ...] = ()
    config: dict[str, Any]
    net: nn.Module

    @property
    def layered(self) -> bool:
        """ViT / DeiT (a plain block sequence) and Swin (stages of blocks) can be run block by block."""
        return self._is_vit() or hasattr(self.net, "layers")

    def _is_vit(self) -> bool:
        return hasattr(self.net, "blocks") and hasattr(self.net, "_pos_embed")

    def _blocks(self) -> list[tuple[nn.Module | None, nn.Module]]:
        """``(stage to enter first or None, block)`` in depth order."""
        if self._is_vit():
            return [(None, b) for b in self.net.blocks]
        out: list[tuple[nn.Module | None, nn.Module]] = []
        for stage in self.net.layers:
            out += [(stage if i == 0 else None, b) for i, b in enumerate(stage.blocks)]
        if out and self.config.get("starts_mid_stage"):
            out[0] = (None, out[0][1])
        return out

    def _enter(self, k: int, hidden: Tensor) -> Tensor:
        stage = self._blocks()[k][0]
        return hidden if stage is None else stage.downsample(hidden)

    def embed_input(self, batch: Batch) -> Tensor:
        """Patch embedding (+ class/distillation/register tokens and positions for a ViT)."""
        net = self.net
        if not self._is_vit():
            return net.patch_embed(pixels(batch))
        return net.norm_pre(net.patch_drop(net._pos_embed(net.patch_embed(pixels(batch)))))

    def context(self, hidden: Tensor, batch: Batch) -> Any:
        """timm blocks need nothing besides the tokens."""
        return None

    def run_block(self, k: int, hidden: Tensor, ctx: Any) -> Tensor:
        """Block ``k`` in full (after its stage's patch merging when it is the stage's first)."""
        return self._blocks()[k][1](self._enter(k, hidden))

    def branch(self, k: int, phase: int, hidden: Tensor, ctx: Any) -> Tensor:
        """``ls1(attn(norm1 x))`` (phase 0) or ``ls2(mlp(norm2 x))`` (phase 1); Swin: windowed attention."""
        blk = self._blocks()[k][1]
        if phase == 0:
            if self._is_vit():
                return blk.ls1(blk.attn(blk.norm1(hidden)))
            return blk._attn(blk.norm1(hidden))
        out = blk.mlp(blk.norm2(hidden))
        return blk.ls2(out) if self._is_vit() else out

    def output_bias(self, k: int, phase: int) -> Tensor | float:
        """The projection (``fc2``) bias through the branch's LayerScale (ViT)."""
        blk = self._blocks()[k][1]
        lin = blk.attn.proj if phase == 0 else blk.mlp.fc2
        if lin.bias is None:
            return 0.0
        if not self._is_vit():
            return lin.bias
        return (blk.ls1 if phase == 0 else blk.ls2)(lin.bias.clone())  # clone: LayerScale may work in place

    def merge(self, k: int, phase: int, hidden: Tensor, out: Tensor) -> Tensor:
        """Pre-norm residual ``x + out``; after the last phase, the next block's patch merging (Swin)."""
        hidden = hidden + out
        if phase == 1 and k + 1 < len(self._blocks()):
            hidden = self._enter(k + 1, hidden)
        return hidden

    def finish(self, hidden: Tensor, batch: Batch) -> Tensor:
        """Final norm, then the backbone's pooling (class token, mean, or the distilled tokens)."""
        return self._pool(self.net, self.net.norm(hidden))  # type: ignore[attr-defined]

    def zero_output_biases(self) -> None:
        """Shards return partial sums without the projection biases (the host adds them once)."""
        for _, blk in self._blocks():
            _zero_bias(blk.attn.proj)
            _zero_bias(blk.mlp.fc2)

    def drop_parts(self, *, embed: bool, finish: bool) -> None:
        """Free the patch embedding and tokens (and/or the final norm) a stage or shard never runs."""
        net = self.net
        if embed:
            net.patch_embed = None
            for name in ("cls_token", "reg_token", "dist_token", "pos_embed", "absolute_pos_embed"):
                if getattr(net, name, None) is not None:
                    setattr(net, name, None)
        if finish:
            net.norm = None


__all__ = ["LayeredTimm"]
