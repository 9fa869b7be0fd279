"""The Transformer baseline (ssmlab.core.transformer): shapes, parameter matching, attention, KV cache."""

from __future__ import annotations

import pytest
import torch

from ssmlab.core import mamba
from ssmlab.core.generation import SamplingConfig, generate
from ssmlab.core.testing import assert_close_rel
from ssmlab.core.training import param_groups
from ssmlab.core.transformer import (
    KVCache, TransformerConfig, TransformerLM, apply_rotary, causal_attention, causal_attention_ref,
    kv_cache_nbytes, match_mamba, param_count, rotary_cos_sin,
)


def small(**kw) -> TransformerConfig:
    return TransformerConfig(**{**dict(d_model=32, n_layer=2, n_head=4, vocab_size=37), **kw})


@pytest.mark.parametrize("kw", [{}, {"mlp": "gelu"}, {"tie_embeddings": False}, {"d_ff": 40, "n_head": 2}])
def test_shapes_and_param_count(kw):
    torch.manual_seed(0)
    cfg = small(**kw)
    model = TransformerLM(cfg)
    assert cfg.vocab_size_padded == 40
    for B, L in [(1, 1), (2, 5), (3, 16)]:
        logits = model(torch.randint(0, cfg.vocab_size, (B, L)))
        assert logits.shape == (B, L, 40) and torch.isfinite(logits).all()
    assert model.num_parameters() == param_count(cfg)
    assert (model.lm_head.weight is model.embedding.weight) == cfg.tie_embeddings


@pytest.mark.parametrize("name", ["130m", "370m", "790m", "1.4b", "tiny", "small"])
def test_match_mamba_within_5_percent(name):
    mcfg = mamba.preset(name) if name in ("tiny", "small") else mamba.preset(name, vocab_size=50277)
    tcfg = match_mamba(mcfg)
    target = mamba.param_count(mcfg)
    assert abs(param_count(tcfg) - target) <= 0.05 * target
    assert tcfg.d_model == mcfg.d_model and tcfg.vocab_size_padded == mcfg.vocab_size_padded
    if name == "130m":  # the paper's pairing: 24 Mamba layers ~ 12 attention + MLP layers at D = 768
        assert (tcfg.n_layer, tcfg.n_head, tcfg.head_dim) == (12, 12, 64)


def test_match_mamba_counts_real_modules():
    mcfg = mamba.MambaConfig(d_model=48, n_layer=4, vocab_size=65)
    tcfg = match_mamba(mcfg)
    m_params = mamba.MambaLMHeadModel(mcfg, device="meta").num_parameters()
    t_params = TransformerLM(tcfg, device="meta").num_parameters()
    assert t_params == param_count(tcfg) and m_params == mamba.param_count(mcfg)
    assert abs(t_params - m_params) <= 0.05 * m_params
    with pytest.raises(ValueError, match="within"):
        match_mamba(mcfg, n_layer=40)  # 40 attention layers cannot fit 4 Mamba layers' budget


@pytest.mark.parametrize("L,S", [(1, 1), (2, 2), (7, 7), (1, 9), (3, 10), (16, 33)])
def test_fused_attention_equals_reference(L, S):
    torch.manual_seed(L * 100 + S)
    q = torch.randn(2, 3, L, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, S, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, S, 8, dtype=torch.float64, requires_grad=True)
    out, ref = causal_attention(q, k, v), causal_attention_ref(q, k, v)
    assert_close_rel(out, ref, torch.float64, "attention")
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), g)
    grads_ref = torch.autograd.grad(ref, (q, k, v), g)
    for name, a, b in zip("qkv", grads, grads_ref):
        assert_close_rel(a, b, torch.float64, f"d{name}")
    for fn in (causal_attention, causal_attention_ref):  # more queries than keys is a caller's error
        with pytest.raises(ValueError, match="at least as many"):
            fn(q, k[..., :L - 1, :], v[..., :L - 1, :])


def test_rotary_scores_depend_on_offset_only():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)

    def score(t, s):
        ct, st = rotary_cos_sin(torch.tensor([t]), 16, 10000.0, torch.float64)
        cs, ss = rotary_cos_sin(torch.tensor([s]), 16, 10000.0, torch.float64)
        return (apply_rotary(q, ct, st) * apply_rotary(k, cs, ss)).sum().item()

    assert score(5, 2) == pytest.approx(score(103, 100), rel=1e-9)
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)
    c, s = rotary_cos_sin(torch.arange(4), 16, 10000.0)
    assert torch.allclose(apply_rotary(q.float(), c[:1], s[:1]), q.float())  # position 0: identity


def test_model_with_reference_attention_matches():
    torch.manual_seed(1)
    model = TransformerLM(small()).double()
    x = torch.randint(0, 37, (2, 13))
    assert_close_rel(model(x), model(x, attention=causal_attention_ref), torch.float64, "logits")


@pytest.mark.parametrize("chunks", [[1] * 9, [4, 1, 1, 3], [9], [2, 7]])
def test_kv_cache_decoding_equals_full_forward(chunks):
    torch.manual_seed(2)
    model = TransformerLM(small()).double().eval()
    x = torch.randint(0, 37, (3, sum(chunks)))
    full = model(x)
    caches = model.allocate_cache(3, max_seqlen=2)  # small on purpose: the cache must grow
    outs, t = [], 0
    for n in chunks:
        outs.append(model.step(x[:, t], caches)[:, None] if n == 1 else model(x[:, t:t + n], caches))
        t += n
    assert_close_rel(torch.cat(outs, 1), full, torch.float64, "cached logits")
    assert all(c.seqlen_offset == x.shape[1] for c in caches)


def test_kv_cache_grows_linearly_and_generate_works():
    torch.manual_seed(3)
    cfg = small()
    model = TransformerLM(cfg).eval()
    caches = model.allocate_cache(2, max_seqlen=64)
    sizes = []
    model(torch.randint(0, 37, (2, 8)), caches)
    for _ in range(3):
        sizes.append(kv_cache_nbytes(caches))
        model(torch.randint(0, 37, (2, 8)), caches)
    per_token = 2 * cfg.n_layer * 2 * cfg.d_model * 4  # K and V, every layer, float32, batch 2
    assert [b - a for a, b in zip(sizes, sizes[1:])] == [8 * per_token] * 2
    prompt = torch.randint(0, 37, (2, 5))
    ids = generate(model, prompt, 6, SamplingConfig(greedy=True))
    seq = prompt
    for _ in range(6):  # greedy generation = repeated argmax of the full forward pass
        seq = torch.cat([seq, model(seq)[:, -1, :37].argmax(-1, keepdim=True)], 1)
    assert torch.equal(ids, seq)
    sampled = generate(model, prompt, 4, SamplingConfig(temperature=0.8, top_k=5), generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (2, 9) and int(sampled.max()) < 37


def test_save_load_roundtrip_and_decay_groups(tmp_path):
    torch.manual_seed(4)
    model = TransformerLM(small())
    model.save_pretrained(tmp_path / "m")
    loaded = TransformerLM.from_pretrained(tmp_path / "m")
    x = torch.randint(0, 37, (2, 6))
    assert torch.equal(model(x), loaded(x))
    assert loaded.lm_head.weight is loaded.embedding.weight
    groups = {("decay" if g["weight_decay"] > 0 else "no_decay"): g["names"] for g in param_groups(model, 0.1)}
    assert all(n.endswith(("qkv.weight", "out_proj.weight", "up_proj.weight", "down_proj.weight")) for n in groups["decay"])
    assert "embedding.weight" in groups["no_decay"] and all("norm" in n or n == "embedding.weight" for n in groups["no_decay"])


@pytest.mark.parametrize("kw,match", [
    ({"n_head": 5}, "divisible"), ({"n_head": 32}, "even"), ({"mlp": "relu"}, "mlp"),
    ({"d_model": 0}, "d_model"), ({"d_ff": -1}, "d_ff"), ({"rope_base": 1.0}, "rope_base"),
])
def test_bad_configs_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        small(**kw)


def test_bad_inputs_raise():
    model = TransformerLM(small())
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        model.step(torch.zeros(2, 3, dtype=torch.long), model.allocate_cache(2))
    cache = KVCache.zeros(1, small(), capacity=1)
    assert cache.nbytes() == 0 and cache.nbytes(used_only=False) == 2 * 4 * 8 * 4
