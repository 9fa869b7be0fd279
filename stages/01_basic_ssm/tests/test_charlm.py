"""The shared char-LM toolkit: windows, the bits-per-character protocol, sampling."""

import math

import pytest
import torch
from torch import nn

from ssmlab.core import charlm


class Uniform(nn.Module):
    """Logits all zero: every character has probability 1/V."""

    def __init__(self, V):
        super().__init__()
        self.V, self.w = V, nn.Parameter(torch.zeros(()))

    def forward(self, ids):
        return torch.zeros(*ids.shape, self.V) + self.w


class Bigram(nn.Module):
    def __init__(self, V):
        super().__init__()
        self.table = nn.Embedding(V, V)

    def forward(self, ids):
        return self.table(ids)


def test_windows_are_shifted_by_one():
    ids = torch.arange(100)
    x, y = charlm.random_windows(ids, 4, 10, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 10)
    assert torch.equal(y, x + 1)
    with pytest.raises(ValueError, match="seq_len"):
        charlm.random_windows(ids[:5], 4, 10)


def test_eval_windows_score_each_target_once():
    ids = torch.arange(23)
    x, y = charlm.eval_windows(ids, 5)
    assert x.shape == (4, 5) and torch.equal(y.flatten(), torch.arange(1, 21))
    assert charlm.eval_windows(ids, 5, max_chars=11)[1].numel() == 10


def test_uniform_model_scores_log2_V():
    bpc = charlm.bits_per_char(Uniform(16), torch.randint(0, 16, (300,)), seq_len=32, batch_size=3)
    assert abs(bpc - math.log2(16)) < 1e-6


def test_training_reduces_loss_and_generation(tmp_path):
    from ssmlab.core.training import TrainConfig

    class Corpus:
        pass

    c = Corpus()
    ids = torch.tensor([0, 1, 2, 3] * 300)  # a deterministic cycle: a bigram model learns it
    c.train_ids, c.val_ids = ids[:1000], ids[1000:]
    model = Bigram(4)
    out = charlm.train_char_lm(model, c, TrainConfig(lr=0.1, max_steps=60, warmup_steps=0, weight_decay=0.0, progress=False),
                               charlm.CharLMConfig(seq_len=16, batch_size=8, eval_seq_len=16, eval_chars=0))
    assert out["last_loss"] < 0.5 * out["first_loss"]
    assert out["val_bpc"] < 0.5
    s = charlm.generate(model, torch.tensor([0]), 7, temperature=0)
    assert s.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    s = charlm.generate(model, torch.tensor([2]), 5, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert len(s) == 6
    with pytest.raises(ValueError, match="temperature"):
        charlm.generate(model, torch.tensor([0]), 3, temperature=-1)
    p = charlm.write_json(tmp_path / "a" / "r.json", {"val_bpc": out["val_bpc"]})
    assert p.exists()
