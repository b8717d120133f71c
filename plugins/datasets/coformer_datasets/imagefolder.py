"""``imagefolder:DIR``: users' own images, one folder per class.

``DIR/<class>/*.png`` (split seeded and stratified), or ``DIR/<split>/<class>/*`` with
split folders ``train``, ``val`` (``validation``, ``dev``) and ``test`` (a missing val or
test split is carved from train). Images (PNG, JPEG, GIF, WebP) become ``uint8`` tensors
``[N, C, H, W]``; they must share one size unless ``size=N`` resizes them all to N×N.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from coformer.data import DatasetFormatError, DatasetSource, DatasetUnavailableError, LabelledExamples, split_name
from coformer.hookspecs import Register, hookimpl

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".webp"}


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _decode(path: Path, mode: str) -> Tensor:
    with warnings.catch_warnings():  # torchvision 0.29 announces torchcodec; its decoders still work
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_image(str(path), mode=ImageReadMode.GRAY if mode == "gray" else ImageReadMode.RGB)
    except (RuntimeError, ValueError) as exc:
        raise DatasetFormatError(path, f"is not a readable image ({exc})") from None


def _resize(image: Tensor, size: int) -> Tensor:
    if tuple(image.shape[-2:]) == (size, size):
        return image
    x = F.interpolate(image.unsqueeze(0).float(), size=(size, size), mode="bilinear", align_corners=False,
                      antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8).squeeze(0)


@dataclass(kw_only=True)
class ImageFolder(DatasetSource):
    """Class-per-folder images; ``mode`` rgb or gray; ``size`` resizes every image to size×size."""

    usage = "imagefolder:DIR"
    location: Path
    mode: Literal["rgb", "gray"] = "rgb"
    size: int | None = None

    def layout(self) -> list[tuple[str | None, Path]]:
        """``(split or None, folder of class folders)``: split folders if every top folder is a split name."""
        root = self.location
        if not root.is_dir():
            raise DatasetUnavailableError(f"{root} is not a directory of class folders")
        top = _class_dirs(root)
        if not top:
            raise DatasetFormatError(root, "has no class folders (expected DIR/<class>/*.png or "
                                     "DIR/train/<class>/*.png)")
        splits = [split_name(p.name) for p in top]
        if all(s is not None for s in splits):
            return [(s, p) for s, p in zip(splits, top)]
        if any(s is not None for s in splits):
            raise DatasetFormatError(root, f"mixes split folders and class folders ({', '.join(p.name for p in top)}); "
                                     f"use only class folders or only train/val/test folders")
        return [(None, root)]

    def read(self) -> LabelledExamples:
        """Every image, decoded; classes are the sorted union of class folder names."""
        parts = self.layout()
        files = [(split, cls.name, f) for split, folder in parts for cls in _class_dirs(folder)
                 for f in sorted(cls.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise DatasetFormatError(self.location, f"holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        classes = sorted({cls for _, cls, _ in files})
        index = {c: i for i, c in enumerate(classes)}
        images = [_decode(f, self.mode) for _, _, f in files]
        if self.size is not None:
            images = [_resize(im, self.size) for im in images]
        first = tuple(images[0].shape[-2:])
        for (_, _, f), im in zip(files, images):
            if tuple(im.shape[-2:]) != first:
                raise DatasetFormatError(f, f"is {tuple(im.shape[-2:])} pixels but {files[0][2]} is {first}; "
                                         f"pass size=N to resize every image to N×N")
        splits = [str(s) for s, _, _ in files] if parts[0][0] is not None else None
        return LabelledExamples(classes, torch.stack(images), [index[c] for _, c, _ in files], splits)


@hookimpl
def register_datasets(register: Register) -> None:
    """Register the ``imagefolder`` URI scheme."""
    register("imagefolder", ImageFolder)
