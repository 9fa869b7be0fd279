"""The causal depthwise convolution of the Mamba block, fused with its SiLU.

    out[b, c, t] = silu( sum_k w[c, k] x[b, c, t - (K-1) + k] + bias[c] )      (x = 0 before t = 0)

Mamba applies a short (K = 4) causal convolution to every channel before the
selective scan. `nn.Conv1d(groups=C, padding=K-1)` computes it, but it pads
both ends and returns L + K - 1 outputs that the block then slices (and
autograd then pads back with zeros in the backward), runs PyTorch's generic
depthwise kernel, and leaves the SiLU to two more passes over the activation.
On an H100 that was about 12% of a 130M Mamba training step. The native
kernels (`cuda/gpu/causal_conv1d_cuda.cu`, `cuda/cpu/causal_conv1d_cpu.cpp`)
do the conv and the SiLU in one pass, read x in place (any channel/batch
strides, unit stride along L), recompute the pre-activation in the backward
instead of storing it, and sum the weight and bias gradients in a fixed
order (no atomics: bitwise repeatable).

`causal_conv1d_ref` is the reference twin: `F.conv1d` on the left-padded
input, float64 capable. `causal_conv1d` dispatches like the selective scan:
CUDA tensors to the CUDA kernel, CPU tensors to the C++ kernel, and the
reference for float64, for widths above 8, or where the native module is
missing. The weight and bias are used in float32 (the kernels accumulate in
float32); the output has x's dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ssmlab.core import native

MAX_WIDTH = 8  # cuda/include/ssmlab/causal_conv1d.h: kConvMaxWidth
CHUNK = 1024  # kConvChunk: steps per partial weight-gradient sum
NATIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def causal_conv1d_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = "silu") -> Tensor:
    """Plain PyTorch: x (B, C, L), weight (C, K) -> (B, C, L)."""
    C, K = weight.shape
    out = F.conv1d(F.pad(x, (K - 1, 0)), weight.unsqueeze(1), bias, groups=C)
    return F.silu(out) if activation == "silu" else out


def _check(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str]) -> None:
    if activation not in (None, "silu"):
        raise ValueError(f"causal_conv1d: activation must be None or 'silu', got {activation!r}")
    if x.ndim != 3:
        raise ValueError(f"causal_conv1d: x must be (batch, channels, length), got shape {tuple(x.shape)}")
    if weight.ndim != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"causal_conv1d: weight must be (channels, width) = ({x.shape[1]}, K), got {tuple(weight.shape)}")
    if weight.shape[1] < 1:
        raise ValueError("causal_conv1d: the conv width must be at least 1")
    if bias is not None and bias.shape != (x.shape[1],):
        raise ValueError(f"causal_conv1d: bias must be ({x.shape[1]},), got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"causal_conv1d: {name} is on {t.device}, x on {x.device}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and not t.is_floating_point():
            raise TypeError(f"causal_conv1d: {name} must be a floating-point tensor, got {t.dtype}")


def _native_fn(kind: str, device: torch.device):
    return getattr(native.native_module(), f"causal_conv1d_{kind}_{device.type}")


def _params(x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool):
    p = native.native_module().CausalConv1dParams()
    p.batch, p.channels, p.length = x.shape
    p.width = weight.shape[1]
    p.dtype = native.DTYPE_CODES[x.dtype]
    p.silu = silu
    p.x, p.x_stride = x.data_ptr(), (int(x.stride(0)), int(x.stride(1)))
    p.weight = weight.data_ptr()
    p.bias = 0 if bias is None else bias.data_ptr()
    return p


@torch.library.custom_op("ssmlab::causal_conv1d_fwd", mutates_args=())
def _fwd_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool) -> Tensor:
    """x with unit stride along L; weight (C, K) and bias (C,) contiguous float32."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    p = _params(x, weight, bias, silu)
    p.out = out.data_ptr()
    native.run_kernel(_native_fn("fwd", x.device), x.device, p)
    return out


@_fwd_op.register_fake
def _(x, weight, bias, silu):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("ssmlab::causal_conv1d_bwd", mutates_args=())
def _bwd_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(grad x, grad weight, grad bias or an empty tensor)."""
    B, C, L = x.shape
    K = weight.shape[1]
    parts = B * ((L + CHUNK - 1) // CHUNK)
    grad_out = grad_out.to(x.dtype).contiguous()
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    gw = torch.empty((parts, C, K), dtype=torch.float32, device=x.device)
    gb = torch.empty((parts, C) if bias is not None else (0,), dtype=torch.float32, device=x.device)
    p = _params(x, weight, bias, silu)
    p.grad_out, p.grad_x, p.grad_weight_partial = grad_out.data_ptr(), grad_x.data_ptr(), gw.data_ptr()
    p.grad_bias_partial = 0 if bias is None else gb.data_ptr()
    native.run_kernel(_native_fn("bwd", x.device), x.device, p)
    # the partials in index order: a fixed-order sum, so repeated runs agree bitwise
    return grad_x, gw.sum(0), gb.sum(0) if bias is not None else gb


@_bwd_op.register_fake
def _(x, weight, bias, silu, grad_out):
    f32 = dict(dtype=torch.float32, device=x.device)
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.empty(weight.shape, **f32),
            torch.empty(bias.shape if bias is not None else (0,), **f32))


def _setup_context(ctx, inputs, output):
    x, weight, bias, silu = inputs
    ctx.silu = silu
    ctx.save_for_backward(x, weight, bias)


def _backward(ctx, grad_out):
    x, weight, bias = ctx.saved_tensors
    gx, gw, gb = _bwd_op(x, weight, bias, ctx.silu, grad_out)
    return gx, gw, gb if bias is not None else None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _use_native(x: Tensor, K: int, backend: str) -> bool:
    which = native.backend_for(x.device, backend)  # raises for an unavailable or mismatched explicit backend
    if which == "ref":
        return False
    if x.dtype not in NATIVE_DTYPES or K > MAX_WIDTH:
        if backend != "auto":
            raise ValueError(f"causal_conv1d: the {which} kernel takes float32/16/bfloat16 and K <= {MAX_WIDTH}, "
                             f"got {x.dtype} and K = {K}; use backend='ref'")
        return False
    if not hasattr(native.native_module(), f"causal_conv1d_fwd_{which}"):
        if backend != "auto":  # asked for by name: say so rather than quietly run the reference
            raise native.BackendUnavailableError(
                f"causal_conv1d: the native module has no causal_conv1d_fwd_{which}: it was built before the "
                f"kernel existed; rebuild it with `pip install -e .`")
        return False
    return True


def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = "silu",
                  backend: str = "auto") -> Tensor:
    """x (B, C, L), weight (C, K) (or a depthwise Conv1d weight (C, 1, K)), bias (C,) -> (B, C, L) in x's dtype.

    `activation`: 'silu' (fused) or None. `backend`: 'auto', 'ref', 'cpu' or 'cuda'.
    """
    if weight.ndim == 3 and weight.shape[1] == 1:
        weight = weight[:, 0]
    _check(x, weight, bias, activation)
    if not _use_native(x, weight.shape[1], backend):
        return causal_conv1d_ref(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), activation)
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        x = x.contiguous()
    w = weight.to(torch.float32).contiguous()
    b = None if bias is None else bias.to(torch.float32).contiguous()
    return _fwd_op(x, w, b, activation == "silu")
