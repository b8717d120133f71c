"""The transformers language family run block by block: the :class:`~coformer_backbones._parallel.LayeredModel`
protocol for its compact sub-model, so pipeline stages and tensor shards come from
:mod:`coformer_backbones._parallel` for ``gpt2``, ``flan_t5``, ``llama`` (pre-norm ``CompactLM`` blocks) and
``bert``, ``mpnet`` (post-norm blocks, ``post_norm``) alike.

Pre-norm blocks normalise inside the branch, so a shard holds the (replicated) norm and the host
only adds the residual; post-norm blocks normalise after the residual, so the host does.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from coformer.backbone import Batch
from coformer_backbones._inputs import pool


def _bias(linear: nn.Linear) -> Tensor | float:
    return 0.0 if linear.bias is None else linear.bias


def _zero_bias(linear: nn.Linear) -> None:
    if linear.bias is not None:
        linear.bias.data.zero_()


class LayeredLM:
    """Block-by-block access to a ``CompactLM`` (GPT-2, T5 encoder, Llama; post-norm blocks too, e.g. MPNet)."""

    block_inputs: tuple[str, ...] = ("attention_mask",)
    config: dict[str, Any]
    layers: nn.ModuleList

    def embed_input(self, batch: Batch) -> Tensor:
        """Token (+ token-type, + position) embeddings of ``batch["input_ids"]``."""
        return self.embed_tokens(batch["input_ids"], batch.get("attention_mask"),  # type: ignore[attr-defined]
                                 batch.get("token_type_ids"))

    def context(self, hidden: Tensor, batch: Batch) -> Any:
        """Additive attention mask, RoPE tables and relative-position buckets for ``hidden``'s length."""
        return self.attention_context(hidden, batch.get("attention_mask"))  # type: ignore[attr-defined]

    def run_block(self, k: int, hidden: Tensor, ctx: Any) -> Tensor:
        """Block ``k`` in full."""
        return self.layers[k](hidden, *ctx)

    def branch(self, k: int, phase: int, hidden: Tensor, ctx: Any) -> Tensor:
        """Attention (phase 0) or MLP (phase 1) on ``norm(x)`` in a pre-norm block, on ``x`` in a post-norm one."""
        blk = self.layers[k]
        post = getattr(blk, "post_norm", False)
        if phase == 0:
            return blk.attn(hidden if post else blk.norm1(hidden), *ctx)
        return blk.mlp(hidden if post else blk.norm2(hidden))

    def output_bias(self, k: int, phase: int) -> Tensor | float:
        """Bias of the attention (MLP) output projection, if the family has one."""
        blk = self.layers[k]
        return _bias(blk.attn.o if phase == 0 else blk.mlp.down)

    def merge(self, k: int, phase: int, hidden: Tensor, out: Tensor) -> Tensor:
        """Residual ``x + out``, normalised after it in a post-norm block."""
        blk = self.layers[k]
        if getattr(blk, "post_norm", False):
            return (blk.norm1 if phase == 0 else blk.norm2)(hidden + out)
        return hidden + out

    def finish(self, hidden: Tensor, batch: Batch) -> Tensor:
        """Final norm, then the teacher's pooling."""
        final_norm = self.final_norm  # type: ignore[attr-defined]
        return pool(final_norm(hidden), batch.get("attention_mask"), self.config["pooling"])

    def zero_output_biases(self) -> None:
        """Shards return partial sums without the projection biases (the host adds them once)."""
        for blk in self.layers:
            _zero_bias(blk.attn.o)
            _zero_bias(blk.mlp.down)

    def drop_parts(self, *, embed: bool, finish: bool) -> None:
        """Free the embeddings (and/or final norm and LM head) a stage or shard never runs."""
        if embed:
            self.embed = None
            self.pos = None
            self.token_type = None
            if hasattr(self, "embed_norm"):
                self.embed_norm = None
        if finish:
            self.final_norm = None
            self.lm_head = None


__all__ = ["LayeredLM"]
