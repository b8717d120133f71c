"""Data sets as plugins: the contract every registered data set meets, the built-ins, and users' own files.

Real data where it is installed (BBC News, Fashion-MNIST, digits, WordNet 3.0); users'
files written here (CSV, JSONL, PNG folders, a saved Hugging Face data set) and read back.
"""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import coformer
from coformer.data import (DatasetFormatError, DatasetOptionError, DatasetSource, DatasetUnavailableError,
                           LabelledExamples, RawDataset, cap_total, split_examples, stratified_split)

SPLIT_NAMES = ("train", "val", "test")
HAS_HF = importlib.util.find_spec("datasets") is not None
WORDNET = Path("/usr/share/wordnet/data.noun").is_file()
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # write_png in fixtures


def _sizes(data: RawDataset) -> tuple[int, int, int]:
    return tuple(len(getattr(data, s).labels) for s in SPLIT_NAMES)  # type: ignore[return-value]


def _write_csv(path: Path, rows: list[list[str]]) -> Path:
    import csv

    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return path


def _text_rows(n_per_class: int = 10, classes: tuple[str, ...] = ("sport", "tech", "food")) -> list[tuple[str, str]]:
    return [(f"{c} example {i}, with a comma", c) for c in classes for i in range(n_per_class)]


def _png_folder(root: Path, layout: dict[str, int], size: tuple[int, int] = (6, 5),
                seed: int = 0) -> dict[Path, torch.Tensor]:
    """Write random RGB PNGs: ``layout`` maps a relative class folder to its image count."""
    from torchvision.io import write_png

    g = torch.Generator().manual_seed(seed)
    written = {}
    for folder, count in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img = torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=g)
            path = root / folder / f"img{i:02d}.png"
            write_png(img, str(path))
            written[path] = img
    return written


# ----------------------------------------------------------------------------- contract over every data set

def _csv_uri(tmp: Path) -> str:
    return f"csv:{_write_csv(tmp / 'd.csv', [['text', 'label'], *map(list, _text_rows())])}"


def _jsonl_uri(tmp: Path) -> str:
    path = tmp / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in _text_rows()))
    return f"jsonl:{path}"


def _imagefolder_uri(tmp: Path) -> str:
    _png_folder(tmp / "imgs", {"cat": 10, "dog": 10})
    return f"imagefolder:{tmp / 'imgs'}"


def _hf_uri(tmp: Path) -> str:
    if not HAS_HF:
        pytest.skip("the optional 'datasets' package is not installed (pip install 'coformer[hf]')")
    import datasets

    rows = _text_rows()
    datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [y for _, y in rows]}).save_to_disk(
        str(tmp / "hf"))
    return f"hf:{tmp / 'hf'}"


#: How to make a small instance of each built-in data set that reads users' files.
LOCATION_EXAMPLES: dict[str, Callable[[Path], str]] = {
    "csv": _csv_uri, "jsonl": _jsonl_uri, "imagefolder": _imagefolder_uri, "hf": _hf_uri}


def _needs_location(info: coformer.PluginInfo) -> bool:
    import inspect

    param = inspect.signature(info.factory).parameters.get("location")
    return param is not None and param.default is param.empty


@pytest.mark.parametrize("info", coformer.list_plugins("dataset"), ids=lambda i: i.name)
def test_every_registered_data_set_meets_the_contract(info: coformer.PluginInfo, tmp_path: Path) -> None:
    if _needs_location(info):
        if info.name not in LOCATION_EXAMPLES:
            pytest.skip(f"{info.name!r} reads a location and this test has no example file for it")
        uri = LOCATION_EXAMPLES[info.name](tmp_path) + "?max_size=24"
    else:
        uri = f"{info.name}?max_size=300"
    source = coformer.create_dataset(uri)
    assert isinstance(source, DatasetSource) and source.uri.startswith(info.name)
    try:
        data = source.load()
    except DatasetUnavailableError as exc:
        pytest.skip(f"{info.name} is not installed here: {exc}")
    assert isinstance(data, RawDataset) and data.name == source.uri
    assert data.classes and len(set(data.classes)) == len(data.classes)
    assert all(isinstance(c, str) and c for c in data.classes)
    for split in SPLIT_NAMES:
        part = getattr(data, split)
        assert len(part.examples) == len(part.labels) > 0, split
        assert all(isinstance(y, int) and 0 <= y < len(data.classes) for y in part.labels), split
        if isinstance(part.examples, torch.Tensor):
            assert part.examples.dtype == torch.uint8 and part.examples.dim() == 4
        else:
            assert all(isinstance(x, str) and x for x in part.examples)
    assert sum(_sizes(data)) <= (300 if not _needs_location(info) else 24) + 3
    again = coformer.load_dataset(uri)
    assert again.train.labels == data.train.labels and again.test.labels == data.test.labels
    if isinstance(data.val.examples, torch.Tensor):
        assert torch.equal(again.val.examples, data.val.examples)
    else:
        assert again.val.examples == data.val.examples


def test_every_built_in_data_set_is_registered() -> None:
    names = {p.name for p in coformer.list_plugins("dataset")}
    assert {"bbc_news", "fashion_mnist", "digits", "wordnet_supersense", "csv", "jsonl", "imagefolder", "hf"} <= names
    assert all(p.distribution == "coformer" for p in coformer.list_plugins("dataset"))


# ----------------------------------------------------------------------------- names, URIs and options

def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(coformer.UnknownPluginError) as err:
        coformer.load_dataset("bbc_newz")
    msg = str(err.value)
    assert "unknown dataset 'bbc_newz'" in msg and "bbc_news" in msg and "wordnet_supersense" in msg and "csv" in msg


def test_bad_options_and_locations_say_what_is_accepted(tmp_path: Path) -> None:
    with pytest.raises(DatasetOptionError, match=r"has no option\(s\) \['sized'\]; its options: .*max_size"):
        coformer.create_dataset("digits?sized=3")
    with pytest.raises(DatasetOptionError, match="option max_size='lots' is not valid"):
        coformer.create_dataset("digits?max_size=lots")
    with pytest.raises(DatasetOptionError, match="choose one of all, noun, verb, adj, adv"):
        coformer.create_dataset("wordnet_supersense?pos=nouns")
    with pytest.raises(DatasetOptionError, match=r"'digits' takes no location"):
        coformer.create_dataset("digits:/tmp/x")
    with pytest.raises(DatasetOptionError, match=r"'csv' needs location: e.g. csv:PATH\?text=COL&label=COL"):
        coformer.create_dataset("csv")
    with pytest.raises(DatasetOptionError, match="sets option 'seed' twice"):
        coformer.create_dataset("digits?seed=1&seed=2")
    with pytest.raises(DatasetOptionError, match="given both in the URI and as arguments"):
        coformer.create_dataset("digits?seed=1", seed=2)
    with pytest.raises(DatasetOptionError, match="three non-negative shares summing to 1"):
        coformer.create_dataset("digits?fractions=0.5,0.5,0.5")
    with pytest.raises(DatasetOptionError, match="sizes must be at least 1"):
        coformer.create_dataset("digits?max_size=0")


def test_uri_options_are_typed_and_the_name_is_canonical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = coformer.create_dataset("digits?fractions=0.5,0.25,0.25&seed=3&max_size=none")
    assert (source.fractions, source.seed, source.max_size) == ((0.5, 0.25, 0.25), 3, None)
    assert source.uri == "digits?fractions=0.5,0.25,0.25&seed=3"  # defaults left out, options sorted
    assert coformer.create_dataset("digits?seed=0").uri == "digits"
    _write_csv(tmp_path / "d.csv", [["body", "y"], *map(list, _text_rows())])
    monkeypatch.chdir(tmp_path)
    rel = coformer.create_dataset("csv:d.csv?label=y&text=body")
    assert rel.uri == f"csv:{tmp_path / 'd.csv'}?label=y&text=body"  # a relative path is resolved
    assert coformer.create_dataset("csv:d.csv", text="body", label="y").uri == rel.uri
    assert coformer.create_dataset("bbc_news", root=str(tmp_path), seed="2").root == tmp_path  # typed from str too


# ----------------------------------------------------------------------------- the one split helper

def test_without_fixed_splits_the_split_is_seeded_and_stratified() -> None:
    labels = [0] * 50 + [1] * 30 + [2] * 20
    data = LabelledExamples(["a", "b", "c"], [f"t{i}" for i in range(100)], labels)
    raw = split_examples(data, "x", fractions=(0.6, 0.2, 0.2), seed=5)
    assert [Counter(getattr(raw, s).labels) for s in SPLIT_NAMES] == [
        {0: 30, 1: 18, 2: 12}, {0: 10, 1: 6, 2: 4}, {0: 10, 1: 6, 2: 4}]
    assert sorted(raw.train.examples + raw.val.examples + raw.test.examples) == sorted(data.examples)
    other = split_examples(data, "x", seed=6)
    assert other.train.examples != raw.train.examples
    assert split_examples(data, "x", seed=5).train.examples == raw.train.examples


def test_fixed_splits_are_kept_and_a_missing_one_is_carved_from_train() -> None:
    labels = [i % 2 for i in range(40)]
    splits = ["train"] * 30 + ["test"] * 10
    data = LabelledExamples(["a", "b"], list(range(40)), labels, splits)
    raw = split_examples(data, "x", fractions=(0.8, 0.2, 0.0), seed=0)
    assert raw.test.examples == list(range(30, 40))  # the data's own test split, untouched
    assert (len(raw.train.examples), len(raw.val.examples)) == (24, 6)
    assert set(raw.train.examples) | set(raw.val.examples) == set(range(30))
    assert Counter(raw.val.labels) == {0: 3, 1: 3}
    only_test = LabelledExamples(["a", "b"], [0, 1], [0, 1], ["test", "test"])
    with pytest.raises(DatasetFormatError, match="no train split"):
        split_examples(only_test, "x")


def test_caps_keep_class_proportions() -> None:
    data = LabelledExamples(["a", "b"], list(range(200)), [0] * 150 + [1] * 50)
    raw = split_examples(data, "x", seed=0)
    capped = cap_total(raw, 40, seed=0)
    assert _sizes(capped) == (24, 8, 8) and Counter(capped.train.labels) == {0: 18, 1: 6}
    assert cap_total(raw, 1000, seed=0) is raw


# ----------------------------------------------------------------------------- built-in named data sets

def test_bbc_news_split_is_fixed_and_the_old_entry_point_matches() -> None:
    from coformer_datasets.bbc_news import load_bbc_news

    data = coformer.load_dataset("bbc_news")
    assert data.name == "bbc_news" and data.classes == ["business", "entertainment", "politics", "sports", "tech"]
    assert sum(_sizes(data)) == 2225 and _sizes(data) == (1336, 444, 445)
    old = load_bbc_news()
    assert old.name == "bbc_news" and old.train.examples == data.train.examples and old.test.labels == data.test.labels
    other = coformer.load_dataset("bbc_news?seed=1")
    assert other.name == "bbc_news?seed=1" and other.train.examples != data.train.examples


def test_digits_through_the_registry() -> None:
    data = coformer.load_dataset("digits")
    assert sum(_sizes(data)) == 1797 and len(data.classes) == 10
    assert data.train.examples.shape[1:] == (1, 8, 8) and data.train.examples.dtype == torch.uint8
    assert torch.equal(coformer.load_dataset("digits").train.examples, data.train.examples)  # the same split


@pytest.mark.skipif(not WORDNET, reason="needs the Debian package wordnet-base (apt-get install wordnet-base)")
def test_wordnet_supersense_all_and_nouns() -> None:
    full = coformer.create_dataset("wordnet_supersense").load()
    assert len(full.classes) == 45 and sum(_sizes(full)) == 117_659
    assert full.classes[0] == "adj.all" and "verb.weather" in full.classes
    nouns = coformer.load_dataset("wordnet_supersense?pos=noun")
    assert len(nouns.classes) == 26 and all(c.startswith("noun.") for c in nouns.classes)
    assert sum(_sizes(nouns)) == 82_115
    entity = nouns.classes.index("noun.Tops")
    tops = [t for t, y in zip(nouns.train.examples + nouns.val.examples + nouns.test.examples,
                              nouns.train.labels + nouns.val.labels + nouns.test.labels) if y == entity]
    assert any(t.startswith("that which is perceived or known or inferred") for t in tops)  # 'entity'
    small = coformer.load_dataset("wordnet_supersense?pos=verb&max_size=1500")
    assert 1490 <= sum(_sizes(small)) <= 1503 and len(small.classes) == 15


def test_wordnet_missing_names_the_package_and_a_bad_line_is_located(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailableError, match=r"apt-get install wordnet-base"):
        coformer.load_dataset("wordnet_supersense", root=tmp_path)
    good = "00001740 03 n 01 entity 0 000 | that which is perceived\n"
    (tmp_path / "data.noun").write_text("  1 licence header\n" + good + "00001930 physical_entity | x\n")
    with pytest.raises(DatasetFormatError, match=r"data\.noun, line 3, column 10: not a WordNet synset line"):
        coformer.load_dataset("wordnet_supersense?pos=noun", root=tmp_path)


def test_missing_fashion_mnist_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailableError, match="apt-get install dataset-fashion-mnist"):
        coformer.load_dataset("fashion_mnist", root=tmp_path)


def test_fashion_mnist_keeps_its_official_test_split() -> None:
    from coformer_datasets.fashion_mnist import fashion_mnist_dir

    if not (fashion_mnist_dir() / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip("needs the Debian package dataset-fashion-mnist")
    data = coformer.load_dataset("fashion_mnist")
    assert _sizes(data) == (54_000, 6_000, 10_000)
    new = coformer.load_dataset("fashion_mnist?train_size=300&val_size=100&test_size=200")
    again = coformer.load_dataset("fashion_mnist", train_size=300, val_size=100, test_size=200)
    assert _sizes(new) == (300, 100, 200) and set(Counter(new.train.labels).values()) == {30}
    assert torch.equal(again.test.examples, new.test.examples) and again.val.labels == new.val.labels
    assert new.train.examples.float().std() > 10  # real pictures, not blank


# ----------------------------------------------------------------------------- CSV and JSONL

def test_csv_with_a_split_column_keeps_it(tmp_path: Path) -> None:
    rows = [["id", "body", "stars", "split"]]
    rows += [[str(i), f"text {i}", str(i % 3 + 1), "train" if i < 30 else ("validation" if i < 36 else "test")]
             for i in range(42)]
    path = _write_csv(tmp_path / "reviews.csv", rows)
    data = coformer.load_dataset(f"csv:{path}?text=body&label=stars")
    assert data.classes == ["1", "2", "3"] and _sizes(data) == (30, 6, 6)
    assert data.val.examples == [f"text {i}" for i in range(30, 36)]
    assert data.test.labels == [i % 3 for i in range(36, 42)]


def test_csv_without_splits_is_split_stratified_and_labels_sort_numerically(tmp_path: Path) -> None:
    rows = [["text", "label"]] + [[f"t{i}", str(y)] for i, y in enumerate([2, 10, 1] * 10)]
    data = coformer.load_dataset(f"csv:{_write_csv(tmp_path / 'd.csv', rows)}")
    assert data.classes == ["1", "2", "10"] and _sizes(data) == (18, 6, 6)
    assert Counter(data.val.labels) == {0: 2, 1: 2, 2: 2}


@pytest.mark.parametrize(("content", "message"), [
    ("text,label\nok,a\nshort\n", r"bad\.csv, line 3: 1 fields but the header has 2"),
    ("text,label\nok,a\n,b\n", r"bad\.csv, line 3, column 1 \('text'\): empty or non-text value"),
    ("text,label\nok,a\nfine,\n", r"bad\.csv, line 3, column 2 \('label'\): the label '' is empty"),
    ("body,label\nok,a\n",
     r"bad\.csv, line 1: no column 'text' for the text \(columns: body, label\); pass text=COLUMN"),
    ("text,label,split\nok,a,train\nno,b,holdout\n", r"line 3, column 3 \('split'\): split 'holdout' is not train"),
    ('text,label\nok,a\n"unterminated,b\n', r"bad\.csv, line \d+: unexpected end of data"),
    ("", r"bad\.csv: is empty; it needs a header row"),
])
def test_malformed_csv_names_file_line_and_column(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DatasetFormatError, match=message):
        coformer.load_dataset(f"csv:{path}")


def test_undecodable_bytes_are_located(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_bytes(b"text,label\nok,a\ncaf\xe9,b\n")
    with pytest.raises(DatasetFormatError, match=r"line 3, column 4: not valid utf-8 .*encoding="):
        coformer.load_dataset(f"csv:{path}")
    data = coformer.load_dataset(f"csv:{path}?encoding=latin-1&max_size=2")
    assert "café" in data.train.examples + data.val.examples + data.test.examples


def test_missing_file_is_unavailable_not_a_traceback(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailableError, match="nope.csv does not exist"):
        coformer.load_dataset(f"csv:{tmp_path / 'nope.csv'}")


def test_jsonl_loads_and_locates_errors(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"q": f"question {i}", "topic": ["math", "art"][i % 2], "split": "train" if i < 16 else "test"})
             for i in range(20)]
    path.write_text("\n".join(lines) + "\n\n")
    data = coformer.load_dataset(f"jsonl:{path}?text=q&label=topic")
    assert data.classes == ["art", "math"] and _sizes(data)[2] == 4 and sum(_sizes(data)) == 20
    path.write_text(lines[0] + "\n" + lines[1] + "\n" + '{"q": "x", "topic": "art" "split": "train"}\n')
    with pytest.raises(DatasetFormatError, match=r"d\.jsonl, line 3, column 27: Expecting ',' delimiter"):
        coformer.load_dataset(f"jsonl:{path}?text=q&label=topic")
    path.write_text(lines[0] + "\n" + json.dumps({"q": "x", "split": "test"}) + "\n")
    with pytest.raises(DatasetFormatError, match=r"line 2: no key 'topic' for the label \(keys: q, split\)"):
        coformer.load_dataset(f"jsonl:{path}?text=q&label=topic")
    path.write_text(lines[0] + "\n[1, 2]\n")
    with pytest.raises(DatasetFormatError, match=r"line 2, column 1: a line must hold a JSON object, got list"):
        coformer.load_dataset(f"jsonl:{path}?text=q&label=topic")


# ----------------------------------------------------------------------------- image folders

def test_imagefolder_reads_class_folders_exactly(tmp_path: Path) -> None:
    written = _png_folder(tmp_path, {"cat": 10, "dog": 5})
    data = coformer.load_dataset(f"imagefolder:{tmp_path}")
    assert data.classes == ["cat", "dog"] and sum(_sizes(data)) == 15
    assert data.train.examples.shape[1:] == (3, 6, 5) and data.train.examples.dtype == torch.uint8
    pictures = {bytes(img.flatten().tolist()) for img in written.values()}
    for split in SPLIT_NAMES:
        for img in getattr(data, split).examples:
            assert bytes(img.flatten().tolist()) in pictures  # lossless PNG round trip
    gray = coformer.load_dataset(f"imagefolder:{tmp_path}?mode=gray")
    assert gray.train.examples.shape[1] == 1


def test_imagefolder_split_folders_and_sizes(tmp_path: Path) -> None:
    _png_folder(tmp_path, {"train/a": 8, "train/b": 8, "test/a": 2, "test/b": 2})
    data = coformer.load_dataset(f"imagefolder:{tmp_path}")
    assert _sizes(data)[2] == 4 and sum(_sizes(data)) == 20 and len(data.val.labels) == 4  # val carved from train
    _png_folder(tmp_path, {"train/b": 1}, size=(7, 7), seed=1)  # img00.png of b overwritten at another size
    with pytest.raises(DatasetFormatError, match=r"img00\.png: is \(7, 7\) pixels but .* pass size=N"):
        coformer.load_dataset(f"imagefolder:{tmp_path}")
    resized = coformer.load_dataset(f"imagefolder:{tmp_path}?size=4")
    assert resized.train.examples.shape[1:] == (3, 4, 4)
    (tmp_path / "cats").mkdir()
    with pytest.raises(DatasetFormatError, match="mixes split folders and class folders"):
        coformer.load_dataset(f"imagefolder:{tmp_path}")


def test_imagefolder_bad_image_is_named(tmp_path: Path) -> None:
    _png_folder(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "b" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetFormatError, match=r"broken\.png: is not a readable image"):
        coformer.load_dataset(f"imagefolder:{tmp_path}")


# ----------------------------------------------------------------------------- Hugging Face save_to_disk

@pytest.mark.skipif(not HAS_HF, reason="the optional 'datasets' package is not installed (pip install 'coformer[hf]')")
def test_hf_dataset_dict_keeps_splits_and_class_names(tmp_path: Path) -> None:
    import datasets

    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "y": datasets.ClassLabel(names=["neg", "pos", "neutral"])})

    def part(n: int, offset: int) -> Any:
        return datasets.Dataset.from_dict({"sentence": [f"s{offset + i}" for i in range(n)],
                                           "y": [i % 3 for i in range(n)]}, features=features)

    datasets.DatasetDict({"train": part(12, 0), "validation": part(6, 100), "test": part(3, 200)}).save_to_disk(
        str(tmp_path / "dd"))
    data = coformer.load_dataset(f"hf:{tmp_path / 'dd'}?text=sentence&label=y")
    assert data.classes == ["neg", "pos", "neutral"] and _sizes(data) == (12, 6, 3)
    assert data.val.examples[0] == "s100" and data.test.labels == [0, 1, 2]
    with pytest.raises(DatasetFormatError, match=r"no column 'text' for the text in split 'train'"):
        coformer.load_dataset(f"hf:{tmp_path / 'dd'}?label=y")


def test_hf_without_datasets_or_directory_says_what_to_do(tmp_path: Path) -> None:
    match = "is not a directory saved with" if HAS_HF else r"pip install 'coformer\[hf\]'"
    with pytest.raises(DatasetUnavailableError, match=match):
        coformer.load_dataset(f"hf:{tmp_path / 'missing'}")


# ----------------------------------------------------------------------------- a third-party data set

class Reversed(DatasetSource):
    """A 'new data set' from a plugin: the digits, labels reversed."""

    def read(self) -> LabelledExamples:
        """Digits with label 9 - y."""
        digits = coformer.create_dataset("digits").read()
        return LabelledExamples(digits.classes[::-1], digits.examples, [9 - y for y in digits.labels])


def test_a_runtime_plugin_data_set_is_loaded_by_name() -> None:
    from dataclasses import dataclass

    from coformer import hookimpl

    source_cls = dataclass(kw_only=True)(Reversed)

    class Plugin:
        @hookimpl
        def register_datasets(self, register: Any) -> None:
            register("reversed_digits", source_cls)

    name = coformer.register_plugin(Plugin(), name="reversed-digits-test")
    try:
        data = coformer.load_dataset("reversed_digits?seed=2")
        digits = coformer.load_dataset("digits?seed=2")
        assert data.classes[0] == "9" and data.name == "reversed_digits?seed=2"
        assert sum(_sizes(data)) == 1797
        assert sorted(data.test.labels) == sorted(9 - y for y in digits.test.labels)
    finally:
        coformer.unregister_plugin(name)
    with pytest.raises(coformer.UnknownPluginError):
        coformer.load_dataset("reversed_digits")


def test_stratified_split_is_unchanged() -> None:
    """The split every stage shares: pinned so a refactor cannot silently move examples between splits."""
    tr, va, te = stratified_split([0, 1] * 10, (0.6, 0.2, 0.2), seed=0)
    assert (len(tr), len(va), len(te)) == (12, 4, 4) and sorted(tr + va + te) == list(range(20))
    assert (tr, va, te) == stratified_split([0, 1] * 10, (0.6, 0.2, 0.2), seed=0)
