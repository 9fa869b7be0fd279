"""The lean (chunked) Cauchy and Vandermonde products equal the naive formulas, forward and backward."""

import pytest
import torch

from ssmlab.core.cauchy import cauchy, cauchy_ref, vandermonde, vandermonde_ref
from ssmlab.core.testing import assert_close_rel as _assert_close_real


def assert_close_rel(x, ref, dtype, what="", factor=1.0):
    """core.testing's relative check, on (re, im) pairs for complex tensors."""
    if x.is_complex() or ref.is_complex():
        x, ref = torch.view_as_real(x.resolve_conj()), torch.view_as_real(ref.resolve_conj())
    _assert_close_real(x, ref, dtype, what, factor)

SHAPES = [  # (batch, N, L, chunk)
    ((), 1, 1, 1),
    ((2,), 2, 7, 3),
    ((3, 1), 5, 33, 8),
    ((1, 4), 16, 64, 64),
    ((2,), 3, 100, 1000),
]


def _rand(shape, dtype, scale=1.0):
    return torch.randn(shape, dtype=dtype) * scale


def _grads(fn, *xs, g):
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    out = fn(*xs)
    (out * g.conj()).real.sum().backward()
    return out.detach(), [x.grad for x in xs]


@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex64])
@pytest.mark.parametrize("batch,N,L,chunk", SHAPES)
def test_cauchy_chunked_matches_ref(batch, N, L, chunk, dtype):
    real = torch.float64 if dtype == torch.complex128 else torch.float32
    v = _rand(batch + (N,), dtype)
    w = torch.complex(-0.5 - torch.rand(batch[-1:] + (N,) if batch else (N,)), torch.randn(N)).to(dtype)
    z = torch.exp(2j * torch.pi * torch.arange(L) / max(L, 1)).to(dtype) * 0.5 + 1.0
    g = _rand(batch + (L,), dtype)
    out, grads = _grads(lambda a, b, c: cauchy(a, b, c, chunk=chunk), v, z, w, g=g)
    ref, grads_ref = _grads(lambda a, b, c: cauchy_ref(a, b, c), v, z, w, g=g)
    assert_close_rel(out, ref, real, "cauchy forward")
    for name, a, b in zip("vzw", grads, grads_ref):
        assert_close_rel(a, b, real, f"cauchy grad {name}")


@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex64])
@pytest.mark.parametrize("batch,N,L,chunk", SHAPES)
def test_vandermonde_chunked_matches_ref(batch, N, L, chunk, dtype):
    real = torch.float64 if dtype == torch.complex128 else torch.float32
    v = _rand(batch + (N,), dtype)
    a = torch.complex(-0.01 - 0.1 * torch.rand(N), torch.randn(N)).to(dtype)
    g = _rand(batch + (L,), dtype)
    out, grads = _grads(lambda x, y: vandermonde(x, y, L, chunk=chunk), v, a, g=g)
    ref, grads_ref = _grads(lambda x, y: vandermonde_ref(x, y, L), v, a, g=g)
    assert_close_rel(out, ref, real, "vandermonde forward")
    for name, x, y in zip("va", grads, grads_ref):
        assert_close_rel(x, y, real, f"vandermonde grad {name}", factor=10.0)


def test_vandermonde_is_powers():
    """The definition: sum_n v_n x_n^l with x = exp(a), by explicit powering."""
    v = torch.randn(4, dtype=torch.complex128)
    x = torch.complex(torch.rand(4, dtype=torch.float64) * 0.9, torch.rand(4, dtype=torch.float64) * 0.3)
    want = torch.stack([(v * x**l).sum() for l in range(9)])
    assert_close_rel(vandermonde(v, torch.log(x), 9, chunk=4), want, torch.float64)


def test_cauchy_gradcheck():
    v = torch.randn(2, 3, dtype=torch.complex128, requires_grad=True)
    w = torch.complex(-torch.rand(3, dtype=torch.float64) - 0.5, torch.randn(3, dtype=torch.float64)).requires_grad_(True)
    z = (torch.randn(5, dtype=torch.complex128) + 3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b, c: cauchy(a, b, c, chunk=2), (v, z, w))
    assert torch.autograd.gradcheck(lambda a, b: vandermonde(a, b, 6, chunk=4), (v, w * 0.1))


def test_bad_inputs_raise():
    v = torch.randn(3, dtype=torch.complex64)
    with pytest.raises(ValueError, match="z must be 1-D"):
        cauchy(v, torch.ones(2, 2), v)
    with pytest.raises(ValueError, match="state size"):
        cauchy(v, torch.ones(2), torch.ones(4))
    with pytest.raises(ValueError, match="chunk must be"):
        vandermonde(v, v, 4, chunk=0)
    with pytest.raises(TypeError, match="v must be"):
        cauchy([1.0], torch.ones(2), v)
