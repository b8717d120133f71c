"""Pipeline stages and tensor-parallel shards of a BERT teacher (the baselines CoFormer is compared with).

* :class:`BertPipelineStage` — consecutive teacher layers, unchanged; the first stage embeds,
  the last mean-pools.
* :class:`BertTensorShard` — per layer, a subset of heads and MLP neurons (Megatron-style):
  phase 0 returns the selected heads' share of the attention output projection, phase 1 the
  selected neurons' share of the MLP output projection, both without bias.
* :class:`BertTensorHost` — what the coordinator keeps: embeddings, the projection biases and
  LayerNorms that turn summed partials into the next hidden state, and mean pooling.

Everything copies the HF teacher's weights directly, so the baselines are exact (up to the fp16
of the wire). :class:`BertParallelMixin` adds the three :class:`~coformer.backbone.Backbone`
methods to ``BertBackbone``; ``build_parallel`` rebuilds the worker-side modules from JSON config.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from coformer.backbone import Batch, SubModel, TensorParallelHost

PIPELINE_STAGE = "pipeline_stage"
TENSOR_SHARD = "tensor_shard"
PARALLEL_KINDS = (PIPELINE_STAGE, TENSOR_SHARD)


def _base_config(bert_config: Any) -> dict[str, Any]:
    h = bert_config.num_attention_heads
    return {
        "backbone": "bert",
        "vocab_size": bert_config.vocab_size,
        "max_position_embeddings": bert_config.max_position_embeddings,
        "type_vocab_size": bert_config.type_vocab_size,
        "embed_dim": bert_config.hidden_size,
        "head_dim": bert_config.hidden_size // h,
        "layer_norm_eps": bert_config.layer_norm_eps,
        "hidden_act": bert_config.hidden_act,
    }


def _copy(dst: Tensor, src: Tensor) -> None:
    with torch.no_grad():
        dst.copy_(src.detach())


class BertEmbed(nn.Module):
    """Word + position + token-type embeddings and LayerNorm, exactly as ``CompactBert`` embeds."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        d = config["embed_dim"]
        self.word = nn.Embedding(config["vocab_size"], d)
        self.position = nn.Embedding(config["max_position_embeddings"], d)
        self.token_type = nn.Embedding(config["type_vocab_size"], d)
        self.norm = nn.LayerNorm(d, eps=config["layer_norm_eps"])

    def load_from(self, teacher_embeddings: nn.Module) -> None:
        """Copy the HF ``BertEmbeddings`` weights."""
        e = teacher_embeddings
        _copy(self.word.weight, e.word_embeddings.weight)
        _copy(self.position.weight, e.position_embeddings.weight)
        _copy(self.token_type.weight, e.token_type_embeddings.weight)
        _copy(self.norm.weight, e.LayerNorm.weight)
        _copy(self.norm.bias, e.LayerNorm.bias)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """Hidden state ``[B, S, d]`` entering layer 0."""
        s = input_ids.shape[1]
        if s > self.position.num_embeddings:
            raise ValueError(f"sequence length {s} exceeds the model's {self.position.num_embeddings} positions; "
                             f"tokenise with a smaller max_length")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = torch.arange(s, device=input_ids.device)
        return self.norm(self.word(input_ids) + self.token_type(token_type_ids) + self.position(positions))


def _key_mask(attention_mask: Tensor | None) -> Tensor | None:
    return None if attention_mask is None else attention_mask.bool()[:, None, None, :]


def _load_layer(dst: nn.Module, src: nn.Module) -> None:
    """Copy one HF ``BertLayer`` into a full-width ``CompactBertLayer``."""
    att = src.attention
    for name, lin in (("q", att.self.query), ("k", att.self.key), ("v", att.self.value), ("o", att.output.dense),
                      ("fc1", src.intermediate.dense), ("fc2", src.output.dense)):
        _copy(getattr(dst, name).weight, lin.weight)
        _copy(getattr(dst, name).bias, lin.bias)
    for name, ln in (("norm1", att.output.LayerNorm), ("norm2", src.output.LayerNorm)):
        _copy(getattr(dst, name).weight, ln.weight)
        _copy(getattr(dst, name).bias, ln.bias)


class BertPipelineStage(SubModel):
    """Consecutive teacher layers at full width; ``config["first"]`` embeds, ``config["last"]`` pools."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        from coformer_backbones.bert import CompactBertLayer

        self.config = dict(config)
        d = config["embed_dim"]
        self.first, self.last = bool(config["first"]), bool(config["last"])
        self.feature_dim = d
        self.embed = BertEmbed(config) if self.first else None
        self.layers = nn.ModuleList(
            CompactBertLayer(d, h, config["head_dim"], m, config["layer_norm_eps"], config["hidden_act"])
            for h, m in zip(config["heads"], config["mlp"], strict=True))

    def forward(self, hidden_states: Tensor | None = None, input_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None) -> Tensor:
        """First stage: a tokenised batch in; later stages: ``hidden_states`` (any float dtype) in.

        Returns hidden states ``[B, S, d]``, or pooled features ``[B, d]`` from the last stage.
        """
        from coformer_backbones.bert import mean_pool

        if self.first:
            if input_ids is None:
                raise ValueError("the first pipeline stage needs input_ids (a tokenised batch)")
            x = self.embed(input_ids, token_type_ids)
        else:
            if hidden_states is None:
                raise ValueError("a later pipeline stage needs hidden_states from the stage before it")
            x = hidden_states.float()
        mask = _key_mask(attention_mask)
        for layer in self.layers:
            x = layer(x, mask)
        return mean_pool(x, attention_mask) if self.last else x


class _ShardLayer(nn.Module):
    """One layer's share: ``heads`` heads (q/k/v rows, o columns) and ``mlp`` neurons (fc1 rows, fc2 columns)."""

    def __init__(self, d: int, heads: int, head_dim: int, mlp: int):
        super().__init__()
        self.heads, self.head_dim, self.mlp = heads, head_dim, mlp
        inner = heads * head_dim
        if heads:
            self.q, self.k, self.v = nn.Linear(d, inner), nn.Linear(d, inner), nn.Linear(d, inner)
            self.o = nn.Parameter(torch.zeros(d, inner))
        if mlp:
            self.fc1 = nn.Linear(d, mlp)
            self.fc2 = nn.Parameter(torch.zeros(d, mlp))


class BertTensorShard(SubModel):
    """A device's heads and MLP neurons in every layer; ``forward`` returns one phase's partial sum."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        from coformer_backbones.bert import _activation

        self.config = dict(config)
        d = config["embed_dim"]
        self.feature_dim = d
        self.act = _activation(config["hidden_act"])
        self.layers = nn.ModuleList(_ShardLayer(d, h, config["head_dim"], m)
                                    for h, m in zip(config["heads"], config["mlp"], strict=True))

    def forward(self, hidden_states: Tensor, layer: Tensor, phase: Tensor,
                attention_mask: Tensor | None = None) -> Tensor:
        """Phase 0: Σ over this shard's heads of head output × its o-projection columns; phase 1: the MLP's."""
        k, p = int(layer), int(phase)
        if not 0 <= k < len(self.layers) or p not in (0, 1):
            raise ValueError(f"layer {k} / phase {p} out of range: {len(self.layers)} layers, phases 0 and 1")
        x = hidden_states.float()
        sh = self.layers[k]
        if p == 0:
            if not sh.heads:
                return torch.zeros_like(x)
            b, s, _ = x.shape

            def split(t: Tensor) -> Tensor:
                return t.view(b, s, sh.heads, sh.head_dim).transpose(1, 2)

            attn = torch.nn.functional.scaled_dot_product_attention(
                split(sh.q(x)), split(sh.k(x)), split(sh.v(x)), attn_mask=_key_mask(attention_mask),
                scale=sh.head_dim**-0.5)
            return attn.transpose(1, 2).reshape(b, s, -1) @ sh.o.T
        if not sh.mlp:
            return torch.zeros_like(x)
        return self.act(sh.fc1(x)) @ sh.fc2.T


class BertTensorHost(TensorParallelHost):
    """The coordinator's side of a BERT tensor-parallel split: embed, add bias + residual + LayerNorm, pool."""

    shard_inputs = ("attention_mask",)
    phases = 2

    def __init__(self, config: dict[str, Any], num_layers: int):
        super().__init__()
        d, eps = config["embed_dim"], config["layer_norm_eps"]
        self.num_layers = num_layers
        self.embedding = BertEmbed(config)
        self.o_bias = nn.ParameterList(nn.Parameter(torch.zeros(d)) for _ in range(num_layers))
        self.fc2_bias = nn.ParameterList(nn.Parameter(torch.zeros(d)) for _ in range(num_layers))
        self.norm1 = nn.ModuleList(nn.LayerNorm(d, eps=eps) for _ in range(num_layers))
        self.norm2 = nn.ModuleList(nn.LayerNorm(d, eps=eps) for _ in range(num_layers))

    def embed(self, batch: Batch) -> Tensor:
        """Embeddings of the tokenised batch."""
        return self.embedding(batch["input_ids"], batch.get("token_type_ids"))

    def combine(self, layer: int, phase: int, hidden: Tensor, partial: Tensor) -> Tensor:
        """Post-LayerNorm residual: ``LN(hidden + Σ partials + bias)``."""
        if phase == 0:
            return self.norm1[layer](hidden + partial.float() + self.o_bias[layer])
        return self.norm2[layer](hidden + partial.float() + self.fc2_bias[layer])

    def pool(self, hidden: Tensor, batch: Batch) -> Tensor:
        """Attention-mask mean pool (the teacher's features)."""
        from coformer_backbones.bert import mean_pool

        return mean_pool(hidden, batch.get("attention_mask"))


def build_parallel(config: dict[str, Any]) -> SubModel:
    """Rebuild a pipeline stage or tensor shard from its JSON config (weights are loaded after)."""
    kind = config.get("kind")
    if kind == PIPELINE_STAGE:
        return BertPipelineStage(config).eval()
    if kind == TENSOR_SHARD:
        return BertTensorShard(config).eval()
    raise ValueError(f"unknown BERT parallel module kind {kind!r}; expected one of {PARALLEL_KINDS}")


class BertParallelMixin:
    """``pipeline_stage``, ``tensor_shard`` and ``tensor_host`` for ``BertBackbone``."""

    def pipeline_stage(self, model: nn.Module, layers: Sequence[int], *, first: bool, last: bool) -> SubModel:
        """Teacher layers ``layers`` (consecutive, ascending) as one pipeline stage."""
        teacher = self._teacher(model)  # type: ignore[attr-defined]
        hf = teacher.bert
        cfg = hf.config
        layers = [int(i) for i in layers]
        if not layers or layers != list(range(layers[0], layers[-1] + 1)) or not 0 <= layers[0] <= layers[-1] < cfg.num_hidden_layers:
            raise ValueError(f"pipeline stage layers {layers} must be consecutive ascending indices in "
                             f"[0, {cfg.num_hidden_layers})")
        config = {**_base_config(cfg), "kind": PIPELINE_STAGE, "first": first, "last": last,
                  "heads": [cfg.num_attention_heads] * len(layers), "mlp": [cfg.intermediate_size] * len(layers),
                  "teacher_layers": layers, "stage_inputs": ["attention_mask"]}
        stage = BertPipelineStage(config)
        if stage.embed is not None:
            stage.embed.load_from(hf.embeddings)
        for dst, j in zip(stage.layers, layers):
            _load_layer(dst, hf.encoder.layer[j])
        return stage.eval()

    def tensor_shard(self, model: nn.Module, heads: Sequence[Sequence[int]],
                     neurons: Sequence[Sequence[int]]) -> SubModel:
        """Per teacher layer, the heads ``heads[k]`` and MLP neurons ``neurons[k]`` (possibly empty)."""
        teacher = self._teacher(model)  # type: ignore[attr-defined]
        hf = teacher.bert
        cfg = hf.config
        L, H, D = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size
        if len(heads) != L or len(neurons) != L:
            raise ValueError(f"a tensor shard needs one head list and one neuron list per layer ({L}); "
                             f"got {len(heads)} and {len(neurons)}")
        for k in range(L):
            if any(not 0 <= h < H for h in heads[k]) or len(set(heads[k])) != len(heads[k]):
                raise ValueError(f"layer {k}: heads {list(heads[k])} must be distinct indices in [0, {H})")
            if any(not 0 <= m < D for m in neurons[k]) or len(set(neurons[k])) != len(neurons[k]):
                raise ValueError(f"layer {k}: MLP neurons must be distinct indices in [0, {D})")
        base = _base_config(cfg)
        hd = base["head_dim"]
        config = {**base, "kind": TENSOR_SHARD, "heads": [len(h) for h in heads], "mlp": [len(m) for m in neurons],
                  "teacher_heads": [list(map(int, h)) for h in heads],
                  "teacher_neurons": [list(map(int, m)) for m in neurons]}
        shard = BertTensorShard(config)
        for k, (sh, hs, ms) in enumerate(zip(shard.layers, heads, neurons)):
            src = hf.encoder.layer[k]
            if hs:
                idx = torch.tensor([h * hd + i for h in hs for i in range(hd)], dtype=torch.long)
                for name, lin in (("q", src.attention.self.query), ("k", src.attention.self.key),
                                  ("v", src.attention.self.value)):
                    _copy(getattr(sh, name).weight, lin.weight.index_select(0, idx))
                    _copy(getattr(sh, name).bias, lin.bias.index_select(0, idx))
                _copy(sh.o, src.attention.output.dense.weight.index_select(1, idx))
            if ms:
                midx = torch.tensor(list(ms), dtype=torch.long)
                _copy(sh.fc1.weight, src.intermediate.dense.weight.index_select(0, midx))
                _copy(sh.fc1.bias, src.intermediate.dense.bias.index_select(0, midx))
                _copy(sh.fc2, src.output.dense.weight.index_select(1, midx))
        return shard.eval()

    def tensor_host(self, model: nn.Module) -> BertTensorHost:
        """Embeddings, projection biases and LayerNorms of every layer, and pooling."""
        teacher = self._teacher(model)  # type: ignore[attr-defined]
        hf = teacher.bert
        host = BertTensorHost(_base_config(hf.config), hf.config.num_hidden_layers)
        host.embedding.load_from(hf.embeddings)
        for k, src in enumerate(hf.encoder.layer):
            _copy(host.o_bias[k], src.attention.output.dense.bias)
            _copy(host.fc2_bias[k], src.output.dense.bias)
            for dst, ln in ((host.norm1[k], src.attention.output.LayerNorm), (host.norm2[k], src.output.LayerNorm)):
                _copy(dst.weight, ln.weight)
                _copy(dst.bias, ln.bias)
        return host.eval()


__all__ = ["BertParallelMixin", "BertPipelineStage", "BertTensorHost", "BertTensorShard", "build_parallel",
           "PARALLEL_KINDS"]
