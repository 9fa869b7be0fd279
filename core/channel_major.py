"""Linear maps between the token-major residual stream and the channel-major Mamba block.

The residual stream of a Mamba model is token-major, (B, L, D): each token's
features are contiguous, which is what the norms and the LM head want. The
conv and the selective scan inside a block are channel-major, (B, C, L): each
channel's sequence is contiguous, which is what a scan along L wants. Writing
the block with `nn.Linear` and `.transpose(1, 2)` puts a transposing copy of
a (B, L, ED) activation at every layout change, and autograd adds more in the
backward; on an H100 those copies were about a third of a Mamba training
step at 130M parameters (`stages/06_mamba_lm/LM.md`).

A batched matrix product can read either operand transposed for free and
writes its output in whichever layout its operand order gives, so every
layout change can be folded into a product that happens anyway:

    tokens_to_channels(h, W)   h (B, L, K) -> W h^T          (B, M, L)   in_proj
    channel_mix(W, x)          x (B, K, L) -> W x            (B, M, L)   x_proj, dt_proj
    channels_to_tokens(y, W)   y (B, K, L) -> y^T W^T        (B, L, M)   out_proj

Each has an explicit backward so that the gradients also come out contiguous
in their input's layout (autograd's generic rule would hand back transposed
views). The weight gradient is a batched product summed over the batch in
float32. Under autocast the products run in the autocast dtype, as
`nn.Linear` would; the weight is cast once before it is broadcast over the
batch, never after.

Reference twin: `nn.functional.linear` with transposes, the form these
replace; the tests compare the two, forward and backward, in float64.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a matrix product on `x` runs in: the autocast dtype when autocast is on (float64 excepted, as autocast does)."""
    dev = x.device.type
    if x.dtype != torch.float64 and dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _check(name: str, x: Tensor, W: Tensor, k_dim: int) -> None:
    if x.ndim != 3:
        raise ValueError(f"{name}: input must be 3-D, got shape {tuple(x.shape)}")
    if W.ndim != 2 or W.shape[1] != x.shape[k_dim]:
        raise ValueError(f"{name}: weight of shape {tuple(W.shape)} does not fit input of shape {tuple(x.shape)}")
    if W.device != x.device:
        raise ValueError(f"{name}: weight on {W.device}, input on {x.device}")


def _acc(x: Tensor) -> torch.dtype:
    """Sums over the batch accumulate in float32 at least (float64 stays float64)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _weight_grad(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """sum_b a_b @ b_b, the batch sum accumulated in float32 or wider, returned in `dtype`."""
    return torch.bmm(a, b).sum(0, dtype=_acc(a)).to(dtype)


class _TokensToChannels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, W: Tensor, bias: Optional[Tensor], sizes: tuple) -> tuple:
        dt = _compute_dtype(h)
        with torch.autocast(h.device.type, enabled=False):
            hc, Wc = h.to(dt), W.to(dt)
            outs = []
            # one product per piece, so each piece is a contiguous tensor of its own
            for Wi, bi in zip(Wc.split(sizes), [None] * len(sizes) if bias is None else bias.to(dt).split(sizes)):
                out = torch.bmm(Wi.expand(h.shape[0], -1, -1), hc.mT)  # (B, M_i, L)
                if bi is not None:
                    out += bi[:, None]
                outs.append(out)
        ctx.save_for_backward(hc, Wc)
        ctx.sizes = sizes
        ctx.dtypes = (h.dtype, W.dtype, None if bias is None else bias.dtype)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *gs: Tensor):
        hc, Wc = ctx.saved_tensors
        h_dtype, W_dtype, b_dtype = ctx.dtypes
        Bsz = hc.shape[0]
        gs = [g.to(hc.dtype).contiguous() for g in gs]  # autograd gives unused pieces zero gradients
        gh = gW = gb = None
        with torch.autocast(hc.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                for g, Wi in zip(gs, Wc.split(ctx.sizes)):
                    # (B, L, K), contiguous; later pieces add in the product's epilogue, not in a separate pass
                    gh = torch.bmm(g.mT, Wi.expand(Bsz, -1, -1)) if gh is None else gh.baddbmm_(g.mT, Wi.expand(Bsz, -1, -1))
                gh = gh.to(h_dtype)
            if ctx.needs_input_grad[1]:
                gW = torch.cat([_weight_grad(g, hc, W_dtype) for g in gs])
            if b_dtype is not None and ctx.needs_input_grad[2]:
                gb = torch.cat([g.sum((0, 2), dtype=_acc(g)) for g in gs]).to(b_dtype)
        return gh, gW, gb, None


class _ChannelsToTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: Tensor, W: Tensor, bias: Optional[Tensor]) -> Tensor:
        dt = _compute_dtype(y)
        with torch.autocast(y.device.type, enabled=False):
            yc, Wc = y.to(dt), W.to(dt)
            out = torch.bmm(yc.mT, Wc.mT.expand(y.shape[0], -1, -1))  # (B, L, M), contiguous
            if bias is not None:
                out += bias.to(dt)
        ctx.save_for_backward(yc, Wc)
        ctx.dtypes = (y.dtype, W.dtype, None if bias is None else bias.dtype)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        yc, Wc = ctx.saved_tensors
        y_dtype, W_dtype, b_dtype = ctx.dtypes
        g = g.to(yc.dtype).contiguous()
        with torch.autocast(g.device.type, enabled=False):
            gy = torch.bmm(Wc.mT.expand(g.shape[0], -1, -1), g.mT).to(y_dtype) if ctx.needs_input_grad[0] else None
            gW = _weight_grad(g.mT, yc.mT, W_dtype) if ctx.needs_input_grad[1] else None
            gb = g.sum((0, 1), dtype=_acc(g)).to(b_dtype) if b_dtype is not None and ctx.needs_input_grad[2] else None
        return gy, gW, gb


class _ChannelMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, W: Tensor, x: Tensor) -> Tensor:
        dt = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xc, Wc = x.to(dt), W.to(dt)
            out = torch.bmm(Wc.expand(x.shape[0], -1, -1), xc)  # (B, M, L), contiguous
        ctx.save_for_backward(xc, Wc)
        ctx.dtypes = (x.dtype, W.dtype)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        xc, Wc = ctx.saved_tensors
        x_dtype, W_dtype = ctx.dtypes
        g = g.to(xc.dtype)
        with torch.autocast(g.device.type, enabled=False):
            gW = _weight_grad(g, xc.mT, W_dtype) if ctx.needs_input_grad[0] else None
            gx = torch.bmm(Wc.mT.expand(g.shape[0], -1, -1), g).to(x_dtype) if ctx.needs_input_grad[1] else None
        return gW, gx


def tokens_to_channels(h: Tensor, weight: Tensor, bias: Optional[Tensor] = None, split: Optional[list] = None):
    """`linear(h, weight, bias).transpose(1, 2)`, contiguous: h (B, L, K), weight (M, K) -> (B, M, L).

    With `split` (sizes summing to M), the output channels come back as that many
    separate contiguous tensors, as `.split(split, dim=1)` of the result would but
    without the strided views (in_proj's x and z: the conv wants x contiguous).
    """
    _check("tokens_to_channels", h, weight, 2)
    sizes = (weight.shape[0],) if split is None else tuple(int(m) for m in split)
    if sum(sizes) != weight.shape[0] or min(sizes) < 1:
        raise ValueError(f"tokens_to_channels: split {list(sizes)} does not partition {weight.shape[0]} output channels")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"tokens_to_channels: bias of shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    outs = _TokensToChannels.apply(h, weight, bias, sizes)
    return outs[0] if split is None else outs


def channels_to_tokens(y: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """`linear(y.transpose(1, 2), weight, bias)`, contiguous: y (B, K, L), weight (M, K) -> (B, L, M)."""
    _check("channels_to_tokens", y, weight, 1)
    return _ChannelsToTokens.apply(y, weight, bias)


def channel_mix(weight: Tensor, x: Tensor) -> Tensor:
    """`weight @ x` for every batch element, contiguous: weight (M, K), x (B, K, L) -> (B, M, L).

    `x` may be any view whose last dimension has unit stride (a slice of channels of a
    larger tensor, for example): the product reads it in place.
    """
    _check("channel_mix", x, weight, 1)
    return _ChannelMix.apply(weight, x)


# ---- reference twins: the nn.Linear-and-transpose forms these replace


def tokens_to_channels_ref(h: Tensor, weight: Tensor, bias: Optional[Tensor] = None, split: Optional[list] = None):
    out = torch.nn.functional.linear(h, weight, bias).transpose(1, 2)
    return out if split is None else out.split(list(split), dim=1)


def channels_to_tokens_ref(y: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    return torch.nn.functional.linear(y.transpose(1, 2), weight, bias)


def channel_mix_ref(weight: Tensor, x: Tensor) -> Tensor:
    return torch.nn.functional.linear(x.transpose(1, 2), weight).transpose(1, 2)
