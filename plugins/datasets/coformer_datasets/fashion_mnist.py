"""``fashion_mnist``: Fashion-MNIST (Debian ``dataset-fashion-mnist``) as ``uint8`` images ``[N, 1, 28, 28]``.

The official 10k test set stays the test split; validation is carved, stratified by seed,
from the 60k train set (10% by default: ``fractions=0.9,0.1,0``).
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from coformer.data import DatasetSource, DatasetUnavailableError, LabelledExamples
from coformer.hookspecs import Register, hookimpl

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a numpy array (the MNIST family's format)."""
    path = Path(path)
    data = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtypes: dict[int, Any] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise ValueError(f"{path}: unknown IDX element type 0x{data[2]:02x}")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=dtypes[data[2]], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {arr.size} values")
    return arr.reshape(dims)


def fashion_mnist_dir() -> Path:
    """The Fashion-MNIST directory: ``$COFORMER_FASHION_MNIST`` or the Debian package's."""
    return Path(os.environ.get("COFORMER_FASHION_MNIST", FASHION_MNIST_DIR))


@dataclass(kw_only=True)
class FashionMnist(DatasetSource):
    """Fashion-MNIST; ``root`` holds the four idx.gz files (default: ``$COFORMER_FASHION_MNIST`` or Debian's)."""

    #: The data set every stage uses for image backbones when no ``--data`` is given.
    default_for_modality: ClassVar[str] = "image"

    root: Path | None = None
    fractions: tuple[float, float, float] = (0.9, 0.1, 0.0)

    def read(self) -> LabelledExamples:
        """The 60k train images (split ``train``) then the 10k test images (split ``test``)."""
        base = self.root if self.root is not None else fashion_mnist_dir()
        missing = [f for pair in _FILES.values() for f in pair if not (base / f).is_file()]
        if missing:
            raise DatasetUnavailableError(
                f"Fashion-MNIST files {missing} are not in {base}; install the Debian package "
                f"'dataset-fashion-mnist' (apt-get install dataset-fashion-mnist) or set COFORMER_FASHION_MNIST "
                f"(or root=DIR) to a directory holding the four idx.gz files")
        images, labels, splits = [], [], []
        for part, (img_file, lab_file) in _FILES.items():
            images.append(torch.from_numpy(read_idx(base / img_file).copy()).unsqueeze(1))
            part_labels = read_idx(base / lab_file).astype(np.int64).tolist()
            labels += part_labels
            splits += [part] * len(part_labels)
        return LabelledExamples(list(FASHION_MNIST_CLASSES), torch.cat(images), labels, splits)


@hookimpl
def register_datasets(register: Register) -> None:
    """Register ``fashion_mnist``."""
    register("fashion_mnist", FashionMnist)
