"""The transformers language backbones (gpt2, flan_t5, llama, mpnet) against the HF models themselves.

The generic contract (tests/test_backbone_contract.py) already runs these plugins; here the
reference is transformers' own forward pass, selections are irregular (random per-layer heads,
the first layer removed — which for T5 holds the relative-bias table), checkpoints are real
``save_pretrained`` directories, and the real SmolLM2-135M is checked end to end.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load as st_load
from torch import Tensor

import coformer
from coformer.artifacts import submodel_artifact
from coformer.offline.decompose import proportional_specs
from coformer.measure import count_params, measure_cost
from coformer.spec import ModelShape, UnitSelection
from coformer_backbones._hf_common import HFTeacher, pool

ATOL, RTOL = 1e-5, 1e-4
FAMILIES = ["gpt2", "flan_t5", "llama", "mpnet"]
MEAN_POOLED = ("flan_t5", "mpnet")


def _hf_reference(name: str, hf: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Features computed from the HF model's own outputs, independently of the plugin."""
    with torch.no_grad():
        if name in MEAN_POOLED:
            hidden = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            m = batch["attention_mask"].float().unsqueeze(-1)
            return (hidden * m).sum(1) / m.sum(1)
        out = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        last = batch["attention_mask"].sum(1) - 1  # right padding
        return out.hidden_states[-1][torch.arange(len(last)), last]


def _random_selection(shape: ModelShape, seed: int, *, drop_first_layer: bool) -> UnitSelection:
    rng = random.Random(seed)
    layers = tuple(range(1 if drop_first_layer else 0, shape.layers))
    g = shape.head_group
    heads, mlp = [], []
    for j in layers:
        groups = sorted(rng.sample(range(shape.heads[j] // g), max(1, shape.heads[j] // g - 1)))
        heads.append(tuple(q * g + i for q in groups for i in range(g)))
        mlp.append(tuple(sorted(rng.sample(range(shape.mlp[j]), shape.mlp[j] // 3))))
    return UnitSelection(layers, tuple(range(shape.embed_dim)), tuple(heads), tuple(mlp))


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request: pytest.FixtureRequest):  # noqa: ANN201
    backbone = coformer.create_backbone(request.param)
    model = backbone.tiny(num_labels=3, seed=0)
    batch = backbone.example_batch(model, batch_size=3, seed=0)
    return request.param, backbone, model, batch


def test_full_selection_matches_transformers(tiny) -> None:
    name, backbone, model, batch = tiny
    ref = _hf_reference(name, model.hf, batch)
    torch.testing.assert_close(backbone.features(model, batch), ref, atol=ATOL, rtol=RTOL)
    sub = backbone.slice(model, UnitSelection.full(backbone.shape(model)))
    with torch.no_grad():
        torch.testing.assert_close(sub(**batch), ref, atol=ATOL, rtol=RTOL)
        # every real token's hidden state, not only the pooled one
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(sub.hidden_states(**batch)[real],
                                   model.hidden_states(**batch)[real], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("seed", [0, 1])
def test_irregular_removal_equals_masked_teacher(tiny, seed: int) -> None:
    """Random heads (whole query groups) and neurons per layer, first layer removed."""
    name, backbone, model, batch = tiny
    sel = _random_selection(backbone.shape(model), seed, drop_first_layer=True)
    with torch.no_grad():
        sliced = backbone.slice(model, sel)(**batch)
        masked = backbone.features(backbone.mask(model, sel), batch)
        torch.testing.assert_close(sliced, masked, atol=ATOL, rtol=RTOL)
        assert not torch.allclose(masked, backbone.features(model, batch), atol=1e-4)


@pytest.mark.parametrize("what", ["heads", "mlp", "layers"])
def test_each_removal_alone_equals_masked_teacher(tiny, what: str) -> None:
    name, backbone, model, batch = tiny
    shape = backbone.shape(model)
    full = UnitSelection.full(shape)
    rnd = _random_selection(shape, 3, drop_first_layer=False)
    sel = {
        "heads": UnitSelection(full.layers, full.channels, rnd.heads, full.mlp),
        "mlp": UnitSelection(full.layers, full.channels, full.heads, rnd.mlp),
        "layers": UnitSelection(full.layers[1:], full.channels, full.heads[1:], full.mlp[1:]),
    }[what]
    with torch.no_grad():
        torch.testing.assert_close(backbone.slice(model, sel)(**batch),
                                   backbone.features(backbone.mask(model, sel), batch), atol=ATOL, rtol=RTOL)


def test_partial_query_group_keeps_its_kv_head() -> None:
    """Llama: query heads from different groups (not whole groups) still equal the masked teacher."""
    backbone = coformer.create_backbone("llama")
    model = backbone.tiny(seed=2)
    batch = backbone.example_batch(model, batch_size=2, seed=2)
    shape = backbone.shape(model)
    assert shape.head_group == 3
    full = UnitSelection.full(shape)
    sel = UnitSelection(full.layers, full.channels, ((0, 4), (8,), (1, 2, 6)), full.mlp)
    sub = backbone.slice(model, sel)
    assert [layer.attn.n_kv for layer in sub.layers] == [2, 1, 2]
    with torch.no_grad():
        torch.testing.assert_close(sub(**batch), backbone.features(backbone.mask(model, sel), batch),
                                   atol=ATOL, rtol=RTOL)


def test_lm_path_full_selection_matches_teacher_logits() -> None:
    for name in ("gpt2", "llama"):
        backbone = coformer.create_backbone(name)
        model = backbone.tiny(seed=0)
        batch = backbone.example_batch(model, batch_size=2, seed=0)
        sub = backbone.slice(model, UnitSelection.full(backbone.shape(model)))
        assert sub.config["lm_head"] == "tied"
        with torch.no_grad():
            ref = model.hf(**batch).logits
            real = batch["attention_mask"].bool()
            torch.testing.assert_close(backbone.lm_logits(sub, batch)[real], ref[real], atol=1e-4, rtol=1e-4)
        assert backbone.perplexity(sub, batch) == pytest.approx(backbone.perplexity(model, batch), rel=1e-4)


def _save_hf(name: str, path) -> torch.nn.Module:  # noqa: ANN001
    """Write a tiny random checkpoint the way a user's local directory would look."""
    from transformers import (GPT2Config, GPT2Model, LlamaConfig, LlamaForCausalLM, MPNetConfig, MPNetForMaskedLM,
                              T5Config, T5ForConditionalGeneration)

    torch.manual_seed(5)
    if name == "gpt2":
        hf = GPT2Model(GPT2Config(vocab_size=64, n_positions=32, n_embd=24, n_layer=2, n_head=3,
                                  bos_token_id=1, eos_token_id=2, activation_function="gelu_new"))
    elif name == "flan_t5":
        # a full encoder-decoder checkpoint, as Flan-T5 ships; the backbone keeps the encoder
        hf = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=24, d_kv=6, d_ff=40, num_layers=2,
                                                 num_decoder_layers=1, num_heads=3, feed_forward_proj="gated-gelu",
                                                 relative_attention_num_buckets=8, decoder_start_token_id=0))
    elif name == "mpnet":
        # all-mpnet-base-v2 ships as an MPNetForMaskedLM checkpoint; the backbone keeps the encoder
        hf = MPNetForMaskedLM(MPNetConfig(vocab_size=64, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                          num_attention_heads=3, max_position_embeddings=34))
    else:
        # untied LM head and attention biases (Qwen-like weights in a Llama layout)
        hf = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                          attention_bias=True, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    hf.eval().save_pretrained(path)
    return hf


@pytest.mark.parametrize("name", FAMILIES)
def test_local_save_pretrained_directory_loads(name: str, tmp_path) -> None:
    hf = _save_hf(name, tmp_path / "ckpt")
    backbone = coformer.create_backbone(name)
    model = backbone.load(tmp_path / "ckpt", num_labels=4)
    assert isinstance(model, HFTeacher)
    batch = backbone.example_batch(model, batch_size=3, seed=4)
    ref_model = {"flan_t5": getattr(hf, "encoder", None), "mpnet": getattr(hf, "mpnet", None)}.get(name, hf)
    if name in MEAN_POOLED:
        with torch.no_grad():
            hidden = ref_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        ref = pool(hidden, batch["attention_mask"], "mean")
    else:
        ref = _hf_reference(name, ref_model, batch)
    torch.testing.assert_close(backbone.features(model, batch), ref, atol=ATOL, rtol=RTOL)
    assert backbone.forward_teacher(model, batch).shape == (3, 4)
    sub = backbone.slice(model, UnitSelection.full(backbone.shape(model)))
    with torch.no_grad():
        torch.testing.assert_close(sub(**batch), ref, atol=ATOL, rtol=RTOL)
    if name == "llama":
        assert sub.config["lm_head"] == "separate"
        real = batch["attention_mask"].bool()
        with torch.no_grad():
            torch.testing.assert_close(sub.lm_logits(**batch)[real], hf(**batch).logits[real], atol=1e-4, rtol=1e-4)
    # the teacher round-trips through its own save, head included
    backbone.save(model, tmp_path / "again")
    again = backbone.load(tmp_path / "again")
    torch.testing.assert_close(backbone.forward_teacher(again, batch), backbone.forward_teacher(model, batch))


def test_wrong_family_and_missing_weights_are_clear_errors(tmp_path) -> None:
    _save_hf("gpt2", tmp_path / "gpt2")
    with pytest.raises(ValueError, match="'gpt2' model, not Llama"):
        coformer.create_backbone("llama").load(tmp_path / "gpt2")
    with pytest.raises(FileNotFoundError, match="no GPT-2 weights ship"):
        coformer.create_backbone("gpt2").load()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        coformer.create_backbone("flan_t5").load(tmp_path / "nowhere")
    backbone = coformer.create_backbone("flan_t5")
    model = backbone.tiny()
    with pytest.raises(ValueError, match="keeps every embedding channel"):
        sel = UnitSelection.full(backbone.shape(model))
        backbone.mask(model, UnitSelection(sel.layers, sel.channels[:-1], sel.heads, sel.mlp))
    with pytest.raises(TypeError, match="expected a Flan-T5 teacher"):
        backbone.features(coformer.create_backbone("gpt2").tiny(), {"input_ids": torch.ones(1, 2, dtype=torch.long)})


@pytest.mark.parametrize("name", FAMILIES)
def test_device_proportional_submodels_shrink(name: str) -> None:
    backbone = coformer.create_backbone(name)
    model = backbone.tiny(seed=0)
    batch = backbone.example_batch(model, batch_size=2, seed=0)
    shape = backbone.shape(model)
    specs = proportional_specs(shape, [235.8, 665.6, 640.0])
    subs = backbone.decompose(model, specs, batch=backbone.example_batch(model, batch_size=4, seed=1))
    full = measure_cost(backbone.slice(model, UnitSelection.full(shape)), batch)
    costs = [measure_cost(s, batch) for s in subs]
    assert all(0 < c.flops < full.flops and 0 < c.params < full.params for c in costs)
    # the smallest device gets the smallest sub-model
    assert costs[0].flops < min(costs[1].flops, costs[2].flops)
    assert costs[0].params < min(costs[1].params, costs[2].params)
    for sub in subs:  # and each rebuilds from JSON + safetensors
        art = submodel_artifact(sub)
        rebuilt = backbone.build_submodel(json.loads(json.dumps(art.config)))
        rebuilt.load_state_dict(st_load(art.weights), strict=True)
        with torch.no_grad():
            torch.testing.assert_close(rebuilt.eval()(**batch), sub(**batch), atol=0, rtol=0)
        assert count_params(rebuilt) == count_params(sub)


@pytest.mark.slow
def test_real_smollm2_loads_and_full_submodel_reproduces_it() -> None:
    pytest.importorskip("gguf")
    backbone = coformer.create_backbone("llama")
    model = backbone.load()
    shape = backbone.shape(model)
    assert (shape.layers, shape.embed_dim, shape.heads[0], shape.mlp[0], shape.head_dim, shape.head_group) == \
        (30, 576, 9, 1536, 64, 3)
    batch = backbone.prepare(model, ["The capital of France is Paris, and the capital of Italy is",
                                     "Hello world."])
    sub = backbone.slice(model, UnitSelection.full(shape))
    with torch.no_grad():
        torch.testing.assert_close(sub(**batch), backbone.features(model, batch), atol=1e-4, rtol=1e-4)
        logits = backbone.lm_logits(model, batch)
    ppl = backbone.perplexity(model, batch)
    assert ppl == pytest.approx(backbone.perplexity(sub, batch), rel=1e-4)
    assert ppl < 200, f"SmolLM2 perplexity {ppl:.1f} on plain English: the weights did not load correctly"
    last = batch["attention_mask"][0].sum() - 1
    assert "Rome" in model.tokenizer.decode(logits[0, last].argmax())


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_headless_causal_lm_importance_uses_next_token_loss(name: str) -> None:
    """Without a classification head, scores come from next-token cross-entropy (and the LM head is the task head)."""
    backbone = coformer.create_backbone(name)
    model = backbone.tiny(seed=0)
    batch = backbone.example_batch(model, batch_size=4, seed=1)
    with_head = backbone.importance(model, batch)
    model.head = None
    lm = backbone.importance(model, batch)
    for scores in (lm.channels, torch.cat(lm.heads), torch.cat(lm.mlp), lm.layers):
        assert torch.isfinite(scores).all() and scores.std() > 0
    assert not torch.allclose(torch.cat(lm.mlp), torch.cat(with_head.mlp))
    with torch.no_grad():
        logits = backbone.forward_teacher(model, batch)
        ref = model.hf(**batch).logits
    last = batch["attention_mask"].sum(1) - 1
    torch.testing.assert_close(logits, ref[torch.arange(4), last], atol=1e-5, rtol=1e-4)


def test_max_length_option_truncates_and_unknown_options_raise(tmp_path) -> None:
    _save_hf("gpt2", tmp_path / "ckpt")
    backbone = coformer.create_backbone("gpt2")
    model = backbone.load(tmp_path / "ckpt", max_length=5)
    batch = backbone.prepare(model, ["one two three four five six seven eight", "short"])
    assert batch["input_ids"].shape == (2, 5) and batch["attention_mask"][1].sum() == 1
    assert backbone.load(tmp_path / "ckpt", max_length=1000).max_length == 32  # capped at n_positions
    with pytest.raises(TypeError):
        backbone.load(tmp_path / "ckpt", image_size=224)
