"""Dropout in both language models: off in eval mode (and in step mode), on in training, no new parameters."""

import pytest
import torch

from ssmlab.core.mamba import MambaConfig, MambaLMHeadModel
from ssmlab.core.transformer import TransformerLM, match_mamba


def _pair(p: float):
    mcfg = MambaConfig(d_model=32, n_layer=2, vocab_size=40, dropout=p)
    return {"mamba": lambda: MambaLMHeadModel(mcfg), "transformer": lambda: TransformerLM(match_mamba(mcfg, n_head=2))}


@pytest.mark.parametrize("name", ["mamba", "transformer"])
def test_dropout_only_in_training_and_adds_no_parameters(name):
    torch.manual_seed(0)
    plain = _pair(0.0)[name]()
    torch.manual_seed(0)
    dropped = _pair(0.3)[name]()
    assert dropped.config.dropout == 0.3
    assert plain.state_dict().keys() == dropped.state_dict().keys()
    dropped.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 40, (2, 17))
    plain.eval(), dropped.eval()
    with torch.no_grad():
        assert torch.equal(plain(ids), dropped(ids))  # eval: dropout is the identity
    dropped.train()
    a, b = dropped(ids), dropped(ids)
    assert not torch.allclose(a, b)  # two training passes draw different masks
    (a.float().square().mean()).backward()
    assert all(p.grad is not None for p in dropped.parameters() if p.requires_grad)


@pytest.mark.parametrize("p", [-0.1, 1.0])
def test_bad_dropout_is_refused(p):
    with pytest.raises(ValueError, match="dropout"):
        MambaConfig(d_model=32, n_layer=2, vocab_size=40, dropout=p)
    with pytest.raises(ValueError, match="dropout"):
        match_mamba(MambaConfig(d_model=32, n_layer=2, vocab_size=40), n_head=2, dropout=p)
