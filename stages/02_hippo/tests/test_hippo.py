"""Stage 02: HiPPO operators, their derivation, reconstruction, discretization and NPLR structure."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, special

from ssmlab.core import hippo, nplr
from ssmlab.core.discretize import discretize, spectral_radius

S3, S5, S15 = math.sqrt(3), math.sqrt(5), math.sqrt(15)


# ----------------------------------------------------------------------------- closed forms, written out by hand


def test_legs_closed_form_n3():
    A, B = hippo.transition("legs", 3)
    # A_nk = -sqrt(2n+1) sqrt(2k+1) below the diagonal, -(n+1) on it, 0 above
    want = torch.tensor([[-1, 0, 0], [-S3, -2, 0], [-S5, -S15, -3]], dtype=torch.float64)
    assert torch.allclose(A, want, atol=1e-15)
    assert torch.allclose(B, torch.tensor([1, S3, S5], dtype=torch.float64))


def test_legt_closed_form_n3():
    theta = 2.0
    A, B = hippo.transition("legt", 3, theta)
    # -(r_n r_k / θ) · (1 below the diagonal, (-1)^(n-k) on and above it)
    want = -torch.tensor([[1, -S3, S5], [S3, 3, -S15], [S5, S15, 5]], dtype=torch.float64) / theta
    assert torch.allclose(A, want, atol=1e-15)
    assert torch.allclose(B, torch.tensor([1, S3, S5], dtype=torch.float64) / theta)


def test_lagt_closed_form_n3():
    A, B = hippo.transition("lagt", 3, 0.5)
    want = -torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.float64) / 0.5
    assert torch.equal(A, want) and torch.equal(B, torch.full((3,), 2.0, dtype=torch.float64))


def test_fout_closed_form_n3():
    A, B = hippo.transition("fout", 3)
    r2, w = math.sqrt(2), 2 * math.pi
    e = torch.tensor([1, r2, 0], dtype=torch.float64)  # g(x=0) = (1, √2 cos 0, √2 sin 0)
    want = torch.tensor([[0, 0, 0], [0, 0, w], [0, -w, 0]], dtype=torch.float64) - 2 * torch.outer(e, e)
    assert torch.allclose(A, want, atol=1e-14) and torch.allclose(B, 2 * e)


# ----------------------------------------------------------------------------- derivation check: d/dt of the projection


def _project(f, measure, N, t, theta):
    """c_n(t) = ∫ f(s) g_n(t, s) ω(t, s) ds by adaptive quadrature (independent of the ODE)."""
    n = np.arange(N)
    if measure == "lagt":
        w = lambda a: np.exp(-a / theta) / theta  # noqa: E731
        lo, hi = 0.0, t  # f = 0 before s = 0
    else:
        span = t if measure == "legs" else theta
        w = lambda a: 1.0 / span  # noqa: E731
        lo, hi = 0.0, span
    out = []
    for k in range(N):
        g = lambda a, k=k: hippo.basis(measure, N, np.array([a]), t if measure == "legs" else theta)[0, k]  # noqa: E731
        out.append(integrate.quad(lambda a, g=g: f(t - a) * g(a) * w(a), lo, hi, epsabs=1e-12, epsrel=1e-12, limit=200)[0])
    del n
    return np.array(out)


@pytest.mark.parametrize("measure", hippo.MEASURES)
def test_operator_is_the_derivative_of_the_projection(measure):
    """A and B come from differentiating c(t) in t; check c'(t) = A c + B f (LegS: (1/t)(A c + B f))."""
    N, theta, t, h = 6, 1.0, 1.7, 1e-4
    if measure == "fout":  # periodic in θ: the boundary term f(t-θ) equals f(t), which the Fourier sum holds exactly
        f = lambda s: math.sin(2 * math.pi * s) + 0.3 * math.cos(4 * math.pi * s)  # noqa: E731
        N = 7
    else:
        f = lambda s: 0.5 + s - 0.4 * s**2 if measure != "lagt" else s**2 * math.exp(-s)  # noqa: E731
        if measure in ("legt",):  # a polynomial of degree < N is represented exactly, so f(t - θ) is too
            pass
    c = _project(f, measure, N, t, theta)
    dc = (_project(f, measure, N, t + h, theta) - _project(f, measure, N, t - h, theta)) / (2 * h)
    A, B = (x.numpy() for x in hippo.transition(measure, N, theta))
    rhs = A @ c + B * f(t)
    if measure == "legs":
        rhs = rhs / t
    assert np.abs(dc - rhs).max() < 1e-5 * max(1.0, np.abs(rhs).max())


# ----------------------------------------------------------------------------- bases and reconstruction


def test_bases_are_orthonormal():
    x, w = special.roots_legendre(80)  # Gauss-Legendre on [-1, 1]
    ages = (1 - x) / 2  # window θ = 1, weight 1/θ: ds = dx/2
    for measure in ("legt", "legs", "fout"):
        G = hippo.basis(measure, 7, ages, 1.0)
        gram = G.T @ (G * (w / 2)[:, None])
        assert np.abs(gram - np.eye(7)).max() < 1e-10, measure
    a, wl = special.roots_laguerre(60)
    G = hippo.basis("lagt", 7, a, 1.0)
    assert np.abs(G.T @ (G * wl[:, None]) - np.eye(7)).max() < 1e-10


def _smooth_signal(L, seed=0):
    rng = np.random.default_rng(seed)
    x = np.arange(1, L + 1) / L
    freqs = np.arange(1, 5)
    a, b = rng.normal(size=4) / freqs, rng.normal(size=4) / freqs
    return torch.tensor(np.sin(2 * np.pi * np.outer(x, freqs)) @ a + np.cos(2 * np.pi * np.outer(x, freqs)) @ b)


@pytest.mark.parametrize("measure", ["legt", "legs", "fout"])
@pytest.mark.parametrize("method", ["zoh", "bilinear"])
def test_reconstruction_error_falls_with_N(measure, method):
    L = 400
    u = _smooth_signal(L)
    errs = [hippo.reconstruction_error(u, measure, N, 1 / L, theta=1.0, method=method) for N in (4, 8, 16, 32)]
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    # FouT's window holds a non-periodic piece: Gibbs at the jump keeps its L2 error decaying slowly
    assert errs[-1] < (0.5 if measure == "fout" else 0.05) * errs[0], errs


def test_lagt_error_falls_with_N():
    L = 400
    u = _smooth_signal(L)
    errs = [hippo.reconstruction_error(u, "lagt", N, 1 / L, theta=0.1, method="zoh", horizon=0.3) for N in (4, 16, 64)]
    assert errs[2] < errs[1] < errs[0], errs


def test_legs_is_timescale_invariant():
    """LegS's steps depend on the index only: the same samples at any rate give the same states."""
    u = _smooth_signal(200)
    c1 = hippo.hippo_states(u, "legs", 16, dt=1e-3)
    c2 = hippo.hippo_states(u, "legs", 16, dt=7.0)
    assert torch.equal(c1, c2)


def test_legs_first_step_projects_a_constant():
    """After one sample the LegS state is the projection of a constant: c = (f0, 0, 0, ...)."""
    c = hippo.hippo_states(torch.tensor([2.5]), "legs", 5, dt=0.1)[0]
    assert torch.allclose(c, torch.tensor([2.5, 0, 0, 0, 0], dtype=torch.float64), atol=1e-12)


# ----------------------------------------------------------------------------- stability of the discretizations


@pytest.mark.parametrize("measure", hippo.MEASURES)
@pytest.mark.parametrize("method", ["zoh", "bilinear", "backward_euler"])
@pytest.mark.parametrize("N", [1, 2, 7, 32])
def test_discretized_operators_are_stable(measure, method, N):
    A, B = hippo.transition(measure, N)
    assert torch.linalg.eigvals(A).real.max() < 1e-9  # continuous: Re λ <= 0 (FouT's DC/rotations at most marginal)
    for dt in (1e-3, 1e-1, 1.0):
        Ad, _ = discretize(A, B[:, None], dt, method)
        assert spectral_radius(Ad).item() <= 1 + 1e-9


def test_forward_euler_can_be_unstable():
    """The contrast: forward Euler with a large step leaves the unit disc (why ZOH / bilinear are used)."""
    A, B = hippo.transition("legs", 16)
    Ad, _ = discretize(A, B[:, None], 1.0, "forward_euler")
    assert spectral_radius(Ad).item() > 1


# ----------------------------------------------------------------------------- NPLR


@pytest.mark.parametrize("N", [1, 2, 3, 8, 17, 64])
def test_nplr_legs_reproduces_A(N):
    Lam, P, B, V = nplr.nplr_legs(N)
    A, Bh = hippo.transition("legs", N)
    assert Lam.dtype == torch.complex128 and P.shape == (N,) and V.shape == (N, N)
    assert (nplr.dense_from_nplr(Lam, P, V) - A).abs().max() < 1e-10
    assert (V @ B - Bh).abs().max() < 1e-10
    assert (V.conj().T @ V - torch.eye(N, dtype=torch.complex128)).abs().max() < 1e-10  # unitary
    assert torch.allclose(Lam.real, torch.full((N,), -0.5, dtype=torch.float64))  # normal part: -1/2 + i ω
    assert P.imag.abs().max() < 1e-12 and (P.real >= -1e-12).all()  # phase convention: P~ real, >= 0


@pytest.mark.parametrize("N", [1, 4, 9])
def test_nplr_legt_reproduces_A(N):
    Lam, P, B, V = nplr.nplr_legt(N, theta=0.5)
    A, Bh = hippo.transition("legt", N, 0.5)
    assert (nplr.dense_from_nplr(Lam, P, V) - A).abs().max() < 1e-10
    assert (V @ B - Bh).abs().max() < 1e-10
    assert Lam.real.abs().max() < 1e-10  # skew normal part: purely imaginary spectrum


def test_nplr_conjugate_pairs():
    Lam, P, B, V = nplr.nplr_legs(8)
    assert torch.allclose(torch.sort(Lam.imag).values, torch.sort(-Lam.imag).values, atol=1e-10)


def test_nplr_rejects_non_normal_plus_low_rank():
    A = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64) * 3 + torch.diag(torch.tensor([1.0, -2.0]))
    with pytest.raises(ValueError, match="not"):
        nplr.nplr(A, torch.zeros(1, 2, dtype=torch.float64))


# ----------------------------------------------------------------------------- bad input


def test_bad_input():
    with pytest.raises(ValueError, match="measure"):
        hippo.transition("legx", 4)
    with pytest.raises(ValueError, match="N"):
        hippo.transition("legs", 0)
    with pytest.raises(ValueError, match="theta"):
        hippo.transition("legt", 4, -1.0)
    with pytest.raises(ValueError, match="ages"):
        hippo.basis("legt", 4, np.array([-0.1]), 1.0)
    with pytest.raises(ValueError, match="dt"):
        hippo.hippo_states(torch.ones(3), "legs", 4, dt=0.0)
    with pytest.raises(ValueError, match="method"):
        hippo.hippo_states(torch.ones(3), "legs", 4, dt=0.1, method="rk4")
    with pytest.raises(ValueError, match="N"):
        nplr.nplr_legs(0)
