"""The linear-recurrence scan h_t = a_t * h_{t-1} + b_t, h_{-1} = h0.

Implementations with one signature ``(a, b, h0=None) -> h``, all built on the
one associative operator `compose`:

* `linear_scan_ref`: the definition, a sequential loop. Readable, float64 capable.
  O(L) work, O(L) depth.
* `linear_scan_hillis_steele`: Hillis and Steele's scan: at level k every
  element composes with the one 2^k steps back. O(L log L) work, O(log L) depth.
* `linear_scan_blelloch`: Blelloch's work-efficient parallel scan (up-sweep,
  down-sweep): O(L) work, O(log L) depth, in vectorised PyTorch.
* `linear_scan_chunked`: sequential inside chunks of T steps (all chunks at
  once), a sequential scan over the L/T chunk carries, then a fix-up.
  O(L) work, O(T + L/T) depth: the shape of the fused CPU/GPU kernels.
* `linear_scan`: the dispatcher. It validates its inputs, then runs the native
  C++ or CUDA kernel through the custom op ``ssmlab::linear_scan`` (so autograd
  and `torch.compile` see one opaque, differentiable op), or the reference
  where no native backend exists.

Why a scan works: each step is the affine map h -> a h + b, and affine maps
compose associatively, (a1, b1) then (a2, b2) is (a1 a2, a2 b1 + b2). Any
bracketing of the composition gives the same states, so the recurrence can be
evaluated as a tree instead of a chain.

Shapes: a, b are (..., L) (the native kernels take (B, C, L)); h0 is (...).
Inputs may be float32, float16, bfloat16 or float64; the state is accumulated
in float32 (float64 for float64 inputs) and the result has the input dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ssmlab.core import native

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating type accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def compose(first: tuple[Tensor, Tensor], second: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """The associative operator: apply `first`, then `second` (elementwise affine maps)."""
    (a1, b1), (a2, b2) = first, second
    return a1 * a2, a2 * b1 + b2


def linear_scan_ref(a: Tensor, b: Tensor, h0: Optional[Tensor] = None) -> Tensor:
    """Sequential reference: h_t = a_t h_{t-1} + b_t, one step at a time."""
    acc = accumulation_dtype(b.dtype)
    h = torch.zeros(b.shape[:-1], dtype=acc, device=b.device) if h0 is None else h0.to(acc)
    out = []
    for t in range(b.shape[-1]):
        h = a[..., t].to(acc) * h + b[..., t].to(acc)
        out.append(h)
    if not out:
        return torch.empty_like(b)
    return torch.stack(out, dim=-1).to(b.dtype)


def linear_scan_blelloch(a: Tensor, b: Tensor, h0: Optional[Tensor] = None) -> Tensor:
    """Blelloch's work-efficient scan over the last axis.

    Up-sweep: compose neighbouring pairs level by level into a reduction tree
    (L/2 + L/4 + ... compositions). Down-sweep: push exclusive prefixes back
    down; a left child inherits its parent's prefix, a right child gets the
    parent's prefix composed with its left sibling. Total O(L) work, 2 log2 L
    levels. The length is padded to a power of two with the identity map (1, 0).
    """
    acc = accumulation_dtype(b.dtype)
    A, B = a.to(acc).expand_as(b), b.to(acc)
    L = B.shape[-1]
    if L == 0:
        return torch.empty_like(b)
    if h0 is not None:  # fold the initial state into the first step: b_0 <- a_0 h0 + b_0
        B = torch.cat([(A[..., :1] * h0.to(acc).unsqueeze(-1) + B[..., :1]), B[..., 1:]], dim=-1)
    n = 1 << (L - 1).bit_length()
    if n != L:
        pad = B.shape[:-1] + (n - L,)
        A = torch.cat([A, A.new_ones(pad)], dim=-1)
        B = torch.cat([B, B.new_zeros(pad)], dim=-1)

    tree = [(A, B)]
    while tree[-1][0].shape[-1] > 1:  # up-sweep
        la, lb = tree[-1]
        tree.append(compose((la[..., 0::2], lb[..., 0::2]), (la[..., 1::2], lb[..., 1::2])))

    pa, pb = torch.ones_like(tree[-1][0]), torch.zeros_like(tree[-1][1])  # exclusive prefix of the root
    for la, lb in reversed(tree[:-1]):  # down-sweep
        left = (la[..., 0::2], lb[..., 0::2])
        ra, rb = compose((pa, pb), left)
        pa = torch.stack([pa, ra], dim=-1).flatten(-2)
        pb = torch.stack([pb, rb], dim=-1).flatten(-2)
    # Inclusive state = exclusive prefix applied to h = 0, then this step.
    _, h = compose((pa, pb), (A, B))
    return h[..., :L].to(b.dtype)


def _fold_h0(A: Tensor, B: Tensor, h0: Optional[Tensor]) -> Tensor:
    """Fold the initial state into the first step: b_0 <- a_0 h0 + b_0."""
    if h0 is None:
        return B
    return torch.cat([A[..., :1] * h0.to(B.dtype).unsqueeze(-1) + B[..., :1], B[..., 1:]], dim=-1)


def linear_scan_hillis_steele(a: Tensor, b: Tensor, h0: Optional[Tensor] = None) -> Tensor:
    """Hillis and Steele's inclusive scan over the last axis.

    After level k, element t holds the composition of steps (t - 2^k, t]; the
    next level composes it with element t - 2^k (or the identity (1, 0) before
    the start). log2 L levels of L compositions each: O(L log L) work, but
    every level is one fully parallel elementwise op.
    """
    acc = accumulation_dtype(b.dtype)
    A, B = a.to(acc).expand_as(b), b.to(acc)
    L = B.shape[-1]
    if L == 0:
        return torch.empty_like(b)
    B = _fold_h0(A, B, h0)
    step = 1
    while step < L:
        pad = B.shape[:-1] + (step,)
        earlier = (torch.cat([A.new_ones(pad), A[..., :-step]], dim=-1), torch.cat([B.new_zeros(pad), B[..., :-step]], dim=-1))
        A, B = compose(earlier, (A, B))
        step *= 2
    return B.to(b.dtype)


def linear_scan_chunked(a: Tensor, b: Tensor, h0: Optional[Tensor] = None, chunk_len: Optional[int] = None) -> Tensor:
    """Chunked scan: sequential inside chunks, carry across chunks.

    1. Within each chunk of T steps, scan sequentially from the identity,
       all chunks at once: local prefixes (P_t, Q_t) with h_t = P_t h_start + Q_t.
    2. Scan the L/T chunk totals sequentially to get each chunk's start state.
    3. Fix up: h_t = P_t h_start + Q_t.
    O(L) work, O(T + L/T) depth; T defaults to about sqrt(L), which balances the two.
    """
    acc = accumulation_dtype(b.dtype)
    A, B = a.to(acc).expand_as(b), b.to(acc)
    L = B.shape[-1]
    if L == 0:
        return torch.empty_like(b)
    T = chunk_len if chunk_len is not None else max(1, round(L**0.5))
    if T < 1:
        raise ValueError(f"linear_scan_chunked: chunk_len must be >= 1, got {T}")
    n = -(-L // T)
    if n * T != L:  # pad with the identity map (1, 0)
        pad = B.shape[:-1] + (n * T - L,)
        A, B = torch.cat([A, A.new_ones(pad)], dim=-1), torch.cat([B, B.new_zeros(pad)], dim=-1)
    A, B = A.unflatten(-1, (n, T)), B.unflatten(-1, (n, T))  # (..., n, T)

    P, Q, Ps, Qs = A[..., 0], B[..., 0], [A[..., 0]], [B[..., 0]]
    for t in range(1, T):  # 1. local prefixes, every chunk in parallel
        P, Q = compose((P, Q), (A[..., t], B[..., t]))
        Ps.append(P)
        Qs.append(Q)
    P, Q = torch.stack(Ps, dim=-1), torch.stack(Qs, dim=-1)

    h = torch.zeros(B.shape[:-2], dtype=acc, device=B.device) if h0 is None else h0.to(acc)
    starts = []
    for c in range(n):  # 2. carries across chunks, sequential
        starts.append(h)
        _, h = compose((torch.ones_like(h), h), (P[..., c, -1], Q[..., c, -1]))  # a state is the map (1, h)
    start = torch.stack(starts, dim=-1).unsqueeze(-1)  # (..., n, 1)
    _, out = compose((torch.ones_like(start), start), (P, Q))  # 3. fix-up
    return out.flatten(-2)[..., :L].to(b.dtype)


# ---------------------------------------------------------------------------
# Validation (all of it here, before any pointer reaches native code)
# ---------------------------------------------------------------------------


def check_scan_inputs(a: Tensor, b: Tensor, h0: Optional[Tensor]) -> None:
    """Raise a clear TypeError/ValueError for anything the kernels cannot take."""
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, Tensor):
            raise TypeError(f"linear_scan: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"linear_scan: {name} has dtype {t.dtype}; supported: {', '.join(map(str, SUPPORTED_DTYPES))}")
    if b.dim() != 3:
        raise ValueError(f"linear_scan: b must be (batch, channels, length), got shape {tuple(b.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"linear_scan: a has shape {tuple(a.shape)} but b has shape {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"linear_scan: a is {a.dtype} but b is {b.dtype}; pass both in one dtype")
    if a.device != b.device:
        raise ValueError(f"linear_scan: a is on {a.device} but b is on {b.device}")
    if h0 is not None:
        if not isinstance(h0, Tensor):
            raise TypeError(f"linear_scan: h0 must be a torch.Tensor or None, got {type(h0).__name__}")
        if h0.shape != b.shape[:2]:
            raise ValueError(f"linear_scan: h0 must be (batch, channels) = {tuple(b.shape[:2])}, got {tuple(h0.shape)}")
        if h0.device != b.device:
            raise ValueError(f"linear_scan: h0 is on {h0.device} but b is on {b.device}")
        if not h0.is_floating_point():
            raise TypeError(f"linear_scan: h0 must be floating point, got {h0.dtype}")


def _unit_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _params(a: Tensor, b: Tensor, h0: Optional[Tensor], out: Tensor):
    p = native.native_module().LinearScanParams()
    p.batch, p.channels, p.length = b.shape
    p.dtype = native.DTYPE_CODES[b.dtype]
    p.a, p.a_stride = a.data_ptr(), (a.stride(0), a.stride(1))
    p.b, p.b_stride = b.data_ptr(), (b.stride(0), b.stride(1))
    p.out, p.out_stride = out.data_ptr(), (out.stride(0), out.stride(1))
    p.h0 = 0 if h0 is None else h0.data_ptr()
    return p


def _run(kind: str, device: torch.device, p) -> None:
    fn = getattr(native.native_module(), f"linear_scan_{kind}_{'cuda' if device.type == 'cuda' else 'cpu'}")
    native.run_kernel(fn, device, p)


@torch.library.custom_op("ssmlab::linear_scan", mutates_args=())
def _linear_scan_op(a: Tensor, b: Tensor, h0: Optional[Tensor]) -> Tensor:
    a, b = _unit_stride(a), _unit_stride(b)
    out = torch.empty(b.shape, dtype=b.dtype, device=b.device)
    _run("fwd", b.device, _params(a, b, h0, out))
    return out


@_linear_scan_op.register_fake
def _(a: Tensor, b: Tensor, h0: Optional[Tensor]) -> Tensor:
    return torch.empty(b.shape, dtype=b.dtype, device=b.device)


@torch.library.custom_op("ssmlab::linear_scan_backward", mutates_args=())
def _linear_scan_backward_op(a: Tensor, out: Tensor, h0: Optional[Tensor], grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    a, grad_out = _unit_stride(a), grad_out.contiguous()
    grad_a, grad_b = torch.empty_like(grad_out), torch.empty_like(grad_out)
    grad_h0 = torch.empty(out.shape[:2], dtype=accumulation_dtype(out.dtype), device=out.device)
    p = _params(a, out, h0, out)
    p.grad_out, p.grad_a, p.grad_b, p.grad_h0 = grad_out.data_ptr(), grad_a.data_ptr(), grad_b.data_ptr(), grad_h0.data_ptr()
    _run("bwd", out.device, p)
    return grad_a, grad_b, grad_h0


@_linear_scan_backward_op.register_fake
def _(a: Tensor, out: Tensor, h0: Optional[Tensor], grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.empty(out.shape, dtype=out.dtype, device=out.device)
    return g, torch.empty_like(g), out.new_empty(out.shape[:2], dtype=accumulation_dtype(out.dtype))


def _setup_context(ctx, inputs, output):
    a, _, h0 = inputs
    ctx.save_for_backward(a, output, h0)


def _backward(ctx, grad_out):
    a, out, h0 = ctx.saved_tensors
    grad_a, grad_b, grad_h0 = _linear_scan_backward_op(a, out, h0, grad_out)
    return grad_a, grad_b, grad_h0 if h0 is not None else None


_linear_scan_op.register_autograd(_backward, setup_context=_setup_context)


# The pure-PyTorch parallel scans, by backend name.
PYTORCH_SCANS = {
    "hillis_steele": linear_scan_hillis_steele,
    "blelloch": linear_scan_blelloch,
    "chunked": linear_scan_chunked,
}


def linear_scan(a: Tensor, b: Tensor, h0: Optional[Tensor] = None, *, backend: str = "auto") -> Tensor:
    """h_t = a_t h_{t-1} + b_t over the last axis of (batch, channels, length) tensors.

    backend: 'auto' (native CUDA/CPU kernel where available, else the reference),
    'cuda', 'cpu', 'ref', or one of the pure-PyTorch parallel scans 'hillis_steele',
    'blelloch', 'chunked'. Differentiable in a, b and h0.
    """
    check_scan_inputs(a, b, h0)
    if backend in PYTORCH_SCANS:
        return PYTORCH_SCANS[backend](a, b, h0)
    which = native.backend_for(b.device, backend)
    if which == "ref":
        return linear_scan_ref(a, b, h0)
    if h0 is not None:
        h0 = h0.to(accumulation_dtype(b.dtype)).contiguous()
    return _linear_scan_op(a, b, h0)
