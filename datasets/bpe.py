"""Subword language-modelling corpora: a BPE vocabulary over a local text collection.

The char-level corpus of the course is `ssmlab.datasets.text`; this module is
its subword twin for stage 06's language models, with the same interface
(``V``, ``train_ids``, ``val_ids``, ``encode``, ``decode``, ``describe``), so a
script can take either.

Sources (`read_documents`):

* ``"imdb"``: the text of the IMDb *training* reviews (25,000 documents, about
  33 MB; found by `ssmlab.datasets.imdb.find_imdb`: flag, ``$SSMLAB_IMDB``,
  cache, the lab's shared copy, download); HTML line breaks removed;
* a text file: one document;
* a folder: every ``*.txt`` file below it (sorted), one document each.

Split, deterministic: with several documents, every tenth document (index
9, 19, ...) validates and the rest train, so both halves mix the collection's
order (IMDb's files are sorted by label); a single document splits at 90% of
its characters, first part training.

Tokenizer: byte-level BPE trained with Hugging Face ``tokenizers`` on the
training documents only (`ssmlab.datasets.tokenize.BpeTokenizer`, shared with
stage 05). Id 0 (its padding token) separates documents in the token stream,
so a model learns where a review ends.

Tokenizing 33 MB takes a while on a laptop, so the tokenizer and both token
streams are cached (``<cache>/lm_bpe/<key>/``), keyed by the source's path,
size and modification time, the vocabulary size and the split rule.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ssmlab.datasets.locate import DataError, cache_dir
from ssmlab.datasets.tokenize import PAD_ID, BpeTokenizer

PathLike = Union[str, os.PathLike]
SEP_ID = PAD_ID  # document separator in the token stream
VAL_EVERY = 10  # with several documents, document i validates when i % VAL_EVERY == VAL_EVERY - 1
VAL_FRACTION = 0.1  # with one document, the last 10% of its characters validate
CACHE_VERSION = 1


# --------------------------------------------------------------------------- documents


def read_documents(source: Union[str, PathLike], imdb_path: Optional[PathLike] = None) -> tuple[list[str], str]:
    """(documents, description) of a source: ``"imdb"``, a text file or a folder of ``*.txt`` files."""
    if str(source) == "imdb":
        from ssmlab.datasets.imdb import clean_review, load_imdb

        data = load_imdb(imdb_path)
        return [clean_review(t) for t in data.train.texts], f"IMDb train reviews ({data.source})"
    p = Path(source).expanduser()
    if p.is_file():
        text = p.read_text(encoding="utf-8")
        if not text:
            raise DataError(f"text file {p} is empty")
        return [text], str(p)
    if p.is_dir():
        files = sorted(p.rglob("*.txt"))
        if not files:
            raise DataError(f"folder {p} holds no *.txt files")
        return [f.read_text(encoding="utf-8") for f in files], f"{p} ({len(files)} .txt files)"
    raise FileNotFoundError(f"text source {p} is neither 'imdb', a file nor a folder")


def split_documents(docs: Sequence[str]) -> tuple[list[str], list[str]]:
    """(train, val) documents by the rule in the module docstring."""
    if not docs:
        raise DataError("no documents to split")
    if len(docs) == 1:
        text = docs[0]
        cut = min(max(int(len(text) * (1 - VAL_FRACTION)), 1), len(text) - 1)
        if cut < 1:
            raise DataError(f"a single document needs at least 2 characters, got {len(text)}")
        return [text[:cut]], [text[cut:]]
    if len(docs) < VAL_EVERY:
        raise DataError(f"need at least {VAL_EVERY} documents to split by document, got {len(docs)}")
    train = [d for i, d in enumerate(docs) if i % VAL_EVERY != VAL_EVERY - 1]
    val = [d for i, d in enumerate(docs) if i % VAL_EVERY == VAL_EVERY - 1]
    return train, val


def token_stream(tok: BpeTokenizer, docs: Sequence[str]) -> np.ndarray:
    """All documents encoded end to end, each followed by SEP_ID: (n_tokens,) int32."""
    packed = tok.encode_all(list(docs))
    n = len(packed)
    out = np.empty(len(packed.ids) + n, dtype=np.int32)
    ends = packed.offsets[1:] + np.arange(1, n + 1)  # position after each document's separator
    starts = np.concatenate([[0], ends[:-1]])
    for i in range(n):  # one slice copy per document
        out[starts[i]:ends[i] - 1] = packed[i]
        out[ends[i] - 1] = SEP_ID
    return out


# --------------------------------------------------------------------------- the corpus


@dataclass
class BpeCorpus:
    """A BPE-tokenized text collection and its train/val token streams (the `CharCorpus` interface)."""

    tokenizer: BpeTokenizer
    train_ids: Tensor  # (n_train,) int64
    val_ids: Tensor  # (n_val,) int64
    source: str
    n_docs: tuple[int, int] = (0, 0)  # (train, val) documents
    n_chars: tuple[int, int] = (0, 0)  # (train, val) characters, for bits per character
    level: str = field(default="bpe", init=False)

    @property
    def V(self) -> int:
        return self.tokenizer.vocab_size

    def encode(self, s: str) -> Tensor:
        return torch.from_numpy(self.tokenizer.encode_all([s]).ids.astype(np.int64))

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return self.tokenizer.decode(ids)

    def describe(self) -> dict:
        return {"source": self.source, "level": "bpe", "V": self.V, "train_tokens": len(self.train_ids),
                "val_tokens": len(self.val_ids), "train_docs": self.n_docs[0], "val_docs": self.n_docs[1],
                "train_chars": self.n_chars[0], "val_chars": self.n_chars[1],
                "chars_per_token_val": self.n_chars[1] / max(len(self.val_ids), 1)}


def _source_key(source, imdb_path, vocab_size: int) -> str:
    if str(source) == "imdb":
        from ssmlab.datasets.imdb import find_imdb

        p = find_imdb(imdb_path)
    else:
        p = Path(source).expanduser().resolve()
    if not p.exists():
        raise FileNotFoundError(f"text source {p} does not exist")
    stat = p.stat()
    files = sorted(p.rglob("*.txt")) if p.is_dir() else []
    sig = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    blob = json.dumps([CACHE_VERSION, str(source), str(p), stat.st_size, stat.st_mtime_ns, sig, vocab_size,
                       VAL_EVERY, VAL_FRACTION])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_bpe_corpus(source: Union[str, PathLike] = "imdb", vocab_size: int = 8192, imdb_path: Optional[PathLike] = None,
                    cache: bool = True, cache_root: Optional[PathLike] = None, min_frequency: int = 2) -> BpeCorpus:
    """Read, split, train BPE on the training documents and tokenize both streams (cached)."""
    folder = Path(cache_root or cache_dir() / "lm_bpe") / _source_key(source, imdb_path, vocab_size)
    meta_path = folder / "meta.json"
    if cache and meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            tok = BpeTokenizer.load(folder / "tokenizer.json")
            train, val = (torch.from_numpy(np.load(folder / f"{s}.npy").astype(np.int64)) for s in ("train", "val"))
            return BpeCorpus(tok, train, val, meta["source"], tuple(meta["n_docs"]), tuple(meta["n_chars"]))
        except (OSError, KeyError, ValueError, json.JSONDecodeError):
            pass  # a damaged cache is rebuilt
    docs, desc = read_documents(source, imdb_path)
    train_docs, val_docs = split_documents(docs)
    tok = BpeTokenizer.train(train_docs, vocab_size=vocab_size, min_frequency=min_frequency)
    train, val = token_stream(tok, train_docs), token_stream(tok, val_docs)
    n_docs = (len(train_docs), len(val_docs))
    n_chars = (sum(map(len, train_docs)), sum(map(len, val_docs)))
    if cache:
        from ssmlab.core.checkpoint import atomic_write, atomic_write_text

        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / "tokenizer.json", tok.save)
        def saver(arr: np.ndarray):
            def write(tmp: str) -> None:
                with open(tmp, "wb") as f:  # np.save on a path would append ".npy" to the temporary name
                    np.save(f, arr)
            return write

        for name, arr in (("train", train), ("val", val)):
            atomic_write(folder / f"{name}.npy", saver(arr))
        atomic_write_text(json.dumps({"source": desc, "n_docs": n_docs, "n_chars": n_chars}), meta_path)
    return BpeCorpus(tok, torch.from_numpy(train.astype(np.int64)), torch.from_numpy(val.astype(np.int64)), desc,
                     n_docs, n_chars)


__all__ = ["BpeCorpus", "SEP_ID", "load_bpe_corpus", "read_documents", "split_documents", "token_stream"]
