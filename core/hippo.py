"""HiPPO: online function approximation by projection onto orthogonal polynomials
(Gu, Dao, Ermon, Rudra, Ré 2020, "HiPPO: Recurrent Memory with Optimal Polynomial Projections").

At every time t, compress the history f(s), s <= t, into N coefficients c(t)
of its projection onto an orthonormal basis g_n(t, s) of a measure ω(t, s):

    c_n(t) = ∫ f(s) g_n(t, s) ω(t, s) ds,      f(s) ≈ Σ_n c_n(t) g_n(t, s).

Differentiating in t gives a linear ODE, the HiPPO operator:

    translated measures (LTI):  c'(t) = A c(t) + B f(t)
    scaled Legendre (LegS):     c'(t) = (1/t) (A c(t) + B f(t))

The four measures, with θ the window (or time scale), a = t - s the age of a
point of the history, r_n = sqrt(2n + 1) (derivations in the stage 02 README):

* LegT, uniform on [t - θ, t], g_n = r_n P_n(1 - 2a/θ):
      A_nk = -(r_n r_k / θ) · (1 if k < n else (-1)^(n-k)),   B_n = r_n / θ
* LegS, uniform on [0, t], g_n = r_n P_n(1 - 2a/t):
      A_nk = -r_n r_k (k < n),  -(n + 1) (k = n),  0 (k > n),   B_n = r_n
* LagT, exponential e^{-a/θ}/θ on a >= 0, g_n = L_n(a/θ) (Laguerre):
      A_nk = -1/θ (k <= n), 0 (k > n),   B_n = 1/θ
* FouT, uniform on [t - θ, t], g = (1, √2 cos 2πkx, √2 sin 2πkx, ...), x = 1 - a/θ:
      A = (Ω - 2 e eᵀ)/θ,  B = 2 e/θ,  e = g(x=0) = (1, √2, 0, √2, 0, ...),
      Ω the rotation generator (Ω[2k-1, 2k] = 2πk = -Ω[2k, 2k-1]); the boundary
      value f(t - θ) is taken from the reconstruction, whose Fourier sum at the
      window's jump is the mid-point (f(t) + f(t - θ))/2.

LegS's 1/t factor makes it an LTI system in log-time τ = ln t: dc/dτ = A c + B f.
So one step from t_{k-1} to t_k is the discretization of (A, B) with step
Δτ_k = ln(t_k / t_{k-1}) = ln(k / (k - 1)) for equally spaced samples: it
depends on the step index only, never on the sampling rate (timescale
robustness). The first sample (from t = 0) is the limit Δτ -> ∞:
c = -A^{-1} B f_0, the projection of a constant.

Discretization reuses `ssmlab.core.discretize` ('bilinear' or 'zoh'); ZOH is
exact for the piecewise-constant input that holds sample f_k on (t_k - dt, t_k].
The bases come from SciPy's special functions (`eval_legendre`,
`eval_genlaguerre`) and NumPy's cos/sin; everything is float64.

Shapes: N state size (number of coefficients), L number of samples, M number
of points at which a reconstruction is evaluated.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from scipy import special
from torch import Tensor

from ssmlab.core.discretize import discretize

MEASURES = ("legt", "legs", "lagt", "fout")
Measure = Literal["legt", "legs", "lagt", "fout"]
METHODS = ("bilinear", "zoh")


def _check(measure: str, N: int, theta: float = 1.0) -> None:
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; choose one of {MEASURES}")
    if not isinstance(N, int) or N < 1:
        raise ValueError(f"N (the state size) must be a positive int, got {N!r}")
    if not (theta > 0 and math.isfinite(theta)):
        raise ValueError(f"theta (the window / time scale) must be finite and > 0, got {theta!r}")


# ----------------------------------------------------------------------------- the operators (A, B)


def transition(measure: Measure, N: int, theta: float = 1.0) -> tuple[Tensor, Tensor]:
    """Continuous HiPPO operator (A (N, N), B (N,)) of `measure`, float64 (formulas in the module docstring).

    theta is the window (LegT, FouT) or time scale (LagT); LegS has none and ignores it.
    """
    _check(measure, N, theta)
    n = torch.arange(N, dtype=torch.float64)
    r = (2 * n + 1).sqrt()
    k_lt_n = n[None, :] < n[:, None]  # [n, k]: k < n
    if measure == "legs":
        A = -torch.where(k_lt_n, r[:, None] * r[None, :], torch.zeros(())) - torch.diag(n + 1)
        return A, r.clone()
    if measure == "legt":
        sign = torch.where(k_lt_n, torch.ones(()), (-1.0) ** (n[:, None] - n[None, :]))
        return -(r[:, None] * r[None, :]) * sign / theta, r / theta
    if measure == "lagt":
        A = -torch.tril(torch.ones(N, N, dtype=torch.float64))
        return A / theta, torch.ones(N, dtype=torch.float64) / theta
    e = _fourier_basis(N, np.zeros(1))[0]  # g(x = 0): (N,)
    e = torch.from_numpy(e)
    Omega = torch.zeros(N, N, dtype=torch.float64)
    for j in range(1, (N - 1) // 2 + 1):  # (cos_j, sin_j) at indices (2j - 1, 2j)
        Omega[2 * j - 1, 2 * j], Omega[2 * j, 2 * j - 1] = 2 * math.pi * j, -2 * math.pi * j
    return (Omega - 2 * torch.outer(e, e)) / theta, 2 * e / theta


# ----------------------------------------------------------------------------- the bases: reconstruction


def _fourier_basis(N: int, x: np.ndarray) -> np.ndarray:
    """(M, N): 1, √2 cos(2πjx), √2 sin(2πjx), j = 1, 2, ... at x in [0, 1]."""
    cols = [np.ones_like(x)]
    for j in range(1, N // 2 + 1):
        cols += [math.sqrt(2) * np.cos(2 * math.pi * j * x), math.sqrt(2) * np.sin(2 * math.pi * j * x)]
    return np.stack(cols[:N], axis=-1)


def basis(measure: Measure, N: int, ages: np.ndarray, window: float) -> np.ndarray:
    """G (M, N) with f(t - a) ≈ Σ_n c_n(t) G[a, n]: the basis g_n at ages a = t - s.

    window: θ for LegT, LagT, FouT; the current time t for LegS (the whole history).
    Points outside the measure's support (a > window, except LagT) evaluate to 0.
    """
    _check(measure, N, window)
    a = np.asarray(ages, dtype=np.float64)
    if (a < 0).any():
        raise ValueError("ages must be >= 0 (a = t - s looks into the past)")
    n = np.arange(N)
    if measure == "lagt":
        return special.eval_genlaguerre(n[None, :], 0.0, a[:, None] / window)  # L_n^(0) = L_n
    inside = (a <= window * (1 + 1e-12))[:, None]
    if measure == "fout":
        G = _fourier_basis(N, 1 - a / window)
    else:  # legt, legs: orthonormal Legendre on the window
        G = np.sqrt(2 * n + 1)[None, :] * special.eval_legendre(n[None, :], 1 - 2 * a[:, None] / window)
    return np.where(inside, G, 0.0)


def reconstruct(c: Tensor, measure: Measure, ages: np.ndarray, window: float) -> np.ndarray:
    """f(t - a) ≈ Σ_n c_n g_n at the given ages, from the state c (N,) or states (..., N) -> (..., M)."""
    c = c.detach().cpu().numpy() if isinstance(c, Tensor) else np.asarray(c)
    return c @ basis(measure, c.shape[-1], ages, window).T


# ----------------------------------------------------------------------------- online approximation


def _check_signal(u: Tensor, dt: float, method: str) -> Tensor:
    u = torch.as_tensor(u, dtype=torch.float64)
    if u.ndim != 1 or len(u) < 1:
        raise ValueError(f"u (the signal samples) must be a non-empty 1-D array, got shape {tuple(u.shape)}")
    if not (dt > 0 and math.isfinite(dt)):
        raise ValueError(f"dt (the sampling step) must be finite and > 0, got {dt!r}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    return u


def hippo_states(u: Tensor, measure: Measure, N: int, dt: float, theta: float = 1.0,
                 method: str = "zoh") -> Tensor:
    """Run the discretized HiPPO dynamics over samples u (L,) taken at t_k = (k + 1) dt -> states c (L, N).

    c[k] summarizes f on (0, t_k]. Translated measures use one (Ā, B̄) with
    step dt; LegS uses the log-time step Δτ_k = ln((k + 1) / k) (see the
    module docstring), independent of dt.
    """
    u = _check_signal(u, dt, method)
    A, B = transition(measure, N, theta)
    L = len(u)
    out = torch.empty(L, N, dtype=torch.float64)
    if measure != "legs":
        Ad, Bd = discretize(A, B[:, None], dt, method)  # (N, N), (N, 1)
        Bd = Bd[:, 0]
        c = torch.zeros(N, dtype=torch.float64)
        for k in range(L):
            c = Ad @ c + Bd * u[k]
            out[k] = c
        return out
    c = -torch.linalg.solve(A, B) * u[0]  # from t = 0: Δτ = ∞
    out[0] = c
    if method == "bilinear":  # A is lower triangular: one O(N²) triangular solve per step, no inverse formed
        I = torch.eye(N, dtype=torch.float64)
        for k in range(1, L):
            h = math.log1p(1 / k) / 2  # Δτ_k / 2
            rhs = c + h * (A @ c) + 2 * h * B * u[k]
            c = torch.linalg.solve_triangular(I - h * A, rhs[:, None], upper=False)[:, 0]
            out[k] = c
        return out
    chunk = 256  # discretize Δτ_k for a block of steps at once (memory: chunk · N² floats)
    for start in range(1, L, chunk):
        ks = torch.arange(start, min(start + chunk, L), dtype=torch.float64)
        dtau = torch.log1p(1 / ks)  # ln((k + 1) / k)
        Ad, Bd = discretize(A.expand(len(ks), N, N), B[:, None].expand(len(ks), N, 1), dtau, method)
        for i, k in enumerate(range(start, start + len(ks))):
            c = Ad[i] @ c + Bd[i, :, 0] * u[k]
            out[k] = c
    return out


def window_of(measure: Measure, t: float, theta: float) -> float:
    """The span of history a state stands for: t for LegS (everything), θ otherwise."""
    return t if measure == "legs" else theta


def reconstruction_error(u: Tensor, measure: Measure, N: int, dt: float, theta: float = 1.0,
                         method: str = "zoh", horizon: float | None = None) -> float:
    """RMS error of the final state's reconstruction of the samples within `horizon` of the end.

    horizon defaults to the measure's window (LegS: the whole signal). The
    samples u_j sit at ages a_j = t_{L-1} - t_j.
    """
    u = _check_signal(u, dt, method)
    c = hippo_states(u, measure, N, dt, theta, method)[-1]
    L = len(u)
    t = L * dt
    h = window_of(measure, t, theta) if horizon is None else horizon
    ages = (L - 1 - np.arange(L) + 0.5) * dt  # centre of the interval where u_j holds
    keep = ages <= h * (1 + 1e-12)
    ages, target = ages[keep], u.numpy()[keep]
    approx = reconstruct(c, measure, ages, window_of(measure, t, theta))
    return float(np.sqrt(np.mean((approx - target) ** 2)))
