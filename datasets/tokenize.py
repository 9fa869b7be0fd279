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
