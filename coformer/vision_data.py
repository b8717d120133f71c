"""Image datasets that work offline: Fashion-MNIST (Debian ``dataset-fashion-mnist``) and sklearn digits.

Both return :class:`coformer.data.RawDataset` whose split ``examples`` are ``uint8`` image
tensors ``[N, 1, H, W]`` (0..255; a vision backbone's ``prepare`` resizes, expands to RGB and
normalises them) with fixed, stratified splits.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from coformer.data import SPLIT_SEED, DatasetUnavailableError, RawDataset, RawSplit, stratified_split

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
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
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
    root = Path(os.environ.get("COFORMER_FASHION_MNIST", FASHION_MNIST_DIR))
    missing = [f for pair in _FILES.values() for f in pair if not (root / f).is_file()]
    if missing:
        raise DatasetUnavailableError(
            f"Fashion-MNIST files {missing} are not in {root}; install the Debian package "
            f"'dataset-fashion-mnist' (apt-get install dataset-fashion-mnist) or set COFORMER_FASHION_MNIST "
            f"to a directory holding the four idx.gz files")
    return root


def stratified_subset(labels: Tensor | list[int], n: int, seed: int = 0) -> list[int]:
    """``n`` indices with the class proportions of ``labels`` (fixed by ``seed``), sorted."""
    labels = torch.as_tensor(labels)
    if n >= labels.numel():
        return list(range(labels.numel()))
    frac = n / labels.numel()
    picked, _, _ = stratified_split(labels.tolist(), (frac, 0.0, 1.0 - frac), seed)
    return picked


def _split(images: Tensor, labels: Tensor, idx: list[int]) -> RawSplit:
    ix = torch.as_tensor(idx, dtype=torch.long)
    return RawSplit(images[ix], labels[ix].tolist())


def load_fashion_mnist(root: str | Path | None = None, *, val_fraction: float = 0.1, seed: int = SPLIT_SEED,
                       train_size: int | None = None, val_size: int | None = None,
                       test_size: int | None = None) -> RawDataset:
    """Fashion-MNIST: the official 10k test set, and the 60k train set split stratified into train/val.

    ``*_size`` take fixed stratified subsets (for quick runs); the split depends only on ``seed``.
    """
    base = Path(root) if root is not None else fashion_mnist_dir()
    arrays = {}
    for part, (img_file, lab_file) in _FILES.items():
        images = torch.from_numpy(read_idx(base / img_file).copy()).unsqueeze(1)
        labels = torch.from_numpy(read_idx(base / lab_file).astype(np.int64))
        arrays[part] = (images, labels)
    tr_img, tr_lab = arrays["train"]
    train_idx, val_idx, _ = stratified_split(tr_lab.tolist(), (1.0 - val_fraction, val_fraction, 0.0), seed)
    te_img, te_lab = arrays["test"]
    test_idx = list(range(te_lab.numel()))

    def limit(idx: list[int], labels: Tensor, n: int | None) -> list[int]:
        if n is None:
            return idx
        keep = stratified_subset(labels[torch.as_tensor(idx)], n, seed)
        return [idx[i] for i in keep]

    return RawDataset("fashion_mnist", list(FASHION_MNIST_CLASSES),
                      _split(tr_img, tr_lab, limit(train_idx, tr_lab, train_size)),
                      _split(tr_img, tr_lab, limit(val_idx, tr_lab, val_size)),
                      _split(te_img, te_lab, limit(test_idx, te_lab, test_size)))


def load_digits_images(*, seed: int = 0, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)) -> RawDataset:
    """scikit-learn's digits (1,797 8×8 images, 10 classes) with a fixed stratified split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DatasetUnavailableError("the digits set needs scikit-learn: pip install scikit-learn") from exc
    digits = load_digits()
    images = torch.from_numpy(np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    tr, va, te = stratified_split(labels.tolist(), fractions, seed)
    return RawDataset("digits", [str(i) for i in range(10)],
                      _split(images, labels, tr), _split(images, labels, va), _split(images, labels, te))
