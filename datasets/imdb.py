"""The Large Movie Review Dataset (aclImdb v1.0; Maas et al., ACL 2011).

25,000 training and 25,000 test reviews, half positive and half negative, laid
out as ``aclImdb/{train,test}/{pos,neg}/ID_RATING.txt``: the label comes from
the folder name (pos = 1, neg = 0), the star rating (1..10) from the file name.

Where the data comes from (``ssmlab.datasets.locate``'s rule, plus one local
default):

1. a path given by the caller (``--data``): an ``aclImdb/`` folder, a folder
   holding one, or a ``.tar.gz`` that contains one;
2. ``$SSMLAB_IMDB``;
3. the user cache (``~/.cache/ssmlab/aclImdb_v1.tar.gz``), MD5-checked;
4. ``../shared/datasets/aclImdb.tar.gz`` beside the repository (or beside the
   working directory), where a lab machine keeps a copy;
5. a download of the official archive, MD5-checked.

Local copies may be repackaged (the shared copy leaves out ``train/unsup``),
so they are checked by structure instead of checksum: exactly 12,500 reviews
in each of the four labelled folders, valid ratings, readable UTF-8. A missing,
partial or corrupt archive raises `DataError`; it never yields a smaller set.

Parsing the archive takes a few seconds, so the parsed reviews of an archive
are cached as ``.npz`` (no pickle) in the user cache, keyed by the archive's
path, size and modification time.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from ssmlab.datasets.locate import DataError, cache_dir, resolve
from ssmlab.datasets.sources import IMDB

PathLike = Union[str, os.PathLike]

PER_FOLDER = 12_500  # reviews in each of train/pos, train/neg, test/pos, test/neg
SPLITS = ("train", "test")
LABELS = {"neg": 0, "pos": 1}
SHARED_NAME = "aclImdb.tar.gz"
_MEMBER = re.compile(r"(?:^|/)(train|test)/(pos|neg)/(\d+)_(\d+)\.txt$")


@dataclass
class ImdbSplit:
    """Reviews of one split; row i is texts[i] with labels[i] (0/1), ratings[i] (1..10), ids[i]."""

    texts: list[str]
    labels: np.ndarray  # (n,) int64
    ratings: np.ndarray  # (n,) int64
    ids: np.ndarray  # (n,) int64, the ID of the file name (unique within a folder)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: Sequence[int]) -> "ImdbSplit":
        index = np.asarray(index, dtype=np.int64)
        return ImdbSplit([self.texts[i] for i in index], self.labels[index], self.ratings[index], self.ids[index])


@dataclass
class Imdb:
    train: ImdbSplit
    test: ImdbSplit
    source: Path  # where the reviews were read from


# ----------------------------------------------------------------------------- finding


def shared_candidates() -> list[Path]:
    """``../shared/datasets/aclImdb.tar.gz`` next to the repository checkout and next to the working directory."""
    repo = Path(__file__).resolve().parents[1]
    out = []
    for base in (repo, Path.cwd()):
        p = (base / ".." / "shared" / "datasets" / SHARED_NAME).resolve()
        if p not in out:
            out.append(p)
    return out


def find_imdb(path: Optional[PathLike] = None, allow_download: bool = True) -> Path:
    """Where the reviews are: the rule in the module docstring. Raises DataError."""
    if path or os.environ.get(IMDB.env_var) or (cache_dir() / IMDB.filename).exists():
        return resolve(IMDB, path)  # given path or env var (must exist), or the MD5-checked cache
    for p in shared_candidates():
        if p.exists():
            return p
    return resolve(IMDB, allow_download=allow_download)


# ----------------------------------------------------------------------------- reading


def _iter_dir(root: Path) -> Iterator[tuple[str, bytes]]:
    base = root / "aclImdb" if (root / "aclImdb").is_dir() else root
    for split in SPLITS:
        for label in LABELS:
            folder = base / split / label
            if folder.is_dir():
                for f in folder.iterdir():
                    yield f"{split}/{label}/{f.name}", f.read_bytes()


def _iter_tar(path: Path) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            if member.isfile() and _MEMBER.search(member.name):
                fh = tar.extractfile(member)
                yield member.name, fh.read()


def read_imdb(path: PathLike, per_folder: int = PER_FOLDER) -> Imdb:
    """Parse an ``aclImdb`` folder or archive and check it is complete (`per_folder` reviews per folder)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"IMDb: {path} does not exist")
    rows: dict[tuple[str, str], list[tuple[int, int, str]]] = {(s, l): [] for s in SPLITS for l in LABELS}
    try:
        items = _iter_dir(path) if path.is_dir() else _iter_tar(path)
        for name, raw in items:
            m = _MEMBER.search(name)
            if not m:
                continue
            split, label, rid, rating = m.group(1), m.group(2), int(m.group(3)), int(m.group(4))
            if not 1 <= rating <= 10:
                raise DataError(f"IMDb: {name} in {path} has rating {rating}, outside 1..10")
            rows[(split, label)].append((rid, rating, raw.decode("utf-8")))
    except (tarfile.TarError, EOFError, zlib.error, OSError, UnicodeDecodeError) as err:
        raise DataError(f"IMDb: {path} is corrupt or truncated ({type(err).__name__}: {err}); "
                        f"replace it with a complete copy of {IMDB.url}") from err
    counts = {f"{s}/{l}": len(v) for (s, l), v in rows.items()}
    if any(c != per_folder for c in counts.values()):
        raise DataError(f"IMDb: {path} is incomplete: expected {per_folder} reviews in each of "
                        f"train/pos, train/neg, test/pos, test/neg, found {counts}. "
                        f"Use a complete copy of {IMDB.url} (an aclImdb/ folder or the .tar.gz)")
    splits = {}
    for s in SPLITS:
        texts, labels, ratings, ids = [], [], [], []
        for l, y in sorted(LABELS.items(), key=lambda kv: kv[1]):
            for rid, rating, text in sorted(rows[(s, l)]):
                texts.append(text), labels.append(y), ratings.append(rating), ids.append(rid)
        splits[s] = ImdbSplit(texts, np.array(labels, np.int64), np.array(ratings, np.int64), np.array(ids, np.int64))
    return Imdb(splits["train"], splits["test"], path)


# ----------------------------------------------------------------------------- caching


def _cache_key(path: Path, per_folder: int) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{per_folder}".encode()).hexdigest()[:16]


def _save_npz(dest: Path, arrays: dict) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _split_to_arrays(prefix: str, sp: ImdbSplit) -> dict:
    blobs = [t.encode("utf-8") for t in sp.texts]
    offsets = np.zeros(len(blobs) + 1, np.int64)
    offsets[1:] = np.cumsum([len(b) for b in blobs])
    return {f"{prefix}_text": np.frombuffer(b"".join(blobs), np.uint8), f"{prefix}_offsets": offsets,
            f"{prefix}_labels": sp.labels, f"{prefix}_ratings": sp.ratings, f"{prefix}_ids": sp.ids}


def _split_from_arrays(prefix: str, z) -> ImdbSplit:
    blob, off = z[f"{prefix}_text"].tobytes(), z[f"{prefix}_offsets"]
    texts = [blob[off[i] : off[i + 1]].decode("utf-8") for i in range(len(off) - 1)]
    return ImdbSplit(texts, z[f"{prefix}_labels"], z[f"{prefix}_ratings"], z[f"{prefix}_ids"])


def load_imdb(path: Optional[PathLike] = None, per_folder: int = PER_FOLDER, cache: bool = True,
              allow_download: bool = True) -> Imdb:
    """Find (see `find_imdb`), read and check the reviews; archives are parsed once and cached."""
    src = find_imdb(path, allow_download)
    if src.is_dir() or not cache:
        return read_imdb(src, per_folder)
    dest = cache_dir() / "imdb" / f"parsed-{_cache_key(src, per_folder)}.npz"
    if dest.exists():
        try:
            with np.load(dest, allow_pickle=False) as z:
                return Imdb(_split_from_arrays("train", z), _split_from_arrays("test", z), src)
        except (OSError, KeyError, ValueError, zlib.error):
            dest.unlink(missing_ok=True)  # a damaged cache is rebuilt from the archive
    data = read_imdb(src, per_folder)
    _save_npz(dest, {**_split_to_arrays("train", data.train), **_split_to_arrays("test", data.test)})
    return data


def train_val_split(labels: np.ndarray, val_fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) carved from the training split, stratified by label, reproducible by `seed`."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    tr, va = [], []
    for y in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == y))
        k = max(1, int(round(len(idx) * val_fraction)))
        va.append(idx[:k]), tr.append(idx[k:])
    return np.sort(np.concatenate(tr)), np.sort(np.concatenate(va))


def clean_review(text: str) -> str:
    """The reviews carry HTML line breaks (``<br />``); make them spaces."""
    return text.replace("<br />", " ")


# ----------------------------------------------------------------------------- tokenized splits


@dataclass
class TokenizedImdb:
    """Token ids of the train / validation / test reviews (validation carved from train), with labels."""

    train: "Packed"
    val: "Packed"
    test: "Packed"
    y_train: np.ndarray
    y_val: np.ndarray
    y_test: np.ndarray
    vocab_size: int  # V, padding id 0 included
    tokenizer_json: Optional[str]  # the BPE tokenizer (None for bytes)
    info: dict  # how the splits were made (sizes, subsets, truncation)


def _stratified_subset(labels: np.ndarray, n: Optional[int], rng: np.random.Generator) -> np.ndarray:
    """`n` indices (about half per label) drawn without replacement, sorted; all when n is None."""
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    if n < 2:
        raise ValueError(f"a subset needs at least 2 reviews, got {n}")
    parts = []
    classes = np.unique(labels)
    for j, y in enumerate(classes):
        k = n // len(classes) + (1 if j < n % len(classes) else 0)
        parts.append(rng.choice(np.flatnonzero(labels == y), size=k, replace=False))
    return np.sort(np.concatenate(parts))


def tokenized_imdb(data: Imdb, tokenizer: str = "bpe", max_len: Optional[int] = None, vocab_size: int = 8192,
                   val_fraction: float = 0.1, seed: int = 0, train_subset: Optional[int] = None,
                   val_subset: Optional[int] = None, test_subset: Optional[int] = None,
                   cache: bool = True) -> TokenizedImdb:
    """Carve validation from train, optionally subsample, train BPE on the training part only, encode.

    Reviews are cleaned (`clean_review`) and truncated to their first `max_len`
    tokens. Results are cached in the user cache, keyed by the source and every
    argument, so chunked runs do not re-tokenize.
    """
    from ssmlab.datasets.tokenize import BpeTokenizer, ByteTokenizer, Packed

    if tokenizer not in ("byte", "bpe"):
        raise ValueError(f"tokenizer must be 'byte' or 'bpe', got {tokenizer!r}")
    args = dict(tokenizer=tokenizer, max_len=max_len, vocab_size=vocab_size if tokenizer == "bpe" else 257,
                val_fraction=val_fraction, seed=seed, train_subset=train_subset, val_subset=val_subset,
                test_subset=test_subset, n_train=len(data.train), n_test=len(data.test))
    dest = None
    if cache and data.source.is_file():
        key = hashlib.sha256(f"{_cache_key(data.source, len(data.train) // 2)}|{sorted(args.items())}".encode())
        dest = cache_dir() / "imdb" / f"tokens-{key.hexdigest()[:16]}.npz"
        if dest.exists():
            try:
                with np.load(dest, allow_pickle=False) as z:
                    packs = {s: Packed(z[f"{s}_ids"], z[f"{s}_offsets"]) for s in ("train", "val", "test")}
                    tj = z["tokenizer_json"].tobytes().decode() if "tokenizer_json" in z else None
                    info = json.loads(z["info"].tobytes().decode())
                    return TokenizedImdb(packs["train"], packs["val"], packs["test"], z["y_train"], z["y_val"],
                                         z["y_test"], int(z["vocab_size"]), tj, info)
            except (OSError, KeyError, ValueError, zlib.error):
                dest.unlink(missing_ok=True)
    rng = np.random.default_rng(seed)
    tr, va = train_val_split(data.train.labels, val_fraction, seed)
    tr = tr[_stratified_subset(data.train.labels[tr], train_subset, rng)]
    va = va[_stratified_subset(data.train.labels[va], val_subset, rng)]
    te = _stratified_subset(data.test.labels, test_subset, rng)
    texts = {"train": [clean_review(data.train.texts[i]) for i in tr],
             "val": [clean_review(data.train.texts[i]) for i in va],
             "test": [clean_review(data.test.texts[i]) for i in te]}
    tok = ByteTokenizer() if tokenizer == "byte" else BpeTokenizer.train(texts["train"], vocab_size)
    packs = {s: tok.encode_all(t, max_len) for s, t in texts.items()}
    tj = tok.tok.to_str() if tokenizer == "bpe" else None
    lengths = {s: p.lengths() for s, p in packs.items()}
    info = {**args, "source": str(data.source), "sizes": {s: len(p) for s, p in packs.items()},
            "truncated_fraction": {s: float(np.mean(lengths[s] >= max_len)) if max_len else 0.0 for s in packs},
            "mean_tokens": {s: float(lengths[s].mean()) for s in packs}}
    out = TokenizedImdb(packs["train"], packs["val"], packs["test"], data.train.labels[tr], data.train.labels[va],
                        data.test.labels[te], tok.vocab_size, tj, info)
    if dest is not None:
        arrays = {f"{s}_{k}": getattr(p, k) for s, p in packs.items() for k in ("ids", "offsets")}
        arrays.update(y_train=out.y_train, y_val=out.y_val, y_test=out.y_test, vocab_size=np.array(out.vocab_size),
                      info=np.frombuffer(json.dumps(info).encode(), np.uint8))
        if tj is not None:
            arrays["tokenizer_json"] = np.frombuffer(tj.encode(), np.uint8)
        _save_npz(dest, arrays)
    return out
