"""Hugging Face `transformers` Mamba checkpoints load into our model and give the same logits."""

import logging

import pytest
import torch

from ssmlab.core.hf_convert import config_from_hf, convert_hf_state_dict, load_hf
from ssmlab.core.mamba import MambaLMHeadModel
from ssmlab.core.testing import assert_close_rel

transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)  # its "kernel not installed, falling back" notices
torch.set_num_threads(1)


def _hf_model(vocab=48, tie=True, use_bias=False, seed=0):
    torch.manual_seed(seed)
    hc = transformers.MambaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2,
                                  conv_kernel=4, use_bias=use_bias, tie_word_embeddings=tie,
                                  use_associative_scan=False)
    hf = transformers.MambaForCausalLM(hc).eval()
    with torch.no_grad():  # random weights everywhere, not the structured init (D = 1, A = -n, ...)
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return hf


@pytest.mark.parametrize("vocab, tie, use_bias", [(48, True, False), (45, True, False), (40, False, True)])
def test_logits_match_transformers(vocab, tie, use_bias):
    hf = _hf_model(vocab, tie, use_bias)
    ours = load_hf(hf).eval()
    assert ours.config.vocab_size == vocab and ours.config.vocab_size_padded % 8 == 0
    assert (ours.lm_head.weight is ours.backbone.embedding.weight) == tie
    x = torch.randint(0, vocab, (2, 13))
    with torch.no_grad():
        ref = hf(x).logits
        out = ours(x)
    assert_close_rel(out[..., :vocab], ref, torch.float32, "logits vs transformers")
    if vocab != ours.config.vocab_size_padded:
        assert torch.all(out[..., vocab:] == 0)  # zero rows of the padded head


def test_recurrent_generation_matches_transformers_greedy():
    from ssmlab.core.generation import generate

    hf = _hf_model(vocab=48)
    ours = load_hf(hf).eval()
    prompt = torch.randint(0, 48, (1, 5))
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8, pad_token_id=0, eos_token_id=None)
    assert torch.equal(generate(ours, prompt, 8), ref)


def test_load_from_saved_hf_folder(tmp_path):
    hf = _hf_model(vocab=45)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf").eval()
    x = torch.randint(0, 45, (1, 9))
    with torch.no_grad():
        assert_close_rel(ours(x)[..., :45], hf(x).logits, torch.float32, "from folder")


def test_config_mapping_and_errors():
    hf = _hf_model()
    cfg = config_from_hf(hf.config)
    assert (cfg.d_model, cfg.n_layer, cfg.d_state, cfg.d_conv, cfg.dt_rank) == (32, 2, 8, 4, 2)
    with pytest.raises(ValueError, match="hidden_act"):
        config_from_hf({**hf.config.to_dict(), "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="missing"):
        config_from_hf({"state_size": 16})
    sd = convert_hf_state_dict(hf.state_dict(), cfg)
    assert "backbone.embedding.weight" in sd and not any("embeddings" in k for k in sd)
    bad = dict(sd)
    bad.pop("backbone.layers.0.mixer.A_log")
    with pytest.raises(RuntimeError):
        MambaLMHeadModel(cfg, init=False).load_state_dict(bad)
