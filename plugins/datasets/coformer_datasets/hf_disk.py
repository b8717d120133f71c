"""``hf:DIR?text=COL&label=COL``: a Hugging Face ``datasets`` directory saved with ``save_to_disk``.

A ``DatasetDict`` gives fixed splits (train, validation/val/dev, test); a single ``Dataset``
is split seeded and stratified, or by its ``split`` column if it has one. A ``ClassLabel``
label column keeps its class names in order; other labels become sorted class names.
Needs the optional ``datasets`` package (``pip install 'coformer[hf]'``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coformer.data import DatasetFormatError, DatasetSource, DatasetUnavailableError, LabelledExamples, split_name
from coformer.hookspecs import Register, hookimpl
from coformer_datasets._records import RecordCollector


def _load_from_disk(path: Path) -> Any:
    try:
        from datasets import load_from_disk
    except ImportError:
        raise DatasetUnavailableError("hf: data sets need the 'datasets' package: pip install 'coformer[hf]' "
                                      "(or pip install datasets)") from None
    if not path.is_dir():
        raise DatasetUnavailableError(f"{path} is not a directory saved with Dataset.save_to_disk")
    try:
        return load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise DatasetFormatError(path, f"is not a directory saved with save_to_disk ({exc})") from None


@dataclass(kw_only=True)
class HfDiskDataset(DatasetSource):
    """A saved ``Dataset``/``DatasetDict``; ``text`` and ``label`` name columns, ``split`` an optional one."""

    usage = "hf:DIR?text=COL&label=COL"
    location: Path
    text: str = "text"
    label: str = "label"
    split: str = "split"

    def read(self) -> LabelledExamples:
        """Every row of every split."""
        loaded = _load_from_disk(self.location)
        parts = list(loaded.items()) if hasattr(loaded, "keys") else [(None, loaded)]
        for part, ds in parts:
            if part is not None and split_name(part) is None:
                raise DatasetFormatError(self.location, f"split {part!r} is not train, validation/val/dev or test")
            for option, col in (("text", self.text), ("label", self.label)):
                if col not in ds.column_names:
                    raise DatasetFormatError(self.location, f"no column {col!r} for the {option}"
                                             + (f" in split {part!r}" if part else "")
                                             + f" (columns: {', '.join(ds.column_names)}); pass {option}=COLUMN")
        fixed = parts[0][0] is not None
        has_split_col = not fixed and self.split in parts[0][1].column_names
        records = RecordCollector(self.location, has_split=fixed or has_split_col)
        names = (repr(self.text), repr(self.label), repr(self.split))
        for part, ds in parts:
            splits = ds[self.split] if has_split_col else [part] * len(ds)
            for row, (text, label, split) in enumerate(zip(ds[self.text], ds[self.label], splits), 1):
                records.add(text, label, split, line=row, columns=names)
        data = records.examples()
        label_names = getattr(parts[0][1].features[self.label], "names", None)
        if label_names:
            data.classes = list(label_names)
            data.labels = [int(v) for v in records.values]
        return data


@hookimpl
def register_datasets(register: Register) -> None:
    """Register the ``hf`` URI scheme."""
    register("hf", HfDiskDataset)
