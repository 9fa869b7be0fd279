"""The shared classification backbone: every mixer runs, ignores padding, trains, fits a budget."""

import dataclasses

import pytest
import torch

from ssmlab.core.seq_models import (CONFIGS, MambaClsConfig, S4Config, S4DConfig, SelfAttention, TransformerConfig,
                                    build_model, fit_d_model, make_config, param_count)

SMALL = dict(vocab_size=40, d_model=16, n_layers=2, dropout=0.0, max_len=32)


def _cfg(mixer):
    extra = {"s4": dict(d_state=8), "s4d": dict(d_state=8), "mamba": dict(d_state=4), "transformer": dict(n_heads=2)}
    return make_config(mixer, **SMALL, **extra[mixer])


@pytest.mark.parametrize("mixer", sorted(CONFIGS) + ["transformer-causal"])
def test_padding_does_not_change_logits(mixer):
    torch.manual_seed(0)
    cfg = dataclasses.replace(_cfg("transformer"), bidirectional=False) if mixer == "transformer-causal" else _cfg(mixer)
    model = build_model(cfg).eval()
    seq = torch.randint(1, 40, (1, 11))
    padded = torch.zeros(2, 23, dtype=torch.long)
    padded[0, :11] = seq[0]
    padded[1] = torch.randint(1, 40, (23,))
    with torch.no_grad():
        alone = model(seq, torch.tensor([11]))
        batch = model(padded, torch.tensor([11, 23]))
    assert batch.shape == (2,)
    assert torch.allclose(alone, batch[:1], atol=1e-5), (alone, batch)


@pytest.mark.parametrize("mixer", sorted(CONFIGS))
def test_a_few_steps_fit_a_toy_task(mixer):
    """Label = whether token 1 occurs: every model must drive the loss down on a fixed batch."""
    torch.manual_seed(0)
    model = build_model(_cfg(mixer))
    x = torch.randint(2, 40, (8, 12))
    y = (torch.arange(8) % 2).float()
    x[y == 1, 5] = 1
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("d_model,heads", [(88, 4), (64, 4), (12, 3)])
def test_attention_over_valid_keys_matches_the_written_out_softmax(d_model, heads):
    """Head sizes 22 and 4 are padded to a multiple of 8 for the fused kernels; 16 is not: all equal the formula."""
    torch.manual_seed(1)
    cfg = TransformerConfig(vocab_size=40, d_model=d_model, n_layers=1, dropout=0.0, max_len=32, n_heads=heads)
    att = SelfAttention(cfg).double()
    x = torch.randn(3, 9, d_model, dtype=torch.float64)
    mask = torch.arange(9)[None, :] < torch.tensor([9, 4, 1])[:, None]
    P = d_model // heads
    q, k, v = att.qkv(x).view(3, 9, 3, heads, P).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2)) / P**0.5
    w = scores.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1)
    ref = att.proj((w @ v).transpose(1, 2).reshape(3, 9, d_model))
    torch.testing.assert_close(att(x, mask), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("d_model,heads", [(88, 4), (64, 4)])
def test_causal_attention_matches_the_written_out_softmax_and_ignores_padding(d_model, heads):
    torch.manual_seed(2)
    cfg = TransformerConfig(vocab_size=40, d_model=d_model, n_layers=1, dropout=0.0, max_len=32, n_heads=heads,
                            bidirectional=False)
    att = SelfAttention(cfg).double()
    x = torch.randn(2, 9, d_model, dtype=torch.float64)
    mask = torch.arange(9)[None, :] < torch.tensor([9, 5])[:, None]
    P = d_model // heads
    q, k, v = att.qkv(x).view(2, 9, 3, heads, P).permute(2, 0, 3, 1, 4)
    future = torch.ones(9, 9, dtype=torch.bool).triu(1)
    w = ((q @ k.transpose(-1, -2)) / P**0.5).masked_fill(future, float("-inf")).softmax(-1)
    ref = att.proj((w @ v).transpose(1, 2).reshape(2, 9, d_model))
    out = att(x, mask)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    x2 = x.clone()
    x2[1, 5:] = torch.randn(4, d_model, dtype=torch.float64)  # other padding: the valid positions do not change
    torch.testing.assert_close(att(x2, mask)[1, :5], out[1, :5], rtol=1e-12, atol=1e-12)


def test_fit_d_model_hits_the_budget():
    for cfg in (S4DConfig(**SMALL, d_state=8, init="lin"), MambaClsConfig(**SMALL), TransformerConfig(**SMALL)):
        fitted = fit_d_model(cfg, 60_000)
        n = param_count(fitted)
        assert abs(n - 60_000) / 60_000 < 0.15, (type(cfg).__name__, fitted.d_model, n)
        assert fitted.d_model % 8 == 0 and dataclasses.replace(fitted, d_model=cfg.d_model) == cfg


def test_config_errors():
    with pytest.raises(ValueError, match="mixer must be"):
        make_config("rnn")
    with pytest.raises(ValueError, match="d_model"):
        S4Config(d_model=0)
    with pytest.raises(ValueError, match="divisible"):
        TransformerConfig(d_model=10, n_heads=4)
    model = build_model(_cfg("s4d"))
    with pytest.raises(ValueError, match="max_len"):
        model(torch.ones(1, 33, dtype=torch.long))


def test_causal_lm_is_causal_and_refuses_bidirectional():
    from ssmlab.core.seq_models import CausalLM

    torch.manual_seed(0)
    for cfg in (S4DConfig(**SMALL, d_state=8, init="lin", bidirectional=False, mlp_ratio=2),
                MambaClsConfig(**SMALL, d_state=4)):
        lm = CausalLM(cfg).eval()
        x = torch.randint(0, 40, (2, 16))
        x2 = x.clone()
        x2[:, 9:] = torch.randint(0, 40, (2, 7))
        with torch.no_grad():
            a, b = lm(x), lm(x2)
        assert a.shape == (2, 16, 40)
        assert torch.allclose(a[:, :9], b[:, :9], atol=1e-5) and not torch.allclose(a[:, 9:], b[:, 9:])
    with pytest.raises(ValueError, match="causal"):
        CausalLM(S4DConfig(**SMALL, init="lin"))


def test_charlm_script_short_run(tmp_path):
    import json
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "train_charlm.py"
    main = runpy.run_path(str(script))["main"]
    text = tmp_path / "tiny.txt"
    text.write_text("ROMEO: what light through yonder window breaks?\nJULIET: ay me!\n" * 200)
    assert main(["--text", str(text), "--init", "lin", "--steps", "4", "--eval-every", "2", "--eval-chars", "1024", "--d-model", "16",
                 "--n-layers", "1", "--d-state", "4", "--seq-len", "32", "--batch-size", "4", "--device", "cpu",
                 "--out", str(tmp_path), "--run-dir", str(tmp_path / "run"), "--no-progress", "--sample-chars", "8"]) == 0
    out = json.loads((tmp_path / "charlm_s4d.json").read_text())
    assert out["steps"] == 4 and 0 < out["val_bpc"] < 8 and out["params"] > 0
    assert (tmp_path / "charlm_s4d.png").exists()


def test_reverse_valid_flips_each_row_within_its_length_and_is_its_own_inverse():
    from ssmlab.core.seq_models import reverse_valid

    x = torch.arange(2 * 5).view(2, 5).float()[..., None].expand(2, 5, 3)
    lengths = torch.tensor([3, 5])
    r = reverse_valid(x, lengths)
    assert r[0, :, 0].tolist() == [2.0, 1.0, 0.0, 3.0, 4.0]  # padding (positions 3, 4) stays put
    assert r[1, :, 0].tolist() == [9.0, 8.0, 7.0, 6.0, 5.0]
    assert torch.equal(reverse_valid(r, lengths), x)


def test_bidirectional_mamba_sees_the_future_and_ignores_padding():
    """Causal Mamba: an early position's output ignores later tokens; BiMamba: it does not (and padding is inert)."""
    from ssmlab.core.seq_models import BiMamba, make_mixer

    torch.manual_seed(3)
    uni = make_mixer(_cfg("mamba")).eval()
    bi = make_mixer(dataclasses.replace(_cfg("mamba"), bidirectional=True)).eval()
    assert isinstance(bi, BiMamba)
    assert param_count(bi) == 2 * param_count(uni)
    x = torch.randn(1, 9, 16)
    y = x.clone()
    y[:, 6:] = torch.randn(1, 3, 16)  # change only the future of positions 0..5
    mask = torch.ones(1, 9, dtype=torch.bool)
    with torch.no_grad():
        assert torch.allclose(uni(x, mask)[:, :6], uni(y, mask)[:, :6], atol=1e-6)
        assert not torch.allclose(bi(x, mask)[:, :6], bi(y, mask)[:, :6], atol=1e-3)
    model = build_model(dataclasses.replace(_cfg("mamba"), bidirectional=True)).eval()
    seq = torch.randint(1, 40, (1, 7))
    padded = torch.cat([seq, torch.zeros(1, 10, dtype=torch.long)], 1)
    padded = torch.cat([padded, torch.randint(1, 40, (1, 17))])
    with torch.no_grad():
        assert torch.allclose(model(seq, torch.tensor([7])), model(padded, torch.tensor([7, 17]))[:1], atol=1e-5)


@pytest.mark.parametrize("mixer", ["s4", "s4d"])
def test_ssm_lr_puts_the_state_space_parameters_in_a_group_of_their_own(mixer):
    from ssmlab.core.training import TrainConfig, make_optimizer, make_scheduler, param_groups

    model = build_model(_cfg(mixer))
    plain = {g["group"]: set(g["names"]) for g in param_groups(model, 0.05)}
    assert set(plain) == {"decay", "no_decay"}  # ssm_lr = 0: the two groups of the recipe
    groups = {g["group"]: g for g in param_groups(model, 0.05, ssm_lr=1e-3)}
    ssm = set(groups["ssm"]["names"])
    leaf = {"s4": {"log_dt", "A_log", "A_imag", "P", "B"}, "s4d": {"log_dt", "A_log", "A_imag", "B"}}[mixer]
    want = {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] in leaf and ".kernel." in f".{n}."}
    assert want and ssm == want, (ssm ^ want)
    assert groups["ssm"]["lr"] == 1e-3 and groups["ssm"]["weight_decay"] == 0.0
    assert ssm.isdisjoint(groups["no_decay"]["names"]) and ssm.isdisjoint(groups["decay"]["names"])
    assert set(groups["no_decay"]["names"]) | ssm == plain["no_decay"]  # they only moved out of no_decay
    assert set(groups["decay"]["names"]) == plain["decay"]
    # the optimizer takes the group's own peak and the schedule scales every group alike
    opt = make_optimizer(model, TrainConfig(lr=4e-3, ssm_lr=1e-3, warmup_steps=4, max_steps=20))
    sched = make_scheduler(opt, TrainConfig(lr=4e-3, ssm_lr=1e-3, warmup_steps=4, max_steps=20))
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([1e-3 / 4, 4e-3 / 4, 4e-3 / 4])
    for _ in range(3):
        opt.step()
        sched.step()
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([1e-3, 4e-3, 4e-3])
    with pytest.raises(ValueError, match="ssm_lr"):
        TrainConfig(ssm_lr=-1.0)
