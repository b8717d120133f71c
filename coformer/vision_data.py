"""Image data sets for callers written before data sets were plugins; new code uses ``coformer.load_dataset``.

The readers live in the ``coformer_datasets`` plugin (``fashion_mnist``, ``digits``); these
functions keep their earlier signatures and results.
"""

from __future__ import annotations

from pathlib import Path

from coformer.data import SPLIT_SEED, RawDataset, load_named, stratified_subset

#: Where the Debian package ``dataset-fashion-mnist`` puts its files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def load_fashion_mnist(root: str | Path | None = None, *, val_fraction: float = 0.1, seed: int = SPLIT_SEED,
                       train_size: int | None = None, val_size: int | None = None,
                       test_size: int | None = None) -> RawDataset:
    """Fashion-MNIST: the official 10k test set, and the 60k train set split stratified into train/val."""
    return load_named("fashion_mnist", root=Path(root) if root is not None else None, seed=seed,
                      fractions=(1.0 - val_fraction, val_fraction, 0.0), train_size=train_size, val_size=val_size,
                      test_size=test_size)


def load_digits_images(*, seed: int = 0, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)) -> RawDataset:
    """scikit-learn's digits (1,797 8×8 images, 10 classes) with a fixed stratified split."""
    return load_named("digits", seed=seed, fractions=fractions)


__all__ = ["FASHION_MNIST_DIR", "load_digits_images", "load_fashion_mnist", "stratified_subset"]
