"""Data sets: the raw and in-memory forms every stage uses, the one split helper, and the plugin base.

A data set plugin (hook ``register_datasets``) registers a :class:`DatasetSource`; its
:meth:`~DatasetSource.read` returns every labelled example once, with fixed splits when
the data has them, and :meth:`~DatasetSource.load` turns that into a :class:`RawDataset`
with train/validation/test splits through :func:`split_examples` — the one split
definition shared by every data set (seeded, stratified).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

#: The three split names; a data set's own split names are mapped onto them by :func:`split_name`.
SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "dev": "val", "test": "test", "testing": "test"}


#: The seed of THE split: every stage and script (plan, demo, bench, examples) splits data with it,
#: so a search or training seed never moves a document between validation and test.
SPLIT_SEED = 0


class DatasetError(Exception):
    """Any problem with a data set the user chose: shown as one message, never a traceback."""


class DatasetUnavailableError(DatasetError, FileNotFoundError):
    """The files of a dataset are not on this machine; the message says which package provides them."""


class DatasetFormatError(DatasetError, ValueError):
    """A data file is malformed; the message names the file, and the line and column where known."""

    def __init__(self, path: str | Path, problem: str, *, line: int | None = None, column: int | str | None = None):
        where = str(path)
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column {column}"
        super().__init__(f"{where}: {problem}")
        self.path, self.line, self.column = str(path), line, column


class DatasetOptionError(DatasetError, ValueError):
    """A data set name, URI or option is wrong; the message says what is accepted."""


@dataclass
class RawSplit:
    """Raw examples (texts, or image tensors) with integer labels."""

    examples: list | Tensor
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
    train: list[int] = []
    val: list[int] = []
    test: list[int] = []
    for y in sorted(by_class):
        idx = by_class[y]
        perm = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
        n_train = round(fractions[0] * len(idx))
        n_val = round(fractions[1] * len(idx))
        train += perm[:n_train]
        val += perm[n_train:n_train + n_val]
        test += perm[n_train + n_val:]
    return sorted(train), sorted(val), sorted(test)


def stratified_subset(labels: Tensor | Sequence[int], n: int, seed: int = SPLIT_SEED) -> list[int]:
    """``n`` indices with the class proportions of ``labels`` (fixed by ``seed``), sorted."""
    labels = torch.as_tensor(labels)
    if n >= labels.numel():
        return list(range(labels.numel()))
    frac = n / labels.numel()
    picked, _, _ = stratified_split(labels.tolist(), (frac, 0.0, 1.0 - frac), seed)
    return picked


def split_name(value: str) -> str | None:
    """``train``/``val``/``test`` for a split name a data set uses (``validation``, ``dev``, ...), else ``None``."""
    return _SPLIT_ALIASES.get(value.strip().lower())


def take(examples: list | Tensor, idx: Sequence[int]) -> list | Tensor:
    """The examples at ``idx``: a tensor is indexed, a list is picked from."""
    if isinstance(examples, Tensor):
        return examples[torch.as_tensor(list(idx), dtype=torch.long)]
    return [examples[i] for i in idx]


def classes_from_values(values: Sequence[str]) -> tuple[list[str], list[int]]:
    """Class names (sorted; numerically when every value is an integer) and each value's class index."""
    names = set(values)
    numeric = all(v.lstrip("-").isdigit() for v in names)
    classes = sorted(names, key=int) if numeric else sorted(names)
    index = {c: i for i, c in enumerate(classes)}
    return classes, [index[v] for v in values]


@dataclass
class LabelledExamples:
    """Every example of a data set once, as read from its files.

    ``splits[i]`` is ``"train"``, ``"val"`` or ``"test"`` when the data fixes the split of
    example ``i``; ``None`` when the data has no splits of its own.
    """

    classes: list[str]
    examples: list | Tensor
    labels: list[int]
    splits: list[str] | None = None

    def check(self, source: str) -> None:
        """Raise ``ValueError`` naming ``source`` unless examples, labels and splits agree."""
        n = len(self.examples)
        if len(self.labels) != n or (self.splits is not None and len(self.splits) != n):
            raise ValueError(f"{source}: {n} examples but {len(self.labels)} labels"
                             + (f" and {len(self.splits)} split names" if self.splits is not None else ""))
        if n == 0:
            raise DatasetFormatError(source, "no examples")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"{source}: class names repeat: {self.classes}")
        bad = sorted({y for y in self.labels if not 0 <= y < len(self.classes)})
        if bad:
            raise ValueError(f"{source}: labels {bad[:5]} are outside 0..{len(self.classes) - 1}")
        if self.splits is not None and not set(self.splits) <= set(SPLITS):
            raise ValueError(f"{source}: split names {sorted(set(self.splits) - set(SPLITS))} are not {SPLITS}")


def _carve(labels: list[int], idx: list[int], share: float, seed: int) -> tuple[list[int], list[int]]:
    """Split ``idx`` stratified into (kept, carved) with ``share`` of each class carved off."""
    kept, carved, _ = stratified_split([labels[i] for i in idx], (1.0 - share, share, 0.0), seed)
    return [idx[i] for i in kept], [idx[i] for i in carved]


def split_indices(data: LabelledExamples, fractions: tuple[float, float, float], seed: int,
                  source: str = "the data") -> tuple[list[int], list[int], list[int]]:
    """Train/val/test indices: the data's own splits where it has them, the rest seeded and stratified.

    A split the data lacks is carved, stratified, from its train split in the proportion
    ``fractions`` gives it relative to train (Fashion-MNIST: val from the 60k train set).
    """
    if data.splits is None:
        return stratified_split(data.labels, fractions, seed)
    groups: dict[str, list[int]] = {s: [] for s in SPLITS}
    for i, s in enumerate(data.splits):
        groups[s].append(i)
    train, val, test = groups["train"], groups["val"], groups["test"]
    if not train:
        raise DatasetFormatError(source, "its fixed splits have no train split; add one, or drop the split "
                                 "names to have a seeded stratified split made")
    f_train, f_val, f_test = fractions
    if not val and not test:
        return _three_way(data.labels, train, fractions, seed)
    if not val:
        train, val = _carve(data.labels, train, f_val / (f_train + f_val), seed)
    if not test:
        train, test = _carve(data.labels, train, f_test / (f_train + f_test), seed)
    return train, val, test


def _three_way(labels: list[int], idx: list[int], fractions: tuple[float, float, float],
               seed: int) -> tuple[list[int], list[int], list[int]]:
    tr, va, te = stratified_split([labels[i] for i in idx], fractions, seed)
    return [idx[i] for i in tr], [idx[i] for i in va], [idx[i] for i in te]


def limit_split(split: RawSplit, n: int | None, seed: int) -> RawSplit:
    """At most ``n`` examples of ``split``, a fixed stratified subset keeping class proportions."""
    if n is None or n >= len(split.labels):
        return split
    keep = stratified_subset(split.labels, n, seed)
    return RawSplit(take(split.examples, keep), [split.labels[i] for i in keep])


def split_examples(data: LabelledExamples, name: str, *, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
                   seed: int = SPLIT_SEED) -> RawDataset:
    """A :class:`RawDataset` from every example once: the one split definition every data set shares."""
    parts = split_indices(data, fractions, seed, name)
    train, val, test = (RawSplit(take(data.examples, idx), [data.labels[i] for i in idx]) for idx in parts)
    return RawDataset(name, list(data.classes), train, val, test)


def _check_sizes(**sizes: int | None) -> None:
    bad = {k: v for k, v in sizes.items() if v is not None and v < 1}
    if bad:
        raise DatasetOptionError(f"sizes must be at least 1, got {bad}")


@dataclass(kw_only=True)
class DatasetSource(ABC):
    """A data set a plugin registers; its fields are the options a URI may set.

    Common options: ``seed`` (the split), ``fractions`` (train/val/test shares where the
    data fixes no split), ``max_size`` (a cap on all splits together, for quick runs) and
    ``train_size``/``val_size``/``test_size`` (caps per split); caps keep class proportions.
    """

    seed: int = SPLIT_SEED
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    max_size: int | None = None
    train_size: int | None = None
    val_size: int | None = None
    test_size: int | None = None
    #: The canonical URI this source was created from; the loaded data set's name.
    uri: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.fractions) != 3 or any(f < 0 for f in self.fractions) or abs(sum(self.fractions) - 1) > 1e-6:
            raise DatasetOptionError(f"fractions must be three non-negative shares summing to 1 "
                                     f"(e.g. fractions=0.6,0.2,0.2), got {self.fractions}")
        _check_sizes(max_size=self.max_size, train_size=self.train_size, val_size=self.val_size,
                     test_size=self.test_size)

    @abstractmethod
    def read(self) -> LabelledExamples:
        """Every example once, with class names and any fixed splits; raise, never return partial data."""

    def load(self) -> RawDataset:
        """The data set with train/val/test splits, capped as the options say."""
        data = self.read()
        name = self.uri or type(self).__name__
        data.check(name)
        raw = split_examples(data, name, fractions=self.fractions, seed=self.seed)
        raw.train = limit_split(raw.train, self.train_size, self.seed)
        raw.val = limit_split(raw.val, self.val_size, self.seed)
        raw.test = limit_split(raw.test, self.test_size, self.seed)
        return cap_total(raw, self.max_size, self.seed)


def cap_total(raw: RawDataset, max_size: int | None, seed: int) -> RawDataset:
    """``raw`` with at most ``max_size`` examples over all splits, each split shrunk in proportion."""
    splits = (raw.train, raw.val, raw.test)
    total = sum(len(s.labels) for s in splits)
    if max_size is None or max_size >= total:
        return raw
    capped = [limit_split(s, max(1, round(max_size * len(s.labels) / total)) if s.labels else None, seed)
              for s in splits]
    return RawDataset(raw.name, raw.classes, *capped)


def load_named(name: str, **options: Any) -> RawDataset:
    """Load the data set registered as ``name`` with typed ``options``; the result is named plainly ``name``.

    For the callers written before data sets were plugins (their cache keys use the plain
    name); new code uses :func:`coformer.load_dataset` with a name or URI.
    """
    from coformer.registry import create

    source: DatasetSource = create("dataset", name, expected=DatasetSource, **options)
    source.uri = name
    return source.load()

