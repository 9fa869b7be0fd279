"""The Mamba block and language model: shapes, parameter counts, initialization, configs, saving."""

import math

import pytest
import torch

from ssmlab.core.mamba import (PRESETS, Mamba, MambaConfig, MambaLMHeadModel, config_from_reference, param_count,
                               preset)

torch.set_num_threads(1)

# Parameter counts of the paper's sizes with the GPT-NeoX vocabulary (50277, padded to 50280).
# 130m matches the 129.1M parameters of the published state-spaces/mamba-130m.
PAPER_COUNTS = {"130m": 129_135_360, "370m": 371_516_416, "790m": 793_204_224, "1.4b": 1_372_178_432}


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_paper_sizes_param_count_on_meta(name):
    cfg = preset(name)
    model = MambaLMHeadModel(cfg, device="meta")  # shapes only, nothing allocated
    assert model.num_parameters() == param_count(cfg) == PAPER_COUNTS[name]
    n_layer, d_model = PRESETS[name]["n_layer"], PRESETS[name]["d_model"]
    assert (cfg.n_layer, cfg.d_model, cfg.d_inner, cfg.dt_rank) == (n_layer, d_model, 2 * d_model, math.ceil(d_model / 16))


@pytest.mark.parametrize("overrides", [
    dict(), dict(tie_embeddings=False), dict(bias=True), dict(conv_bias=False), dict(gated=False),
    dict(d_state=1, expand=1, d_conv=2, dt_rank=3, vocab_size=7),
])
def test_small_param_count_and_shapes(overrides):
    cfg = preset("tiny", **overrides)
    model = MambaLMHeadModel(cfg)
    assert model.num_parameters() == param_count(cfg)
    for Bsz, L in [(1, 1), (2, 5), (3, 17)]:
        x = torch.randint(0, cfg.vocab_size, (Bsz, L))
        assert model(x).shape == (Bsz, L, cfg.vocab_size_padded)
    block = Mamba(cfg)
    h = torch.randn(2, 9, cfg.d_model)
    assert block(h).shape == h.shape


def test_reference_state_dict_names_and_shapes():
    cfg = preset("tiny", vocab_size=50)
    sd = MambaLMHeadModel(cfg).state_dict()
    D, ED, N, R, K, V = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.dt_rank, cfg.d_conv, cfg.vocab_size_padded
    expected = {"backbone.embedding.weight": (V, D), "backbone.norm_f.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(cfg.n_layer):
        p = f"backbone.layers.{i}."
        expected.update({
            p + "norm.weight": (D,), p + "mixer.in_proj.weight": (2 * ED, D),
            p + "mixer.conv1d.weight": (ED, 1, K), p + "mixer.conv1d.bias": (ED,),
            p + "mixer.x_proj.weight": (R + 2 * N, ED), p + "mixer.dt_proj.weight": (ED, R),
            p + "mixer.dt_proj.bias": (ED,), p + "mixer.A_log": (ED, N), p + "mixer.D": (ED,),
            p + "mixer.out_proj.weight": (D, ED),
        })
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_vocab_padding_and_tied_head():
    cfg = MambaConfig(d_model=16, n_layer=1, vocab_size=50277)
    assert cfg.vocab_size_padded == 50280
    assert MambaConfig(d_model=16, n_layer=1, vocab_size=48).vocab_size_padded == 48
    assert MambaConfig(d_model=16, n_layer=1, vocab_size=5, pad_vocab_size_multiple=1).vocab_size_padded == 5
    model = MambaLMHeadModel(preset("tiny"))
    assert model.lm_head.weight is model.backbone.embedding.weight


def test_paper_initialization():
    torch.manual_seed(0)
    cfg = preset("tiny", d_model=128, n_layer=4, d_state=8)
    model = MambaLMHeadModel(cfg)
    unscaled = torch.nn.Linear(cfg.d_inner, cfg.d_model, bias=False).weight
    for layer in model.backbone.layers:
        m = layer.mixer
        A = -torch.exp(m.A_log)
        assert torch.allclose(A, -torch.arange(1, cfg.d_state + 1.0).expand(cfg.d_inner, -1))  # S4D-Real
        assert torch.equal(m.D, torch.ones(cfg.d_inner))
        delta = torch.nn.functional.softplus(m.dt_proj.bias)  # Delta at init, with zero input to dt_proj
        assert delta.min() >= cfg.dt_min * (1 - 1e-4) and delta.max() <= cfg.dt_max * (1 + 1e-4)
        assert delta.log().std() > 0.5  # spread log-uniformly over two decades, not constant
        bound = cfg.dt_rank ** -0.5
        assert m.dt_proj.weight.abs().max() <= bound
        # out_proj rescaled by 1/sqrt(n_layer) relative to the default init
        ratio = m.out_proj.weight.std() / unscaled.std()
        assert abs(ratio - 1 / math.sqrt(cfg.n_layer)) < 0.05
    emb = model.backbone.embedding.weight
    assert abs(emb.std().item() - cfg.initializer_range) < 0.002


def test_residual_in_fp32_under_bf16():
    cfg = preset("tiny", residual_in_fp32=True)
    model = MambaLMHeadModel(cfg).to(torch.bfloat16)
    x = torch.randint(0, cfg.vocab_size, (2, 6))
    h = model.backbone.embedding(x)
    out = model.backbone.layers[0](h)
    assert out.dtype == torch.float32  # residual stream kept in float32
    assert model(x).dtype == torch.bfloat16
    cfg2 = preset("tiny", residual_in_fp32=False)
    model2 = MambaLMHeadModel(cfg2).to(torch.bfloat16)
    assert model2.backbone.layers[0](model2.backbone.embedding(x)).dtype == torch.bfloat16


def test_gradients_reach_every_parameter():
    model = MambaLMHeadModel(preset("tiny", vocab_size=20))
    x = torch.randint(0, 20, (2, 11))
    model(x).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("bad, match", [
    (dict(d_model=0), "d_model"), (dict(n_layer=-1), "n_layer"), (dict(vocab_size=0), "vocab_size"),
    (dict(d_state=2.5), "d_state"), (dict(dt_rank="big"), "dt_rank"), (dict(dt_min=0.2, dt_max=0.1), "dt_min"),
    (dict(dt_init="xavier"), "dt_init"), (dict(mixer="attention"), "mixer"), (dict(norm_eps=0.0), "norm_eps"),
    (dict(expand=True), "expand"),
])
def test_bad_config_raises(bad, match):
    with pytest.raises(ValueError, match=match):
        MambaConfig(**{"d_model": 16, "n_layer": 1, "vocab_size": 10, **bad})


def test_bad_preset_and_input_shape():
    with pytest.raises(ValueError, match="unknown Mamba preset"):
        preset("7b")
    model = MambaLMHeadModel(preset("tiny"))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(5, dtype=torch.long))


def test_save_and_load_roundtrip(tmp_path):
    cfg = preset("tiny", vocab_size=37)
    model = MambaLMHeadModel(cfg)
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]  # no temp left
    loaded = MambaLMHeadModel.from_pretrained(tmp_path / "m")
    assert loaded.config == cfg
    assert loaded.lm_head.weight is loaded.backbone.embedding.weight
    x = torch.randint(0, 37, (2, 7))
    assert torch.equal(model(x), loaded(x))


def test_reference_config_dict():
    ref = {"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {}, "rms_norm": True,
           "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8}
    cfg = config_from_reference(ref)
    assert param_count(cfg) == PAPER_COUNTS["130m"]
    with pytest.raises(ValueError, match="rms_norm"):
        config_from_reference({**ref, "rms_norm": False})
    with pytest.raises(ValueError, match="Mamba1"):
        config_from_reference({**ref, "ssm_cfg": {"layer": "Mamba2"}})


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rmsnorm_is_the_written_out_formula(dtype):
    """y = x / sqrt(mean(x^2) + eps) * w, computed in float32 (float64 kept), returned in x's dtype, even under autocast."""
    from ssmlab.core.mamba import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(24, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(24))
    x = (3 * torch.randn(2, 5, 24, dtype=torch.float64)).to(dtype)
    x64 = x.double()
    want = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    got = norm(x)
    assert got.dtype == dtype
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(got.double(), want.to(dtype).double(), rtol=tol, atol=tol)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm(x.float()).dtype == torch.float32  # the residual stream's norm stays float32
