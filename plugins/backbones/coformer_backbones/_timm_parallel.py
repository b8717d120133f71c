"""The timm vision family run block by block: the :class:`~coformer_backbones._parallel.LayeredModel`
protocol for its sliced sub-models, so pipeline stages and tensor shards come from
:mod:`coformer_backbones._parallel` for ``vit`` and ``deit`` (plain and distilled).

ViT blocks are pre-norm with an optional LayerScale after each branch: LayerScale is a
per-channel product, so it distributes over the shards' partial sums and over the bias the host
adds (``ls(Σ partials + b) = Σ ls(partial) + ls(b)``).

Swin's blocks change width between stages (patch merging), so a stage boundary inside a
pipeline stage or a tensor-parallel host needs the merge step; that is not done here and Swin
declares no baselines (``layered`` is False): ``coformer bench`` runs it without them and says so.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from coformer.backbone import Batch


def _zero_bias(linear: nn.Linear) -> None:
    if linear.bias is not None:
        linear.bias.data.zero_()


class LayeredTimm:
    """Block-by-block access to a sliced timm ``VisionTransformer`` (``TimmSubModel``)."""

    block_inputs: tuple[str, ...] = ()
    config: dict[str, Any]
    net: nn.Module

    @property
    def layered(self) -> bool:
        """Whether this net is a plain sequence of blocks (ViT / DeiT); Swin's staged nets are not."""
        return hasattr(self.net, "blocks") and hasattr(self.net, "_pos_embed")

    def embed_input(self, batch: Batch) -> Tensor:
        """Patch embedding, class/distillation/register tokens and positions: the tokens entering block 0."""
        from coformer_backbones._timm_common import pixels

        net = self.net
        return net.norm_pre(net.patch_drop(net._pos_embed(net.patch_embed(pixels(batch)))))

    def context(self, hidden: Tensor, batch: Batch) -> Any:
        """ViT blocks need nothing besides the tokens."""
        return None

    def run_block(self, k: int, hidden: Tensor, ctx: Any) -> Tensor:
        """Block ``k`` in full."""
        return self.net.blocks[k](hidden)

    def branch(self, k: int, phase: int, hidden: Tensor, ctx: Any) -> Tensor:
        """``ls1(attn(norm1 x))`` (phase 0) or ``ls2(mlp(norm2 x))`` (phase 1)."""
        blk = self.net.blocks[k]
        if phase == 0:
            return blk.ls1(blk.attn(blk.norm1(hidden)))
        return blk.ls2(blk.mlp(blk.norm2(hidden)))

    def output_bias(self, k: int, phase: int) -> Tensor | float:
        """The projection (``fc2``) bias through the branch's LayerScale."""
        blk = self.net.blocks[k]
        lin, scale = (blk.attn.proj, blk.ls1) if phase == 0 else (blk.mlp.fc2, blk.ls2)
        return 0.0 if lin.bias is None else scale(lin.bias.clone())  # clone: LayerScale may work in place

    def merge(self, k: int, phase: int, hidden: Tensor, out: Tensor) -> Tensor:
        """Pre-norm residual: ``x + out``."""
        return hidden + out

    def finish(self, hidden: Tensor, batch: Batch) -> Tensor:
        """Final norm, then the backbone's pooling (class token, mean, or the distilled tokens)."""
        return self._pool(self.net, self.net.norm(hidden))  # type: ignore[attr-defined]

    def zero_output_biases(self) -> None:
        """Shards return partial sums without the projection biases (the host adds them once)."""
        for blk in self.net.blocks:
            _zero_bias(blk.attn.proj)
            _zero_bias(blk.mlp.fc2)

    def drop_parts(self, *, embed: bool, finish: bool) -> None:
        """Free the patch embedding and tokens (and/or the final norm) a stage or shard never runs."""
        net = self.net
        if embed:
            net.patch_embed = None
            for name in ("cls_token", "reg_token", "dist_token", "pos_embed"):
                if getattr(net, name, None) is not None:
                    setattr(net, name, None)
        if finish:
            net.norm = None


__all__ = ["LayeredTimm"]
