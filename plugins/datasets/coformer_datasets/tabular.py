"""Users' own text data: ``csv:PATH?text=COL&label=COL`` and ``jsonl:PATH?text=KEY&label=KEY``.

A ``split`` column/key (values train, val/validation/dev, test) fixes the splits; without
one the split is seeded and stratified. A malformed file raises naming the file, line and
column; nothing is returned half-read.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from coformer.data import DatasetFormatError, DatasetSource, LabelledExamples
from coformer.hookspecs import Register, hookimpl
from coformer_datasets._records import RecordCollector, read_text


@dataclass(kw_only=True)
class CsvDataset(DatasetSource):
    """A CSV file with a header row; ``text`` and ``label`` name columns, ``split`` an optional one."""

    usage = "csv:PATH?text=COL&label=COL"
    location: Path
    text: str = "text"
    label: str = "label"
    split: str = "split"
    delimiter: str = ","
    encoding: str = "utf-8"

    def read(self) -> LabelledExamples:
        """Every row, checked; the first malformed row raises."""
        path = self.location
        if len(self.delimiter) != 1:
            raise DatasetFormatError(path, f"delimiter must be one character, got {self.delimiter!r}")
        reader = csv.reader(io.StringIO(read_text(path, self.encoding), newline=""), delimiter=self.delimiter,
                            strict=True)
        try:
            header = next(reader)
        except StopIteration:
            raise DatasetFormatError(path, "is empty; it needs a header row") from None
        except csv.Error as exc:
            raise DatasetFormatError(path, f"{exc}", line=reader.line_num) from None
        cols = {name.strip(): i for i, name in enumerate(header)}
        for option, name in (("text", self.text), ("label", self.label)):
            if name not in cols:
                raise DatasetFormatError(path, f"no column {name!r} for the {option} (columns: {', '.join(cols)}); "
                                         f"pass {option}=COLUMN", line=1)
        t, y = cols[self.text], cols[self.label]
        s = cols.get(self.split)
        records = RecordCollector(path, has_split=s is not None)
        names = (f"{t + 1} ({self.text!r})", f"{y + 1} ({self.label!r})", f"{(s or 0) + 1} ({self.split!r})")
        try:
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    raise DatasetFormatError(path, f"{len(row)} fields but the header has {len(header)}",
                                             line=reader.line_num)
                records.add(row[t], row[y], row[s] if s is not None else None, line=reader.line_num, columns=names)
        except csv.Error as exc:
            raise DatasetFormatError(path, str(exc), line=reader.line_num) from None
        return records.examples()


@dataclass(kw_only=True)
class JsonlDataset(DatasetSource):
    """JSON Lines: one object per line; ``text`` and ``label`` name keys, ``split`` an optional one."""

    usage = "jsonl:PATH?text=KEY&label=KEY"
    location: Path
    text: str = "text"
    label: str = "label"
    split: str = "split"
    encoding: str = "utf-8"

    def read(self) -> LabelledExamples:
        """Every line, checked; the split key is used only if the first record has it."""
        path = self.location
        records: RecordCollector | None = None
        names = (repr(self.text), repr(self.label), repr(self.split))
        for line_no, line in enumerate(read_text(path, self.encoding).splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetFormatError(path, exc.msg, line=line_no, column=exc.colno) from None
            if not isinstance(obj, dict):
                raise DatasetFormatError(path, f"a line must hold a JSON object, got {type(obj).__name__}",
                                         line=line_no, column=1)
            if records is None:
                records = RecordCollector(path, has_split=self.split in obj)
            for option, key in (("text", self.text), ("label", self.label)) + (
                    (("split", self.split),) if records.has_split else ()):
                if key not in obj:
                    raise DatasetFormatError(path, f"no key {key!r} for the {option} (keys: {', '.join(obj)}); "
                                             f"pass {option}=KEY", line=line_no)
            records.add(obj[self.text], obj[self.label], obj.get(self.split), line=line_no, columns=names)
        if records is None:
            raise DatasetFormatError(path, "has no records")
        return records.examples()


@hookimpl
def register_datasets(register: Register) -> None:
    """Register the ``csv`` and ``jsonl`` URI schemes."""
    register("csv", CsvDataset)
    register("jsonl", JsonlDataset)
