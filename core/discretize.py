"""Discretization: from the continuous SSM x'(t) = A x(t) + B u(t) to the
discrete recurrence x_k = Ā x_{k-1} + B̄ u_k with step Δ.

Every rule below solves ``x' = A x + B u`` over one step of length Δ under a
different approximation. With I the identity:

* forward Euler (explicit, order 1):   Ā = I + Δ A,              B̄ = Δ B
* backward Euler (implicit, order 1):  Ā = (I - Δ A)^{-1},        B̄ = (I - Δ A)^{-1} Δ B
* bilinear / Tustin / trapezoid (order 2):
                                        Ā = (I - Δ/2 A)^{-1} (I + Δ/2 A),  B̄ = (I - Δ/2 A)^{-1} Δ B
* generalized bilinear transform GBT(α), α in [0, 1] (Zhang et al. 2007, used
  by LSSL, Gu et al. 2021, eq. 3):
                                        Ā = (I - α Δ A)^{-1} (I + (1 - α) Δ A),  B̄ = (I - α Δ A)^{-1} Δ B
  α = 0 is forward Euler, α = 1/2 bilinear, α = 1 backward Euler.
* zero-order hold (exact when u is constant over each step):
                                        Ā = exp(Δ A),  B̄ = ∫_0^Δ exp(s A) ds B  (= A^{-1}(exp(Δ A) - I) B if A is invertible)

ZOH is computed by one matrix exponential of the augmented matrix (Van Loan
1978): exp(Δ [[A, B], [0, 0]]) = [[Ā, B̄], [0, I]], which stays exact when A
is singular (an integrator, a free mass). `zoh_ref` is the textbook
A^{-1}(exp(ΔA) - I) B formula, kept as an independent check. For diagonal A
(state x_n decoupled) everything is elementwise and ZOH has the closed form
Ā_n = exp(Δ λ_n), B̄_n = (exp(Δ λ_n) - 1) / λ_n · B_n, with the limit Δ at λ_n = 0.

Shapes: ``...`` are batch dims (e.g. H channels), broadcast together.

* dense:    A (..., N, N), B (..., N, M), Δ scalar or (...)  ->  Ā (..., N, N), B̄ (..., N, M)
* diagonal: A (..., N),    B (..., N) or (..., N, M), Δ scalar or (...)  ->  Ā (..., N), B̄ like B

All functions are differentiable in Δ, A and B (plain torch ops), and work in
float32 and float64 (diagonal A may also be complex).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

METHODS = ("forward_euler", "backward_euler", "bilinear", "gbt", "zoh")
# The GBT parameter α that each named one-step rule equals.
GBT_ALPHA = {"forward_euler": 0.0, "bilinear": 0.5, "backward_euler": 1.0}

Delta = Union[float, Tensor]


# ----------------------------------------------------------------------------- validation


def _check_delta(delta: Delta, like: Tensor) -> Tensor:
    """Δ as a real tensor on A's device; raise unless every entry is finite and > 0."""
    real = like.real.dtype if like.is_complex() else like.dtype
    d = delta if isinstance(delta, Tensor) else torch.tensor(float(delta), dtype=real, device=like.device)
    if d.is_complex():
        raise TypeError(f"delta must be real, got dtype {d.dtype}")
    flat = d.detach().flatten()
    bad = flat[~(torch.isfinite(flat) & (flat > 0))]
    if len(bad):
        raise ValueError(f"delta (the step Δ) must be finite and > 0, got {bad[:3].tolist()}")
    return d.to(real)


def _check_dense(A: Tensor, B: Tensor) -> int:
    if A.ndim < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"A must be a square matrix (..., N, N), got shape {tuple(A.shape)}")
    N = A.shape[-1]
    if B.ndim < 2 or B.shape[-2] != N:
        raise ValueError(f"B must be (..., N, M) with N = {N} (A is {tuple(A.shape)}), got shape {tuple(B.shape)}")
    _check_dtypes(A, B)
    return N


def _check_diag(A: Tensor, B: Tensor) -> bool:
    """Validate diagonal A (..., N) and B (..., N) or (..., N, M); True if B has an M axis."""
    if A.ndim < 1:
        raise ValueError("diagonal A must have shape (..., N), got a scalar")
    N = A.shape[-1]
    if B.ndim == A.ndim and B.shape[-1] == N:
        matrix_b = False
    elif B.ndim == A.ndim + 1 and B.shape[-2] == N:
        matrix_b = True
    else:
        raise ValueError(
            f"with diagonal A of shape {tuple(A.shape)}, B must be (..., N) or (..., N, M) with N = {N}, "
            f"got shape {tuple(B.shape)}"
        )
    _check_dtypes(A, B)
    return matrix_b


def _check_dtypes(A: Tensor, B: Tensor) -> None:
    for name, t in (("A", A), ("B", B)):
        if not (t.is_floating_point() or t.is_complex()):
            raise TypeError(f"{name} must be a floating (or complex) tensor, got {t.dtype}")


def _batch_delta(d: Tensor, batch_ndim: int) -> Tensor:
    """Δ (...) -> (..., 1, 1) so it broadcasts against matrices (..., N, N)."""
    if d.ndim > batch_ndim:
        raise ValueError(f"delta has shape {tuple(d.shape)} but the batch dims of A, B have {batch_ndim} dims")
    return d[..., None, None]


def _eye_like(A: Tensor) -> Tensor:
    return torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)


# ----------------------------------------------------------------------------- dense A


def gbt(A: Tensor, B: Tensor, delta: Delta, alpha: float) -> tuple[Tensor, Tensor]:
    """Generalized bilinear transform: Ā = (I - αΔA)^{-1}(I + (1-α)ΔA), B̄ = (I - αΔA)^{-1} ΔB."""
    N = _check_dense(A, B)
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    d = _batch_delta(_check_delta(delta, A), max(A.ndim, B.ndim) - 2)
    I = _eye_like(A)
    dA, dB = _broadcast_pair(d * A, d * B)  # (..., N, N), (..., N, M)
    if alpha == 0.0:  # explicit: nothing to invert
        return I + dA, dB
    lhs = I - alpha * dA
    rhs = torch.cat([I + (1 - alpha) * dA, dB], dim=-1)  # (..., N, N+M)
    sol = torch.linalg.solve(lhs, rhs)  # one factorisation for Ā and B̄
    return sol[..., :N], sol[..., N:]


def _broadcast_pair(X: Tensor, Y: Tensor) -> tuple[Tensor, Tensor]:
    """Broadcast the batch dims of X (..., N, P) and Y (..., N, Q), keeping their last two dims."""
    batch = torch.broadcast_shapes(X.shape[:-2], Y.shape[:-2])
    return X.expand(*batch, *X.shape[-2:]), Y.expand(*batch, *Y.shape[-2:])


def forward_euler(A: Tensor, B: Tensor, delta: Delta) -> tuple[Tensor, Tensor]:
    """Ā = I + ΔA, B̄ = ΔB (GBT with α = 0)."""
    return gbt(A, B, delta, 0.0)


def backward_euler(A: Tensor, B: Tensor, delta: Delta) -> tuple[Tensor, Tensor]:
    """Ā = (I - ΔA)^{-1}, B̄ = (I - ΔA)^{-1} ΔB (GBT with α = 1)."""
    return gbt(A, B, delta, 1.0)


def bilinear(A: Tensor, B: Tensor, delta: Delta) -> tuple[Tensor, Tensor]:
    """Tustin / trapezoid: Ā = (I - Δ/2 A)^{-1}(I + Δ/2 A), B̄ = (I - Δ/2 A)^{-1} ΔB (GBT, α = 1/2)."""
    return gbt(A, B, delta, 0.5)


def zoh(A: Tensor, B: Tensor, delta: Delta) -> tuple[Tensor, Tensor]:
    """Zero-order hold by one augmented matrix exponential (exact, also for singular A).

    exp(Δ [[A, B], [0, 0]]) = [[exp(ΔA), ∫_0^Δ exp(sA) ds B], [0, I]].
    """
    N = _check_dense(A, B)
    d = _batch_delta(_check_delta(delta, A), max(A.ndim, B.ndim) - 2)
    A_, B_ = _broadcast_pair(A, B)
    M = B_.shape[-1]
    top = torch.cat([A_, B_], dim=-1)  # (..., N, N+M)
    bottom = torch.zeros(*top.shape[:-2], M, N + M, dtype=top.dtype, device=top.device)
    aug = torch.cat([top, bottom], dim=-2)  # (..., N+M, N+M)
    E = torch.linalg.matrix_exp(d * aug)
    return E[..., :N, :N], E[..., :N, N:]


def zoh_ref(A: Tensor, B: Tensor, delta: Delta) -> tuple[Tensor, Tensor]:
    """Textbook ZOH: Ā = exp(ΔA), B̄ = A^{-1}(exp(ΔA) - I) B. Needs an invertible A."""
    _check_dense(A, B)
    d = _batch_delta(_check_delta(delta, A), max(A.ndim, B.ndim) - 2)
    Ad = torch.linalg.matrix_exp(d * A)
    A_, E_ = _broadcast_pair(A, Ad - _eye_like(A))
    A_, B_ = _broadcast_pair(A_, B)
    E_ = E_.expand(*A_.shape[:-2], *E_.shape[-2:])
    Bd = torch.linalg.solve(A_, E_ @ B_)
    return Ad, Bd


# ----------------------------------------------------------------------------- diagonal A


def discretize_diag(A: Tensor, B: Tensor, delta: Delta, method: str = "zoh",
                    alpha: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """Every rule for diagonal A = diag(λ_1 .. λ_N), elementwise (real or complex λ).

    A (..., N); B (..., N) or (..., N, M); Δ scalar or (...). Returns Ā (..., N), B̄ like B.
    ZOH uses the closed form B̄ = expm1(Δλ)/λ · B, and Δ·B where λ = 0.
    """
    matrix_b = _check_diag(A, B)
    alpha = _resolve_alpha(method, alpha)
    d = _check_delta(delta, A)
    if d.ndim > A.ndim - 1:
        raise ValueError(f"delta has shape {tuple(d.shape)} but the batch dims of A have {A.ndim - 1} dims")
    d = d[..., None]  # (..., 1) against (..., N)
    dA = d * A
    if method == "zoh":
        Ad = torch.exp(dA)
        small = dA.abs() < 1e-6
        safe = torch.where(small, torch.ones_like(A), A)  # no 0/0, so no NaN gradients either
        gain = torch.where(small, d * (1 + dA / 2), torch.expm1(dA) / safe)  # ∫_0^Δ exp(sλ) ds
    else:
        inv = 1 / (1 - alpha * dA)
        Ad = (1 + (1 - alpha) * dA) * inv
        gain = d * inv
    Bd = gain[..., None] * B if matrix_b else gain * B
    return Ad, Bd


# ----------------------------------------------------------------------------- dispatcher


def _resolve_alpha(method: str, alpha: Optional[float]) -> float:
    """The GBT α of a rule (NaN for ZOH), validating method and alpha together."""
    if method not in METHODS:
        raise ValueError(f"unknown discretization method {method!r}; choose one of {METHODS}")
    if method == "gbt":
        if alpha is None:
            raise ValueError("method 'gbt' needs alpha in [0, 1]")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        return float(alpha)
    if alpha is not None:
        raise ValueError(f"alpha is only used by method 'gbt', not {method!r}")
    return GBT_ALPHA.get(method, float("nan"))


def discretize(A: Tensor, B: Tensor, delta: Delta, method: str = "zoh", alpha: Optional[float] = None,
               diagonal: bool = False) -> tuple[Tensor, Tensor]:
    """(Ā, B̄) of the continuous (A, B) with step Δ by `method` (see the module docstring).

    method: 'forward_euler' | 'backward_euler' | 'bilinear' | 'gbt' (needs `alpha`) | 'zoh'.
    diagonal=False: A (..., N, N), B (..., N, M).  diagonal=True: A (..., N) holds the
    eigenvalues, B (..., N) or (..., N, M). Δ is a float or a tensor of the batch shape (...).
    """
    alpha = _resolve_alpha(method, alpha)
    if diagonal:
        return discretize_diag(A, B, delta, method, None if method != "gbt" else alpha)
    if method == "zoh":
        return zoh(A, B, delta)
    return gbt(A, B, delta, alpha)


def spectral_radius(Ad: Tensor, diagonal: bool = False) -> Tensor:
    """max |eigenvalue| of Ā (...): the discrete system is stable iff it is < 1."""
    eig = Ad if diagonal else torch.linalg.eigvals(Ad)
    return eig.abs().amax(dim=-1)
