"""S4: the Cauchy + Woodbury + iFFT kernel equals discretizing and powering the same DPLR matrix."""

import pytest
import torch

from ssmlab.core.lti import ssm_kernel_ref
from ssmlab.core.s4 import bilinear_dense, dplr_dense, legs_nplr, s4_kernel, s4_layer
from ssmlab.core.testing import assert_close_rel


def hippo_legs(N):
    """HiPPO-LegS from eq. (2) of S4, written out independently: A_nk = -r_n r_k (n > k), -(n+1) (n = k); B_n = r_n."""
    r = [(2 * n + 1) ** 0.5 for n in range(N)]
    A = torch.tensor([[-r[n] * r[k] if n > k else (-(n + 1.0) if n == k else 0.0) for k in range(N)] for n in range(N)],
                     dtype=torch.float64)
    return A, torch.tensor(r, dtype=torch.float64)


def _random_dplr(H, Np, r=1, c=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    Lam = torch.complex(-0.2 - torch.rand(H, Np, generator=g, dtype=torch.float64),
                        5 * torch.randn(H, Np, generator=g, dtype=torch.float64))
    P = 0.3 * torch.randn(r, H, Np, generator=g, dtype=torch.complex128)
    B = torch.randn(H, Np, generator=g, dtype=torch.complex128)
    Ct = torch.randn(c, H, Np, generator=g, dtype=torch.complex128)
    dt = torch.exp(torch.empty(H, dtype=torch.float64).uniform_(-4, -1, generator=g))
    return Lam, P, B, Ct, dt


def _kernel_by_powering(Lam, P, B, Ct, dt, L):
    """Dense A = Λ - P P^* (with conjugate modes), bilinear, C = C~ (I - dA^L)^{-1}, K_l = C dA^l dB."""
    A, Bf = dplr_dense(Lam, P, B)
    dA, dB = bilinear_dense(A, Bf, dt)
    N = A.shape[-1]
    Ctf = torch.cat([Ct, Ct.conj()], -1)  # (c, H, N)
    M = torch.eye(N, dtype=A.dtype) - torch.linalg.matrix_power(dA, L)
    C = torch.linalg.solve(M.transpose(-1, -2), Ctf.unsqueeze(-1)).squeeze(-1)  # C M = C~
    K = ssm_kernel_ref(dA, dB, C, L)  # stage 01: one matrix-vector product per step
    assert K.imag.abs().max() < 1e-9 * K.abs().max()  # conjugate pairs make the kernel real
    return K.real


@pytest.mark.parametrize("H,Np,r,c,L", [(1, 1, 1, 1, 1), (1, 2, 1, 1, 2), (2, 3, 1, 2, 7), (2, 4, 2, 1, 16),
                                        (3, 8, 1, 2, 33), (1, 16, 1, 1, 100)])
def test_cauchy_woodbury_kernel_equals_powering(H, Np, r, c, L):
    Lam, P, B, Ct, dt = _random_dplr(H, Np, r, c)
    want = _kernel_by_powering(Lam, P, B, Ct, dt, L)
    for lean in (True, False):
        got = s4_kernel(Lam, P, B, Ct, dt, L, lean=lean)
        assert got.shape == (c, H, L)
        assert_close_rel(got, want, torch.float64, f"lean={lean}", factor=1e2)  # 1e-8


@pytest.mark.parametrize("N", [2, 8, 64])
def test_legs_nplr_reproduces_hippo(N):
    """V (Λ - P P^*) V^* = A and V B~ = B, with the stored modes plus their conjugates."""
    Lam, P, B, V = legs_nplr(N, return_V=True)
    assert Lam.shape == (N // 2,) and P.shape == (1, N // 2) and B.shape == (N // 2,) and V.shape == (N, N // 2)
    assert torch.allclose(Lam.real, torch.full((N // 2,), -0.5, dtype=torch.float64)) and torch.all(Lam.imag > 0)
    A, Bf = dplr_dense(Lam.unsqueeze(0), P.unsqueeze(1), B.unsqueeze(0))
    Vf = torch.cat([V, V.conj()], dim=1)  # (N, N) unitary
    assert torch.allclose(Vf.conj().T @ Vf, torch.eye(N, dtype=torch.complex128), atol=1e-10)
    A_legs, B_legs = hippo_legs(N)
    assert torch.allclose(Vf @ A[0] @ Vf.conj().T, A_legs.to(torch.complex128), atol=1e-9 * N)
    assert torch.allclose(Vf @ Bf[0], B_legs.to(torch.complex128), atol=1e-9 * N)
    if N >= 3:  # eq. (2) of S4, entry by entry
        assert abs(A_legs[2, 1] + 15**0.5) < 1e-12 and A_legs[1, 1] == -2 and A_legs[1, 2] == 0


@pytest.mark.parametrize("bidirectional", [False, True])
def test_layer_shapes_and_grads(bidirectional):
    torch.manual_seed(0)
    layer = s4_layer(4, N=8, bidirectional=bidirectional)
    y = layer(torch.randn(2, 20, 4))
    assert y.shape == (2, 20, 4)
    y.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


def test_step_mode_equals_kernel_mode():
    torch.manual_seed(0)
    L = 24
    layer = s4_layer(3, N=8, l_max=L).double()
    u = torch.randn(2, L, 3, dtype=torch.float64)
    with torch.no_grad():
        y_conv = layer(u)
        cache = layer.kernel.step_params(L)
        state = layer.default_state(2).to(torch.complex128)
        ys = []
        for t in range(L):
            y, state = layer.step(u[:, t], state, cache)
            ys.append(y)
    assert_close_rel(torch.stack(ys, 1), y_conv.double(), torch.float32)


def test_bad_length_raises():
    Lam, P, B, Ct, dt = _random_dplr(1, 2)
    with pytest.raises(ValueError, match="L must be"):
        s4_kernel(Lam, P, B, Ct, dt, 0)
