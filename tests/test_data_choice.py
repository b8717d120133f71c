"""Which data set a stage runs on: --data, else the one a data set plugin declares its modality's default."""

from __future__ import annotations

import gzip
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

import coformer
from coformer import hookimpl
from coformer.data import DatasetOptionError, DatasetSource, LabelledExamples
from coformer.offline.data_choice import choose_dataset, default_data_name
from coformer_datasets.fashion_mnist import fashion_mnist_dir, read_idx


@dataclass(kw_only=True)
class _Clips(DatasetSource):
    default_for_modality: ClassVar[str] = "audio"

    def read(self) -> LabelledExamples:
        return LabelledExamples(["hum", "tap"], [f"clip {i}" for i in range(20)], [i % 2 for i in range(20)])


class _ClipsPlugin:
    def __init__(self, name: str) -> None:
        self.name = name

    @hookimpl
    def register_datasets(self, register) -> None:
        register(self.name, _Clips)


def test_each_modality_default_is_the_data_set_that_declares_it() -> None:
    assert (default_data_name("text"), default_data_name("image")) == ("bbc_news", "fashion_mnist")
    with pytest.raises(DatasetOptionError, match="no installed data set is the default for 'audio'.*--data"):
        default_data_name("audio")


def test_a_third_party_default_is_chosen_and_two_defaults_are_refused() -> None:
    first = coformer.register_plugin(_ClipsPlugin("clips"), name="clips-plugin")
    try:
        data = choose_dataset(None, "audio")
        assert data.name == "clips" and data.classes == ["hum", "tap"] and sum(map(len, (
            data.train.labels, data.val.labels, data.test.labels))) == 20
        assert choose_dataset("clips?seed=3", "text").name == "clips?seed=3"  # --data wins over the default
        second = coformer.register_plugin(_ClipsPlugin("clips2"), name="clips2-plugin")
        try:
            with pytest.raises(DatasetOptionError, match="clips, clips2 all declare themselves the default"):
                default_data_name("audio")
        finally:
            coformer.unregister_plugin(second)
    finally:
        coformer.unregister_plugin(first)


def test_read_idx_round_trip(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 0x08, 3]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    (tmp_path / "x.gz").write_bytes(gzip.compress(header + arr.tobytes()))
    np.testing.assert_array_equal(read_idx(tmp_path / "x.gz"), arr)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")


@pytest.mark.skipif(not (fashion_mnist_dir() / "t10k-labels-idx1-ubyte.gz").is_file(),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_image_demo_uses_a_fixed_stratified_subset() -> None:
    from coformer.experiments.demo import DEMO_IMAGE_SPLIT, default_dataset

    data = default_dataset("image")
    assert (len(data.train.labels), len(data.val.labels), len(data.test.labels)) == DEMO_IMAGE_SPLIT
    assert set(Counter(data.test.labels).values()) == {DEMO_IMAGE_SPLIT[2] // 10}  # 10 balanced classes
    assert default_dataset("image").train.labels == data.train.labels  # the same subset every time
