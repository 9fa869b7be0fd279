"""Synthetic tasks that need *selection*: selective copying and induction heads (Mamba paper, Section 4.1).

Both generators return ``(inputs, targets)``, int64 tensors of shape (B, T):
``targets`` holds the answer at the positions that are scored and `IGNORE`
(-100, the `cross_entropy` ignore index) everywhere else, so a model is
trained and scored on the answers only. Every answer is recoverable from the
inputs alone (`selective_copying_answers`, `induction_heads_answers`), which
the stage-06 tests check.

Selective copying (vocabulary of ``vocab_size`` tokens in all):

    token 0            noise (the filler of the context)
    token 1            marker: "output the next remembered token now"
    tokens 2..V-1      data (V - 2 symbols)

    inputs  = [ context of `seq_len` tokens: `n_tokens` data tokens at random
                positions (in order), noise elsewhere ] + [ `n_tokens` markers ]
    targets = IGNORE over the context; at the i-th marker, the i-th data token.

The positions are random per example, so an LTI model (a fixed convolution)
cannot know where to look: it must *select* by content. The paper's setting:
V = 16, seq_len = 4096, n_tokens = 16. The smaller reference-study setting:
V = 30, seq_len = 64 for training and 128 for testing, 10,000 fixed training
examples.

Induction heads (vocabulary of ``vocab_size`` tokens in all):

    token 0            the trigger (appears exactly twice)
    tokens 1..V-1      ordinary tokens, uniform

    inputs  = random ordinary tokens of length `seq_len`, the trigger at a random
              position p <= seq_len - 3 followed by the answer a = inputs[p + 1],
              and the trigger again as the last token.
    targets = IGNORE except at the last position: a.

Trained at seq_len = 256 with V = 16 (the paper), tested at every power of two
up to 2^20 to measure length extrapolation.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

IGNORE = -100  # targets at unscored positions (torch cross_entropy's ignore_index)
NOISE, MARKER = 0, 1  # selective copying's special tokens
TRIGGER = 0  # induction heads' special token


def _check(name: str, value: int, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


# --------------------------------------------------------------------------- selective copying


def selective_copying(batch: int, seq_len: int = 4096, n_tokens: int = 16, vocab_size: int = 16,
                      generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """(inputs, targets), each (batch, seq_len + n_tokens) int64; see the module docstring."""
    _check("batch", batch, 1)
    _check("n_tokens", n_tokens, 1)
    _check("vocab_size", vocab_size, 3)
    _check("seq_len", seq_len, n_tokens)
    # random positions: the n_tokens smallest of seq_len uniform keys, sorted (distinct, uniform subset)
    keys = torch.rand(batch, seq_len, generator=generator)
    pos = keys.topk(n_tokens, dim=1, largest=False).indices.sort(dim=1).values  # (B, n)
    data = torch.randint(2, vocab_size, (batch, n_tokens), generator=generator)  # (B, n)
    context = torch.full((batch, seq_len), NOISE, dtype=torch.long).scatter(1, pos, data)
    inputs = torch.cat([context, torch.full((batch, n_tokens), MARKER, dtype=torch.long)], dim=1)
    targets = torch.cat([torch.full((batch, seq_len), IGNORE, dtype=torch.long), data], dim=1)
    return inputs, targets


def selective_copying_answers(inputs: Tensor, n_tokens: int) -> Tensor:
    """The answers read off the inputs alone: the data tokens of the context, in order: (B, n_tokens)."""
    context = inputs[:, :-n_tokens]
    data = context[context >= 2].view(inputs.shape[0], n_tokens)  # exactly n_tokens per row
    return data


# --------------------------------------------------------------------------- induction heads


def induction_heads(batch: int, seq_len: int = 256, vocab_size: int = 16,
                    generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """(inputs, targets), each (batch, seq_len) int64; see the module docstring."""
    _check("batch", batch, 1)
    _check("vocab_size", vocab_size, 2)
    _check("seq_len", seq_len, 3)
    inputs = torch.randint(1, vocab_size, (batch, seq_len), generator=generator)
    p = torch.randint(0, seq_len - 2, (batch,), generator=generator)  # trigger position, p + 1 < seq_len - 1
    rows = torch.arange(batch)
    inputs[rows, p] = TRIGGER
    inputs[:, -1] = TRIGGER
    targets = torch.full_like(inputs, IGNORE)
    targets[:, -1] = inputs[rows, p + 1]
    return inputs, targets


def induction_heads_answers(inputs: Tensor) -> Tensor:
    """The answers read off the inputs alone: the token after the first trigger: (B,)."""
    first = (inputs == TRIGGER).int().argmax(dim=1)  # index of the first trigger
    return inputs[torch.arange(inputs.shape[0]), first + 1]


# --------------------------------------------------------------------------- scoring


def answer_accuracy(logits: Tensor, targets: Tensor) -> Tensor:
    """Token accuracy over the scored positions (targets != IGNORE): a 0-dim float tensor."""
    mask = targets != IGNORE
    if not mask.any():
        raise ValueError("targets hold no scored position")
    return (logits.argmax(-1)[mask] == targets[mask]).float().mean()


def sequence_accuracy(logits: Tensor, targets: Tensor) -> Tensor:
    """Fraction of examples whose every scored position is right."""
    mask = targets != IGNORE
    right = (logits.argmax(-1) == targets) | ~mask
    return right.all(dim=1).float().mean()


__all__ = [
    "IGNORE", "MARKER", "NOISE", "TRIGGER", "answer_accuracy", "induction_heads", "induction_heads_answers",
    "selective_copying", "selective_copying_answers", "sequence_accuracy",
]
