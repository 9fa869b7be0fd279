"""Cauchy and Vandermonde products: the two reductions behind S4 and S4D kernels.

Both reduce over the state index n for every output position l:

* Cauchy      ``out[..., l] = sum_n v[..., n] / (z[l] - w[..., n])``
  (S4: the generating function of a DPLR SSM at the roots of unity, Alg. 1 of
  Gu et al. 2022, "Efficiently Modeling Long Sequences with Structured State
  Spaces").
* Vandermonde ``out[..., l] = sum_n v[..., n] * exp(l * a[..., n])``
  (S4D: the kernel of a diagonal SSM, ``K_l = C diag(dA)^l dB`` with
  ``a = log dA``; Gu et al. 2022, "On the Parameterization and Initialization
  of Diagonal State Space Models", eq. 5).

Two implementations with one signature each:

* ``cauchy_ref`` / ``vandermonde_ref``: the formula, written with broadcasting.
  They materialize an ``(..., N, L)`` complex tensor (and autograd keeps it for
  the backward pass): O(N L) memory per channel.
* ``cauchy`` / ``vandermonde``: the memory-lean path. The length axis is cut
  into chunks; per chunk the ``(M, N, chunk)`` matrix of nodes (M = the
  channels of w) is built once and contracted with every v by a batched
  matrix product, and a custom autograd function recomputes the chunks in the
  backward pass instead of storing them: O(N + L) memory per channel, and the
  division (or exponential) is done once per node, not once per v.

Shapes: v, w, a are ``(..., N)`` (broadcastable against each other), z is
``(L,)``; outputs are ``(..., L)``. Inputs are complex64 or complex128
(real tensors are promoted).

Gradients of complex functions follow PyTorch's convention: for a holomorphic
f, the backward maps an output gradient g to ``g * conj(f'(x))``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor



def _complex(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex():
        return x
    if x.is_floating_point():
        return x.to(torch.complex128 if x.dtype == torch.float64 else torch.complex64)
    raise TypeError(f"{name} must be a floating or complex tensor, got {x.dtype}")


def _check_cauchy(v: Tensor, z: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    v, z, w = _complex(v, "v"), _complex(z, "z"), _complex(w, "w")
    if z.dim() != 1:
        raise ValueError(f"z must be 1-D (L,), got shape {tuple(z.shape)}")
    if v.dim() == 0 or w.dim() == 0:
        raise ValueError("v and w must have a state axis (..., N)")
    if v.shape[-1] != w.shape[-1]:
        raise ValueError(f"v and w must share the state size N, got {v.shape[-1]} and {w.shape[-1]}")
    dtype = torch.promote_types(torch.promote_types(v.dtype, z.dtype), w.dtype)
    return v.to(dtype), z.to(dtype), w.to(dtype)


def _check_vandermonde(v: Tensor, a: Tensor, L: int) -> tuple[Tensor, Tensor]:
    v, a = _complex(v, "v"), _complex(a, "a")
    if not isinstance(L, int) or L < 0:
        raise ValueError(f"L must be a non-negative int, got {L!r}")
    if v.dim() == 0 or a.dim() == 0 or v.shape[-1] != a.shape[-1]:
        raise ValueError(f"v and a must be (..., N) with the same N, got {tuple(v.shape)} and {tuple(a.shape)}")
    dtype = torch.promote_types(v.dtype, a.dtype)
    return v.to(dtype), a.to(dtype)


# ----------------------------------------------------------------------------- references


def cauchy_ref(v: Tensor, z: Tensor, w: Tensor, chunk: Optional[int] = None) -> Tensor:
    """sum_n v_n / (z_l - w_n), materializing the (..., N, L) matrix. `chunk` is ignored."""
    v, z, w = _check_cauchy(v, z, w)
    return (v.unsqueeze(-1) / (z - w.unsqueeze(-1))).sum(dim=-2)  # (..., N, L) -> (..., L)


def vandermonde_ref(v: Tensor, a: Tensor, L: int, chunk: Optional[int] = None) -> Tensor:
    """sum_n v_n exp(l a_n) for l < L, materializing the (..., N, L) matrix. `chunk` is ignored."""
    v, a = _check_vandermonde(v, a, L)
    ell = torch.arange(L, device=a.device, dtype=a.real.dtype)
    return (v.unsqueeze(-1) * torch.exp(a.unsqueeze(-1) * ell)).sum(dim=-2)  # (..., N, L) -> (..., L)


# ----------------------------------------------------------------------------- lean paths
#
# Layout: v is viewed as (K, M, N) and w (or a) as (M, N), where M collects the
# batch dims that w has (H channels) and K the extra leading dims of v only (the
# several vectors that share one set of nodes, e.g. S4's four products). The
# (M, N, chunk) matrix 1/(z - w) (or exp(l a)) is built once per chunk and
# contracted with v by a batched matrix product: no (K, M, N, L) tensor exists.


def _layout(v: Tensor, w: Tensor) -> tuple[Tensor, Tensor, torch.Size]:
    """(v3 (K, M, N), w2 (M, N), batch shape of the result)."""
    batch = torch.broadcast_shapes(v.shape[:-1], w.shape[:-1])
    nw = w.dim() - 1
    wb = batch[len(batch) - nw :] if nw else torch.Size()
    N = v.shape[-1]
    v3 = v.expand(batch + (N,)).reshape(-1, max(1, _numel(wb)), N)
    w2 = w.expand(wb + (N,)).reshape(-1, N)
    return v3, w2, batch


def _reduce_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast gradient back to `shape` (leading and size-1 axes)."""
    while grad.dim() > len(shape):
        grad = grad.sum(0)
    for i, s in enumerate(shape):
        if s == 1 and grad.shape[i] != 1:
            grad = grad.sum(i, keepdim=True)
    return grad


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _auto_chunk(chunk, M: int, N: int, L: int) -> int:
    if chunk is not None:
        return chunk
    return max(16, min(max(L, 1), (1 << 22) // max(1, M * N)))  # about 4M complex numbers per chunk


class _CauchyChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: Tensor, z: Tensor, w: Tensor, chunk) -> Tensor:
        v3, w2, batch = _layout(v, w)
        c = _auto_chunk(chunk, w2.shape[0], w2.shape[1], z.shape[0])
        out = torch.empty(v3.shape[:2] + z.shape, dtype=v.dtype, device=v.device)  # (K, M, L)
        for s in range(0, z.shape[0], c):
            r = 1.0 / (z[s : s + c] - w2.unsqueeze(-1))  # (M, N, c)
            out[..., s : s + c] = torch.einsum("kmn,mnc->kmc", v3, r)
        ctx.save_for_backward(v, z, w)
        ctx.chunk = c
        return out.reshape(batch + z.shape)

    @staticmethod
    def backward(ctx, g: Tensor):
        v, z, w = ctx.saved_tensors
        v3, w2, batch = _layout(v, w)
        g3 = g.reshape(v3.shape[:2] + z.shape)  # (K, M, L)
        need_v, need_z, need_w = ctx.needs_input_grad[:3]
        gv = torch.zeros_like(v3) if need_v else None
        gt = torch.zeros_like(v3) if need_w else None  # sum_l g conj(r^2), times conj(v) below
        gz = torch.empty_like(z) if need_z else None
        for s in range(0, z.shape[0], ctx.chunk):
            r = 1.0 / (z[s : s + ctx.chunk] - w2.unsqueeze(-1))  # (M, N, c)
            gc = g3[..., s : s + ctx.chunk]
            if need_v:  # d out_l / d v_n = r_nl
                gv += torch.einsum("kmc,mnc->kmn", gc, r.conj())
            if need_w or need_z:
                t = torch.einsum("kmc,mnc->kmn", gc, (r * r).conj()) if need_w else None
                if need_w:  # d out_l / d w_n = v_n r_nl^2
                    gt += t
                if need_z:  # d out_l / d z_l = -sum_n v_n r_nl^2
                    gz[s : s + ctx.chunk] = -torch.einsum("kmc,kmn,mnc->c", gc, v3.conj(), (r * r).conj())
        gv = _reduce_to(gv.reshape(batch + v.shape[-1:]), v.shape) if need_v else None
        gw = _reduce_to((v3.conj() * gt).reshape(batch + w.shape[-1:]), w.shape) if need_w else None
        return gv, gz, gw, None


class _VandermondeChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: Tensor, a: Tensor, L: int, chunk) -> Tensor:
        v3, a2, batch = _layout(v, a)
        c = _auto_chunk(chunk, a2.shape[0], a2.shape[1], L)
        out = torch.empty(v3.shape[:2] + (L,), dtype=v.dtype, device=v.device)
        for s in range(0, L, c):
            ell = torch.arange(s, min(s + c, L), device=a.device, dtype=a.real.dtype)
            out[..., s : s + c] = torch.einsum("kmn,mnc->kmc", v3, torch.exp(a2.unsqueeze(-1) * ell))
        ctx.save_for_backward(v, a)
        ctx.L, ctx.chunk = L, c
        return out.reshape(batch + (L,))

    @staticmethod
    def backward(ctx, g: Tensor):
        v, a = ctx.saved_tensors
        L, c = ctx.L, ctx.chunk
        v3, a2, batch = _layout(v, a)
        g3 = g.reshape(v3.shape[:2] + (L,))
        need_v, need_a = ctx.needs_input_grad[:2]
        gv, gt = torch.zeros_like(v3), torch.zeros_like(v3)
        for s in range(0, L, c):
            ell = torch.arange(s, min(s + c, L), device=a.device, dtype=a.real.dtype)
            e = torch.exp(a2.unsqueeze(-1) * ell)  # (M, N, c)
            gc = g3[..., s : s + c]
            if need_v:  # d out_l / d v_n = e_nl
                gv += torch.einsum("kmc,mnc->kmn", gc, e.conj())
            if need_a:  # d out_l / d a_n = v_n l e_nl
                gt += torch.einsum("kmc,mnc->kmn", gc, (ell * e).conj())
        gv = _reduce_to(gv.reshape(batch + v.shape[-1:]), v.shape) if need_v else None
        ga = _reduce_to((v3.conj() * gt).reshape(batch + a.shape[-1:]), a.shape) if need_a else None
        return gv, ga, None, None


def _check_chunk(chunk) -> None:
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be None (automatic) or a positive int, got {chunk!r}")


def cauchy(v: Tensor, z: Tensor, w: Tensor, chunk: Optional[int] = None) -> Tensor:
    """sum_n v_n / (z_l - w_n) holding one (M, N, chunk) block at a time, forward and backward."""
    _check_chunk(chunk)
    v, z, w = _check_cauchy(v, z, w)
    return _CauchyChunked.apply(v, z, w, chunk)


def vandermonde(v: Tensor, a: Tensor, L: int, chunk: Optional[int] = None) -> Tensor:
    """sum_n v_n exp(l a_n) for l < L holding one (M, N, chunk) block at a time, forward and backward."""
    _check_chunk(chunk)
    v, a = _check_vandermonde(v, a, L)
    return _VandermondeChunked.apply(v, a, L, chunk)
