"""The discrete linear time-invariant (LTI) SSM and its two computation modes.

    x_k = Ā x_{k-1} + B̄ u_k,    y_k = C x_k + D u_k,    x_{-1} = 0

* recurrent: run the recurrence step by step. O(L N^2) work, L sequential
  steps, O(N) memory: the mode for streaming inference (`ssm_step`).
* convolutional: unroll the recurrence. With x_{-1} = 0,
      y_k = sum_{j=0..k} C Ā^j B̄ u_{k-j} + D u_k,
  a causal convolution of u with the kernel
      K = (C B̄, C Ā B̄, C Ā^2 B̄, ..., C Ā^{L-1} B̄)       (S4 paper, eq. 4-5)
  computed once, then applied by FFT in O(L log L): the mode for training,
  where the whole sequence is known in advance.

Both give the same y; the tests of stage 01 check it to 1e-10 in float64.

Each channel is single-input single-output (SISO); ``...`` are batch dims,
typically H channels, broadcast together:

    Ā (..., N, N),  B̄ (..., N),  C (..., N),  D (...) or None,  u (..., L),  K (..., L)

Fast paths and their readable twins, same signatures:
`ssm_kernel` (powers of Ā by doubling, O(log L) matmuls, O(N sqrt L) memory) / `ssm_kernel_ref`
(one matrix-vector product per step); `causal_conv` (FFT) / `causal_conv_ref`
(the sum above, O(L^2)).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def _check_system(Ad: Tensor, Bd: Tensor, C: Tensor) -> int:
    if Ad.ndim < 2 or Ad.shape[-1] != Ad.shape[-2]:
        raise ValueError(f"Ad must be a square matrix (..., N, N), got shape {tuple(Ad.shape)}")
    N = Ad.shape[-1]
    for name, t in (("Bd", Bd), ("C", C)):
        if t.ndim < 1 or t.shape[-1] != N:
            raise ValueError(f"{name} must be (..., N) with N = {N} (Ad is {tuple(Ad.shape)}), got {tuple(t.shape)}")
    return N


def _check_length(L: int) -> None:
    if not isinstance(L, int) or L < 1:
        raise ValueError(f"L (the kernel length) must be a positive int, got {L!r}")


# ----------------------------------------------------------------------------- the kernel K


def ssm_kernel_ref(Ad: Tensor, Bd: Tensor, C: Tensor, L: int) -> Tensor:
    """K_l = C Ā^l B̄ for l = 0..L-1, one matrix-vector product per step. -> (..., L)."""
    _check_system(Ad, Bd, C)
    _check_length(L)
    v, out = Bd, []
    for _ in range(L):
        out.append((C * v).sum(-1))
        v = (Ad @ v.unsqueeze(-1)).squeeze(-1)  # Ā^{l+1} B̄
    return torch.stack(out, dim=-1)


def _krylov(P: Tensor, X: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """[X, P X, P^2 X, ..., P^{n-1} X] along the last axis by doubling, and P^{n'} (n' >= n columns made).

    P (..., N, N), X (..., N, 1) -> (..., N, n). ceil(log2 n) matrix products.
    """
    while X.shape[-1] < n:
        X = torch.cat([X, P @ X], dim=-1)  # [X_k, P^k X_k]
        if X.shape[-1] < n:
            P = P @ P  # P^{2k}
    return X[..., :n], P


def ssm_kernel(Ad: Tensor, Bd: Tensor, C: Tensor, L: int) -> Tensor:
    """Same as `ssm_kernel_ref`, in O(log L) matrix products and O(N sqrt L) memory per channel.

    Write l = i + j s with s = ceil(sqrt L), 0 <= i < s. Then
    K_l = C Ā^l B̄ = (C Ā^{j s}) (Ā^i B̄): a (J, N) @ (N, s) product whose
    J·s >= L entries, read row by row, are K. Both factors are built by
    doubling: [v, Ā v, ..., Ā^{k-1} v] -> [.., Ā^k (..)] with Ā^{2k} = (Ā^k)^2.
    """
    N = _check_system(Ad, Bd, C)
    _check_length(L)
    batch = torch.broadcast_shapes(Ad.shape[:-2], Bd.shape[:-1], C.shape[:-1])
    s = math.isqrt(L - 1) + 1  # ceil(sqrt(L))
    J = -(-L // s)  # ceil(L / s)
    right, _ = _krylov(Ad, Bd.expand(*batch, N).unsqueeze(-1), s)  # (..., N, s): Ā^i B̄
    As = torch.linalg.matrix_power(Ad, s)  # Ā^s
    left, _ = _krylov(As.transpose(-1, -2), C.expand(*batch, N).unsqueeze(-1), J)  # (..., N, J): (C Ā^{js})ᵀ
    K = left.transpose(-1, -2) @ right  # (..., J, s)
    return K.flatten(-2)[..., :L]


# ----------------------------------------------------------------------------- causal convolution


def causal_conv_ref(u: Tensor, K: Tensor) -> Tensor:
    """y_k = sum_{j=0..k} K_j u_{k-j} over the last axis, directly. u (..., L), K (..., Lk) -> (..., L)."""
    L = u.shape[-1]
    y = torch.zeros(torch.broadcast_shapes(u.shape[:-1], K.shape[:-1]) + (L,), dtype=torch.result_type(u, K),
                    device=u.device)
    for j in range(min(L, K.shape[-1])):
        y = y + torch.nn.functional.pad(u[..., : L - j], (j, 0)) * K[..., j : j + 1]
    return y


def causal_conv(u: Tensor, K: Tensor) -> Tensor:
    """Causal convolution by FFT over the last axis, O(L log L). u (..., L), K (..., Lk) -> (..., L).

    Zero-padding both to n >= L + min(L, Lk) - 1 turns the FFT's circular
    convolution into a linear one; the first L outputs are the causal ones.
    Batch dims of u and K broadcast. Real inputs give real outputs.
    """
    if u.ndim < 1 or K.ndim < 1:
        raise ValueError(f"u and K need a last (length) axis, got shapes {tuple(u.shape)} and {tuple(K.shape)}")
    L = u.shape[-1]
    K = K[..., :L]
    n = L + K.shape[-1] - 1
    n = 1 << max(n - 1, 0).bit_length()  # next power of two: fast FFT sizes
    if u.is_complex() or K.is_complex():
        y = torch.fft.ifft(torch.fft.fft(u, n=n) * torch.fft.fft(K, n=n), n=n)
    else:
        y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(K, n=n), n=n)
    return y[..., :L]


# ----------------------------------------------------------------------------- the two modes


def ssm_step(Ad: Tensor, Bd: Tensor, C: Tensor, x: Tensor, u_t: Tensor,
             D: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """One step with an explicit state: x (..., N), u_t (...) -> (y_t (...), new x (..., N)).

    Streaming: start from ``x = zeros(..., N)`` and feed inputs one at a time.
    """
    x = (Ad @ x.unsqueeze(-1)).squeeze(-1) + Bd * u_t.unsqueeze(-1)  # x_k = Ā x_{k-1} + B̄ u_k
    y = (C * x).sum(-1)  # y_k = C x_k
    if D is not None:
        y = y + D * u_t
    return y, x


def ssm_recurrent(Ad: Tensor, Bd: Tensor, C: Tensor, u: Tensor, D: Optional[Tensor] = None,
                  x0: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Recurrent mode: L calls of `ssm_step`. u (..., L) -> (y (..., L), final state (..., N))."""
    N = _check_system(Ad, Bd, C)
    batch = torch.broadcast_shapes(Ad.shape[:-2], Bd.shape[:-1], C.shape[:-1], u.shape[:-1])
    dtype = torch.result_type(Ad, u)
    x = torch.zeros(*batch, N, dtype=dtype, device=u.device) if x0 is None else x0
    ys = []
    for t in range(u.shape[-1]):
        y, x = ssm_step(Ad, Bd, C, x, u[..., t], D)
        ys.append(y)
    return torch.stack(ys, dim=-1), x


def ssm_convolutional(Ad: Tensor, Bd: Tensor, C: Tensor, u: Tensor, D: Optional[Tensor] = None) -> Tensor:
    """Convolutional mode (zero initial state): y = causal_conv(u, K) + D u. u (..., L) -> (..., L)."""
    K = ssm_kernel(Ad, Bd, C, u.shape[-1])
    y = causal_conv(u, K)
    return y if D is None else y + D.unsqueeze(-1) * u
