"""The BERT backbone on the real pretrained all-MiniLM-L6-v2 (and its tiny model where noted)."""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import load_file as st_load_file
from torch import Tensor

import coformer
from coformer.admission import materialise, safetensors_header
from coformer.artifacts import load_plan, submodel_artifact
from coformer.assignment import assign_units
from coformer.offline.decompose import proportional_specs
from coformer.measure import measure_cost
from coformer.spec import ModelShape, UnitSelection, check_structure
from coformer_backbones import _hf_common
from coformer_backbones._hf_common import CompactLM, HFBackbone, HFTeacher
from coformer_backbones._parallel import LayeredModel
from coformer_backbones.bert import BertBackbone, HashTokenizer

TEXTS = ["The striker scored twice in the cup final.", "Shares fell after the bank's profit warning."]
#: two headlines per class (sport, business, tech, politics, entertainment)
LABELLED = [
    ("The striker scored twice in the cup final.", 0), ("The champions lost at home on Saturday.", 0),
    ("Shares fell after the bank's profit warning.", 1), ("The company reported record quarterly sales.", 1),
    ("A new phone was released with a faster chip.", 2), ("The software update fixes a security flaw.", 2),
    ("The minister announced a new tax plan.", 3), ("MPs voted against the government's bill.", 3),
    ("The film festival opens in Cannes.", 4), ("The singer's new album tops the charts.", 4),
]


@dataclass
class Real:
    """The real MiniLM teacher (5-label head), a tokenised batch and its reference features."""

    backbone: BertBackbone
    model: HFTeacher
    batch: dict[str, Tensor]
    shape: ModelShape
    features: Tensor


@pytest.fixture(scope="module")
def real() -> Real:
    """Load all-MiniLM-L6-v2 once per module."""
    torch.manual_seed(0)  # the fresh head's initialisation
    backbone = coformer.create_backbone("bert")
    model = backbone.load(num_labels=5)
    batch = backbone.prepare(model, TEXTS)
    with torch.no_grad():
        feats = backbone.features(model, batch)
    return Real(backbone, model, batch, backbone.shape(model), feats)


def _run(module: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
    with torch.no_grad():
        return module(**batch)


def test_registered_and_shape_is_minilm(real: Real) -> None:
    assert isinstance(real.backbone, BertBackbone)
    assert real.shape == ModelShape(6, 384, (12,) * 6, (1536,) * 6, 32)


def test_prepare_tokenises_real_text(real: Real) -> None:
    tok = real.model.tokenizer
    batch = real.batch
    assert set(batch) == {"input_ids", "attention_mask"}
    assert all(t.dtype == torch.int64 and t.shape == (2, real.model.max_length) for t in batch.values())
    for i, text in enumerate(TEXTS):
        ids = tok(text)["input_ids"]  # with [CLS] … [SEP], unpadded
        assert batch["attention_mask"][i].sum().item() == len(ids)
        assert batch["input_ids"][i, : len(ids)].tolist() == ids
        assert batch["input_ids"][i, 0].item() == tok.cls_token_id
    long = real.backbone.prepare(real.model, ["word " * 1000])
    assert long["attention_mask"].sum().item() == real.model.max_length
    assert long["input_ids"][0, -1].item() == tok.sep_token_id
    with pytest.raises(TypeError, match="list of strings"):
        real.backbone.prepare(real.model, "not a list")


def test_features_are_pretrained_sentence_embeddings(real: Real) -> None:
    """Mean pooling over real MiniLM weights puts paraphrases together and unrelated text apart."""
    batch = real.backbone.prepare(real.model, ["A man is playing a guitar.", "Someone plays the guitar.",
                                               "The stock market fell sharply today."])
    with torch.no_grad():
        e = F.normalize(real.backbone.features(real.model, batch), dim=-1)
    assert e.shape == (3, 384)
    paraphrase, unrelated = (e[0] @ e[1]).item(), (e[0] @ e[2]).item()
    assert paraphrase > 0.6 and paraphrase > unrelated + 0.4


def test_full_selection_reproduces_real_teacher(real: Real) -> None:
    sub = real.backbone.slice(real.model, UnitSelection.full(real.shape))
    assert isinstance(sub, CompactLM) and sub.feature_dim == 384
    torch.testing.assert_close(_run(sub, real.batch), real.features, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("removed", ["heads", "mlp", "layers", "all"])
def test_removed_units_equal_masked_real_teacher(real: Real, removed: str) -> None:
    g = torch.Generator().manual_seed(1)
    layers = (0, 1, 3, 5) if removed in ("layers", "all") else tuple(range(6))
    heads = tuple(tuple(sorted(torch.randperm(12, generator=g)[:5].tolist())) if removed in ("heads", "all")
                  else tuple(range(12)) for _ in layers)
    mlp = tuple(tuple(sorted(torch.randperm(1536, generator=g)[:600].tolist())) if removed in ("mlp", "all")
                else tuple(range(1536)) for _ in layers)
    sel = UnitSelection(layers, tuple(range(384)), heads, mlp)
    sliced = _run(real.backbone.slice(real.model, sel), real.batch)
    with torch.no_grad():
        masked = real.backbone.features(real.backbone.mask(real.model, sel), real.batch)
    torch.testing.assert_close(sliced, masked, atol=1e-5, rtol=1e-4)
    assert (masked - real.features).abs().max() > 1e-2  # the removal changed the teacher


@pytest.mark.parametrize("n", [2, 3, 4])
def test_real_decomposition_is_disjoint_within_teacher(real: Real, n: int) -> None:
    imp = real.backbone.importance(real.model, real.batch)
    specs = proportional_specs(real.shape, [1.0] * n)
    assert check_structure(specs, real.shape) == []
    sels = assign_units(real.shape, specs, imp)
    assert [s.spec for s in sels] == specs
    channels = [c for s in sels for c in s.channels]
    assert len(channels) == len(set(channels)) <= 384
    for j in range(6):
        heads = [h for s in sels if j in s.layers for h in s.heads[s.layers.index(j)]]
        mlp = [m for s in sels if j in s.layers for m in s.mlp[s.layers.index(j)]]
        assert len(heads) == len(set(heads)) <= 12
        assert len(mlp) == len(set(mlp)) <= 1536
    # every sub-model gets a mix: none holds only the least important heads of layer 0
    top = set(torch.argsort(imp.heads[0], descending=True)[:n].tolist())
    assert all(set(s.heads[0]) & top for s in sels)
    subs = real.backbone.decompose(real.model, specs, importance=imp)
    for sub, spec in zip(subs, specs, strict=True):
        out = _run(sub, real.batch)
        assert out.shape == (2, spec.embed_dim) and torch.isfinite(out).all()


def test_real_submodel_round_trip_and_costs(real: Real) -> None:
    imp = real.backbone.importance(real.model, real.batch)
    subs = real.backbone.decompose(real.model, proportional_specs(real.shape, [1.0, 2.0]), importance=imp)
    art = submodel_artifact(subs[0])
    rebuilt = real.backbone.build_submodel(json.loads(json.dumps(art.config)))
    rebuilt.load_state_dict(st_load(art.weights), strict=True)
    torch.testing.assert_close(_run(rebuilt.eval(), real.batch), _run(subs[0], real.batch), atol=0, rtol=0)

    teacher = measure_cost(real.model, real.batch)
    # every FLOP is a matmul: QKV/output/MLP projections plus QK^T and attention·V per head
    (b, s), sh = real.batch["input_ids"].shape, real.shape
    projections = 2 * b * s * sum(4 * sh.embed_dim**2 + 2 * sh.embed_dim * m for m in sh.mlp)
    attention = sum(2 * 2 * b * h * s * s * sh.head_dim for h in sh.heads)
    assert teacher.flops == projections + attention
    costs = [measure_cost(s, real.batch) for s in subs]
    for c in costs:
        assert 0 < c.flops < teacher.flops and 0 < c.params < teacher.params
    assert costs[0].flops < costs[1].flops  # the 1:2 split is visible in measured work
    assert sum(c.flops for c in costs) < teacher.flops


def test_importance_uses_labels_and_data(real: Real) -> None:
    batch = dict(real.batch)
    base = real.backbone.importance(real.model, batch)
    with torch.no_grad():
        predicted = real.backbone.forward_teacher(real.model, batch).argmax(-1)
    same = real.backbone.importance(real.model, {**batch, "labels": predicted})
    other = real.backbone.importance(real.model, {**batch, "labels": (predicted + 1) % 5})
    torch.testing.assert_close(torch.cat(same.heads), torch.cat(base.heads))
    assert not torch.allclose(torch.cat(other.heads), torch.cat(base.heads))
    assert torch.isfinite(base.layers).all() and (base.layers > 0).all()


def test_important_units_matter_more(real: Real) -> None:
    """With a head fitted to a real task, keeping the top-scored half of heads (MLP neurons) hurts less than the bottom half."""
    texts, labels = zip(*LABELLED)
    y = torch.tensor(labels)
    batch = real.backbone.prepare(real.model, list(texts))
    with torch.no_grad():
        feats = real.backbone.features(real.model, batch)
    head = copy.deepcopy(real.model.head)
    opt = torch.optim.Adam(head.parameters(), lr=0.01)
    for _ in range(15):
        opt.zero_grad()
        F.cross_entropy(head(feats), y).backward()
        opt.step()
    teacher = HFTeacher(real.model.hf, real.model.tokenizer, head, "mean", real.model.max_length).eval()
    imp = real.backbone.importance(teacher, {**batch, "labels": y})

    def loss_keeping(kind: str, top: bool) -> float:
        heads = tuple(tuple(range(12)) for _ in range(6))
        mlp = tuple(tuple(range(1536)) for _ in range(6))
        scores = imp.heads if kind == "heads" else imp.mlp
        kept = tuple(tuple(sorted(torch.argsort(s, descending=top)[: s.numel() // 2].tolist())) for s in scores)
        sel = UnitSelection(tuple(range(6)), tuple(range(384)), *((kept, mlp) if kind == "heads" else (heads, kept)))
        with torch.no_grad():
            logits = real.backbone.forward_teacher(real.backbone.mask(teacher, sel), batch)
        return F.cross_entropy(logits, y).item()

    for kind in ("heads", "mlp"):
        assert loss_keeping(kind, top=True) < loss_keeping(kind, top=False), kind


def test_teacher_directory_round_trip(real: Real, tmp_path) -> None:
    out = real.backbone.save(real.model, tmp_path / "minilm")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "coformer_head.safetensors", "coformer_head.json"):
        assert (out / name).exists(), name
    loaded = real.backbone.load(out)
    for a, b in zip(loaded.head.state_dict().values(), real.model.head.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert real.backbone.prepare(loaded, TEXTS)["input_ids"].equal(real.batch["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(real.backbone.forward_teacher(loaded, real.batch),
                                   real.backbone.forward_teacher(real.model, real.batch), atol=1e-6, rtol=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        relabelled = real.backbone.load(out, num_labels=3)
    assert relabelled.head.out.out_features == 3 and any("fresh" in str(w.message) for w in caught)


def test_clear_errors(real: Real, tmp_path) -> None:
    backbone = real.backbone
    with pytest.raises(FileNotFoundError, match="does not exist"):
        backbone.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        backbone.load(tmp_path / "empty")
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="'gpt2' model, not BERT"):
        backbone.load(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="no task head"):
        backbone.task_head(backbone.load())
    with pytest.raises(TypeError, match="BERT teacher"):
        backbone.shape(torch.nn.Linear(2, 2))
    half = UnitSelection.full(real.shape)
    half = UnitSelection(half.layers, tuple(range(192)), half.heads, half.mlp)
    with pytest.raises(ValueError, match="every embedding channel"):
        backbone.mask(real.model, half)
    bad = UnitSelection((0, 9), tuple(range(384)), ((0,), (0,)), ((0,), (0,)))
    with pytest.raises(ValueError, match=r"layers \[0, 9\]"):
        backbone.slice(real.model, bad)
    with pytest.raises(ValueError, match="backbone 'vit'"):
        backbone.build_submodel({"backbone": "vit"})


def test_tiny_prepare_and_save_without_vocabulary(tmp_path) -> None:
    backbone = BertBackbone()
    tiny = backbone.tiny(num_labels=4)
    assert isinstance(tiny.tokenizer, HashTokenizer)
    batch = backbone.prepare(tiny, ["hello world", "hello"])
    assert batch["input_ids"][0, :4].tolist() == [1, batch["input_ids"][1, 1].item(), batch["input_ids"][0, 2].item(), 2]
    assert batch["attention_mask"].sum(1).tolist() == [4, 3]
    loaded = backbone.load(backbone.save(tiny, tmp_path / "tiny"))
    assert isinstance(loaded.tokenizer, HashTokenizer) and loaded.max_length == tiny.max_length
    with torch.no_grad():
        torch.testing.assert_close(backbone.forward_teacher(loaded, batch), backbone.forward_teacher(tiny, batch))


# -- BERT on the shared HF toolkit ----------------------------------------------------------------

FIXTURE = Path(__file__).parent / "fixtures" / "bert_v1_plan"


def test_bert_is_a_family_of_the_shared_hf_toolkit() -> None:
    """Nothing BERT-specific beyond where its weights live: the shared teacher, sub-model, tokenizer,
    and block-by-block protocol serve it, and the compact sub-model takes BERT's token types."""
    backbone = BertBackbone()
    assert isinstance(backbone, HFBackbone) and HashTokenizer is _hf_common.HashTokenizer
    torch.manual_seed(0)
    tiny = backbone.tiny()
    assert isinstance(tiny, HFTeacher) and isinstance(tiny.tokenizer, _hf_common.HashTokenizer)
    shape = backbone.shape(tiny)
    batch = backbone.example_batch(tiny, batch_size=3)
    types = {**batch, "token_type_ids": (torch.arange(batch["input_ids"].shape[1]) % 2).expand(3, -1)}
    sub = backbone.slice(tiny, UnitSelection.full(shape))
    assert type(sub) is CompactLM and isinstance(sub, LayeredModel)
    with torch.no_grad():
        for b in (batch, types):  # token types matter, and the sub-model reads them like the teacher
            torch.testing.assert_close(sub(**b), backbone.features(tiny, b), atol=1e-5, rtol=1e-4)
        assert not torch.allclose(sub(**types), sub(**batch))
        first = backbone.pipeline_stage(tiny, [0, 1], first=True, last=False)
        last = backbone.pipeline_stage(tiny, [2], first=False, last=True)
        staged = last(hidden_states=first(**types), attention_mask=types["attention_mask"])
    torch.testing.assert_close(staged, backbone.features(tiny, types), atol=1e-5, rtol=1e-4)


def test_hash_tokenizer_wraps_and_pads_like_bert() -> None:
    """BERT's hash tokenizer: [CLS] … [SEP], words from id 4, padded to max_length; the shared default
    (no wrap, words from 3) pads to the longest text."""
    bert = BertBackbone()._hash_tokenizer(100)
    enc = bert(["Hello world", ""], max_length=6, padding="max_length")
    hello, world = bert.encode("hello world")
    assert enc["input_ids"].tolist() == [[1, hello, world, 2, 0, 0], [1, 2, 0, 0, 0, 0]]
    assert enc["attention_mask"].sum(1).tolist() == [4, 2] and 4 <= min(hello, world)
    plain = _hf_common.HashTokenizer(100)(["Hello world", ""], max_length=6)
    assert plain["input_ids"].shape == (2, 2) and plain["input_ids"][1].tolist() == [3, 0]
    assert plain["attention_mask"].sum(1).tolist() == [2, 1]
    with pytest.raises(ValueError, match="at least 5 ids"):
        BertBackbone()._hash_tokenizer(4)


def test_plan_written_before_the_shared_toolkit_still_loads() -> None:
    """A plan directory written by the former BERT sub-model (``bert-v1`` config and tensor names,
    fixture from commit 99331b8) passes admission, loads and gives the features it gave then."""
    expected = st_load_file(str(FIXTURE / "expected.safetensors"))
    batch = {k: v for k, v in expected.items() if k != "features"}
    plan = load_plan(FIXTURE)
    assert "hidden_act" in plan.artifacts[0].config  # the old format, untouched
    (sub,) = plan.submodels()
    with torch.no_grad():
        features = sub(**batch)
    # not bitwise against the fixture: CPUs with other vector units round differently (4e-8 seen)
    torch.testing.assert_close(features, expected["features"], atol=1e-6, rtol=1e-5)
    # sent on to a worker it keeps the tensor names of its weights file, with a CompactLM config
    art = submodel_artifact(sub)
    assert art.config["weights_layout"] == "bert-v1" and "norm_eps" in art.config
    assert set(safetensors_header(art.weights)) == set(safetensors_header(FIXTURE / "submodel_0.safetensors"))
    backbone = BertBackbone()
    again = materialise(lambda: backbone.build_submodel(art.config), art.weights)
    with torch.no_grad():
        assert torch.equal(again(**batch), features)
    with pytest.raises(ValueError, match=r"lacks \['layer_norm_eps'\]"):
        backbone.build_submodel({k: v for k, v in plan.artifacts[0].config.items() if k != "layer_norm_eps"})
