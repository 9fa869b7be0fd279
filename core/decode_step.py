"""One token through a Mamba block's two recurrences: the causal conv and the selective SSM.

Generation (`ssmlab.core.generation`) runs the block once per new token. Between
its matrix products (in_proj, x_proj, dt_proj, out_proj) a token needs two
small recurrences, each fused here into one kernel:

``causal_conv1d_update`` (the depthwise causal conv of width K, one step)::

    conv_state <- (conv_state[..., 1:], x)          the last K inputs, oldest first, IN PLACE
    out         = act(sum_k conv_state[..., k] weight[:, k] + bias)    act = silu or identity

``selective_state_update`` (the S6 recurrence of `selective_scan`, one step)::

    Δ     = softplus(dt + dt_bias)                  (softplus only if dt_softplus)
    state = exp(Δ A) state + Δ B x                  IN PLACE  (zero-order hold for A, Euler for B)
    y     = C · state + D x,   y *= silu(z)         (gate only if z given)

Shapes (glossary: B batch, C channels (the block's ED), K conv width, N state size)::

    conv_state (B, C, K)   x, dt, z, out, y (B, C)   weight (C, K)   bias, D, dt_bias (C,)
    state (B, C, N)        A (C, N)                  B, C (B, N)

Dtypes: the activations x, dt, z, B, C and the conv's state, weight and bias are
float32, float16 or bfloat16, each its own; the SSM state, A, D and dt_bias
are float32; the references also take float64 everywhere. Arithmetic is
float32 (float64 when any input is); outputs have x's dtype.

Backends (``backend=``, as in `ssmlab.core.selective_scan`)::

    'ref'    `*_ref`: the formulas above in plain PyTorch (a dozen small ops each;
             differentiable; float64 capable)
    'cpu'    the C++ kernels of the native module (cuda/cpu/decode_step_cpu.cpp)
    'cuda'   the CUDA kernels (cuda/gpu/decode_step_cuda.cu); N <= CUDA_MAX_DSTATE
    'auto'   the native kernel of the tensors' device where it exists, else 'ref';
             also 'ref' when an input is float64 or autograd needs gradients
             (the kernels are inference only: they have no backward)

Under torch.compile the native kernels are reached through the custom ops
``ssmlab::causal_conv1d_update`` and ``ssmlab::selective_state_update`` (which
declare their in-place state); in eager mode they are called directly, since
a custom op's dispatch costs more than the kernel at batch 1.

Mirrors ``causal_conv1d_update`` of the causal-conv1d package and
``selective_state_update`` of ``mamba_ssm.ops.triton.selective_state_update``;
differs in taking B, C without a group axis and in accepting strided views
(no copy) for every input and for the state.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ssmlab.core import native

log = logging.getLogger(__name__)

BACKENDS = ("auto", "ref", "cpu", "cuda")
ACTIVATIONS = (None, "silu")
ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FLOAT32_DTYPES = (torch.float32, torch.float64)  # the SSM state, A, D, dt_bias (float64: reference only)
CUDA_MAX_DSTATE = 4096  # the CUDA kernel stages a batch row's B and C (2 N floats) in shared memory


# ---------------------------------------------------------------------------
# The references
# ---------------------------------------------------------------------------


def _accumulation_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """float64 when any input is, else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def causal_conv1d_update_ref(
    conv_state: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = "silu"
) -> Tensor:
    """The conv step (module docstring) in PyTorch; updates conv_state in place, returns (B, C) in x's dtype."""
    acc = _accumulation_dtype(conv_state, x, weight, bias)
    window = torch.cat([conv_state[..., 1:], x.unsqueeze(-1).to(conv_state.dtype)], dim=-1)  # (B, C, K)
    # The sum reads `window`, never conv_state, so autograd saves nothing that copy_ overwrites.
    out = (window.to(acc) * weight.to(acc)).sum(-1)  # (B, C)
    if bias is not None:
        out = out + bias.to(acc)
    if activation == "silu":
        out = F.silu(out)
    conv_state.copy_(window)
    return out.to(x.dtype)


def selective_state_update_ref(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
    z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None, dt_softplus: bool = True,
) -> Tensor:
    """The SSM step (module docstring) in PyTorch; updates state in place, returns y (B, C) in x's dtype."""
    acc = _accumulation_dtype(state, x, dt, A, B, C, D, z, dt_bias)
    delta = dt.to(acc)
    if dt_bias is not None:
        delta = delta + dt_bias.to(acc)
    if dt_softplus:
        delta = F.softplus(delta)  # (B, C)
    h_prev = state.to(acc)
    if torch.is_grad_enabled():
        h_prev = h_prev.clone()  # autograd keeps h_prev for the product's backward; copy_ below would overwrite it
    h = torch.exp(delta[..., None] * A.to(acc)) * h_prev + (delta * x.to(acc))[..., None] * B.to(acc)[:, None, :]  # (B, C, N)
    y = (h * C.to(acc)[:, None, :]).sum(-1)  # (B, C)
    if D is not None:
        y = y + D.to(acc) * x.to(acc)
    if z is not None:
        y = y * F.silu(z.to(acc))
    state.copy_(h)
    return y.to(x.dtype)


# ---------------------------------------------------------------------------
# Validation (all of it here, before any pointer reaches native code)
# ---------------------------------------------------------------------------


def _shape(t: Tensor) -> tuple:
    return tuple(t.shape)


def _check_tensors(fn: str, x: Tensor, named: tuple) -> None:
    """Type, dtype and device of every (name, tensor, allowed dtypes, optional) entry; x's device is everyone's."""
    device = x.device
    for name, t, allowed, optional in named:
        if t is None and optional:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor{' or None' if optional else ''}, got {type(t).__name__}")
        if t.dtype not in allowed:
            raise TypeError(f"{fn}: {name} has dtype {t.dtype}; supported: {', '.join(map(str, allowed))}")
        if t.device != device:
            raise ValueError(f"{fn}: {name} is on {t.device} but x is on {device}; put every tensor on one device")


def _check_writable(fn: str, name: str, t: Tensor) -> None:
    """An in-place buffer must not be a broadcast view: its elements would share memory."""
    if any(s == 0 and n > 1 for s, n in zip(t.stride(), t.shape)):
        raise ValueError(f"{fn}: {name} is a broadcast (expanded) view with shape {_shape(t)} and strides "
                         f"{t.stride()}; it is updated in place, so pass a tensor that owns its elements")


def check_conv_inputs(conv_state: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                      activation: Optional[str]) -> None:
    """Raise a TypeError/ValueError naming the argument for anything `causal_conv1d_update` does not take."""
    fn = "causal_conv1d_update"
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    act = ACTIVATION_DTYPES
    _check_tensors(fn, x, (("x", x, act, False), ("conv_state", conv_state, act, False),
                           ("weight", weight, act, False), ("bias", bias, act, True)))
    if x.dim() != 2:
        raise ValueError(f"{fn}: x must be (batch, channels), got shape {_shape(x)}")
    batch, channels = x.shape
    if conv_state.dim() != 3 or conv_state.shape[:2] != x.shape or conv_state.shape[2] < 1:
        raise ValueError(f"{fn}: conv_state must be (batch, channels, K) = ({batch}, {channels}, K) with K >= 1, "
                         f"got {_shape(conv_state)}")
    K = conv_state.shape[2]
    if weight.shape != (channels, K):
        raise ValueError(f"{fn}: weight must be (channels, K) = {(channels, K)} (the depthwise Conv1d weight "
                         f"without its middle axis), got {_shape(weight)}")
    if bias is not None and bias.shape != (channels,):
        raise ValueError(f"{fn}: bias must be (channels,) = ({channels},), got {_shape(bias)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{fn}: activation must be None or 'silu', got {activation!r}")
    _check_writable(fn, "conv_state", conv_state)


def check_ssm_inputs(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                     z: Optional[Tensor], dt_bias: Optional[Tensor]) -> None:
    """Raise a TypeError/ValueError naming the argument for anything `selective_state_update` does not take."""
    fn = "selective_state_update"
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    act, f32 = ACTIVATION_DTYPES, FLOAT32_DTYPES
    _check_tensors(fn, x, (("x", x, act, False), ("state", state, f32, False), ("dt", dt, act, False),
                           ("A", A, f32, False), ("B", B, act, False), ("C", C, act, False), ("D", D, f32, True),
                           ("z", z, act, True), ("dt_bias", dt_bias, f32, True)))
    if x.dim() != 2:
        raise ValueError(f"{fn}: x must be (batch, channels), got shape {_shape(x)}")
    batch, channels = x.shape
    for name, t in (("dt", dt), ("z", z)):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"{fn}: {name} must have x's shape (batch, channels) = {_shape(x)}, got {_shape(t)}")
    if state.dim() != 3 or state.shape[:2] != x.shape or state.shape[2] < 1:
        raise ValueError(f"{fn}: state must be (batch, channels, N) = ({batch}, {channels}, N) with N >= 1, "
                         f"got {_shape(state)}")
    N = state.shape[2]
    if A.shape != (channels, N):
        raise ValueError(f"{fn}: A must be (channels, N) = {(channels, N)}, got {_shape(A)}")
    for name, t in (("B", B), ("C", C)):
        if t.shape != (batch, N):
            raise ValueError(f"{fn}: {name} must be (batch, N) = {(batch, N)}, got {_shape(t)}")
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        if t is not None and t.shape != (channels,):
            raise ValueError(f"{fn}: {name} must be (channels,) = ({channels},), got {_shape(t)}")
    _check_writable(fn, "state", state)


# ---------------------------------------------------------------------------
# Backend choice
# ---------------------------------------------------------------------------

_HAS_KERNEL: dict[tuple[str, str], bool] = {}
_WARNED: set = set()


def _native_fn(name: str, device: torch.device):
    """native_module().{name}_{cpu|cuda}, or an error naming the fix."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    fn = getattr(native.native_module(), f"{name}_{kind}", None)
    if fn is None:
        raise native.BackendUnavailableError(
            f"the native module has no {name}_{kind}: it was built before the decoding kernels existed; "
            f"rebuild it with `pip install -e .` (see cuda/include/ssmlab/decode_step.h)"
        )
    return fn


def has_native(name: str, device: torch.device) -> bool:
    """Whether the native kernel `name` ('causal_conv1d_update', 'selective_state_update') runs on `device` here."""
    if device.type not in ("cpu", "cuda"):
        return False
    key = (name, device.type)
    if key not in _HAS_KERNEL:
        _HAS_KERNEL[key] = native.backends()[device.type] and hasattr(native.native_module(), f"{name}_{device.type}")
    return _HAS_KERNEL[key]


def resolve_backend(name: str, backend: str, x: Tensor, tensors: tuple, dstate: int = 1) -> str:
    """The implementation ('ref', 'cpu' or 'cuda') that `name(..., backend=backend)` runs for these inputs."""
    if backend not in BACKENDS:
        raise ValueError(f"{name}: unknown backend {backend!r}; choose from {', '.join(map(repr, BACKENDS))}")
    if backend == "ref":
        return "ref"
    given = [t for t in tensors if t is not None]
    float64 = any(t.dtype == torch.float64 for t in given)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in given)
    if backend == "auto":
        if float64 or grad or not has_native(name, x.device):
            return "ref"
        if x.device.type == "cuda" and dstate > CUDA_MAX_DSTATE:
            if name not in _WARNED:
                _WARNED.add(name)
                log.warning("%s: N = %d exceeds the CUDA kernel's limit of %d; using backend='ref'",
                            name, dstate, CUDA_MAX_DSTATE)
            return "ref"
        return x.device.type
    which = native.backend_for(x.device, backend)  # raises for an unavailable backend or the wrong device
    if float64:
        raise TypeError(f"{name}: backend {backend!r} computes in float32 and takes no float64 tensor; "
                        f"use backend='ref' for float64")
    if grad:
        raise ValueError(f"{name}: backend {backend!r} has no backward, but an input requires grad; "
                         f"call it under torch.no_grad() or use backend='ref'")
    if which == "cuda" and dstate > CUDA_MAX_DSTATE:
        raise ValueError(f"{name}: backend 'cuda' takes N <= {CUDA_MAX_DSTATE}, got N = {dstate}; use backend='ref'")
    _native_fn(name, x.device)  # raises when the module lacks the kernel
    return which


# ---------------------------------------------------------------------------
# The native kernels
# ---------------------------------------------------------------------------

_CODE = native.DTYPE_CODES


def _launch(name: str, x: Tensor, p) -> None:
    native.run_kernel(_native_fn(name, x.device), x.device, p)


def _conv_native(conv_state: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool) -> Tensor:
    p = native.native_module().CausalConv1dUpdateParams()
    p.batch, p.channels, p.width = conv_state.shape
    p.silu = silu
    p.state, p.state_stride, p.state_dtype = conv_state.data_ptr(), conv_state.stride(), _CODE[conv_state.dtype]
    p.x, p.x_stride, p.x_dtype = x.data_ptr(), x.stride(), _CODE[x.dtype]
    p.weight, p.weight_stride, p.weight_dtype = weight.data_ptr(), weight.stride(), _CODE[weight.dtype]
    if bias is not None:
        p.bias, p.bias_stride, p.bias_dtype = bias.data_ptr(), bias.stride(0), _CODE[bias.dtype]
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    p.out = out.data_ptr()
    _launch("causal_conv1d_update", x, p)
    return out


def _ssm_native(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                z: Optional[Tensor], dt_bias: Optional[Tensor], dt_softplus: bool) -> Tensor:
    p = native.native_module().SelectiveStateUpdateParams()
    p.batch, p.dim, p.dstate = state.shape
    p.dt_softplus = dt_softplus
    p.state, p.state_stride = state.data_ptr(), state.stride()
    p.A, p.A_stride = A.data_ptr(), A.stride()
    p.x, p.x_stride, p.x_dtype = x.data_ptr(), x.stride(), _CODE[x.dtype]
    p.dt, p.dt_stride, p.dt_dtype = dt.data_ptr(), dt.stride(), _CODE[dt.dtype]
    p.B, p.B_stride, p.B_dtype = B.data_ptr(), B.stride(), _CODE[B.dtype]
    p.C, p.C_stride, p.C_dtype = C.data_ptr(), C.stride(), _CODE[C.dtype]
    if z is not None:
        p.z, p.z_stride, p.z_dtype = z.data_ptr(), z.stride(), _CODE[z.dtype]
    if D is not None:
        p.D, p.D_stride = D.data_ptr(), D.stride(0)
    if dt_bias is not None:
        p.dt_bias, p.dt_bias_stride = dt_bias.data_ptr(), dt_bias.stride(0)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    p.out = out.data_ptr()
    _launch("selective_state_update", x, p)
    return out


# The same kernels as custom ops, for torch.compile: they declare the state they mutate.
@torch.library.custom_op("ssmlab::causal_conv1d_update", mutates_args=("conv_state",))
def _conv_op(conv_state: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool) -> Tensor:
    return _conv_native(conv_state, x, weight, bias, silu)


@_conv_op.register_fake
def _(conv_state, x, weight, bias, silu):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("ssmlab::selective_state_update", mutates_args=("state",))
def _ssm_op(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
            z: Optional[Tensor], dt_bias: Optional[Tensor], dt_softplus: bool) -> Tensor:
    return _ssm_native(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


@_ssm_op.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


# ---------------------------------------------------------------------------
# The dispatchers
# ---------------------------------------------------------------------------


def causal_conv1d_update(
    conv_state: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = "silu",
    *, backend: str = "auto",
) -> Tensor:
    """One step of the depthwise causal conv (module docstring): conv_state updated in place, returns (B, C)."""
    check_conv_inputs(conv_state, x, weight, bias, activation)
    which = resolve_backend("causal_conv1d_update", backend, x, (conv_state, x, weight, bias))
    if which == "ref":
        return causal_conv1d_update_ref(conv_state, x, weight, bias, activation)
    op = _conv_op if torch.compiler.is_compiling() else _conv_native
    return op(conv_state, x, weight, bias, activation == "silu")


def selective_state_update(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
    z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None, dt_softplus: bool = True,
    *, backend: str = "auto",
) -> Tensor:
    """One step of the selective SSM (module docstring): state updated in place, returns y (B, C)."""
    check_ssm_inputs(state, x, dt, A, B, C, D, z, dt_bias)
    tensors = (state, x, dt, A, B, C, D, z, dt_bias)
    which = resolve_backend("selective_state_update", backend, x, tensors, dstate=state.shape[2])
    if which == "ref":
        return selective_state_update_ref(*tensors, dt_softplus)
    op = _ssm_op if torch.compiler.is_compiling() else _ssm_native
    return op(*tensors, bool(dt_softplus))


__all__ = [
    "BACKENDS", "CUDA_MAX_DSTATE", "causal_conv1d_update", "causal_conv1d_update_ref", "check_conv_inputs",
    "check_ssm_inputs", "has_native", "resolve_backend", "selective_state_update", "selective_state_update_ref",
]
