"""Shared by the file loaders: read a text file with positioned errors, and turn records into examples."""

from __future__ import annotations

from pathlib import Path

from coformer.data import DatasetFormatError, DatasetUnavailableError, LabelledExamples, classes_from_values, split_name


def read_text(path: Path, encoding: str) -> str:
    """The whole file; a missing file or an undecodable byte raises naming the file, line and column."""
    if not path.is_file():
        raise DatasetUnavailableError(f"{path} does not exist or is not a file")
    data = path.read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        before = data[:exc.start]
        line = before.count(b"\n") + 1
        column = exc.start - (before.rfind(b"\n") + 1) + 1
        raise DatasetFormatError(path, f"not valid {encoding} ({exc.reason}); pass encoding=... to read it",
                                 line=line, column=column) from None
    except LookupError:
        raise DatasetFormatError(path, f"unknown encoding {encoding!r}") from None


class RecordCollector:
    """Collects ``(text, label, split)`` records, checking each as it comes, into :class:`LabelledExamples`."""

    def __init__(self, path: Path, has_split: bool):
        self.path, self.has_split = path, has_split
        self.texts: list[str] = []
        self.values: list[str] = []
        self.splits: list[str] = []

    def add(self, text: object, label: object, split: object, *, line: int, columns: tuple[str, str, str]) -> None:
        """One record at ``line``; ``columns`` name where text, label and split came from (for errors)."""
        if not isinstance(text, str) or not text.strip():
            raise DatasetFormatError(self.path, f"empty or non-text value {text!r} for the text", line=line,
                                     column=columns[0])
        if isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
            raise DatasetFormatError(self.path, f"the label {label!r} is empty or not a string or integer",
                                     line=line, column=columns[1])
        self.texts.append(text)
        self.values.append(str(label).strip())
        if self.has_split:
            name = split_name(split) if isinstance(split, str) else None
            if name is None:
                raise DatasetFormatError(self.path, f"split {split!r} is not train, val (validation, dev) or test",
                                         line=line, column=columns[2])
            self.splits.append(name)

    def examples(self) -> LabelledExamples:
        """Everything collected; classes sorted (numerically when every label is an integer)."""
        if not self.texts:
            raise DatasetFormatError(self.path, "has no records")
        classes, labels = classes_from_values(self.values)
        return LabelledExamples(classes, self.texts, labels, self.splits if self.has_split else None)
