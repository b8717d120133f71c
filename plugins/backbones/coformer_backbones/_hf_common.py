"""Shared machinery of the transformers-based language backbones (``bert``, ``gpt2``, ``flan_t5``, ``llama``, ``mpnet``).

The families are pre-norm (GPT-2, T5, Llama) or post-norm (MPNet, BERT-like) transformer stacks,
so one compact sub-model serves them all:

* each family reads its HF teacher into a **canonical** form — per layer, nn.Linear-layout
  weights ``q k v o`` / ``up gate down`` / two norms, plus embeddings, final norm and, where the
  family has them, learned positions, the T5 relative-attention-bias table and the LM head;
* :func:`slice_canonical` cuts the selected heads, MLP neurons, layers and channels out of that
  form into a :class:`CompactLM`: plain torch, per-layer head counts and MLP widths, a subset of
  embedding channels, rebuilt from its JSON ``config`` alone;
* :class:`HFBackbone` implements the :class:`~coformer.backbone.Backbone` contract once (load, save,
  features, importance, slice, mask, prepare, ...); a family subclass only says where things live.

Per-family switches in the canonical ``arch`` (all optional, defaults = pre-norm decoder):
``norm_placement`` ("pre" / "post": ``x = norm(x + f(x))``), ``embed_norm`` (a LayerNorm on the
embedding output, globals ``embed_norm_w/_b``), ``final_norm`` (False: no final norm),
``position_padding_idx`` (learned positions counted RoBERTa-style from ``padding_idx + 1`` over
the real tokens), ``relative_bias`` (a T5-style bucketed bias table alongside learned positions)
and ``type_vocab_size`` (BERT's token-type embeddings, added to the token embeddings before the
positions; ``token_type_ids`` default to zeros).

``mask`` works on a copy of the HF teacher, independently of ``slice``: a removed head (MLP
neuron) writes into the residual stream only through its columns of the attention (MLP) output
projection, so zeroing those columns removes it exactly; a removed layer has both projections
(and their biases) zeroed, which in a pre-norm block makes it the identity; in a post-norm block
(``HFBackbone.norm_placement = "post"``) the removed layer is replaced by a pass-through module.
"""

from __future__ import annotations

import contextlib
import copy
import json
import zlib
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from coformer.backbone import Backbone, Batch, SubModel

from coformer.assignment import UnitImportance
from coformer.heads import ClassifierHead, load_head, save_head
from coformer.spec import ModelShape, UnitSelection, check_selection
from coformer_backbones._hf_parallel import LayeredLM
from coformer_backbones._inputs import pool
from coformer_backbones._parallel import PARALLEL_KINDS, ParallelBaselines, build_parallel

BACKBONE_CONFIG = "coformer_backbone.json"
INPUT_KEYS = ("input_ids", "attention_mask")
DEFAULT_MAX_LENGTH = 128
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "spiece.model",
                   "tokenizer.model")


def quiet_transformers() -> contextlib.AbstractContextManager[None]:
    """Silence transformers' load reports and progress bars while loading local checkpoints."""
    from transformers.utils import logging as hf_logging

    @contextlib.contextmanager
    def ctx() -> Iterator[None]:
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            hf_logging.set_verbosity(level)
            hf_logging.enable_progress_bar()

    return ctx()


class HashTokenizer:
    """A deterministic whitespace tokenizer for teachers without a vocabulary (tiny test models).

    Words map to ids ``first_id..vocab_size-1`` by CRC32; 0 is padding and the ids below
    ``first_id`` are reserved. ``wrap`` puts a (start, end) pair of ids around every text (BERT's
    ``[CLS]`` … ``[SEP]``). Real checkpoints use their own HF tokenizer instead.
    """

    def __init__(self, vocab_size: int, *, first_id: int = 3, wrap: tuple[int, int] | None = None):
        if vocab_size <= first_id:
            raise ValueError(f"HashTokenizer needs a vocabulary of at least {first_id + 1} ids, got {vocab_size}")
        self.vocab_size = vocab_size
        self.first_id = first_id
        self.wrap = wrap

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without the ``wrap`` ids."""
        return [self.first_id + zlib.crc32(w.encode()) % (self.vocab_size - self.first_id)
                for w in text.lower().split()]

    def __call__(self, texts: Sequence[str], *, max_length: int, padding: bool | str = True,
                 **_: Any) -> dict[str, Tensor]:
        """Right-padded batch, truncated to ``max_length``; padded to the longest text, or to
        ``max_length`` with ``padding="max_length"`` (as HF tokenizers do)."""
        if self.wrap is None:
            rows = [self.encode(t)[:max_length] or [self.first_id] for t in texts]
        else:
            start, end = self.wrap
            rows = [[start, *self.encode(t)[: max_length - 2], end] for t in texts]
        width = max_length if padding == "max_length" else max((len(r) for r in rows), default=0)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def next_token_nll(logits: Tensor, input_ids: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Summed next-token negative log-likelihood and the number of predicted tokens (real → real only)."""
    pred, target = logits[:, :-1], input_ids[:, 1:]
    valid = torch.ones_like(target, dtype=torch.bool) if attention_mask is None else (
        attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool())
    nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]).float(), target.reshape(-1), reduction="none")
    return (nll * valid.reshape(-1)).sum(), valid.sum()


# --------------------------------------------------------------------------------------------
# The compact sub-model
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """T5 / Llama RMS norm: scale by the root mean square (no mean subtraction, no bias)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """Normalise over the last dimension in float32, as the HF implementations do."""
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def _norm(kind: str, dim: int, eps: float) -> nn.Module:
    return nn.LayerNorm(dim, eps=eps) if kind == "layer" else RMSNorm(dim, eps)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class CompactAttention(nn.Module):
    """Self-attention over ``heads`` query heads of the teacher's ``head_dim``.

    ``kv_map[i]`` is the key/value head query head ``i`` reads (grouped-query attention); ``None``
    means one key/value head per query head. ``rel_buckets > 0`` adds a T5 relative-position-bias
    table with one column per kept head.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, kv_map: list[int] | None, scaling: float,
                 qkv_bias: bool, o_bias: bool, rel_buckets: int = 0):
        super().__init__()
        self.heads, self.head_dim, self.scaling = heads, head_dim, scaling
        n_kv = heads if kv_map is None else max(kv_map) + 1
        self.n_kv = n_kv
        self.q = nn.Linear(dim, heads * head_dim, bias=qkv_bias)
        self.k = nn.Linear(dim, n_kv * head_dim, bias=qkv_bias)
        self.v = nn.Linear(dim, n_kv * head_dim, bias=qkv_bias)
        self.o = nn.Linear(heads * head_dim, dim, bias=o_bias)
        self._kv_list = None if kv_map is None or list(kv_map) == list(range(heads)) else list(kv_map)
        self.register_buffer("kv_map", None, persistent=False)
        self.rebuild_buffers()
        self.rel_bias = nn.Parameter(torch.zeros(rel_buckets, heads)) if rel_buckets else None

    def rebuild_buffers(self) -> None:
        """(Re)create the non-persistent key/value index buffer from the constructor arguments."""
        self.kv_map = None if self._kv_list is None else torch.tensor(self._kv_list, dtype=torch.long)

    def forward(self, x: Tensor, mask: Tensor | None, rope: tuple[Tensor, Tensor] | None,
                buckets: Tensor | None) -> Tensor:
        """``x [B, T, d]``; ``mask`` additive ``[B, 1, T, T]`` or boolean (True: attend) ``[B, 1, 1, T]``;
        ``rope`` (cos, sin) ``[T, head_dim]``."""
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        if self.kv_map is not None:
            k, v = k.index_select(1, self.kv_map), v.index_select(1, self.kv_map)
        if self.rel_bias is not None and buckets is not None:
            mask = mask + self.rel_bias[buckets].permute(2, 0, 1).unsqueeze(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
        return self.o(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class CompactMLP(nn.Module):
    """``down(act(up x))``, or gated ``down(act(gate x) * up x)`` (SwiGLU / gated-GELU)."""

    def __init__(self, dim: int, width: int, act: str, gated: bool, bias: bool):
        super().__init__()
        from transformers.activations import ACT2FN

        self.up = nn.Linear(dim, width, bias=bias)
        self.gate = nn.Linear(dim, width, bias=bias) if gated else None
        self.down = nn.Linear(width, dim, bias=bias)
        self.act = ACT2FN[act]

    def forward(self, x: Tensor) -> Tensor:
        """The MLP branch of a block."""
        h = self.act(self.gate(x)) * self.up(x) if self.gate is not None else self.act(self.up(x))
        return self.down(h)


def has_relative_bias(cfg: dict[str, Any]) -> bool:
    """Whether an architecture adds a bucketed relative-position bias (T5, or MPNet beside learned positions)."""
    return cfg["positions"] == "relative" or bool(cfg.get("relative_bias"))


class CompactBlock(nn.Module):
    """A pre-norm block (``x + attn(norm1 x)``, then ``x + mlp(norm2 x)``) or its post-norm form."""

    def __init__(self, cfg: dict[str, Any], k: int):
        super().__init__()
        d, kv_maps = cfg["embed_dim"], cfg.get("kv_map") or [None] * len(cfg["heads"])
        self.norm1 = _norm(cfg["norm"], d, cfg["norm_eps"])
        self.attn = CompactAttention(d, cfg["heads"][k], cfg["head_dim"], kv_maps[k], cfg["scaling"][k],
                                     cfg["qkv_bias"], cfg["o_bias"],
                                     cfg.get("rel_buckets", 0) if has_relative_bias(cfg) else 0)
        self.norm2 = _norm(cfg["norm"], d, cfg["norm_eps"])
        self.mlp = CompactMLP(d, cfg["mlp"][k], cfg["act"], cfg["gated"], cfg["mlp_bias"])
        self.post_norm = cfg.get("norm_placement", "pre") == "post"

    def forward(self, x: Tensor, mask: Tensor | None, rope: tuple[Tensor, Tensor] | None,
                buckets: Tensor | None) -> Tensor:
        """One block on the residual stream (pre-norm, or post-norm ``norm(x + f(x))``)."""
        if self.post_norm:
            x = self.norm1(x + self.attn(x, mask, rope, buckets))
            return self.norm2(x + self.mlp(x))
        x = x + self.attn(self.norm1(x), mask, rope, buckets)
        return x + self.mlp(self.norm2(x))


class CompactLM(LayeredLM, SubModel):
    """A sliced BERT / GPT-2 / T5-encoder / Llama / MPNet sub-model, plain torch, rebuilt from its JSON ``config``.

    ``forward(input_ids, attention_mask, token_type_ids)`` returns the pooled features ``[B, embed_dim]``;
    :meth:`hidden_states` the final-normed token states; :meth:`lm_logits` next-token logits
    where the teacher had an LM head.
    """

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = dict(config)
        d = config["embed_dim"]
        self.feature_dim = d
        self.embed = nn.Embedding(config["vocab_size"], d)
        types = config.get("type_vocab_size")
        self.token_type = nn.Embedding(types, d) if types else None
        self.pos = nn.Embedding(config["max_positions"], d) if config["positions"] == "learned" else None
        self.embed_norm = _norm(config["norm"], d, config["norm_eps"]) if config.get("embed_norm") else None
        self.register_buffer("inv_freq", None, persistent=False)
        self.layers = nn.ModuleList(CompactBlock(config, k) for k in range(len(config["heads"])))
        self.final_norm = (_norm(config["norm"], d, config["norm_eps"]) if config.get("final_norm", True)
                           else nn.Identity())
        self.lm_head = nn.Linear(d, config["vocab_size"], bias=False) if config.get("lm_head") == "separate" else None
        self.rebuild_buffers()

    def rebuild_buffers(self) -> None:
        """(Re)create the non-persistent buffers (RoPE frequencies, key/value maps) from ``config``.

        Slicing builds the module on the meta device and assigns the sliced weights (no random
        init, no second copy), after which these buffers are made here on the CPU.
        """
        if self.config["positions"] == "rope":
            self.inv_freq = torch.tensor(self.config["rope_inv_freq"], dtype=torch.float32)
        for layer in self.layers:
            layer.attn.rebuild_buffers()

    def embed_tokens(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                     token_type_ids: Tensor | None = None) -> Tensor:
        """Token (+ token-type, + learned position) embeddings ``[B, T, embed_dim]``: the hidden state entering block 0."""
        x = self.embed(input_ids)
        if self.token_type is not None:
            x = x + self.token_type(torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids)
        elif token_type_ids is not None:
            raise ValueError("this sub-model has no token-type embeddings (its teacher takes no token_type_ids); "
                             "drop them from the batch")
        if self.pos is not None:
            pad = self.config.get("position_padding_idx")
            first = 0 if pad is None else pad + 1
            t = input_ids.shape[1]
            if t + first > self.pos.num_embeddings:
                raise ValueError(f"sequence length {t} exceeds the model's {self.pos.num_embeddings - first} positions; "
                                 f"tokenise with a smaller max_length")
            if pad is None:
                x = x + self.pos(torch.arange(t, device=input_ids.device))
            else:  # RoBERTa / MPNet: real tokens count from padding_idx + 1, padding sits at padding_idx
                real = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).long()
                x = x + self.pos(torch.cumsum(real, dim=1) * real + pad)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        return x

    def attention_context(self, x: Tensor, attention_mask: Tensor | None) -> tuple[Any, Any, Any]:
        """What every block takes besides ``x [B, T, d]``: the attention mask, RoPE (cos, sin), relative buckets.

        The mask is additive ``[B, 1, T, T]``; a bidirectional model without a relative bias (BERT)
        takes the boolean key mask ``[B, 1, 1, T]`` (or ``None``) instead, which attends alike and
        costs no ``T × T`` tensor per call.
        """
        cfg = self.config
        b, t = x.shape[:2]
        dev = x.device
        positions = torch.arange(t, device=dev)
        rope = None
        if cfg["positions"] == "rope":
            freqs = positions[:, None].float() * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            scale = cfg.get("rope_scaling", 1.0)
            rope = ((emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype))
        buckets = None
        if has_relative_bias(cfg):
            from transformers.models.t5.modeling_t5 import T5Attention

            rel = positions[None, :] - positions[:, None]
            buckets = T5Attention._relative_position_bucket(
                rel, bidirectional=not cfg["causal"], num_buckets=cfg["rel_buckets"],
                max_distance=cfg["rel_max_distance"])
        if not cfg["causal"] and buckets is None:
            return (None if attention_mask is None else attention_mask.bool()[:, None, None, :]), rope, None
        allowed = torch.ones(b, 1, t, t, dtype=torch.bool, device=dev)
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, :]
        if cfg["causal"]:
            allowed = allowed & torch.ones(t, t, dtype=torch.bool, device=dev).tril()
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=dev).masked_fill(~allowed, torch.finfo(x.dtype).min)
        return mask, rope, buckets

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                      token_type_ids: Tensor | None = None) -> Tensor:
        """Final-normed hidden states ``[B, T, embed_dim]``."""
        x = self.embed_tokens(input_ids, attention_mask, token_type_ids)
        mask, rope, buckets = self.attention_context(x, attention_mask)
        for layer in self.layers:
            x = layer(x, mask, rope, buckets)
        return self.final_norm(x)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        """Pooled features ``[B, embed_dim]`` (the teacher's pooling: last real token or mean)."""
        return pool(self.hidden_states(input_ids, attention_mask, token_type_ids), attention_mask,
                    self.config["pooling"])

    def lm_logits(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Next-token logits ``[B, T, vocab]``: the final-normed states times the teacher's LM head columns
        of the kept channels (tied to the embedding slice when the teacher ties them)."""
        kind = self.config.get("lm_head")
        if kind is None:
            raise ValueError("this sub-model was sliced from a teacher without an LM head; it has no lm_logits")
        h = self.hidden_states(input_ids, attention_mask)
        return F.linear(h, self.embed.weight if kind == "tied" else self.lm_head.weight)


# --------------------------------------------------------------------------------------------
# Slicing the canonical form
# --------------------------------------------------------------------------------------------

Canon = dict[str, Tensor | None]


def slice_canonical(arch: dict[str, Any], glob: Canon, layers: Sequence[Canon], shape: ModelShape,
                    selection: UnitSelection) -> CompactLM:
    """Build a :class:`CompactLM` holding the selected units of a teacher in canonical form.

    ``arch`` holds the family's fixed settings (norm kind, activation, positions, pooling, ...);
    ``glob`` the embedding / positions / final norm / LM head / relative-bias table; ``layers``
    the selected layers' canonical weights, in selection order.
    """
    hd, group = shape.head_dim, shape.head_group
    kv_maps, head_rows, kv_rows = [], [], []
    for hs in selection.heads:
        kv_heads = sorted({h // group for h in hs})
        kv_maps.append([kv_heads.index(h // group) for h in hs] if group > 1 else None)
        head_rows.append(torch.tensor([h * hd + i for h in hs for i in range(hd)], dtype=torch.long))
        kv_rows.append(torch.tensor([g * hd + i for g in (kv_heads if group > 1 else hs) for i in range(hd)],
                                    dtype=torch.long))
    config = {
        **arch,
        "embed_dim": len(selection.channels),
        "head_dim": hd,
        "heads": [len(h) for h in selection.heads],
        "kv_map": kv_maps if group > 1 else None,
        "mlp": [len(m) for m in selection.mlp],
        "scaling": [arch["scaling"][j] for j in selection.layers],
        "teacher_layers": list(selection.layers),
        "teacher_channels": list(selection.channels),
    }
    with torch.device("meta"):  # weights are assigned below: skip the random init
        sub = CompactLM(config)
    ch = torch.tensor(selection.channels, dtype=torch.long)

    def take(t: Tensor | None, dim: int, idx: Tensor) -> Tensor | None:
        return None if t is None else t.detach().index_select(dim, idx).clone()

    state: dict[str, Tensor | None] = {
        "embed.weight": take(glob["embed"], 1, ch),
        "token_type.weight": take(glob.get("token_type"), 1, ch) if sub.token_type is not None else None,
        "final_norm.weight": take(glob.get("final_w"), 0, ch),
        "final_norm.bias": take(glob.get("final_b"), 0, ch),
    }
    if sub.embed_norm is not None:
        state["embed_norm.weight"] = take(glob["embed_norm_w"], 0, ch)
        state["embed_norm.bias"] = take(glob.get("embed_norm_b"), 0, ch)
    if sub.pos is not None:
        state["pos.weight"] = take(glob["pos"], 1, ch)
    if sub.lm_head is not None:
        state["lm_head.weight"] = take(glob["lm_head"], 1, ch)
    for k, (canon, hs, ms) in enumerate(zip(layers, selection.heads, selection.mlp, strict=True)):
        p = f"layers.{k}."
        hrow, kvrow, mrow = head_rows[k], kv_rows[k], torch.tensor(ms, dtype=torch.long)
        for norm in ("norm1", "norm2"):
            state[p + norm + ".weight"] = take(canon[norm + "_w"], 0, ch)
            state[p + norm + ".bias"] = take(canon.get(norm + "_b"), 0, ch)
        for name, rows in (("q", hrow), ("k", kvrow), ("v", kvrow)):
            state[p + f"attn.{name}.weight"] = take(take(canon[name + "_w"], 0, rows), 1, ch)
            state[p + f"attn.{name}.bias"] = take(canon.get(name + "_b"), 0, rows)
        state[p + "attn.o.weight"] = take(take(canon["o_w"], 0, ch), 1, hrow)
        state[p + "attn.o.bias"] = take(canon.get("o_b"), 0, ch)
        if has_relative_bias(config):
            state[p + "attn.rel_bias"] = take(glob["rel_bias"], 1, torch.tensor(hs, dtype=torch.long))
        for name in ("up", "gate"):
            state[p + f"mlp.{name}.weight"] = take(take(canon.get(name + "_w"), 0, mrow), 1, ch)
            state[p + f"mlp.{name}.bias"] = take(canon.get(name + "_b"), 0, mrow)
        state[p + "mlp.down.weight"] = take(take(canon["down_w"], 0, ch), 1, mrow)
        state[p + "mlp.down.bias"] = take(canon.get("down_b"), 0, ch)
    sub.load_state_dict({k: v for k, v in state.items() if v is not None}, strict=True, assign=True)
    sub.rebuild_buffers()
    return sub.eval()


# --------------------------------------------------------------------------------------------
# The teacher and the shared backbone
# --------------------------------------------------------------------------------------------


class HFTeacher(nn.Module):
    """A transformers model + tokenizer + pooling + optional classification head.

    ``forward(input_ids, attention_mask)`` returns the pooled features ``[B, hidden]`` of the
    final-normed last hidden state.
    """

    def __init__(self, hf: nn.Module, tokenizer: Any, head: ClassifierHead | None, pooling: str,
                 max_length: int = DEFAULT_MAX_LENGTH):
        super().__init__()
        self.hf = hf
        self.tokenizer = tokenizer
        self.head = head
        self.pooling = pooling
        self.max_length = max_length

    @property
    def base(self) -> nn.Module:
        """The headless transformer (``GPT2Model``, ``T5EncoderModel``, ``LlamaModel``)."""
        return self.hf.base_model

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                      token_type_ids: Tensor | None = None) -> Tensor:
        """Final-normed last hidden state ``[B, T, d]``; ``token_type_ids`` only for families that take them (BERT)."""
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.base(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        """Pooled features ``[B, d]``."""
        return pool(self.hidden_states(input_ids, attention_mask, token_type_ids), attention_mask, self.pooling)

    def lm_logits(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Next-token logits of a causal LM teacher ``[B, T, vocab]``."""
        lm = self.hf.get_output_embeddings()
        if lm is None:
            raise ValueError(f"{type(self.hf).__name__} has no LM head")
        return lm(self.hidden_states(input_ids, attention_mask))


def _inputs(batch: Batch, keys: Sequence[str] = INPUT_KEYS) -> dict[str, Tensor]:
    """The model inputs ``keys`` that ``batch`` holds (labels and the like left out)."""
    if "input_ids" not in batch:
        raise ValueError(f"a text batch needs 'input_ids' (got keys {sorted(batch)}); build it with prepare()")
    return {k: batch[k] for k in keys if k in batch and batch[k] is not None}


def _in_dim(module: nn.Module) -> int:
    """Which weight axis is the input: 0 for transformers' ``Conv1D`` (GPT-2), 1 for ``nn.Linear``."""
    return 0 if type(module).__name__ == "Conv1D" else 1


def _zero_inputs(module: nn.Module, idx: list[int], *, bias: bool = False) -> None:
    """Zero the weights that read input features ``idx`` (and the bias, when asked)."""
    if idx:
        module.weight.index_fill_(_in_dim(module), torch.tensor(idx, dtype=torch.long), 0.0)
    if bias and getattr(module, "bias", None) is not None:
        module.bias.zero_()


class PassThroughBlock(nn.Module):
    """Stands in for a removed post-norm HF block: hands the hidden states on unchanged, as a 1-tuple
    or a bare tensor (``as_tuple``), the way the block it replaces returns its output."""

    def __init__(self, as_tuple: bool = True):
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor] | Tensor:
        """Identity on the residual stream."""
        return (hidden_states,) if self.as_tuple else hidden_states


class HFBackbone(ParallelBaselines, Backbone):
    """The :class:`Backbone` contract for transformers language models; subclasses say where things live."""

    modality: ClassVar[str] = "text"
    #: HF ``model_type`` values this family accepts.
    model_types: ClassVar[tuple[str, ...]] = ()
    #: ``"last"`` (decoders) or ``"mean"`` (encoders).
    pooling: ClassVar[str] = "last"
    #: Human name for messages.
    family: ClassVar[str] = "transformer"
    #: ``"pre"``: zeroed projections make a removed block the identity; ``"post"`` (``x = norm(x + f(x))``):
    #: :meth:`mask` swaps a removed block for a :class:`PassThroughBlock` instead.
    norm_placement: ClassVar[str] = "pre"
    #: Whether the family's HF blocks return a tuple (most) or a bare tensor (BERT in transformers 5).
    blocks_return_tuple: ClassVar[bool] = True
    #: The batch keys the teacher and its sub-models take.
    input_keys: ClassVar[tuple[str, ...]] = INPUT_KEYS
    #: How :meth:`prepare` pads: ``True`` to the longest text, ``"max_length"`` to the teacher's ``max_length``.
    padding: ClassVar[bool | str] = True

    # -- what a family provides -------------------------------------------------------------

    def _from_pretrained(self, path: Path) -> nn.Module:
        """Load the HF model from a local directory (float32)."""
        raise NotImplementedError

    def _tiny_hf(self) -> nn.Module:
        """A tiny randomly initialised HF model (the RNG is seeded by the caller)."""
        raise NotImplementedError

    def _default_source(self) -> tuple[Path, dict[str, Any]]:
        """The embedded default checkpoint directory and extra from_pretrained kwargs."""
        raise FileNotFoundError(
            f"no {self.family} weights ship with CoFormer; pass a local directory holding a transformers "
            f"checkpoint (config.json + weights, e.g. written by save_pretrained)")

    def _blocks(self, base: nn.Module) -> Sequence[nn.Module]:
        raise NotImplementedError

    def _attn_out(self, block: nn.Module) -> nn.Module:
        raise NotImplementedError

    def _mlp_out(self, block: nn.Module) -> nn.Module:
        raise NotImplementedError

    def _canonical_layer(self, base: nn.Module, block: nn.Module) -> Canon:
        raise NotImplementedError

    def _canonical_globals(self, hf: nn.Module) -> Canon:
        raise NotImplementedError

    def _arch(self, hf: nn.Module) -> dict[str, Any]:
        raise NotImplementedError

    def _shape(self, cfg: Any) -> ModelShape:
        """{L, d, h, D} from the usual HF config names (BERT, MPNet); families named otherwise override it."""
        L, h = cfg.num_hidden_layers, cfg.num_attention_heads
        return ModelShape(L, cfg.hidden_size, (h,) * L, (cfg.intermediate_size,) * L, cfg.hidden_size // h)

    def _hash_tokenizer(self, vocab_size: int) -> HashTokenizer:
        """The tokenizer of a teacher saved without a vocabulary (tiny models)."""
        return HashTokenizer(vocab_size)

    # -- loading and saving -------------------------------------------------------------------

    def _teacher(self, model: nn.Module) -> HFTeacher:
        if not isinstance(model, HFTeacher) or getattr(model.hf.config, "model_type", None) not in self.model_types:
            raise TypeError(f"expected a {self.family} teacher from {type(self).__name__}.load()/tiny(), "
                            f"got {type(model).__name__}")
        return model

    def _lm_kind(self, hf: nn.Module) -> str | None:
        lm = hf.get_output_embeddings()
        if lm is None:
            return None
        return "tied" if lm.weight is hf.get_input_embeddings().weight else "separate"

    def load(self, source: str | Path | None = None, *, num_labels: int | None = None,
             max_length: int | None = None) -> HFTeacher:
        """Load a teacher from a local transformers directory (or the embedded default when ``None``).

        A ``coformer_head.*`` pair written by :meth:`save` is restored; ``num_labels`` attaches a
        fresh head of that size instead when none is saved or the saved one has another size.
        ``max_length`` overrides the saved (or default 128) number of tokens ``prepare`` keeps.
        """
        from transformers import AutoConfig, AutoTokenizer

        extra: dict[str, Any] = {}
        if source is None:
            source, extra = self._default_source()
        path = Path(source)
        if not path.is_dir():
            raise FileNotFoundError(f"{self.family} checkpoint directory {path} does not exist; pass a local "
                                    f"transformers directory (config.json + weights)")
        if not extra and not (path / "config.json").exists():
            raise ValueError(f"{path} has no config.json, so it is not a transformers checkpoint; pass a "
                             f"directory written by save_pretrained or {type(self).__name__}.save")
        with quiet_transformers():
            if not extra:
                cfg = AutoConfig.from_pretrained(path, local_files_only=True)
                if cfg.model_type not in self.model_types:
                    raise ValueError(f"{path} holds a {cfg.model_type!r} model, not {self.family} "
                                     f"({', '.join(self.model_types)}); load it with the backbone for that family")
                hf = self._from_pretrained(path)
            else:
                hf = self._from_pretrained_default(path, extra)
            has_vocab = "gguf_file" in extra or any((path / f).exists() for f in TOKENIZER_FILES)
            tokenizer = (AutoTokenizer.from_pretrained(path, local_files_only=True, **extra) if has_vocab
                         else self._hash_tokenizer(hf.config.vocab_size))
        if getattr(tokenizer, "pad_token", 1) is None:
            tokenizer.pad_token = tokenizer.eos_token
        hf.eval()
        saved_length = DEFAULT_MAX_LENGTH
        if (path / BACKBONE_CONFIG).exists():
            saved_length = int(json.loads((path / BACKBONE_CONFIG).read_text())["max_length"])
        max_length = max_length or saved_length
        limit = getattr(hf.config, "n_positions", None) or getattr(hf.config, "max_position_embeddings", None)
        if limit:
            max_length = min(max_length, limit)
        head = load_head(path, num_labels)
        if head is None and num_labels is not None:
            head = ClassifierHead(self._shape(hf.config).embed_dim, num_labels)
        return HFTeacher(hf, tokenizer, head, self.pooling, max_length).eval()

    def _from_pretrained_default(self, path: Path, extra: dict[str, Any]) -> nn.Module:
        return self._from_pretrained(path)

    def save(self, model: nn.Module, path: str | Path) -> Path:
        """Write the HF weights (safetensors), tokenizer, max length and task head to ``path``."""
        teacher = self._teacher(model)
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        with quiet_transformers():
            teacher.hf.save_pretrained(out, safe_serialization=True)
            if not isinstance(teacher.tokenizer, HashTokenizer):
                teacher.tokenizer.save_pretrained(out)
        (out / BACKBONE_CONFIG).write_text(json.dumps({"backbone": self.name, "max_length": teacher.max_length}))
        if teacher.head is not None:
            save_head(teacher.head, out)
        return out

    def tiny(self, *, num_labels: int = 3, seed: int = 0) -> HFTeacher:
        """A small randomly initialised teacher of the exact architecture with a classification head."""
        torch.manual_seed(seed)
        hf = self._tiny_hf().eval()
        head = ClassifierHead(self._shape(hf.config).embed_dim, num_labels)
        return HFTeacher(hf, self._hash_tokenizer(hf.config.vocab_size), head, self.pooling, max_length=16).eval()

    # -- the teacher ----------------------------------------------------------------------------

    def shape(self, model: nn.Module) -> ModelShape:
        """{L, d, h, D}, the per-head width and the query heads per key/value head."""
        return self._shape(self._teacher(model).hf.config)

    def features(self, model: nn.Module, batch: Batch) -> Tensor:
        """The teacher's pooled final hidden state ``[B, d]``."""
        return self._teacher(model)(**_inputs(batch, self.input_keys))

    def task_head(self, model: nn.Module) -> nn.Module:
        """The classification head (``features → logits``); a headless causal LM gives its LM head
        (last-token features → next-token logits)."""
        teacher = self._teacher(model)
        if teacher.head is not None:
            return teacher.head
        lm = teacher.hf.get_output_embeddings()
        if lm is not None:
            return lm
        raise ValueError(f"this {self.family} teacher has no task head; load it with num_labels=N "
                         f"(or from a directory saved with a head)")

    def prepare(self, model: nn.Module, examples: Sequence[Any]) -> Batch:
        """Tokenise texts, truncated to ``max_length`` and right-padded per :attr:`padding`: {input_ids, attention_mask}."""
        teacher = self._teacher(model)
        if isinstance(examples, str) or not all(isinstance(e, str) for e in examples):
            raise TypeError(f"{self.family} prepare() takes a list of strings")
        tok = teacher.tokenizer
        if not isinstance(tok, HashTokenizer):
            tok.padding_side = "right"
        enc = tok(list(examples), padding=self.padding, truncation=True, max_length=teacher.max_length,
                  return_tensors="pt")
        return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}

    def example_batch(self, model: nn.Module, batch_size: int = 2, seed: int = 0) -> Batch:
        """Random token ids of varying lengths, right-padded (so padding and the mask are exercised)."""
        teacher = self._teacher(model)
        g = torch.Generator().manual_seed(seed)
        seq = min(teacher.max_length, 16)
        ids = torch.randint(3, teacher.hf.config.vocab_size, (batch_size, seq), generator=g)
        lengths = torch.randint(seq // 2, seq + 1, (batch_size,), generator=g)
        lengths[0] = seq
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        return {"input_ids": ids * mask, "attention_mask": mask}

    # -- importance -----------------------------------------------------------------------------

    def importance(self, model: nn.Module, batch: Batch) -> UnitImportance:
        """Data-driven scores on a calibration batch.

        Heads and MLP neurons: |∂L/∂gate| of per-sample gates on each head's (neuron's) input to
        the output projection (Michel et al., 2019), summed over samples. Channels: the same on
        gates over the residual stream at the embedding output and after every layer. Layers:
        1 − cosine between each layer's input and output over real tokens (block influence).
        L is cross-entropy on ``batch["labels"]`` or the teacher's own predictions when it has a
        classification head; next-token cross-entropy for a headless causal LM; else ½‖features‖².
        """
        teacher = self._teacher(model)
        shape = self.shape(teacher)
        inputs = _inputs(batch, self.input_keys)
        bsz = inputs["input_ids"].shape[0]
        token_mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).float()
        blocks = self._blocks(teacher.base)
        head_gates = [torch.ones(bsz, h, requires_grad=True) for h in shape.heads]
        mlp_gates = [torch.ones(bsz, m, requires_grad=True) for m in shape.mlp]
        chan_gates = [torch.ones(bsz, shape.embed_dim, requires_grad=True) for _ in range(shape.layers + 1)]
        layer_change = torch.zeros(shape.layers)
        hd = shape.head_dim

        def gate_heads(k: int) -> Callable[..., Any]:
            def pre(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
                x = args[0]
                b, s, _ = x.shape
                x = (x.view(b, s, shape.heads[k], hd) * head_gates[k][:, None, :, None]).view(b, s, -1)
                return (x, *args[1:])
            return pre

        def gate_mlp(k: int) -> Callable[..., Any]:
            def pre(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
                return (args[0] * mlp_gates[k][:, None, :], *args[1:])
            return pre

        def hidden_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
            return args[0] if args else kwargs["hidden_states"]

        def gate_input(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            x = hidden_arg(args, kwargs) * chan_gates[0][:, None, :]
            return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

        def gate_output(k: int) -> Callable[..., Any]:
            def post(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
                h = out[0] if isinstance(out, tuple) else out
                cos = F.cosine_similarity(hidden_arg(args, kwargs).detach(), h.detach(), dim=-1)
                layer_change[k] = (((1 - cos) * token_mask).sum() / token_mask.sum()).item()
                h = h * chan_gates[k + 1][:, None, :]
                return (h, *out[1:]) if isinstance(out, tuple) else h
            return post

        handles = [blocks[0].register_forward_pre_hook(gate_input, with_kwargs=True)]
        was_training = teacher.training
        grad_flags = [p.requires_grad for p in teacher.parameters()]
        teacher.eval().requires_grad_(False)
        try:
            for k, block in enumerate(blocks):
                handles.append(self._attn_out(block).register_forward_pre_hook(gate_heads(k)))
                handles.append(self._mlp_out(block).register_forward_pre_hook(gate_mlp(k)))
                handles.append(block.register_forward_hook(gate_output(k), with_kwargs=True))
            hidden = teacher.hidden_states(**inputs)
            feats = pool(hidden, inputs.get("attention_mask"), teacher.pooling)
            lm = teacher.hf.get_output_embeddings()
            if teacher.head is not None:
                logits = teacher.head(feats)
                labels = batch.get("labels")
                labels = logits.argmax(-1).detach() if labels is None else labels.long()
                loss = F.cross_entropy(logits, labels)
            elif lm is not None:
                nll, count = next_token_nll(lm(hidden), inputs["input_ids"], inputs.get("attention_mask"))
                loss = nll / count.clamp(min=1)
            else:
                loss = 0.5 * feats.pow(2).sum(-1).mean()
            grads = torch.autograd.grad(loss, [*head_gates, *mlp_gates, *chan_gates])
        finally:
            for h in handles:
                h.remove()
            for p, flag in zip(teacher.parameters(), grad_flags):
                p.requires_grad_(flag)
            teacher.train(was_training)
        L = shape.layers
        g_heads, g_mlp, g_chan = grads[:L], grads[L: 2 * L], grads[2 * L:]
        return UnitImportance(
            layers=layer_change,
            channels=sum(g.abs().sum(0) for g in g_chan).detach(),
            heads=[g.abs().sum(0).detach() for g in g_heads],
            mlp=[g.abs().sum(0).detach() for g in g_mlp],
        )

    # -- slicing and masking ----------------------------------------------------------------------

    def _check_selection(self, shape: ModelShape, sel: UnitSelection) -> None:
        check_selection(shape, sel, f"this {self.family}")

    def slice(self, model: nn.Module, selection: UnitSelection) -> CompactLM:
        """A :class:`CompactLM` holding only the selected layers, heads, neurons and channels."""
        teacher = self._teacher(model)
        shape = self.shape(teacher)
        self._check_selection(shape, selection)
        base = teacher.base
        blocks = self._blocks(base)
        with torch.no_grad():
            layers = [self._canonical_layer(base, blocks[j]) for j in selection.layers]
            return slice_canonical({"backbone": self.name, **self._arch(teacher.hf)},
                                   self._canonical_globals(teacher.hf), layers, shape, selection)

    def build_submodel(self, config: dict[str, Any]) -> CompactLM:
        """An untrained :class:`CompactLM` with the architecture ``config`` describes."""
        if config.get("backbone") != self.name:
            raise ValueError(f"sub-model config is for backbone {config.get('backbone')!r}, not {self.name!r}")
        if config.get("kind") in PARALLEL_KINDS:  # pipeline stages / tensor shards (baselines)
            return build_parallel(self, config)
        missing = {"vocab_size", "embed_dim", "head_dim", "heads", "mlp", "scaling", "norm", "norm_eps", "act",
                   "gated", "positions", "causal", "pooling", "qkv_bias", "o_bias", "mlp_bias"} - set(config)
        if missing:
            raise ValueError(f"{self.family} sub-model config lacks {sorted(missing)}")
        return CompactLM(config).eval()

    def mask(self, model: nn.Module, selection: UnitSelection) -> HFTeacher:
        """A copy of the HF teacher whose removed heads/neurons write nothing and whose removed layers are identities."""
        teacher = self._teacher(model)
        shape = self.shape(teacher)
        self._check_selection(shape, selection)
        if tuple(selection.channels) != tuple(range(shape.embed_dim)):
            raise ValueError("mask() keeps every embedding channel: removing channels has no masking identity "
                             "(norm statistics change); compare channel subsets with slice() only")
        masked = copy.deepcopy(teacher, memo={id(teacher.tokenizer): teacher.tokenizer})
        kept = dict(zip(selection.layers, zip(selection.heads, selection.mlp)))
        hd = shape.head_dim
        blocks = self._blocks(masked.base)
        with torch.no_grad():
            for j, block in enumerate(list(blocks)):
                if j not in kept and self.norm_placement == "post":
                    blocks[j] = PassThroughBlock(self.blocks_return_tuple)
                    continue
                hs, ms = kept.get(j, ((), ()))
                drop_h = [h * hd + i for h in range(shape.heads[j]) if h not in set(hs) for i in range(hd)]
                drop_m = [m for m in range(shape.mlp[j]) if m not in set(ms)]
                _zero_inputs(self._attn_out(block), drop_h, bias=j not in kept)
                _zero_inputs(self._mlp_out(block), drop_m, bias=j not in kept)
        return masked.eval()

    # -- language modelling ---------------------------------------------------------------------

    def lm_logits(self, model: nn.Module, batch: Batch) -> Tensor:
        """Next-token logits ``[B, T, vocab]`` of a causal-LM teacher or of a sub-model sliced from one."""
        inputs = _inputs(batch)
        if isinstance(model, CompactLM):
            return model.lm_logits(**inputs)
        return self._teacher(model).lm_logits(**inputs)

    def perplexity(self, model: nn.Module, batch: Batch) -> float:
        """Next-token perplexity over the real tokens of ``batch`` (teacher or sub-model)."""
        with torch.no_grad():
            logits = self.lm_logits(model, batch)
            nll, count = next_token_nll(logits, batch["input_ids"], batch.get("attention_mask"))
        if int(count) == 0:
            raise ValueError("perplexity needs at least one sequence of two or more real tokens")
        return float(torch.exp(nll / count))


__all__ = ["CompactLM", "HFBackbone", "HFTeacher", "HashTokenizer", "PassThroughBlock", "has_relative_bias", "pool",
           "slice_canonical"]
