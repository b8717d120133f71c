"""The int8 ONNX Flan-T5 converter: dequantisation and naming on a hand-built graph; the real package (slow).

The slow test is the tolerance statement: with the ONNX graph's dynamic uint8 activation
quantisation emulated, the dequantised float weights reproduce onnxruntime on real text to float
rounding; the plain float model (what the ``flan_t5`` backbone runs) is measured against it too.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import coformer
from coformer.spec import UnitSelection
from coformer_backbones import onnx_t5
from coformer_backbones.onnx_t5 import OnnxConversionError

onnx = pytest.importorskip("onnx")


def _graph(tmp_path: Path, node_name: str) -> tuple[Path, dict[str, np.ndarray]]:
    """A graph with a quantised embedding, one quantised projection behind ``node_name`` and a float norm."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    emb_q = rng.integers(0, 256, (10, 4), dtype=np.uint8)
    w_q = rng.integers(-128, 128, (4, 6), dtype=np.int8)  # [in, out], as MatMul reads it
    norm = rng.standard_normal(4).astype(np.float32)
    inits = [
        numpy_helper.from_array(emb_q, "enc.embed_tokens.weight_quantized"),
        numpy_helper.from_array(np.array(0.05, np.float32), "enc.embed_tokens.weight_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "enc.embed_tokens.weight_zero_point"),
        numpy_helper.from_array(w_q, "onnx::MatMul_7_quantized"),
        numpy_helper.from_array(np.array(0.01, np.float32), "onnx::MatMul_7_scale"),
        numpy_helper.from_array(np.array(3, np.int8), "onnx::MatMul_7_zero_point"),
        numpy_helper.from_array(norm, "enc.block.0.layer.0.layer_norm.weight"),
    ]
    node = helper.make_node("MatMulInteger", ["x", "onnx::MatMul_7_quantized", "xz", "onnx::MatMul_7_zero_point"],
                            ["y"], name=node_name)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 4]),
                                            helper.make_tensor_value_info("xz", TensorProto.UINT8, [])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 6])], initializer=inits)
    path = tmp_path / "enc.onnx"
    onnx.save(helper.make_model(graph), str(path))
    expected = {"shared.weight": (emb_q.astype(np.float32) - 128) * np.float32(0.05),
                "encoder.block.0.layer.0.SelfAttention.q.weight": ((w_q.astype(np.float32) - 3) * np.float32(0.01)).T,
                "encoder.block.0.layer.0.layer_norm.weight": norm}
    return path, expected


def test_extract_dequantises_and_names_every_weight(tmp_path: Path) -> None:
    path, expected = _graph(tmp_path, "/enc/block.0/layer.0/SelfAttention/q/MatMul_quant")
    weights = onnx_t5.extract_weights(path)
    assert set(weights) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(weights[name], value, rtol=0, atol=1e-7)
        assert weights[name].dtype == np.float32


def test_unnamed_projection_is_a_clear_error(tmp_path: Path) -> None:
    path, _ = _graph(tmp_path, "MatMulInteger_12")
    with pytest.raises(OnnxConversionError, match="not a named encoder projection"):
        onnx_t5.extract_weights(path)


def test_fake_quantisation_matches_dynamic_quantize_linear() -> None:
    """The activation rounding used for the tolerance check is onnxruntime's own DynamicQuantizeLinear."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 50])],
                              [helper.make_tensor_value_info(n, t, None) for n, t in
                               (("q", TensorProto.UINT8), ("s", TensorProto.FLOAT), ("z", TensorProto.UINT8))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 50) * 4 + 1
    q, s, z = sess.run(None, {"x": x.numpy()})
    ref = (q.astype(np.float32) - np.float32(z)) * np.float32(s)
    np.testing.assert_allclose(onnx_t5.fake_quantize_uint8(x).numpy(), ref, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_real_traceforge_encoder_against_onnxruntime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("traceforge_title_model") is None:
        pytest.skip("needs `pip install --no-deps traceforge-title-model==0.2.0`")
    from transformers import AutoTokenizer, T5EncoderModel

    monkeypatch.setenv("COFORMER_CACHE", str(tmp_path))
    path = onnx_t5.converted_dir()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert onnx_t5.converted_dir() == path and (path / "model.safetensors").stat().st_mtime_ns == stamp
    model = T5EncoderModel.from_pretrained(path, local_files_only=True).eval()
    cfg = model.config
    assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff, cfg.is_gated_act) == \
        (8, 512, 6, 64, 1024, True)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    batch = dict(tok(list(onnx_t5.SAMPLE_TEXTS), padding=True, return_tensors="pt"))
    with onnx_t5.onnx_activation_quantization(model):
        emulated = onnx_t5.compare_with_onnxruntime(model, batch)
    plain = onnx_t5.compare_with_onnxruntime(model, batch)
    # the weights are exact: only float rounding separates us from the int8 graph
    assert emulated["max_abs"] < 1e-5 and emulated["min_token_cosine"] > 0.99999
    # the float model differs from the int8 graph only through activation rounding, by orders of magnitude more
    assert plain["relative"] > 1000 * emulated["relative"]

    # the flan_t5 backbone's default is this checkpoint, and its full sub-model reproduces it
    backbone = coformer.create_backbone("flan_t5")
    teacher = backbone.load(num_labels=3)
    tb = backbone.prepare(teacher, list(onnx_t5.SAMPLE_TEXTS))
    with torch.no_grad():
        hidden = model(**tb).last_hidden_state
        m = tb["attention_mask"].float().unsqueeze(-1)
        torch.testing.assert_close(backbone.features(teacher, tb), (hidden * m).sum(1) / m.sum(1),
                                   atol=1e-5, rtol=1e-4)
        sub = backbone.slice(teacher, UnitSelection.full(backbone.shape(teacher)))
        torch.testing.assert_close(sub(**tb), backbone.features(teacher, tb), atol=1e-4, rtol=1e-4)


def test_flan_t5_without_the_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "traceforge_title_model" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps traceforge-title-model==0\.2\.0.*"
                                                r"pass a local directory"):
        coformer.create_backbone("flan_t5").load()
