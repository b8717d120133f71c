"""``wordnet_supersense``: WordNet 3.0 glosses labelled with their lexicographer file (supersense).

From the Debian package ``wordnet-base`` (``/usr/share/wordnet/data.{noun,verb,adj,adv}``):
each synset line's second field is its lexicographer file number, its gloss follows
`` | ``. All parts of speech: 117,659 glosses in 45 classes; ``pos=noun``: 82,115 in 26.
A much harder text task than BBC News. Split stratified 60/20/20 by seed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from coformer.data import DatasetFormatError, DatasetSource, DatasetUnavailableError, LabelledExamples
from coformer.hookspecs import Register, hookimpl

WORDNET_DIR = Path("/usr/share/wordnet")
#: lexnames(5WN): the 45 lexicographer files of WordNet 3.0, by number.
LEXNAMES = [
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
]
PARTS_OF_SPEECH = ("noun", "verb", "adj", "adv")


def wordnet_dir() -> Path:
    """The WordNet database directory: ``$COFORMER_WORDNET`` or the Debian package's."""
    return Path(os.environ.get("COFORMER_WORDNET", WORDNET_DIR))


def read_glosses(path: Path) -> list[tuple[int, str]]:
    """``(lexicographer file number, gloss)`` of every synset in one WordNet ``data.*`` file."""
    out = []
    with path.open(encoding="utf-8", errors="strict") as f:
        for line_no, line in enumerate(f, 1):
            if line.startswith("  "):  # the licence header
                continue
            fields = line.split(" ", 2)
            gloss_at = line.find(" | ")
            if len(fields) < 3 or not fields[1].isdigit() or gloss_at < 0:
                raise DatasetFormatError(path, "not a WordNet synset line (offset, lexfile number, ..., ' | ' gloss)",
                                         line=line_no, column=len(fields[0]) + 2 if len(fields) > 1 else 1)
            lexfile = int(fields[1])
            if lexfile >= len(LEXNAMES):
                raise DatasetFormatError(path, f"lexicographer file {lexfile} is not one of WordNet 3.0's 45",
                                         line=line_no, column=len(fields[0]) + 2)
            out.append((lexfile, line[gloss_at + 3:].strip()))
    return out


@dataclass(kw_only=True)
class WordnetSupersense(DatasetSource):
    """Glosses → supersense; ``pos`` restricts to one part of speech (``noun``: 26 classes)."""

    pos: Literal["all", "noun", "verb", "adj", "adv"] = "all"
    root: Path | None = None

    def read(self) -> LabelledExamples:
        """Every gloss of the chosen parts of speech; classes are the lexicographer files present, by number."""
        base = self.root if self.root is not None else wordnet_dir()
        parts = PARTS_OF_SPEECH if self.pos == "all" else (self.pos,)
        files = [base / f"data.{p}" for p in parts]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise DatasetUnavailableError(
                f"WordNet files {missing} are not in {base}; install the Debian package 'wordnet-base' "
                f"(apt-get install wordnet-base) or set COFORMER_WORDNET (or root=DIR) to a WordNet 3.0 dict directory")
        pairs = [pair for f in files for pair in read_glosses(f)]
        present = sorted({lexfile for lexfile, _ in pairs})
        index = {lexfile: i for i, lexfile in enumerate(present)}
        return LabelledExamples([LEXNAMES[k] for k in present], [g for _, g in pairs],
                                [index[k] for k, _ in pairs])


@hookimpl
def register_datasets(register: Register) -> None:
    """Register ``wordnet_supersense``."""
    register("wordnet_supersense", WordnetSupersense)
