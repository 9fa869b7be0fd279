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
  into chunks of ``chunk`` positions, so at most ``(..., N, chunk)`` lives at
  once, and a custom autograd function recomputes the chunks in the backward
  pass instead of storing them: O(N + L) memory per channel.

Shapes: v, w, a are ``(..., N)`` (broadcastable against each other), z is
``(L,)``; outputs are ``(..., L)``. Inputs are complex64 or complex128
(real tensors are promoted).

Gradients of complex functions follow PyTorch's convention: for a holomorphic
f, the backward maps an output gradient g to ``g * conj(f'(x))``.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_CHUNK = 1024  # positions per chunk: (..., N, 1024) complex at a time


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


def cauchy_ref(v: Tensor, z: Tensor, w: Tensor, chunk: int = DEFAULT_CHUNK) -> Tensor:
    """sum_n v_n / (z_l - w_n), materializing the (..., N, L) matrix. `chunk` is ignored."""
    v, z, w = _check_cauchy(v, z, w)
    return (v.unsqueeze(-1) / (z - w.unsqueeze(-1))).sum(dim=-2)  # (..., N, L) -> (..., L)


def vandermonde_ref(v: Tensor, a: Tensor, L: int, chunk: int = DEFAULT_CHUNK) -> Tensor:
    """sum_n v_n exp(l a_n) for l < L, materializing the (..., N, L) matrix. `chunk` is ignored."""
    v, a = _check_vandermonde(v, a, L)
    ell = torch.arange(L, device=a.device, dtype=a.real.dtype)
    return (v.unsqueeze(-1) * torch.exp(a.unsqueeze(-1) * ell)).sum(dim=-2)  # (..., N, L) -> (..., L)


# ----------------------------------------------------------------------------- lean paths


def _reduce_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast gradient back to `shape` (leading and size-1 axes)."""
    while grad.dim() > len(shape):
        grad = grad.sum(0)
    for i, s in enumerate(shape):
        if s == 1 and grad.shape[i] != 1:
            grad = grad.sum(i, keepdim=True)
    return grad


class _CauchyChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: Tensor, z: Tensor, w: Tensor, chunk: int) -> Tensor:
        batch = torch.broadcast_shapes(v.shape[:-1], w.shape[:-1])
        out = torch.empty(batch + z.shape, dtype=v.dtype, device=v.device)
        vv, ww = v.unsqueeze(-1), w.unsqueeze(-1)  # (..., N, 1)
        for s in range(0, z.shape[0], chunk):
            out[..., s : s + chunk] = (vv / (z[s : s + chunk] - ww)).sum(-2)
        ctx.save_for_backward(v, z, w)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        v, z, w = ctx.saved_tensors
        chunk = ctx.chunk
        need_v, need_z, need_w = ctx.needs_input_grad[:3]
        vv, ww = v.unsqueeze(-1), w.unsqueeze(-1)
        batch = g.shape[:-1]
        gv = torch.zeros(batch + v.shape[-1:], dtype=v.dtype, device=v.device) if need_v else None
        gw = torch.zeros(batch + w.shape[-1:], dtype=v.dtype, device=v.device) if need_w else None
        gz = torch.empty_like(z) if need_z else None
        for s in range(0, z.shape[0], chunk):
            r = 1.0 / (z[s : s + chunk] - ww)  # (..., N, c)
            gc = g[..., s : s + chunk].unsqueeze(-2)  # (..., 1, c)
            if need_v:  # d/dv_n = r
                gv += (gc * r.conj()).sum(-1)
            if need_w or need_z:
                r2 = (vv * r * r).conj()  # d/dw_n = v_n r^2 = -d/dz_l
                if need_w:
                    gw += (gc * r2).sum(-1)
                if need_z:
                    gz[s : s + chunk] = -(gc * r2).sum(-2).reshape(-1, r2.shape[-1]).sum(0)
        gv = _reduce_to(gv, v.shape) if need_v else None
        gw = _reduce_to(gw, w.shape) if need_w else None
        return gv, gz, gw, None


class _VandermondeChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: Tensor, a: Tensor, L: int, chunk: int) -> Tensor:
        batch = torch.broadcast_shapes(v.shape[:-1], a.shape[:-1])
        out = torch.empty(batch + (L,), dtype=v.dtype, device=v.device)
        vv, aa = v.unsqueeze(-1), a.unsqueeze(-1)
        for s in range(0, L, chunk):
            ell = torch.arange(s, min(s + chunk, L), device=a.device, dtype=a.real.dtype)
            out[..., s : s + chunk] = (vv * torch.exp(aa * ell)).sum(-2)
        ctx.save_for_backward(v, a)
        ctx.L, ctx.chunk = L, chunk
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        v, a = ctx.saved_tensors
        L, chunk = ctx.L, ctx.chunk
        need_v, need_a = ctx.needs_input_grad[:2]
        vv, aa = v.unsqueeze(-1), a.unsqueeze(-1)
        batch = g.shape[:-1]
        gv = torch.zeros(batch + v.shape[-1:], dtype=v.dtype, device=v.device)
        ga = torch.zeros(batch + a.shape[-1:], dtype=v.dtype, device=v.device)
        for s in range(0, L, chunk):
            ell = torch.arange(s, min(s + chunk, L), device=a.device, dtype=a.real.dtype)
            e = torch.exp(aa * ell)  # (..., N, c)
            gc = g[..., s : s + chunk].unsqueeze(-2)
            if need_v:  # d/dv_n = e
                gv += (gc * e.conj()).sum(-1)
            if need_a:  # d/da_n = v_n l e
                ga += (gc * (vv * ell * e).conj()).sum(-1)
        return (_reduce_to(gv, v.shape) if need_v else None), (_reduce_to(ga, a.shape) if need_a else None), None, None


def cauchy(v: Tensor, z: Tensor, w: Tensor, chunk: int = DEFAULT_CHUNK) -> Tensor:
    """sum_n v_n / (z_l - w_n) with at most (..., N, chunk) in memory, forward and backward."""
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    v, z, w = _check_cauchy(v, z, w)
    return _CauchyChunked.apply(v, z, w, chunk)


def vandermonde(v: Tensor, a: Tensor, L: int, chunk: int = DEFAULT_CHUNK) -> Tensor:
    """sum_n v_n exp(l a_n) for l < L with at most (..., N, chunk) in memory, forward and backward."""
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    v, a = _check_vandermonde(v, a, L)
    return _VandermondeChunked.apply(v, a, L, chunk)
