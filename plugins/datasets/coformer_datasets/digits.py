"""``digits``: scikit-learn's digits (1,797 8×8 images, 10 classes) as ``uint8`` images ``[N, 1, 8, 8]``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from coformer.data import DatasetSource, DatasetUnavailableError, LabelledExamples
from coformer.hookspecs import Register, hookimpl


@dataclass(kw_only=True)
class Digits(DatasetSource):
    """scikit-learn's ``load_digits``, pixel values scaled from 0..16 to 0..255, split stratified by seed."""

    def read(self) -> LabelledExamples:
        """All 1,797 images."""
        try:
            from sklearn.datasets import load_digits
        except ImportError as exc:
            raise DatasetUnavailableError("the digits set needs scikit-learn: pip install scikit-learn") from exc
        digits = load_digits()
        images = torch.from_numpy(np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
        return LabelledExamples([str(i) for i in range(10)], images, digits.target.astype(np.int64).tolist())


@hookimpl
def register_datasets(register: Register) -> None:
    """Register ``digits``."""
    register("digits", Digits)
