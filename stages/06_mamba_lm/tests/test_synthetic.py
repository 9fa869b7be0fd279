"""The synthetic generators produce what they claim: answers recoverable from the inputs alone."""

import pytest
import torch

from ssmlab.datasets.synthetic import (IGNORE, MARKER, NOISE, TRIGGER, answer_accuracy, induction_heads,
                                       induction_heads_answers, selective_copying, selective_copying_answers,
                                       sequence_accuracy)


@pytest.mark.parametrize("seq_len, n_tokens, vocab", [(4096, 16, 16), (64, 16, 30), (128, 16, 30), (5, 5, 3), (7, 1, 4)])
def test_selective_copying(seq_len, n_tokens, vocab):
    g = torch.Generator().manual_seed(0)
    x, y = selective_copying(8, seq_len=seq_len, n_tokens=n_tokens, vocab_size=vocab, generator=g)
    assert x.shape == y.shape == (8, seq_len + n_tokens) and x.dtype == y.dtype == torch.long
    assert x.min() >= 0 and x.max() < vocab
    context, tail = x[:, :seq_len], x[:, seq_len:]
    assert (tail == MARKER).all() and not (context == MARKER).any()
    assert ((context != NOISE).sum(1) == n_tokens).all()  # exactly n data tokens, the rest noise
    assert (y[:, :seq_len] == IGNORE).all()
    assert torch.equal(selective_copying_answers(x, n_tokens), y[:, seq_len:])  # recoverable, in order


def test_selective_copying_positions_vary():
    x, _ = selective_copying(64, seq_len=64, n_tokens=4, vocab_size=16, generator=torch.Generator().manual_seed(1))
    positions = {tuple((row[:64] != NOISE).nonzero().flatten().tolist()) for row in x}
    assert len(positions) > 60  # random spacing per example, not a fixed pattern an LTI model could learn
    first = (x[:, :64] != NOISE).int().argmax(1)
    assert first.min() < 8 and first.max() > 20


@pytest.mark.parametrize("seq_len, vocab", [(256, 16), (3, 2), (64, 5), (1000, 16)])
def test_induction_heads(seq_len, vocab):
    g = torch.Generator().manual_seed(0)
    x, y = induction_heads(16, seq_len=seq_len, vocab_size=vocab, generator=g)
    assert x.shape == y.shape == (16, seq_len)
    assert x.min() >= 0 and x.max() < vocab
    assert ((x == TRIGGER).sum(1) == 2).all() and (x[:, -1] == TRIGGER).all()
    assert (y[:, :-1] == IGNORE).all()
    assert torch.equal(induction_heads_answers(x), y[:, -1])
    assert (y[:, -1] != TRIGGER).all()


def test_seeded_and_fresh():
    a = induction_heads(4, generator=torch.Generator().manual_seed(3))
    b = induction_heads(4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0])
    g = torch.Generator().manual_seed(3)
    assert not torch.equal(induction_heads(4, generator=g)[0], induction_heads(4, generator=g)[0])


def test_accuracy_helpers():
    y = torch.tensor([[IGNORE, 2, 3], [IGNORE, IGNORE, 1]])
    logits = torch.zeros(2, 3, 5)
    logits[0, 1, 2] = logits[0, 2, 0] = logits[1, 2, 1] = 1.0  # right, wrong, right
    assert answer_accuracy(logits, y).item() == pytest.approx(2 / 3)
    assert sequence_accuracy(logits, y).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no scored"):
        answer_accuracy(logits, torch.full((2, 3), IGNORE))


@pytest.mark.parametrize("call, match", [
    (lambda: selective_copying(2, seq_len=3, n_tokens=4), "seq_len"),
    (lambda: selective_copying(2, vocab_size=2), "vocab_size"),
    (lambda: selective_copying(0), "batch"),
    (lambda: induction_heads(2, seq_len=2), "seq_len"),
    (lambda: induction_heads(2, vocab_size=1), "vocab_size"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
