"""The channel-major projections of the Mamba block against their nn.Linear-and-transpose twins."""

import pytest
import torch

from ssmlab.core.channel_major import (channel_mix, channel_mix_ref, channels_to_tokens, channels_to_tokens_ref,
                                       tokens_to_channels, tokens_to_channels_ref)

torch.set_num_threads(1)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _leaf(*shape, dtype, device, gen):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()


def _compare(fast, ref, inputs, rtol, atol, gen):
    """Outputs, then the gradients of a random projection of the outputs, fast against reference."""
    out_f, out_r = fast(*inputs), ref(*inputs)
    out_f = out_f if isinstance(out_f, tuple) else (out_f,)
    out_r = out_r if isinstance(out_r, (tuple, list)) else (out_r,)
    loss_f = loss_r = 0.0
    for a, b in zip(out_f, out_r):
        assert a.shape == b.shape and a.is_contiguous()
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
        w = torch.randn(a.shape, generator=gen, dtype=torch.float64).to(a.device, a.dtype)
        loss_f, loss_r = loss_f + (a * w).sum(), loss_r + (b * w).sum()
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    g_f = torch.autograd.grad(loss_f, leaves)
    g_r = torch.autograd.grad(loss_r, leaves)
    for x, a, b in zip(leaves, g_f, g_r):
        assert a.dtype == x.dtype and a.shape == x.shape
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    return g_f


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,L,K,M", [(1, 1, 1, 1), (2, 7, 5, 6), (3, 33, 16, 40)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_tokens_to_channels(device, dtype, B, L, K, M, with_bias):
    gen = torch.Generator().manual_seed(B * 100 + L)
    h, W = _leaf(B, L, K, dtype=dtype, device=device, gen=gen), _leaf(M, K, dtype=dtype, device=device, gen=gen)
    b = _leaf(M, dtype=dtype, device=device, gen=gen) if with_bias else None
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    _compare(tokens_to_channels, tokens_to_channels_ref, (h, W, b), gen=gen, **tol)
    grads = _compare(tokens_to_channels, tokens_to_channels_ref, (h, W, b), gen=gen, **tol)
    assert grads[0].is_contiguous()  # dL/dh in h's own layout, not a transposed view


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("split", [[3, 3], [1, 5], [2, 1, 3]])
def test_tokens_to_channels_split(device, split):
    gen = torch.Generator().manual_seed(len(split))
    h = _leaf(2, 9, 4, dtype=torch.float64, device=device, gen=gen)
    W, b = _leaf(6, 4, dtype=torch.float64, device=device, gen=gen), _leaf(6, dtype=torch.float64, device=device, gen=gen)
    fast = lambda h, W, b: tokens_to_channels(h, W, b, split=split)  # noqa: E731
    ref = lambda h, W, b: tokens_to_channels_ref(h, W, b, split=split)  # noqa: E731
    _compare(fast, ref, (h, W, b), rtol=1e-10, atol=1e-10, gen=gen)


def test_tokens_to_channels_split_unused_piece():
    """A piece that does not reach the loss (the z half of an ungated use) gets zero gradient."""
    gen = torch.Generator().manual_seed(0)
    h, W = _leaf(2, 5, 3, dtype=torch.float64, device="cpu", gen=gen), _leaf(4, 3, dtype=torch.float64, device="cpu", gen=gen)
    x, _ = tokens_to_channels(h, W, split=[2, 2])
    x.sum().backward()
    assert torch.all(W.grad[2:] == 0) and torch.any(W.grad[:2] != 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,L,K,M", [(1, 1, 1, 1), (2, 7, 5, 6), (3, 33, 16, 40)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_channels_to_tokens(device, dtype, B, L, K, M, with_bias):
    gen = torch.Generator().manual_seed(B * 10 + K)
    y, W = _leaf(B, K, L, dtype=dtype, device=device, gen=gen), _leaf(M, K, dtype=dtype, device=device, gen=gen)
    b = _leaf(M, dtype=dtype, device=device, gen=gen) if with_bias else None
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    grads = _compare(channels_to_tokens, channels_to_tokens_ref, (y, W, b), gen=gen, **tol)
    assert grads[0].is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,L,K,M", [(1, 1, 1, 1), (2, 7, 5, 6), (3, 33, 16, 40)])
def test_channel_mix(device, dtype, B, L, K, M):
    gen = torch.Generator().manual_seed(B + L + K)
    W, x = _leaf(M, K, dtype=dtype, device=device, gen=gen), _leaf(B, K, L, dtype=dtype, device=device, gen=gen)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    grads = _compare(channel_mix, channel_mix_ref, (W, x), gen=gen, **tol)
    assert grads[1].is_contiguous()


def test_channel_mix_reads_a_channel_slice_in_place():
    """dt_proj reads the first R channels of x_proj's output: a strided view, used without a copy."""
    gen = torch.Generator().manual_seed(1)
    full = _leaf(2, 7, 11, dtype=torch.float64, device="cpu", gen=gen)
    W = _leaf(5, 3, dtype=torch.float64, device="cpu", gen=gen)
    _compare(lambda W, x: channel_mix(W, x[:, 2:5]), lambda W, x: channel_mix_ref(W, x[:, 2:5]), (W, full),
             rtol=1e-10, atol=1e-10, gen=gen)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_runs_in_the_autocast_dtype(device):
    """Under autocast the products run in bfloat16 like nn.Linear; gradients come back in the inputs' dtypes."""
    gen = torch.Generator().manual_seed(2)
    h, W = _leaf(2, 16, 8, dtype=torch.float32, device=device, gen=gen), _leaf(12, 8, dtype=torch.float32, device=device, gen=gen)
    with torch.autocast(device, dtype=torch.bfloat16):
        out, ref = tokens_to_channels(h, W), tokens_to_channels_ref(h, W)
        y = channels_to_tokens(out, W.mT.contiguous())
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
    y.float().sum().backward()
    assert h.grad.dtype == W.grad.dtype == torch.float32 and torch.isfinite(h.grad).all()
    with torch.autocast(device, dtype=torch.bfloat16):  # like nn.Linear, float64 is left alone
        assert tokens_to_channels(h.detach().double(), W.detach().double()).dtype == torch.float64


def test_bad_shapes_raise():
    h, W = torch.randn(2, 5, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="does not fit"):
        tokens_to_channels(h, torch.randn(4, 2))
    with pytest.raises(ValueError, match="3-D"):
        channels_to_tokens(torch.randn(5, 3), W)
    with pytest.raises(ValueError, match="partition"):
        tokens_to_channels(h, W, split=[3, 3])
    with pytest.raises(ValueError, match="bias"):
        tokens_to_channels(h, W, torch.randn(3))
    with pytest.raises(ValueError, match="does not fit"):
        channel_mix(torch.randn(4, 2), torch.randn(2, 3, 5))
