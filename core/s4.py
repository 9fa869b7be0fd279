"""S4: structured state spaces with a diagonal-plus-low-rank (DPLR) A
(Gu, Goel, Ré 2022, "Efficiently Modeling Long Sequences with Structured State
Spaces", Algorithm 1).

HiPPO-LegS is normal plus low rank (NPLR): ``A = V (Λ - P Q^*) V^*`` with V
unitary (stage 02, ``ssmlab.core.nplr``). In the eigenbasis the SSM is
``(Λ - P Q^*, B, C)`` with Λ diagonal; here Q = P (LegS). Modes come in
conjugate pairs: the stored N' = N/2 modes and their conjugates make a
system of size N whose kernel is real.

The kernel is never computed by powering A. With the bilinear discretization
``dA = (I - Δ/2 A)^{-1} (I + Δ/2 A)``, ``dB = (I - Δ/2 A)^{-1} Δ B`` and
``C~ = C (I - dA^L)`` (the *truncated generating function*; C~ is what is
learned), the generating function at the L-th roots of unity ω is

    K^(ω) = sum_{l<L} C dA^l dB ω^l = 2/(1+ω) · C~ (g(ω) - A)^{-1} B,
    g(ω) = (2/Δ) (1-ω)/(1+ω),

and the Woodbury identity turns the inverse of the DPLR matrix into four
Cauchy products with R(ω) = (g(ω) - Λ)^{-1}:

    K^ = 2/(1+ω) [ C~ R B - C~ R P (1 + Q^* R P)^{-1} Q^* R B ].

An inverse FFT of K^ gives K. At ω = -1 (even L), g is infinite and the limit
is exact: K^(-1) = Δ/2 · C~ B. Work is O(N L) per channel and, with the lean
Cauchy product, O(N + L) memory.

C~ is tied to one length, ``l_max``: the layer always computes the kernel
of length l_max and cuts it to the input's length, so inputs of any length up
to l_max see the same filter (longer ones get the kernel of their own length).

The recurrent step mode rebuilds the dense system of size N (O(N^2) per
step): C = C~ (I - dA^L)^{-1} for the length L the kernel is used at.

Shapes: B batch, H channels, N state size, N' = N/2 stored modes, r rank of
the low-rank term, L length, L' = L//2 + 1 frequencies, c kernel copies.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ssmlab.core.cauchy import cauchy, cauchy_ref
from ssmlab.core.discretize import bilinear
from ssmlab.core.nplr import nplr_legs
from ssmlab.core.s4d import SSMConv


def legs_nplr(N: int, return_V: bool = False):
    """(Λ, P, B): the N/2 modes of HiPPO-LegS's NPLR form with positive imaginary part (stage 02).

    Λ (N',), P (r=1, N'), B (N',), complex128, all in the eigenbasis V
    (``ssmlab.core.nplr.nplr_legs``); with `return_V` also V (N, N'), whose
    columns and their conjugates form the full unitary basis.
    """
    if not isinstance(N, int) or N < 2 or N % 2:
        raise ValueError(f"N must be an even int >= 2, got {N!r}")
    Lam, P, B, V = nplr_legs(N)
    order = torch.argsort(Lam.imag, descending=True)[: N // 2]  # one mode of each conjugate pair
    out = (Lam[order], P.reshape(-1, N)[:, order], B[order])
    return out + (V[:, order],) if return_V else out


def _full(x: Tensor) -> Tensor:
    """Stored modes and their conjugates along the last axis: (..., N') -> (..., N)."""
    return torch.cat([x, x.conj()], dim=-1)


def dplr_dense(Lam: Tensor, P: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """The dense size-N system of conjugate pairs: A = diag(Λ) - P P^* (H, N, N), B (H, N)."""
    Lf, Pf = _full(Lam), _full(P)  # (H, N), (r, H, N)
    A = torch.diag_embed(Lf) - torch.einsum("rhm,rhn->hmn", Pf, Pf.conj())
    return A, _full(B)


def bilinear_dense(A: Tensor, B: Tensor, dt: Tensor) -> tuple[Tensor, Tensor]:
    """dA = (I - Δ/2 A)^{-1}(I + Δ/2 A), dB = (I - Δ/2 A)^{-1} Δ B (stage 01); A (H, N, N), B (H, N), dt (H,)."""
    dA, dB = bilinear(A, B.unsqueeze(-1), dt.to(A.real.dtype))
    return dA, dB.squeeze(-1)


def s4_kernel(Lam: Tensor, P: Tensor, B: Tensor, Ct: Tensor, dt: Tensor, L: int, lean: bool = True) -> Tensor:
    """Algorithm 1: the kernel (c, H, L) of the DPLR SSM by Cauchy products, Woodbury and an inverse FFT.

    Lam (H, N'), P (r, H, N'), B (H, N'), Ct = C~ (c, H, N') complex; dt (H,) real.
    """
    if L < 1:
        raise ValueError(f"L must be >= 1, got {L}")
    cdtype = Lam.dtype
    freqs = torch.arange(L // 2 + 1, device=Lam.device)
    omega = torch.exp(-2j * math.pi * freqs.to(torch.float64) / L).to(cdtype)  # (L',)
    nyquist = freqs * 2 == L  # ω = -1: handled by its exact limit below
    omega_safe = torch.where(nyquist, torch.zeros_like(omega), omega)
    z = 2 * (1 - omega_safe) / (1 + omega_safe)  # g(ω) Δ, so R = Δ / (z - Δ Λ)
    w = dt.unsqueeze(-1) * Lam  # (H, N')
    c, r = Ct.shape[0], P.shape[0]
    # v-vectors of the four products, stacked: C~B (c), C~P (c, r), P^*B (r), P^*P (r, r)
    v = torch.cat([
        Ct * B,
        (Ct.unsqueeze(1) * P).flatten(0, 1),
        P.conj() * B,
        (P.conj().unsqueeze(1) * P).flatten(0, 1),
    ])  # (c + c r + r + r r, H, N')
    product = cauchy if lean else cauchy_ref
    k = product(_full(v), z, _full(w)) * dt.unsqueeze(-1)  # (., H, L') = sum over all N modes of v R
    k00 = k[:c]  # (c, H, L')
    k01 = k[c : c + c * r].unflatten(0, (c, r)).movedim(1, -1)  # (c, H, L', r)
    k10 = k[c + c * r : c + c * r + r].movedim(0, -1)  # (H, L', r)
    k11 = k[c + c * r + r :].unflatten(0, (r, r)).movedim((0, 1), (-2, -1))  # (H, L', r, r)
    eye = torch.eye(r, dtype=cdtype, device=Lam.device)
    corr = torch.linalg.solve(eye + k11, k10.unsqueeze(-1)).squeeze(-1)  # (1 + Q^*RP)^{-1} Q^*RB: (H, L', r)
    Khat = k00 - (k01 * corr).sum(-1)  # (c, H, L')
    Khat = Khat * 2 / (1 + omega_safe)
    limit = dt * (_full(Ct * B).sum(-1)) / 2  # K^(-1) = Δ/2 C~ B: (c, H)
    Khat = torch.where(nyquist, limit.unsqueeze(-1), Khat)
    return torch.fft.irfft(Khat, n=L)  # (c, H, L)


class S4Kernel(nn.Module):
    """Learnable DPLR SSM of H channels initialized from HiPPO-LegS; `forward(L)` gives (c, H, L)."""

    def __init__(self, H: int, N: int = 64, channels: int = 1, dt_min: float = 1e-3, dt_max: float = 1e-1,
                 l_max: int = 1024, lean: bool = True):
        super().__init__()
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        Lam, P, B = legs_nplr(N)
        self.H, self.N, self.l_max, self.lean = H, N, l_max, lean
        log_dt = torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        self.log_dt = nn.Parameter(log_dt)
        self.A_log = nn.Parameter(torch.log(-Lam.real).float().repeat(H, 1))  # Re Λ = -exp(A_log) < 0
        self.A_imag = nn.Parameter(Lam.imag.float().repeat(H, 1))
        self.P = nn.Parameter(torch.view_as_real(P.to(torch.complex64).unsqueeze(1).repeat(1, H, 1)).clone())
        self.B = nn.Parameter(torch.view_as_real(B.to(torch.complex64).repeat(H, 1)).clone())
        Ct = torch.randn(channels, H, N // 2, dtype=torch.complex64) * 0.5**0.5
        self.C = nn.Parameter(torch.view_as_real(Ct).clone())  # C~, the truncated generating function's C
        for p in (self.log_dt, self.A_log, self.A_imag, self.P, self.B):
            p._no_weight_decay = True
            p._ssm_param = True  # their own lr when TrainConfig.ssm_lr > 0

    def params(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(Λ (H, N'), P (r, H, N'), B (H, N'), C~ (c, H, N'), Δ (H,))."""
        Lam = torch.complex(-torch.exp(self.A_log), self.A_imag)
        vc = torch.view_as_complex
        return Lam, vc(self.P), vc(self.B), vc(self.C), torch.exp(self.log_dt)

    def forward(self, L: int) -> Tensor:
        """The kernel of length l_max, cut to L (C~ belongs to l_max: a shorter input sees the same filter)."""
        Lam, P, B, Ct, dt = self.params()
        return s4_kernel(Lam, P, B, Ct, dt, max(L, self.l_max), self.lean)[..., :L]

    def step_params(self, L: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
        """Dense (dA (H, N, N), dB (H, N), C (c, H, N)) with C = C~ (I - dA^L)^{-1}, L = l_max by default."""
        L = self.l_max if L is None else L
        Lam, P, B, Ct, dt = self.params()
        A, Bf = dplr_dense(Lam, P, B)
        dA, dB = bilinear_dense(A, Bf, dt)
        eye = torch.eye(self.N, dtype=dA.dtype, device=dA.device)
        M = eye - torch.linalg.matrix_power(dA, L)  # (H, N, N)
        C = torch.linalg.solve(M.transpose(-1, -2), _full(Ct).unsqueeze(-1)).squeeze(-1)  # C M = C~
        return dA, dB, C

    def default_state(self, batch: int) -> Tensor:
        return torch.zeros(batch, self.H, self.N, dtype=torch.complex64, device=self.C.device)

    def step(self, u: Tensor, state: Tensor, cache: Optional[tuple] = None) -> tuple[Tensor, Tensor]:
        """x <- dA x + dB u, y = Re(C x): u (B, H), state (B, H, N) -> y (B, H), state."""
        dA, dB, C = cache if cache is not None else self.step_params()
        state = torch.einsum("hmn,bhn->bhm", dA.to(state.dtype), state) + dB.to(state.dtype) * u.unsqueeze(-1)
        return (C[0].to(state.dtype) * state).sum(-1).real, state


def s4_layer(H: int, N: int = 64, bidirectional: bool = False, dropout: float = 0.0, dt_min: float = 1e-3,
             dt_max: float = 1e-1, l_max: int = 1024, lean: bool = True) -> SSMConv:
    """An S4 layer on (B, L, H)."""
    kernel = S4Kernel(H, N, channels=2 if bidirectional else 1, dt_min=dt_min, dt_max=dt_max, l_max=l_max, lean=lean)
    return SSMConv(kernel, H, bidirectional, dropout)
