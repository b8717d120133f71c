"""GPT-2 (transformers ``GPT2Model`` / ``GPT2LMHeadModel``) as a CoFormer backbone.

No GPT-2 weights ship with CoFormer: :meth:`GPT2Backbone.load` reads a local transformers
directory. Features are the final hidden state (after ``ln_f``) of the last real token, as in
the seed's GLUE use of GPT-2; the task head is a :class:`~coformer.heads.ClassifierHead`.

GPT-2 stores its projections as transformers ``Conv1D`` (weight ``[in, out]``, the transpose of
``nn.Linear``), with q, k and v fused in ``c_attn`` ``[d, 3d]``; the canonical form transposes
and splits them. Attention scaling (``scale_attn_weights``, ``scale_attn_by_inverse_layer_idx``)
is kept per teacher layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from coformer.hookspecs import Register, hookimpl
from coformer.spec import ModelShape
from coformer_backbones._hf_common import Canon, HFBackbone


class GPT2Backbone(HFBackbone):
    """GPT-2 decoders from a local directory; causal attention, learned positions, LayerNorm."""

    name = "gpt2"
    family = "GPT-2"
    model_types = ("gpt2",)
    pooling = "last"

    def _from_pretrained(self, path: Path) -> nn.Module:
        from transformers import GPT2LMHeadModel

        # a GPT2Model directory loads too: the LM head is tied to the token embedding
        return GPT2LMHeadModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)

    def _tiny_hf(self) -> nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=101, n_positions=64, n_embd=32, n_layer=3, n_head=4, n_inner=64,
                            bos_token_id=1, eos_token_id=2)
        return GPT2LMHeadModel(config)

    def _shape(self, cfg: Any) -> ModelShape:
        if getattr(cfg, "add_cross_attention", False):
            raise ValueError("GPT-2 with cross-attention is not supported; use a decoder-only checkpoint")
        L, h, d = cfg.n_layer, cfg.n_head, cfg.n_embd
        return ModelShape(L, d, (h,) * L, (cfg.n_inner or 4 * d,) * L, d // h)

    def _blocks(self, base: nn.Module) -> Sequence[nn.Module]:
        return base.h

    def _attn_out(self, block: nn.Module) -> nn.Module:
        return block.attn.c_proj

    def _mlp_out(self, block: nn.Module) -> nn.Module:
        return block.mlp.c_proj

    def _canonical_layer(self, base: nn.Module, block: nn.Module) -> Canon:
        d = base.config.n_embd
        w, b = block.attn.c_attn.weight, block.attn.c_attn.bias
        return {
            "norm1_w": block.ln_1.weight, "norm1_b": block.ln_1.bias,
            "q_w": w[:, :d].t(), "k_w": w[:, d:2 * d].t(), "v_w": w[:, 2 * d:].t(),
            "q_b": b[:d], "k_b": b[d:2 * d], "v_b": b[2 * d:],
            "o_w": block.attn.c_proj.weight.t(), "o_b": block.attn.c_proj.bias,
            "norm2_w": block.ln_2.weight, "norm2_b": block.ln_2.bias,
            "up_w": block.mlp.c_fc.weight.t(), "up_b": block.mlp.c_fc.bias,
            "down_w": block.mlp.c_proj.weight.t(), "down_b": block.mlp.c_proj.bias,
        }

    def _canonical_globals(self, hf: nn.Module) -> Canon:
        base = hf.base_model
        lm = hf.get_output_embeddings()
        return {"embed": base.wte.weight, "pos": base.wpe.weight, "final_w": base.ln_f.weight,
                "final_b": base.ln_f.bias, "lm_head": None if lm is None else lm.weight}

    def _arch(self, hf: nn.Module) -> dict[str, Any]:
        cfg = hf.config
        hd = cfg.n_embd // cfg.n_head
        scaling = []
        for j in range(cfg.n_layer):
            s = hd ** -0.5 if cfg.scale_attn_weights else 1.0
            scaling.append(s / (j + 1) if cfg.scale_attn_by_inverse_layer_idx else s)
        return {"family": "gpt2", "vocab_size": cfg.vocab_size, "max_positions": cfg.n_positions,
                "norm": "layer", "norm_eps": cfg.layer_norm_epsilon, "act": cfg.activation_function,
                "gated": False, "qkv_bias": True, "o_bias": True, "mlp_bias": True, "positions": "learned",
                "causal": True, "pooling": self.pooling, "scaling": scaling, "lm_head": self._lm_kind(hf)}


@hookimpl
def register_backbones(register: Register) -> None:
    """Register the ``gpt2`` backbone."""
    register("gpt2", GPT2Backbone)


__all__ = ["GPT2Backbone"]
