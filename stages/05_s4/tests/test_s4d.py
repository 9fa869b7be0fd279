"""S4D: Vandermonde kernel = powering the diagonal; ZOH and bilinear; kernel mode = step mode."""

import pytest
import torch

from ssmlab.core.s4d import S4DKernel, SSMConv, discretize_diag, s4d_init, s4d_kernel, s4d_kernel_ref, s4d_layer
from ssmlab.core.testing import assert_close_rel


def _random_diag(H, Np, c=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.complex(-0.05 - torch.rand(H, Np, generator=g, dtype=torch.float64),
                      3 * torch.randn(H, Np, generator=g, dtype=torch.float64))
    B = torch.randn(H, Np, generator=g, dtype=torch.complex128)
    C = torch.randn(c, H, Np, generator=g, dtype=torch.complex128)
    dt = torch.exp(torch.empty(H, dtype=torch.float64).uniform_(-5, -1, generator=g))
    return A, B, C, dt


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
@pytest.mark.parametrize("conj", [True, False])
@pytest.mark.parametrize("H,Np,L", [(1, 1, 1), (2, 3, 7), (3, 8, 64), (1, 5, 100)])
def test_vandermonde_kernel_equals_powering(H, Np, L, method, conj):
    A, B, C, dt = _random_diag(H, Np, c=2)
    want = s4d_kernel_ref(A, B, C, dt, L, method, conj)
    for lean in (True, False):
        got = s4d_kernel(A, B, C, dt, L, method, conj, lean=lean)
        assert got.shape == (2, H, L)
        assert_close_rel(got, want, torch.float64, f"{method} lean={lean}")


def test_zoh_matches_matrix_exponential():
    """ZOH: exp([[ΔA, ΔB], [0, 0]]) = [[dA, dB], [0, 1]] for each mode."""
    A, B, _, dt = _random_diag(2, 3)
    dA, dB = discretize_diag(A, B, dt, "zoh")
    for h in range(2):
        for n in range(3):
            M = torch.zeros(2, 2, dtype=torch.complex128)
            M[0, 0], M[0, 1] = dt[h] * A[h, n], dt[h] * B[h, n]
            E = torch.linalg.matrix_exp(M)
            assert abs(E[0, 0] - dA[h, n]) < 1e-9 and abs(E[0, 1] - dB[h, n]) < 1e-9  # matrix_exp: Pade, ~1e-10


def test_bilinear_is_trapezoid():
    """Bilinear: (1 - ΔA/2) x_k = (1 + ΔA/2) x_{k-1} + Δ B u_k, solved for x_k."""
    A, B, _, dt = _random_diag(1, 4)
    dA, dB = discretize_diag(A, B, dt, "bilinear")
    x0, u = torch.randn(4, dtype=torch.complex128), 0.7
    x1 = dA[0] * x0 + dB[0] * u
    lhs, rhs = (1 - dt * A[0] / 2) * x1, (1 + dt * A[0] / 2) * x0 + dt * B[0] * u
    assert torch.allclose(lhs, rhs, atol=1e-12)


def test_inits():
    A, B, conj = s4d_init(8, "lin")
    assert conj and A.shape == (4,) and torch.allclose(A.real, torch.full((4,), -0.5))
    assert torch.allclose(A.imag, torch.pi * torch.arange(4.0))
    A, B, conj = s4d_init(5, "real")
    assert not conj and torch.equal(A.real, -torch.arange(1.0, 6.0)) and torch.all(A.imag == 0)
    with pytest.raises(ValueError, match="init"):
        s4d_init(8, "bogus")
    with pytest.raises(ValueError, match="N must be"):
        s4d_init(7, "lin")


def test_legs_init_is_nplr_diagonal():
    A, B, conj = s4d_init(16, "legs")
    assert conj and A.shape == (8,)
    assert torch.allclose(A.real, torch.full((8,), -0.5), atol=1e-5)  # LegS's normal part: -1/2 + skew
    assert torch.all(A.imag > 0)


@pytest.mark.parametrize("init", ["legs", "lin", "real"])
@pytest.mark.parametrize("method", ["zoh", "bilinear"])
def test_step_mode_equals_kernel_mode(init, method):
    torch.manual_seed(0)
    H, L = 3, 37
    layer = s4d_layer(H, N=6, init=init, method=method)
    u = torch.randn(2, L, H)
    with torch.no_grad():
        y_conv = layer(u)
        state, cache, ys = layer.default_state(2), layer.kernel.step_params(), []
        for t in range(L):
            y, state = layer.step(u[:, t], state, cache)
            ys.append(y)
    assert_close_rel(torch.stack(ys, 1), y_conv, torch.float32, f"{init}/{method}", factor=10)


def test_bidirectional_sees_future_causal_does_not():
    torch.manual_seed(0)
    u = torch.randn(1, 16, 4)
    u2 = u.clone()
    u2[:, 10:] += 1.0
    for bidir, changes in ((False, False), (True, True)):
        layer = s4d_layer(4, N=4, init="lin", bidirectional=bidir)
        with torch.no_grad():
            d = (layer(u) - layer(u2))[:, :10].abs().max().item()
        assert (d > 1e-4) == changes
    with pytest.raises(RuntimeError, match="step mode"):
        s4d_layer(4, N=4, init="lin", bidirectional=True).step(u[:, 0], None)


def test_layer_gradients_flow_and_shape_errors():
    layer = s4d_layer(4, N=4, init="lin")
    y = layer(torch.randn(2, 9, 4))
    y.sum().backward()
    k: S4DKernel = layer.kernel
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in (k.log_dt, k.A_log, k.B, k.C))
    with pytest.raises(ValueError, match="u must be"):
        layer(torch.randn(2, 9, 5))
    assert isinstance(layer, SSMConv)
