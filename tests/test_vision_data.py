"""Fashion-MNIST (Debian package) and digits loaders: real files, fixed stratified splits, clear errors."""

from __future__ import annotations

import gzip
from collections import Counter

import numpy as np
import pytest

from coformer.data import DatasetUnavailableError
from coformer.vision_data import FASHION_MNIST_DIR, load_digits_images, load_fashion_mnist, stratified_subset
from coformer_datasets.fashion_mnist import read_idx


def test_read_idx_round_trip(tmp_path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 0x08, 3]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    (tmp_path / "x.gz").write_bytes(gzip.compress(header + arr.tobytes()))
    np.testing.assert_array_equal(read_idx(tmp_path / "x.gz"), arr)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")


def test_missing_fashion_mnist_names_the_package(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("COFORMER_FASHION_MNIST", str(tmp_path))
    with pytest.raises(DatasetUnavailableError, match="dataset-fashion-mnist"):
        load_fashion_mnist()


@pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
                    reason="needs the Debian package dataset-fashion-mnist")
def test_fashion_mnist_subsets_are_stratified_and_fixed() -> None:
    data = load_fashion_mnist(train_size=500, val_size=100, test_size=300)
    assert data.train.examples.shape == (500, 1, 28, 28) and len(data.classes) == 10
    assert set(Counter(data.train.labels).values()) == {50}
    again = load_fashion_mnist(train_size=500, val_size=100, test_size=300)
    assert (again.test.examples == data.test.examples).all() and again.val.labels == data.val.labels
    assert data.train.examples.float().std() > 10  # real pictures, not blank


def test_digits_split() -> None:
    data = load_digits_images()
    n = len(data.train.labels) + len(data.val.labels) + len(data.test.labels)
    assert n == 1797 and data.train.examples.shape[1:] == (1, 8, 8)
    assert stratified_subset(data.train.labels, 100) == stratified_subset(data.train.labels, 100)


@pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_image_demo_uses_a_fixed_stratified_subset() -> None:
    from coformer.demo import DEMO_IMAGE_SPLIT, default_dataset

    data = default_dataset("image")
    assert (len(data.train.labels), len(data.val.labels), len(data.test.labels)) == DEMO_IMAGE_SPLIT
    assert set(Counter(data.test.labels).values()) == {DEMO_IMAGE_SPLIT[2] // 10}  # 10 balanced classes
    assert default_dataset("image").train.labels == data.train.labels  # the same subset every time
