"""The selective scan: Mamba's S6 operator (Gu & Dao 2023, Algorithm 2).

For every batch b and channel d, a diagonal SSM of state size N whose step,
input and output matrices depend on the input (that is the *selection*):

    Δ_t = softplus(delta_t + delta_bias)           (softplus only if delta_softplus)
    Ā_t = exp(Δ_t A)                               (zero-order hold for A)
    B̄_t = Δ_t B_t                                  (Euler step for B, as in Mamba)
    h_t = Ā_t h_{t-1} + B̄_t u_t,   h_{-1} = initial_state (else 0)
    y_t = C_t · h_t + D u_t,       out_t = y_t * silu(z_t)   (gate only if z given)

Shapes (glossary: B batch, D dim/channels, L length, N state size, G groups):
    u, delta, z          (B, D, L)
    A                    (D, N), real, negative for a stable (decaying) state
    B, C                 (D, N) time-invariant, (B, N, L) input-dependent, or
                         (B, G, N, L) grouped: channel d uses group d // (D / G)
    D, delta_bias        (D,)
    initial_state, last  (B, D, N)

Inputs are float32, float16 or bfloat16 (float64 too, for the references);
the state and every accumulation are float32 (float64 for float64 inputs);
`out` has the input dtype, the last state the accumulation dtype.

Implementations, one signature (`backend=`):
    'ref'                 `selective_scan_ref`, the loop above, one step at a time
    'hillis_steele', 'blelloch', 'chunked'
                          discretise everything, then one parallel scan over L of
                          the (B, D, N, L) tensors, with the operators of `scan.py`
    'cpu', 'cuda'         the fused native kernels (custom op ``ssmlab::selective_scan_fwd``)
    'auto'                the native kernel for the tensors' device where it exists
                          (and the dtype is not float64), else 'ref'

Mirrors `mamba_ssm.ops.selective_scan_interface.selective_scan_fn`; differs in
taking `initial_state` and in propagating gradients through both the initial
and the last state.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ssmlab.core import native, scan

log = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
NATIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PYTORCH_SCANS: dict[str, Callable] = scan.PYTORCH_SCANS
BACKENDS = ("auto", "ref", "cpu", "cuda") + tuple(PYTORCH_SCANS)

Output = Union[Tensor, tuple[Tensor, Tensor]]


# ---------------------------------------------------------------------------
# Shared pieces of the PyTorch implementations
# ---------------------------------------------------------------------------


def discretized_delta(delta: Tensor, delta_bias: Optional[Tensor], delta_softplus: bool, acc: torch.dtype) -> Tensor:
    """Δ = softplus(delta + delta_bias), (B, D, L) in the accumulation dtype."""
    dt = delta.to(acc)
    if delta_bias is not None:
        dt = dt + delta_bias.to(acc)[:, None]
    return F.softplus(dt) if delta_softplus else dt


def per_channel(X: Tensor, dim: int) -> Tensor:
    """An input-dependent B or C as (B, D, N, L): each channel gets its group's matrix."""
    if X.dim() == 3:  # (B, N, L): one group
        return X.unsqueeze(1).expand(X.shape[0], dim, *X.shape[1:])
    batch, G, N, L = X.shape
    return X.unsqueeze(2).expand(batch, G, dim // G, N, L).reshape(batch, dim, N, L)


def _finish(y: Tensor, u: Tensor, D: Optional[Tensor], z: Optional[Tensor], acc: torch.dtype) -> Tensor:
    """y + D u, gated by silu(z), cast back to the input dtype."""
    if D is not None:
        y = y + D.to(acc)[:, None] * u.to(acc)
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(u.dtype)


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: Optional[Tensor] = None,
) -> Output:
    """The definition, one time step at a time (see the module docstring)."""
    acc = scan.accumulation_dtype(u.dtype)
    batch, dim, L = u.shape
    dt = discretized_delta(delta, delta_bias, delta_softplus, acc)  # (B, D, L)
    A = A.to(acc)
    Bx = per_channel(B.to(acc), dim) if B.dim() > 2 else B.to(acc)  # (B, D, N, L) or (D, N)
    Cx = per_channel(C.to(acc), dim) if C.dim() > 2 else C.to(acc)
    h = u.new_zeros((batch, dim, A.shape[1]), dtype=acc) if initial_state is None else initial_state.to(acc)
    # Split along L once (indexing step by step would make autograd's backward O(L^2)).
    dts, dus = dt.unbind(-1), (dt * u.to(acc)).unbind(-1)  # each (B, D)
    Bs = Bx.unbind(-1) if Bx.dim() == 4 else [Bx] * L  # each (B, D, N) or (D, N)
    Cs = Cx.unbind(-1) if Cx.dim() == 4 else [Cx] * L
    ys = []
    for t in range(L):
        h, y = _STEP(h, dts[t], dus[t], A, Bs[t], Cs[t])
        ys.append(y)
    out = _finish(torch.stack(ys, dim=-1), u, D, z, acc)
    return (out, h) if return_last_state else out


def ref_step(h: Tensor, dt: Tensor, du: Tensor, A: Tensor, B_t: Tensor, C_t: Tensor) -> tuple[Tensor, Tensor]:
    """One step of the reference: h <- exp(Δ A) h + Δ u B_t; y = C_t . h.
    h, B_t, C_t: (B, D, N) (or (D, N) for time-invariant B/C); dt = Δ_t, du = Δ_t u_t: (B, D)."""
    h = torch.exp(dt[..., None] * A) * h + du[..., None] * B_t
    return h, (h * C_t).sum(-1)


_STEP = ref_step


def compile_reference_step(enable: bool = True, **compile_kwargs) -> None:
    """Make `selective_scan_ref` run its step through torch.compile (for benchmarks).

    Compiling the whole reference would unroll its Python loop into a graph of
    L steps, which takes minutes for long L; compiling the step keeps the loop
    and fuses each step's elementwise work. `enable=False` restores the eager step."""
    global _STEP
    _STEP = torch.compile(ref_step, **compile_kwargs) if enable else ref_step


def selective_scan_parallel(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: Optional[Tensor] = None,
    *,
    scan_fn: Callable = scan.linear_scan_blelloch,
) -> Output:
    """Discretise every step at once, then one parallel scan over L.

    Materialises Ā and B̄u as (B, D, N, L) tensors, so it needs N times the
    memory of the fused kernels; autograd differentiates straight through the scan.
    """
    acc = scan.accumulation_dtype(u.dtype)
    dim = u.shape[1]
    dt = discretized_delta(delta, delta_bias, delta_softplus, acc)  # (B, D, L)
    A_bar = torch.exp(dt[:, :, None, :] * A.to(acc)[None, :, :, None])  # (B, D, N, L)
    Bx = per_channel(B.to(acc), dim) if B.dim() > 2 else B.to(acc)[None, :, :, None]
    Cx = per_channel(C.to(acc), dim) if C.dim() > 2 else C.to(acc)[None, :, :, None]
    Bu = (dt * u.to(acc))[:, :, None, :] * Bx  # (B, D, N, L)
    h0 = None if initial_state is None else initial_state.to(acc)
    h = scan_fn(A_bar, Bu, h0)  # (B, D, N, L)
    out = _finish((h * Cx).sum(2), u, D, z, acc)
    return (out, h[..., -1]) if return_last_state else out


# ---------------------------------------------------------------------------
# Validation (all of it here, before any pointer reaches native code)
# ---------------------------------------------------------------------------


def _shape(t: Tensor) -> tuple:
    return tuple(t.shape)


def check_selective_scan_inputs(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    initial_state: Optional[Tensor],
    check_finite: bool = True,
) -> None:
    """Raise a TypeError/ValueError naming the argument for anything unsupported.

    Value checks (`check_finite`): A, D, delta_bias, time-invariant B/C and
    initial_state must be finite. They are parameters or carried state, one
    NaN there silently poisons every later step of every sequence, and they are
    small, so the check is cheap. Activations (u, delta, z, input-dependent
    B/C) are not scanned: that would cost a full pass per call, and a bad value
    there stays local to its own outputs. The value check is skipped on CUDA
    tensors (it would force a device sync per call) and under torch.compile.
    """
    fn = "selective_scan"
    named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias,
             "initial_state": initial_state}
    for name, t in named.items():
        if t is None and name in ("D", "z", "delta_bias", "initial_state"):
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor{' or None' if name in ('D', 'z', 'delta_bias', 'initial_state') else ''}, got {type(t).__name__}")
        if t.is_complex():
            raise TypeError(f"{fn}: {name} is complex ({t.dtype}); only real tensors are supported")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{fn}: {name} has dtype {t.dtype}; supported: {', '.join(map(str, SUPPORTED_DTYPES))}")
        if t.device != u.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but u is on {u.device}; put every tensor on one device")
    if u.dim() != 3:
        raise ValueError(f"{fn}: u must be (batch, dim, L), got shape {_shape(u)}")
    batch, dim, L = u.shape
    if L < 1:
        raise ValueError(f"{fn}: u must have at least one time step, got L = {L}")
    for name, t in (("delta", delta), ("z", z)):
        if t is not None and t.shape != u.shape:
            raise ValueError(f"{fn}: {name} must have u's shape (batch, dim, L) = {_shape(u)}, got {_shape(t)}")
        if t is not None and t.dtype != u.dtype:
            raise TypeError(f"{fn}: {name} is {t.dtype} but u is {u.dtype}; pass u, delta, z in one dtype")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"{fn}: A must be (dim, N) with dim = {dim}, got {_shape(A)}")
    N = A.shape[1]
    if N < 1:
        raise ValueError(f"{fn}: A must have a state size N >= 1, got {_shape(A)}")
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 2:
            if t.shape != (dim, N):
                raise ValueError(f"{fn}: time-invariant {name} must be (dim, N) = {(dim, N)}, got {_shape(t)}")
            continue
        if t.dim() == 3:
            want = (batch, N, L)
        elif t.dim() == 4:
            G = t.shape[1]
            if G < 1 or dim % G != 0:
                raise ValueError(f"{fn}: {name} has {G} groups, which does not divide dim = {dim}")
            want = (batch, G, N, L)
        else:
            raise ValueError(f"{fn}: {name} must be (dim, N), (batch, N, L) or (batch, groups, N, L), got {_shape(t)}")
        if tuple(t.shape) != want:
            raise ValueError(f"{fn}: {name} must be {want} (batch, [groups,] N, L), got {_shape(t)}")
        if t.dtype != u.dtype:
            raise TypeError(f"{fn}: input-dependent {name} is {t.dtype} but u is {u.dtype}; pass them in one dtype")
    if B.dim() == 4 and C.dim() == 4 and B.shape[1] != C.shape[1]:
        raise ValueError(f"{fn}: B has {B.shape[1]} groups but C has {C.shape[1]}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (dim,):
            raise ValueError(f"{fn}: {name} must be (dim,) = ({dim},), got {_shape(t)}")
    if initial_state is not None and initial_state.shape != (batch, dim, N):
        raise ValueError(f"{fn}: initial_state must be (batch, dim, N) = {(batch, dim, N)}, got {_shape(initial_state)}")
    if check_finite and u.device.type != "cuda" and not torch.compiler.is_compiling():
        small = {"A": A, "D": D, "delta_bias": delta_bias, "initial_state": initial_state,
                 "B": B if B.dim() == 2 else None, "C": C if C.dim() == 2 else None}
        for name, t in small.items():
            if t is not None and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{fn}: {name} has non-finite values (NaN or inf), which would poison every output")


# ---------------------------------------------------------------------------
# The native kernels as custom ops
# ---------------------------------------------------------------------------


def _native_fn(name: str, device: torch.device):
    """native_module().selective_scan_{name}_{cpu|cuda}, or an error naming the fix."""
    mod = native.native_module()
    kind = "cuda" if device.type == "cuda" else "cpu"
    fn = getattr(mod, f"selective_scan_{name}_{kind}", None)
    if fn is None:
        raise native.BackendUnavailableError(
            f"the native module has no selective_scan_{name}_{kind}: it was built without the {kind} selective scan "
            f"kernels; rebuild with `pip install -e .` (see cuda/include/ssmlab/selective_scan.h)"
        )
    return fn


def has_native(device: torch.device) -> bool:
    """Whether the native selective scan can run on this device here."""
    have = native.backends()
    kind = "cuda" if device.type == "cuda" else "cpu"
    if not have.get(kind, False):
        return False
    return hasattr(native.native_module(), f"selective_scan_fwd_{kind}")


def chunk_len(device: torch.device) -> int:
    """Steps per stored chunk state of the native kernel for `device`."""
    return int(_native_fn("chunk_len", device)())


def _segments_from_env() -> int:
    raw = os.environ.get("SSMLAB_CUDA_SEGMENTS", "").strip()
    if not raw:
        return 0
    if not raw.isdigit():
        raise ValueError(f"SSMLAB_CUDA_SEGMENTS must be an integer >= 0 (0: automatic), got {raw!r}")
    return int(raw)


# How many pieces the CUDA kernels split the length into (0: their own choice,
# made from batch x channels and the GPU's SM count; see ssmlab/selective_scan.h).
# SSMLAB_CUDA_SEGMENTS sets it for a whole process (1: never split).
_CUDA_SEGMENTS = _segments_from_env()


@contextlib.contextmanager
def cuda_length_segments(n: int) -> Iterator[None]:
    """Inside the block, CUDA scans split the length into at most `n` pieces (0: automatic).

    For tests and benchmarks: the result is the same up to rounding whatever `n`
    is; the split only changes how the work is spread over the GPU.
    """
    global _CUDA_SEGMENTS
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"cuda_length_segments: n must be an int >= 0, got {n!r}")
    old, _CUDA_SEGMENTS = _CUDA_SEGMENTS, n
    try:
        yield
    finally:
        _CUDA_SEGMENTS = old


def cuda_segments_for(batch: int, dim: int, length: int, dstate: int = 16, groups: int = 1) -> int:
    """The number of length pieces the CUDA kernels use for this shape on the current GPU."""
    p = native.native_module().SelectiveScanParams()
    p.batch, p.dim, p.length, p.dstate, p.groups, p.segments = batch, dim, length, dstate, groups, _CUDA_SEGMENTS
    return int(_native_fn("segments", torch.device("cuda"))(p))


def _strides(t: Tensor, k: int) -> tuple:
    return tuple(int(s) for s in t.stride()[:k])


def _params(u, delta, A, B, C, D, z, delta_bias, h0, delta_softplus):
    p = native.native_module().SelectiveScanParams()
    p.batch, p.dim, p.length = u.shape
    p.dstate = A.shape[1]
    p.groups = B.shape[1] if B.dim() == 4 else (C.shape[1] if C.dim() == 4 else 1)
    p.chunk_len = chunk_len(u.device)
    p.segments = _CUDA_SEGMENTS
    p.dtype = native.DTYPE_CODES[u.dtype]
    p.is_variable_B, p.is_variable_C, p.delta_softplus = B.dim() == 4, C.dim() == 4, bool(delta_softplus)
    p.u, p.u_stride = u.data_ptr(), _strides(u, 2)
    p.delta, p.delta_stride = delta.data_ptr(), _strides(delta, 2)
    if z is not None:
        p.z, p.z_stride = z.data_ptr(), _strides(z, 2)
    p.A = A.data_ptr()
    p.B, p.C = B.data_ptr(), C.data_ptr()
    if B.dim() == 4:
        p.B_stride = _strides(B, 3)
    if C.dim() == 4:
        p.C_stride = _strides(C, 3)
    p.D = 0 if D is None else D.data_ptr()
    p.delta_bias = 0 if delta_bias is None else delta_bias.data_ptr()
    p.h0 = 0 if h0 is None else h0.data_ptr()
    return p


def _n_chunks(u: Tensor) -> int:
    T = chunk_len(u.device)
    return (u.shape[2] + T - 1) // T


@torch.library.custom_op("ssmlab::selective_scan_fwd", mutates_args=())
def _fwd_op(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
    delta_bias: Optional[Tensor], initial_state: Optional[Tensor], delta_softplus: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(out, last_state, chunk_states); inputs already normalised by `_normalise`."""
    batch, dim, L = u.shape
    N = A.shape[1]
    out = torch.empty_like(u, memory_format=torch.contiguous_format)
    last = u.new_empty((batch, dim, N), dtype=torch.float32)
    states = u.new_empty((batch, dim, _n_chunks(u), N), dtype=torch.float32)
    p = _params(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus)
    p.out, p.out_stride = out.data_ptr(), _strides(out, 2)
    p.last_state, p.chunk_states = last.data_ptr(), states.data_ptr()
    workspace = _fwd_workspace(u, p)  # kept alive until the kernel is enqueued (stream-ordered reuse after)
    native.run_kernel(_native_fn("fwd", u.device), u.device, p)
    del workspace
    return out, last, states


def _fwd_workspace(u: Tensor, p) -> Optional[Tensor]:
    """Scratch of a forward whose length the kernel splits (None when it needs none)."""
    nbytes = int(_native_fn("fwd_workspace_bytes", u.device)(p))
    if nbytes == 0:
        return None
    workspace = u.new_empty((nbytes,), dtype=torch.uint8)
    p.workspace = workspace.data_ptr()
    return workspace


@_fwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
    batch, dim, L = u.shape
    N = A.shape[1]
    T = chunk_len(u.device)
    return (
        torch.empty_like(u, memory_format=torch.contiguous_format),
        u.new_empty((batch, dim, N), dtype=torch.float32),
        u.new_empty((batch, dim, (L + T - 1) // T, N), dtype=torch.float32),
    )


@torch.library.custom_op("ssmlab::selective_scan_bwd", mutates_args=())
def _bwd_op(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
    delta_bias: Optional[Tensor], initial_state: Optional[Tensor], delta_softplus: bool,
    chunk_states: Tensor, grad_out: Tensor, grad_last_state: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (u, delta, A, B, C, D, z, delta_bias, initial_state); absent inputs get empty tensors."""
    grads = _bwd_fake(u, delta, A, B, C, D, z, delta_bias, initial_state)
    g_u, g_delta, g_A, g_B, g_C, g_D, g_z, g_bias, g_h0 = grads
    p = _params(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus)
    p.chunk_states = chunk_states.data_ptr()
    grad_out = grad_out.contiguous()
    p.grad_out = grad_out.data_ptr()
    if grad_last_state is not None:
        grad_last_state = grad_last_state.to(torch.float32).contiguous()
        p.grad_last_state = grad_last_state.data_ptr()
    p.grad_u, p.grad_delta, p.grad_A, p.grad_B, p.grad_C = (g.data_ptr() for g in (g_u, g_delta, g_A, g_B, g_C))
    if z is not None:
        p.grad_z = g_z.data_ptr()
    if D is not None:
        p.grad_D = g_D.data_ptr()
    if delta_bias is not None:
        p.grad_delta_bias = g_bias.data_ptr()
    if initial_state is not None:
        p.grad_h0 = g_h0.data_ptr()
    nbytes = int(_native_fn("bwd_workspace_bytes", u.device)(p))
    workspace = u.new_empty((nbytes,), dtype=torch.uint8)
    p.workspace = workspace.data_ptr()
    native.run_kernel(_native_fn("bwd", u.device), u.device, p)
    return grads


def _bwd_fake(u, delta, A, B, C, D, z, delta_bias, initial_state):
    f32 = dict(dtype=torch.float32, device=u.device)
    like_u = lambda: torch.empty(u.shape, dtype=u.dtype, device=u.device)  # noqa: E731
    absent = lambda: u.new_empty((0,))  # noqa: E731
    return (
        like_u(),
        like_u(),
        torch.empty(A.shape, **f32),
        torch.empty(B.shape, **f32),
        torch.empty(C.shape, **f32),
        torch.empty(D.shape, **f32) if D is not None else absent(),
        like_u() if z is not None else absent(),
        torch.empty(delta_bias.shape, **f32) if delta_bias is not None else absent(),
        torch.empty(initial_state.shape, **f32) if initial_state is not None else absent(),
    )


@_bwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk_states, grad_out, grad_last_state):
    return _bwd_fake(u, delta, A, B, C, D, z, delta_bias, initial_state)


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus = inputs
    ctx.delta_softplus = delta_softplus
    # Unused outputs (the last state, always the chunk states) get None, not a
    # zero-filled gradient: ~100 MB of zeros a layer for the 130M model at 65,536 tokens.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, output[2])


def _backward(ctx, grad_out, grad_last, _grad_states):
    u, delta, A, B, C, D, z, delta_bias, h0, states = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(u)
    g = _bwd_op(u, delta, A, B, C, D, z, delta_bias, h0, ctx.delta_softplus, states, grad_out, grad_last)
    g_u, g_delta, g_A, g_B, g_C, g_D, g_z, g_bias, g_h0 = g
    return (
        g_u, g_delta, g_A, g_B.to(B.dtype), g_C.to(C.dtype),
        g_D if D is not None else None,
        g_z if z is not None else None,
        g_bias if delta_bias is not None else None,
        g_h0 if h0 is not None else None,
        None,
    )


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _unit_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _normalise(u, delta, A, B, C, D, z, delta_bias, initial_state):
    """The layouts of ssmlab/selective_scan.h: unit-stride L, float32 parameters,
    input-dependent B/C as (B, G, N, L). Differentiable (plain PyTorch ops)."""
    f32 = lambda t: None if t is None else t.to(torch.float32).contiguous()  # noqa: E731

    def bc(X: Tensor) -> Tensor:
        if X.dim() == 2:
            return f32(X)
        X = X.unsqueeze(1) if X.dim() == 3 else X
        return X if X.stride(-1) == 1 else X.contiguous()

    u, delta = _unit_stride(u), _unit_stride(delta)
    z = None if z is None else _unit_stride(z)
    B, C = bc(B), bc(C)
    if B.dim() == 4 and C.dim() == 4 and B.shape[1] != C.shape[1]:
        # The kernels take one group count: a one-group (batch, N, L) matrix
        # is broadcast over the other's groups (a stride-0 view, no copy).
        G = max(B.shape[1], C.shape[1])
        B, C = B.expand(-1, G, -1, -1), C.expand(-1, G, -1, -1)
    return u, delta, f32(A), B, C, f32(D), z, f32(delta_bias), f32(initial_state)


def selective_scan_native(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
    z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
    return_last_state: bool = False, initial_state: Optional[Tensor] = None,
) -> Output:
    """The fused native kernel of the tensors' device (no validation: call `selective_scan`)."""
    args = _normalise(u, delta, A, B, C, D, z, delta_bias, initial_state)
    out, last, _ = _fwd_op(*args, bool(delta_softplus))
    return (out, last) if return_last_state else out


CUDA_MAX_DSTATE = 64  # the CUDA kernels keep N states per thread group in registers


def resolve_backend(u: Tensor, backend: str = "auto", dstate: int = 1) -> str:
    """The implementation that `selective_scan(..., backend=backend)` runs for u (and state size N)."""
    if backend not in BACKENDS:
        raise ValueError(f"selective_scan: unknown backend {backend!r}; choose from {', '.join(map(repr, BACKENDS))}")
    if backend in PYTORCH_SCANS or backend == "ref":
        return backend
    if backend == "auto":
        if u.dtype in NATIVE_DTYPES and has_native(u.device):
            if u.device.type != "cuda":
                return "cpu"
            if dstate <= CUDA_MAX_DSTATE:
                return "cuda"
            log.warning("selective_scan: N = %d exceeds the CUDA kernel's limit of %d; using backend='ref'",
                        dstate, CUDA_MAX_DSTATE)
        return "ref"
    which = native.backend_for(u.device, backend)  # raises for unavailable / wrong device
    if u.dtype not in NATIVE_DTYPES:
        raise TypeError(f"selective_scan: backend {backend!r} takes u in float32, float16 or bfloat16, got {u.dtype}; "
                        f"use backend='ref' for float64")
    _native_fn("fwd", u.device)  # raises when the module lacks the kernel
    return which


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: Optional[Tensor] = None,
    *,
    backend: str = "auto",
) -> Output:
    """The selective scan (see the module docstring); returns out, or (out, last_state).

    Differentiable in every tensor argument, including initial_state, and
    through the returned last state, by every backend.
    """
    check_selective_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    which = resolve_backend(u, backend, dstate=A.shape[-1])
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state)
    if which == "ref":
        return selective_scan_ref(*args)
    if which in PYTORCH_SCANS:
        return selective_scan_parallel(*args, scan_fn=PYTORCH_SCANS[which])
    return selective_scan_native(*args)
