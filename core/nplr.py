"""Normal plus low rank (NPLR): the structure of HiPPO that S4 builds on
(Gu, Goel, Ré 2022, "Efficiently Modeling Long Sequences with Structured State Spaces", Theorem 1).

A HiPPO matrix is not normal, so it cannot be diagonalized stably. But adding
a low-rank term makes it normal:

    S = A + Pᵀ P   is normal, so   S = V Λ V^*  with V unitary,
    A = V (Λ - P~ P~^*) V^*,   P~ = V^* Pᵀ           (rank r = rows of P)

and in the eigenbasis A is diagonal plus low rank (DPLR), which S4's Cauchy
kernel exploits (stage 05).

* LegS (rank 1): P_n = sqrt(n + 1/2). Then S = A + P Pᵀ has S_nk = -1/2 on
  the diagonal and, for n > k, -r_n r_k + sqrt((n+1/2)(k+1/2)) = -(1/2) r_n r_k
  (r_n = sqrt(2n+1)), mirrored with the opposite sign above: S = -I/2 + skew.
  So Λ = -1/2 + i ω with iω the eigenvalues of the skew part.
* LegT (rank 2): its symmetric part is -r_n r_k where n - k is even, 0 where
  odd, i.e. -(p pᵀ + q qᵀ)/2 with p = r/√θ, q_n = (-1)^n r_n/√θ; so S = A + PᵀP
  with P = [p; q]/√2 is skew-symmetric: Λ is purely imaginary.

Both normal parts are "scalar times identity plus skew", so Λ and V come
from a Hermitian eigenproblem (eigh of -i·skew): exact real parts and a
unitary V to machine precision. Conventions (shared with stage 05's
`ssmlab.core.s4`): eigenvalues in ascending order of their imaginary part,
each eigenvector's phase chosen so that the first row of P~ is real and >= 0,
which makes conjugate eigenvalues carry conjugate columns of V.

Shapes: N state size, r rank. Everything complex128 (Λ, P~, B~, V) or float64 (A, P).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ssmlab.core.hippo import transition


def nplr(A: Tensor, P: Tensor, atol: float = 1e-9) -> tuple[Tensor, Tensor, Tensor]:
    """(Λ (N,), P~ (r, N), V (N, N)) with A = V (diag Λ - P~ᵀ conj(P~)) V^*, for real A (N, N), P (r, N).

    Requires S = A + PᵀP to be (scalar · I) + skew-symmetric, as for HiPPO-LegS
    and LegT; raises ValueError naming the defect otherwise.
    """
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"A must be a square matrix (N, N), got shape {tuple(A.shape)}")
    N = A.shape[0]
    P = P.reshape(-1, N) if P.ndim == 1 else P
    if P.ndim != 2 or P.shape[1] != N:
        raise ValueError(f"P must be (r, N) with N = {N}, got shape {tuple(P.shape)}")
    A, P = A.to(torch.float64), P.to(torch.float64)
    S = A + P.T @ P
    sym = (S + S.T) / 2
    c = sym.diagonal().mean()
    defect = (sym - c * torch.eye(N, dtype=torch.float64)).abs().max().item()
    if defect > atol * max(1.0, S.abs().max().item()):
        raise ValueError(f"A + PᵀP is not (scalar · I) + skew: its symmetric part is off by {defect:.2e}")
    skew = (S - S.T) / 2
    w, V = torch.linalg.eigh(-1j * skew.to(torch.complex128))  # Hermitian: real w, ascending
    Lam = torch.complex(torch.full_like(w, c.item()), w)  # skew = V (i w) V^*
    Pt = V.conj().T @ P.T.to(torch.complex128)  # (N, r)
    phase = torch.where(Pt[:, 0].abs() > 1e-14, Pt[:, 0].abs() / Pt[:, 0], torch.ones((), dtype=torch.complex128))
    V = V * phase.conj()[None, :]  # column m rotated so that row 0 of P~ = V^* Pᵀ becomes real >= 0
    Pt = (Pt * phase[:, None]).T.contiguous()  # (r, N)
    Pt[0] = torch.complex(Pt[0].real, torch.zeros_like(Pt[0].real))  # real by construction: drop round-off
    return Lam, Pt, V


def nplr_legs(N: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """HiPPO-LegS as A = V (diag Λ - P~ P~^*) V^*: returns (Λ, P~ = V^* P, B~ = V^* B, V), complex128.

    P_n = sqrt(n + 1/2); all N modes (conjugate pairs plus, for odd N, one real
    mode -1/2). The contract stage 05's `ssmlab.core.s4.legs_nplr` relies on.
    """
    if not isinstance(N, int) or N < 1:
        raise ValueError(f"N (the state size) must be a positive int, got {N!r}")
    A, B = transition("legs", N)
    P = (torch.arange(N, dtype=torch.float64) + 0.5).sqrt()
    Lam, Pt, V = nplr(A, P[None, :])
    return Lam, Pt[0], V.conj().T @ B.to(torch.complex128), V


def nplr_legt(N: int, theta: float = 1.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """HiPPO-LegT as A = V (diag Λ - P~ᵀ conj(P~)) V^* with rank 2: (Λ (N,), P~ (2, N), B~ (N,), V)."""
    if not isinstance(N, int) or N < 1:
        raise ValueError(f"N (the state size) must be a positive int, got {N!r}")
    A, B = transition("legt", N, theta)
    n = torch.arange(N, dtype=torch.float64)
    r = (2 * n + 1).sqrt() / (2 * theta) ** 0.5
    P = torch.stack([r, (-1.0) ** n * r])  # (2, N)
    Lam, Pt, V = nplr(A, P)
    return Lam, Pt, V.conj().T @ B.to(torch.complex128), V


def dense_from_nplr(Lam: Tensor, Pt: Tensor, V: Tensor) -> Tensor:
    """Rebuild A = V (diag Λ - P~ᵀ conj(P~)) V^* (N, N), complex; P~ (N,) or (r, N)."""
    Pt = Pt.reshape(-1, Lam.shape[-1])
    return V @ (torch.diag(Lam) - Pt.T @ Pt.conj()) @ V.conj().T
