"""MPNet encoders (transformers ``MPNetModel``; default all-mpnet-base-v2, 110M) as a CoFormer backbone.

Built on the HF family's shared toolkit (:mod:`coformer_backbones._hf_common`): this module only
says where MPNet keeps its weights. MPNet specifics the compact sub-model reproduces:

* **post-norm** blocks (``x = LN(x + attn(x))``, ``x = LN(x + mlp(x))``) with a LayerNorm on the
  embedding output and no final norm;
* learned positions counted RoBERTa-style from ``padding_idx + 1`` over the real tokens;
* a bucketed **relative-position attention bias** (32 buckets, max distance 128, bidirectional,
  the T5 bucketing) stored once in the encoder and shared by all layers; each sub-model layer
  keeps that table's columns for its own heads.

Features are the attention-mask mean pool of the last hidden state (sentence-transformers'
pooling for all-mpnet-base-v2). With no source, :meth:`MPNetBackbone.load` reads the checkpoint
that ``python -m coformer_backbones.mpnet_assets fetch`` put in the CoFormer cache.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from coformer.hookspecs import Register, hookimpl
from coformer_backbones import mpnet_assets
from coformer_backbones._hf_common import Canon, HFBackbone

#: MPNetEncoder.compute_position_bias buckets with these fixed values, whatever the config says.
REL_BUCKETS, REL_MAX_DISTANCE = 32, 128


class MPNetBackbone(HFBackbone):
    """MPNet encoders: all-mpnet-base-v2 from the CoFormer cache by default, any local MPNet directory otherwise."""

    name = "mpnet"
    family = "MPNet"
    model_types = ("mpnet",)
    pooling = "mean"
    norm_placement = "post"
    #: Chosen on BBC News validation (BENCHMARKS, "mpnet calibration settings"): at the booster's 3e-4
    #: the two larger sub-models (~25M parameters each) collapse to chance under every weight rule;
    #: 5e-5 annealed by cosine keeps all three rules at 84-86% with every device.
    calibration_defaults: ClassVar[dict[str, Any]] = {"lr": 5e-5, "lr_schedule": "cosine"}

    def _default_source(self) -> tuple[Path, dict[str, Any]]:
        return mpnet_assets.require(), {}

    def _from_pretrained(self, path: Path) -> nn.Module:
        from transformers import MPNetModel

        model = MPNetModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False,
                                           dtype=torch.float32)
        self._check_buckets(model.config)
        return model

    @staticmethod
    def _check_buckets(cfg: Any) -> None:
        if cfg.relative_attention_num_buckets != REL_BUCKETS:
            raise ValueError(f"MPNet config has relative_attention_num_buckets={cfg.relative_attention_num_buckets}, "
                             f"but transformers' MPNetEncoder always buckets into {REL_BUCKETS}; only such "
                             f"checkpoints are supported")

    def _tiny_hf(self) -> nn.Module:
        from transformers import MPNetConfig, MPNetModel

        config = MPNetConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=40,
                             relative_attention_num_buckets=REL_BUCKETS, hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0)
        return MPNetModel(config, add_pooling_layer=False)

    def _blocks(self, base: nn.Module) -> Sequence[nn.Module]:
        return base.encoder.layer

    def _attn_out(self, block: nn.Module) -> nn.Module:
        return block.attention.attn.o

    def _mlp_out(self, block: nn.Module) -> nn.Module:
        return block.output.dense

    def _canonical_layer(self, base: nn.Module, block: nn.Module) -> Canon:
        att = block.attention.attn
        return {
            "q_w": att.q.weight, "q_b": att.q.bias, "k_w": att.k.weight, "k_b": att.k.bias,
            "v_w": att.v.weight, "v_b": att.v.bias, "o_w": att.o.weight, "o_b": att.o.bias,
            "norm1_w": block.attention.LayerNorm.weight, "norm1_b": block.attention.LayerNorm.bias,
            "up_w": block.intermediate.dense.weight, "up_b": block.intermediate.dense.bias,
            "down_w": block.output.dense.weight, "down_b": block.output.dense.bias,
            "norm2_w": block.output.LayerNorm.weight, "norm2_b": block.output.LayerNorm.bias,
        }

    def _canonical_globals(self, hf: nn.Module) -> Canon:
        emb = hf.embeddings
        return {"embed": emb.word_embeddings.weight, "pos": emb.position_embeddings.weight,
                "embed_norm_w": emb.LayerNorm.weight, "embed_norm_b": emb.LayerNorm.bias,
                "rel_bias": hf.encoder.relative_attention_bias.weight}

    def _arch(self, hf: nn.Module) -> dict[str, Any]:
        cfg = hf.config
        self._check_buckets(cfg)
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        # MPNetEmbeddings fixes padding_idx at 1 (not config.pad_token_id); real tokens count from 2
        return {"family": "mpnet", "vocab_size": cfg.vocab_size, "max_positions": cfg.max_position_embeddings,
                "norm": "layer", "norm_eps": cfg.layer_norm_eps, "act": cfg.hidden_act, "gated": False,
                "qkv_bias": True, "o_bias": True, "mlp_bias": True, "positions": "learned",
                "position_padding_idx": hf.embeddings.padding_idx, "relative_bias": True, "rel_buckets": REL_BUCKETS,
                "rel_max_distance": REL_MAX_DISTANCE, "norm_placement": "post", "embed_norm": True,
                "final_norm": False, "causal": False, "pooling": self.pooling,
                "scaling": [1 / math.sqrt(head_dim)] * cfg.num_hidden_layers, "lm_head": None}


@hookimpl
def register_backbones(register: Register) -> None:
    """Register the ``mpnet`` backbone."""
    register("mpnet", MPNetBackbone)


__all__ = ["MPNetBackbone"]
