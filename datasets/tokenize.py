"""Tokenizers for text classification: raw bytes, and a byte-level BPE vocabulary.

* `ByteTokenizer`: UTF-8 bytes as tokens (the Long Range Arena text task);
  id 0 is padding, byte b has id b + 1, so V = 257.
* `BpeTokenizer`: a byte-level BPE vocabulary learned with Hugging Face
  `tokenizers` from the texts it is given (give it the training split only);
  id 0 is padding. Byte-level pre-tokenization means no text is unknown.

Both encode a list of strings into a `Packed` array (token ids of every text
end to end, plus offsets), which is compact, saves as ``.npz`` and pads into
batches on demand.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np

PAD_ID = 0
PAD_TOKEN = "[PAD]"


@dataclass
class Packed:
    """Variable-length token sequences: sequence i is ids[offsets[i]:offsets[i+1]]."""

    ids: np.ndarray  # (total,) int32
    offsets: np.ndarray  # (n + 1,) int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i] : self.offsets[i + 1]]

    def select(self, index: Sequence[int]) -> "Packed":
        parts = [self[int(i)] for i in index]
        offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(p) for p in parts])
        ids = np.concatenate(parts) if parts else np.zeros(0, np.int32)
        return Packed(ids.astype(np.int32), offsets)

    def pad(self, index: Sequence[int], multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(ids (B, L) padded with PAD_ID, lengths (B,)) for the sequences in `index`."""
        lens = np.array([self.offsets[i + 1] - self.offsets[i] for i in index], dtype=np.int64)
        L = max(int(lens.max()) if len(lens) else 1, 1)
        L = -(-L // multiple) * multiple
        out = np.full((len(index), L), PAD_ID, dtype=np.int64)
        for row, i in enumerate(index):
            seq = self[int(i)]
            out[row, : len(seq)] = seq
        return out, lens

    @staticmethod
    def from_lists(seqs: Sequence[np.ndarray]) -> "Packed":
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(s) for s in seqs])
        ids = np.concatenate([np.asarray(s, np.int32) for s in seqs]) if len(seqs) else np.zeros(0, np.int32)
        return Packed(ids.astype(np.int32), offsets)


class ByteTokenizer:
    """UTF-8 bytes, shifted by one so that 0 is padding."""

    name = "byte"
    vocab_size = 257

    def encode(self, text: str, max_len: int | None = None) -> np.ndarray:
        b = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        if max_len is not None:
            b = b[:max_len]
        return b.astype(np.int32) + 1

    def encode_all(self, texts: Sequence[str], max_len: int | None = None) -> Packed:
        return Packed.from_lists([self.encode(t, max_len) for t in texts])

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) - 1 for i in ids if i != PAD_ID).decode("utf-8", errors="replace")


class BpeTokenizer:
    """Byte-level BPE (Hugging Face `tokenizers`), id 0 = padding."""

    name = "bpe"

    def __init__(self, tokenizer):
        self.tok = tokenizer
        if tokenizer.token_to_id(PAD_TOKEN) != PAD_ID:
            raise ValueError(f"the tokenizer must map {PAD_TOKEN} to id {PAD_ID}")

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    @classmethod
    def train(cls, texts: Sequence[str], vocab_size: int = 8192, min_frequency: int = 2) -> "BpeTokenizer":
        """Learn merges from `texts` (the training split only, so nothing leaks from the test set)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < 300:
            raise ValueError(f"vocab_size must be >= 300 (256 bytes + merges), got {vocab_size}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[PAD_TOKEN],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
        return cls(tok)

    def encode_all(self, texts: Sequence[str], max_len: int | None = None) -> Packed:
        encs = self.tok.encode_batch(list(texts))
        return Packed.from_lists([np.asarray(e.ids[:max_len] if max_len else e.ids, np.int32) for e in encs])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids if i != PAD_ID])

    def save(self, path: Union[str, Path]) -> None:
        self.tok.save(str(path))

    @classmethod
    def load(cls, path: Union[str, Path]) -> "BpeTokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def to_json(self) -> dict:
        return json.loads(self.tok.to_str())


class LengthBucketBatches:
    """Shuffled mini-batches that group sequences of similar length (less padding), resumable.

    Epoch e: permute the examples with seed + e, cut the permutation into pools
    of `pool` batches, sort each pool by length, cut it into batches, and
    shuffle the batch order. Everything follows from (seed, epoch), so the
    state is (epoch, cursor). Each batch is (ids (B, L) int64, lengths (B,),
    labels (B,) float32) as tensors; L is padded up to `pad_multiple`.
    """

    def __init__(self, packed: Packed, labels: np.ndarray, batch_size: int, seed: int = 0, pool: int = 50,
                 pad_multiple: int = 8):
        import torch

        if batch_size < 1 or batch_size > len(packed):
            raise ValueError(f"batch_size must be in [1, {len(packed)}], got {batch_size}")
        if len(labels) != len(packed):
            raise ValueError(f"labels ({len(labels)}) and sequences ({len(packed)}) differ in number")
        self.packed, self.labels = packed, np.asarray(labels)
        self.batch_size, self.seed, self.pool, self.pad_multiple = batch_size, seed, pool, pad_multiple
        self._torch = torch
        self.lengths = packed.lengths()
        self.epoch, self.cursor = 0, 0
        self._batches = self._plan(0)

    def _plan(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng(self.seed + epoch)
        perm = rng.permutation(len(self.packed))
        n_full = len(perm) // self.batch_size * self.batch_size  # drop the last incomplete batch
        perm = perm[:n_full]
        batches = []
        step = self.batch_size * self.pool
        for s in range(0, n_full, step):
            chunk = perm[s : s + step]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        order = rng.permutation(len(batches))
        return [batches[i] for i in order]

    def __iter__(self):
        return self

    def __next__(self):
        if self.cursor >= len(self._batches):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._batches = self._plan(self.epoch)
        idx = self._batches[self.cursor]
        self.cursor += 1
        return self.batch(idx)

    def batch(self, idx: Sequence[int]):
        torch = self._torch
        ids, lens = self.packed.pad(idx, self.pad_multiple)
        return torch.from_numpy(ids), torch.from_numpy(lens), torch.from_numpy(self.labels[idx].astype(np.float32))

    def steps_per_epoch(self) -> int:
        return len(self._batches)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor, self.seed = state["epoch"], state["cursor"], state["seed"]
        self._batches = self._plan(self.epoch)


def eval_batches(packed: Packed, batch_size: int, pad_multiple: int = 8):
    """Deterministic batches over all sequences, sorted by length: yields (index, ids, lengths)."""
    import torch

    order = np.argsort(packed.lengths(), kind="stable")
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        ids, lens = packed.pad(idx, pad_multiple)
        yield idx, torch.from_numpy(ids), torch.from_numpy(lens)
