"""The normal-plus-low-rank structure of HiPPO-LegS (and LegT), and its contract with stage 05."""

import numpy as np
import pytest
import scipy.linalg
import torch

from ssmlab.core import s4
from ssmlab.core.hippo import transition
from ssmlab.core.nplr import dense_from_nplr, nplr, nplr_legs, nplr_legt


def rel_error(x, ref):
    """||x - ref|| / ||ref|| for complex tensors (core.testing.rel_error is for real ones)."""
    assert torch.isfinite(torch.view_as_real(x)).all()
    return ((x - ref).norm() / ref.norm()).item()

SIZES = [1, 2, 3, 8, 17, 64]


@pytest.mark.parametrize("N", SIZES)
def test_legs_nplr_reproduces_A(N):
    Lam, P, B, V = nplr_legs(N)
    for x in (Lam, P, B, V):
        assert x.dtype == torch.complex128
    assert Lam.shape == P.shape == B.shape == (N,) and V.shape == (N, N)
    A, B_ref = transition("legs", N)
    assert rel_error(dense_from_nplr(Lam, P, V), A.to(torch.complex128)) < 1e-10
    assert rel_error(V @ B, B_ref.to(torch.complex128)) < 1e-10
    assert rel_error(V.conj().T @ V, torch.eye(N, dtype=torch.complex128)) < 1e-12  # unitary
    torch.testing.assert_close(Lam.real, torch.full((N,), -0.5, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("N", SIZES)
def test_legs_nplr_matches_independent_schur(N):
    """Same Λ and eigenvectors (up to a phase each) as SciPy's complex Schur form of S = A + P Pᵀ.

    For a normal matrix the Schur form is diagonal, so it is an independent route to (Λ, V).
    """
    Lam, P, B, V = nplr_legs(N)
    n = np.arange(N)
    A = np.where(n[:, None] > n[None, :], -np.sqrt(np.outer(2 * n + 1, 2 * n + 1)), 0.0) - np.diag(n + 1.0)
    p = np.sqrt(n + 0.5)
    T, Z = scipy.linalg.schur(A + np.outer(p, p), output="complex")
    assert np.abs(T - np.diag(np.diag(T))).max() < 1e-10  # normal: triangular Schur factor is diagonal
    order = np.argsort(np.diag(T).imag)
    lam_ref, Z = torch.from_numpy(np.diag(T)[order]), torch.from_numpy(Z[:, order])
    torch.testing.assert_close(Lam, lam_ref, rtol=0, atol=1e-10)
    overlap = (Z.conj().T @ V).abs()  # |<z_m, v_n>| = δ_mn
    torch.testing.assert_close(overlap, torch.eye(N, dtype=torch.float64), rtol=0, atol=1e-8)
    torch.testing.assert_close(P.abs(), (Z.conj().T @ torch.from_numpy(p).to(torch.complex128)).abs(),
                               rtol=0, atol=1e-10)


@pytest.mark.parametrize("N", [2, 8, 16])
def test_conjugate_pairs(N):
    """Our phase convention makes P~ real and conjugate eigenvalues carry conjugate eigenvectors."""
    Lam, P, B, V = nplr_legs(N)
    assert P.imag.abs().max() < 1e-12 and (P.real >= 0).all()
    flip = torch.arange(N - 1, -1, -1)  # ascending imag parts: mode m pairs with mode N-1-m
    torch.testing.assert_close(Lam[flip], Lam.conj(), rtol=0, atol=1e-10)
    torch.testing.assert_close(V[:, flip], V.conj(), rtol=0, atol=1e-9)


@pytest.mark.parametrize("N", [8, 16])
def test_s4_uses_stage02_nplr(N):
    """Stage 05's legs_nplr (half the modes) still rebuilds A through its dense DPLR form."""
    Lam, P, B, V = s4.legs_nplr(N, return_V=True)
    A_dplr, _ = s4.dplr_dense(Lam[None], P[:, None], B[None])
    full_V = torch.cat([V, V.conj()], dim=-1)
    A, _ = transition("legs", N)
    assert rel_error(full_V @ A_dplr[0] @ full_V.conj().T, A.to(torch.complex128)) < 1e-10


@pytest.mark.parametrize("N", SIZES)
def test_legt_nplr_rank2(N):
    Lam, P, B, V = nplr_legt(N, theta=0.5)
    assert P.shape == (2, N)
    A, B_ref = transition("legt", N, 0.5)
    assert rel_error(dense_from_nplr(Lam, P, V), A.to(torch.complex128)) < 1e-10
    assert rel_error(V @ B, B_ref.to(torch.complex128)) < 1e-10
    assert Lam.real.abs().max() < 1e-10  # the normal part is skew: purely imaginary spectrum


def test_nplr_rejects_non_normal():
    A, _ = transition("legs", 5)
    with pytest.raises(ValueError, match="skew"):
        nplr(A, torch.zeros(1, 5, dtype=torch.float64))  # LegS itself is not normal
    with pytest.raises(ValueError, match="P"):
        nplr(A, torch.zeros(1, 4))
    with pytest.raises(ValueError, match="N"):
        nplr_legs(0)
