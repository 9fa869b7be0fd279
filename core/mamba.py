"""The Mamba block and the Mamba language model (Gu & Dao, 2023, Section 3.4, Figure 3).

Glossary (code name -> paper symbol, shape letters as in the course):

    d_model   D      model width                 B  batch
    expand    E      inner expansion (2)         L  length
    d_inner   E*D    inner width (written ED)    N  state size (d_state)
    d_state   N      SSM state size (16)         R  rank of Delta's projection (dt_rank)
    d_conv    K      causal conv kernel (4)      V  vocabulary (padded to a multiple of 8)
    A_log     log(-A)   A = -exp(A_log), S4D-Real init A_n = -(n + 1)
    dt_proj   Delta = softplus(dt_proj(x_proj(x)[:R]))      (Eq. 3 / Algorithm 2, s_Delta)
    x_proj    (Delta-rank part, B, C) = Linear_{R + 2N}(x)   (s_B, s_C)
    D         skip connection y += D * x

One block (Figure 3, "Mamba"):

    x, z = in_proj(h).split(ED)              # (B, L, 2ED) -> two (B, ED, L)
    x = SiLU(causal_depthwise_conv_K(x))
    Delta, B, C = from x_proj(x)             # input-dependent: the *selection*
    y = selective_scan(x, Delta, A, B, C, D) # h_t = exp(Delta A) h_{t-1} + Delta B x_t, y = C h + D x
    y = y * SiLU(z)                          # gate
    out = out_proj(y)

Parameter names and shapes match the reference implementation's
``MambaLMHeadModel`` state dict (``backbone.embedding``,
``backbone.layers.i.mixer.{in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj}``,
``backbone.layers.i.norm``, ``backbone.norm_f``, ``lm_head``), so its published
checkpoints load as they are; `ssmlab.core.hf_convert` maps the Hugging Face
layout. Generation (prefill + O(1) steps) lives in `ssmlab.core.generation`
and uses `MambaLayerCache` and `Mamba.step` from here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssmlab.core.causal_conv import causal_conv1d
from ssmlab.core.channel_major import channel_mix, channels_to_tokens, tokens_to_channels


# --------------------------------------------------------------------------- config


@dataclass
class MambaConfig:
    """One Mamba language model. Paper symbols in the comments; derived fields after `__post_init__`."""

    d_model: int = 768  # D, model width
    n_layer: int = 24  # number of residual Mamba blocks
    vocab_size: int = 50277  # V before padding (GPT-NeoX tokenizer: 50277)
    d_state: int = 16  # N, SSM state size per channel
    expand: int = 2  # E, inner width is E * D
    d_conv: int = 4  # K, causal depthwise conv kernel size
    dt_rank: Union[int, str] = "auto"  # R, rank of the Delta projection; "auto" = ceil(D / 16)
    dt_min: float = 1e-3  # Delta init: log-uniform in [dt_min, dt_max]
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4  # Delta init floor before the inverse softplus
    dt_scale: float = 1.0  # scale of dt_proj.weight's uniform init (std R^-1/2 * dt_scale)
    dt_init: str = "random"  # dt_proj.weight init: "random" (uniform) or "constant"
    bias: bool = False  # bias in in_proj / out_proj (reference: False)
    conv_bias: bool = True  # bias in the depthwise conv
    norm_eps: float = 1e-5  # RMSNorm epsilon
    residual_in_fp32: bool = True  # keep the residual stream in float32 under low precision
    tie_embeddings: bool = True  # LM head shares the embedding matrix
    pad_vocab_size_multiple: int = 8  # V is rounded up to a multiple of this (tensor-core friendly)
    initializer_range: float = 0.02  # std of the embedding init
    rescale_prenorm_residual: bool = True  # out_proj.weight /= sqrt(n_layer) at init (GPT-2 scheme)
    mixer: str = "mamba"  # "mamba": selective SSM (S6); "s4d": LTI baseline, Delta, B, C input-independent
    gated: bool = True  # y *= SiLU(z); False drops z (in_proj then has ED outputs), as in an ungated S4
    dropout: float = 0.0  # on the embedding and on each block's mixer output, training only (the reference has none)
    d_inner: int = field(init=False)  # E * D
    vocab_size_padded: int = field(init=False)  # V rounded up

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layer", "vocab_size", "d_state", "expand", "d_conv", "pad_vocab_size_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MambaConfig.{name} must be a positive int, got {value!r}")
        if self.dt_rank == "auto":
            self.dt_rank = math.ceil(self.d_model / 16)
        if not isinstance(self.dt_rank, int) or isinstance(self.dt_rank, bool) or self.dt_rank < 1:
            raise ValueError(f"MambaConfig.dt_rank must be 'auto' or a positive int, got {self.dt_rank!r}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"MambaConfig needs 0 < dt_min <= dt_max, got dt_min={self.dt_min}, dt_max={self.dt_max}")
        if self.dt_init_floor <= 0:
            raise ValueError(f"MambaConfig.dt_init_floor must be > 0, got {self.dt_init_floor}")
        if self.dt_init not in ("random", "constant"):
            raise ValueError(f"MambaConfig.dt_init must be 'random' or 'constant', got {self.dt_init!r}")
        if self.norm_eps <= 0:
            raise ValueError(f"MambaConfig.norm_eps must be > 0, got {self.norm_eps}")
        if self.mixer not in ("mamba", "s4d"):
            raise ValueError(f"MambaConfig.mixer must be 'mamba' or 's4d', got {self.mixer!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MambaConfig.dropout must be in [0, 1), got {self.dropout}")
        self.d_inner = self.expand * self.d_model
        m = self.pad_vocab_size_multiple
        self.vocab_size_padded = (self.vocab_size + m - 1) // m * m

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @classmethod
    def from_dict(cls, d: dict) -> "MambaConfig":
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(d) - names - {"d_inner", "vocab_size_padded"})
        if unknown:
            raise ValueError(f"unknown MambaConfig fields: {unknown}")
        return cls(**{k: v for k, v in d.items() if k in names})


# The paper's model sizes (Table 12 / Section 4.2.1) and small CPU ones.
PRESETS: dict[str, dict] = {
    "130m": dict(n_layer=24, d_model=768),
    "370m": dict(n_layer=48, d_model=1024),
    "790m": dict(n_layer=48, d_model=1536),
    "1.4b": dict(n_layer=48, d_model=2048),
    "tiny": dict(n_layer=2, d_model=64, vocab_size=256),  # ~70K params, unit tests and synthetic tasks
    "small": dict(n_layer=4, d_model=128, vocab_size=256),  # CPU character-level experiments
}


def preset(name: str, **overrides) -> MambaConfig:
    """The config of a named size ('130m', '370m', '790m', '1.4b', 'tiny', 'small'), with overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown Mamba preset {name!r}; choose one of {sorted(PRESETS)}")
    return MambaConfig(**{**PRESETS[name], **overrides})


def param_count(cfg: MambaConfig) -> int:
    """Number of distinct parameters, computed from the config (no allocation)."""
    if cfg.mixer != "mamba":
        raise ValueError(f"param_count covers mixer='mamba' only, got {cfg.mixer!r}")
    D, ED, N, R, K = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.dt_rank, cfg.d_conv
    n_in = 2 * ED if cfg.gated else ED
    mixer = (
        D * n_in + (n_in if cfg.bias else 0)  # in_proj
        + ED * K + (ED if cfg.conv_bias else 0)  # conv1d (depthwise)
        + ED * (R + 2 * N)  # x_proj
        + R * ED + ED  # dt_proj (weight, bias)
        + ED * N + ED  # A_log, D
        + ED * D + (D if cfg.bias else 0)  # out_proj
    )
    layer = mixer + D  # + RMSNorm weight
    embed = cfg.vocab_size_padded * D
    return embed + cfg.n_layer * layer + D + (0 if cfg.tie_embeddings else embed)


# --------------------------------------------------------------------------- pieces


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32 (float64 kept), returned in x's dtype."""

    def __init__(self, d: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        # F.rms_norm is the same formula as one op (a fused kernel where PyTorch has one, instead of
        # five passes over the activation); autocast is kept off so it stays float32 whatever the context
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32  # 16-bit inputs are normalised in float32
        with torch.autocast(x.device.type, enabled=False):
            y = F.rms_norm(x.to(acc), (x.shape[-1],), self.weight.to(acc), self.eps)
        return y.to(x.dtype)


@dataclass
class MambaLayerCache:
    """What one block needs to continue a sequence: the last K inputs of the conv and the SSM state."""

    conv_state: Tensor  # (B, ED, K): the last K conv inputs, oldest first
    ssm_state: Tensor  # (B, ED, N): h_t, float32
    seqlen_offset: int = 0  # tokens seen so far

    @classmethod
    def zeros(cls, batch: int, cfg: MambaConfig, device=None, dtype=torch.float32) -> "MambaLayerCache":
        return cls(
            conv_state=torch.zeros(batch, cfg.d_inner, cfg.d_conv, device=device, dtype=dtype),
            ssm_state=torch.zeros(batch, cfg.d_inner, cfg.d_state, device=device, dtype=torch.float32),
        )

    def nbytes(self) -> int:
        return self.conv_state.numel() * self.conv_state.element_size() + self.ssm_state.numel() * self.ssm_state.element_size()


def _selective_scan():
    try:
        from ssmlab.core.selective_scan import selective_scan
    except ImportError as err:  # pragma: no cover - only while stage 04 is missing
        raise ImportError(f"ssmlab.core.selective_scan is needed by the Mamba block: {err}") from err
    return selective_scan


class Mamba(nn.Module):
    """The Mamba mixer (the reference's ``Mamba`` / the paper's Figure 3 block, without norm and residual)."""

    def __init__(self, cfg: MambaConfig, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        kw = dict(device=device, dtype=dtype)
        D, ED, N, R, K = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.dt_rank, cfg.d_conv
        self.in_proj = nn.Linear(D, 2 * ED if cfg.gated else ED, bias=cfg.bias, **kw)
        self.conv1d = nn.Conv1d(ED, ED, K, groups=ED, padding=K - 1, bias=cfg.conv_bias, **kw)
        self.x_proj = nn.Linear(ED, R + 2 * N, bias=False, **kw)
        self.dt_proj = nn.Linear(R, ED, bias=True, **kw)
        self.A_log = nn.Parameter(torch.empty(ED, N, **kw))
        self.D = nn.Parameter(torch.empty(ED, **kw))
        self.out_proj = nn.Linear(ED, D, bias=cfg.bias, **kw)
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        if device is None or torch.device(device).type != "meta":
            self.reset_parameters()

    # ---- initialization (Section 3.6 / Appendix: Delta, A; reference defaults elsewhere)
    @torch.no_grad()
    def reset_parameters(self) -> None:
        cfg = self.cfg
        for lin in (self.in_proj, self.x_proj, self.out_proj):
            lin.reset_parameters()
            if lin.bias is not None:
                lin.bias.zero_()
        self.conv1d.reset_parameters()
        std = cfg.dt_rank ** -0.5 * cfg.dt_scale
        if cfg.dt_init == "constant":
            self.dt_proj.weight.fill_(std)
        else:
            self.dt_proj.weight.uniform_(-std, std)
        self.dt_proj.bias.copy_(inverse_softplus(init_delta(cfg.d_inner, cfg, device=self.dt_proj.bias.device)))
        self.A_log.copy_(torch.log(s4d_real_A(cfg.d_inner, cfg.d_state, device=self.A_log.device)))
        self.D.fill_(1.0)
        if cfg.rescale_prenorm_residual:
            self.out_proj.weight /= math.sqrt(cfg.n_layer)

    def A(self) -> Tensor:
        """A = -exp(A_log), float32: (ED, N)."""
        return -torch.exp(self.A_log.float())

    def forward(self, hidden: Tensor, cache: Optional[MambaLayerCache] = None) -> Tensor:
        """hidden (B, L, D) -> (B, L, D). With `cache`, continue from it and leave the final state in it."""
        cfg = self.cfg
        L = hidden.shape[1]
        ED, N, R, K = cfg.d_inner, cfg.d_state, cfg.dt_rank, cfg.d_conv
        # Channel-major from here to out_proj: (B, ED, L) tensors with unit stride along L, produced
        # and consumed by products that absorb the layout change (core/channel_major.py).
        if cfg.gated:
            x, z = tokens_to_channels(hidden, self.in_proj.weight, self.in_proj.bias, split=[ED, ED])
        else:
            x, z = tokens_to_channels(hidden, self.in_proj.weight, self.in_proj.bias), None
        if cache is None:  # SiLU(causal depthwise conv) in one fused pass (core/causal_conv.py)
            x = causal_conv1d(x, self.conv1d.weight, self.conv1d.bias)
            initial_state = None
        else:  # prepend the last K-1 inputs seen (zeros at the start): chunked prefill is exact
            x_ext = torch.cat([cache.conv_state[..., 1:].to(x.dtype), x], dim=-1)  # (B, ED, L + K - 1)
            cache.conv_state = x_ext[..., -K:].to(cache.conv_state.dtype).clone()
            x = F.silu(F.conv1d(x_ext, self.conv1d.weight, self.conv1d.bias, groups=ED))  # (B, ED, L)
            initial_state = cache.ssm_state if cache.seqlen_offset > 0 else None
        x_dbl = channel_mix(self.x_proj.weight, x)  # (B, R + 2N, L)
        dt = channel_mix(self.dt_proj.weight, x_dbl[:, :R])  # (B, ED, L); bias added (in fp32) inside the scan
        B, C = x_dbl[:, R:R + N], x_dbl[:, R + N:]  # (B, N, L) views: the scan reads them in place
        scan = _selective_scan()
        kwargs = dict(D=self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
        if cache is None:
            y = scan(x, dt, self.A(), B, C, **kwargs)
        else:
            y, last = scan(x, dt, self.A(), B, C, return_last_state=True, initial_state=initial_state, **kwargs)
            cache.ssm_state = last.float()
            cache.seqlen_offset += L
        return channels_to_tokens(y, self.out_proj.weight, self.out_proj.bias)  # (B, L, D)

    def step(self, hidden: Tensor, cache: MambaLayerCache, backend: str = "auto") -> Tensor:
        """One token: hidden (B, D) -> (B, D), updating `cache` in place in O(1) time and memory.

        h = exp(Delta A) h + Delta B x;  y = C h + D x;  y *= SiLU(z).
        The conv and the SSM step are one fused kernel each (`ssmlab.core.decode_step`);
        `backend` picks theirs: 'ref' runs them as plain PyTorch ops (the unfused
        step; differentiable), 'auto' the native kernels when nothing needs gradients.
        """
        from ssmlab.core.decode_step import causal_conv1d_update, selective_state_update

        cfg = self.cfg
        R, N = cfg.dt_rank, cfg.d_state
        xz = self.in_proj(hidden)
        x, z = xz.chunk(2, dim=-1) if cfg.gated else (xz, None)  # (B, ED) each
        x = causal_conv1d_update(cache.conv_state, x, self.conv1d.weight[:, 0, :], self.conv1d.bias,
                                 backend=backend)  # SiLU(conv): (B, ED)
        dt, B, C = self.x_proj(x).split([R, N, N], dim=-1)  # (B, R), (B, N), (B, N)
        dt = F.linear(dt, self.dt_proj.weight)  # (B, ED); the bias (in fp32) and softplus inside the update
        y = selective_state_update(cache.ssm_state, x, dt, self.A(), B, C, self.D.float(), z,
                                   self.dt_proj.bias.float(), True, backend=backend)  # (B, ED)
        cache.seqlen_offset += 1
        return self.out_proj(y.to(hidden.dtype))


class LTIMixer(nn.Module):
    """The Mamba block with selection switched off: the baseline that shows selection matters.

    Same in_proj, causal conv, SiLU, optional SiLU(z) gate and out_proj as `Mamba`,
    but the SSM is linear time-invariant: Delta, B, C are per-channel parameters,
    not functions of the input, so the layer is a fixed long convolution
    (S4D-Real init, ZOH, FFT; the kernel of stage 05's `ssmlab.core.s4d`).
    No recurrent step mode (generation is not what it is for).
    """

    def __init__(self, cfg: MambaConfig, device=None, dtype=None):
        super().__init__()
        from ssmlab.core.s4d import S4DKernel  # stage 05

        self.cfg = cfg
        kw = dict(device=device, dtype=dtype)
        D, ED, K = cfg.d_model, cfg.d_inner, cfg.d_conv
        self.in_proj = nn.Linear(D, 2 * ED if cfg.gated else ED, bias=cfg.bias, **kw)
        self.conv1d = nn.Conv1d(ED, ED, K, groups=ED, padding=K - 1, bias=cfg.conv_bias, **kw)
        self.kernel = S4DKernel(ED, cfg.d_state, init="real", method="zoh", dt_min=cfg.dt_min, dt_max=cfg.dt_max)
        self.D = nn.Parameter(torch.ones(ED, **kw))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(ED, D, bias=cfg.bias, **kw)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for module in (self.in_proj, self.conv1d, self.out_proj):
            module.reset_parameters()
        self.D.fill_(1.0)
        if self.cfg.rescale_prenorm_residual:
            self.out_proj.weight /= math.sqrt(self.cfg.n_layer)

    def forward(self, hidden: Tensor, cache: Optional[MambaLayerCache] = None) -> Tensor:
        if cache is not None:
            raise NotImplementedError("the LTI baseline mixer has no cached / recurrent mode")
        from ssmlab.core.s4d import fft_conv

        L, ED = hidden.shape[1], self.cfg.d_inner
        # the same channel-major path as Mamba.forward: no transposing copies
        if self.cfg.gated:
            x, z = tokens_to_channels(hidden, self.in_proj.weight, self.in_proj.bias, split=[ED, ED])
        else:
            x, z = tokens_to_channels(hidden, self.in_proj.weight, self.in_proj.bias), None
        x = causal_conv1d(x, self.conv1d.weight, self.conv1d.bias).float()  # (B, ED, L)
        y = fft_conv(x, self.kernel(L)[0]) + self.D.float()[:, None] * x  # K: (ED, L)
        if z is not None:
            y = y * F.silu(z.float())
        return channels_to_tokens(y.to(hidden.dtype), self.out_proj.weight, self.out_proj.bias)

    def step(self, hidden: Tensor, cache: MambaLayerCache) -> Tensor:
        raise NotImplementedError("the LTI baseline mixer has no cached / recurrent mode")


def s4d_real_A(d_inner: int, d_state: int, device=None) -> Tensor:
    """S4D-Real: -A_n = n + 1 for n = 0..N-1, the same for every channel: (ED, N)."""
    return torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(d_inner, 1)


def init_delta(d_inner: int, cfg: MambaConfig, device=None) -> Tensor:
    """Delta at init: log-uniform in [dt_min, dt_max], floored at dt_init_floor: (ED,)."""
    u = torch.rand(d_inner, device=device)
    dt = torch.exp(u * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
    return dt.clamp(min=cfg.dt_init_floor)


def inverse_softplus(y: Tensor) -> Tensor:
    """x with softplus(x) = y: x = y + log(1 - exp(-y))."""
    return y + torch.log(-torch.expm1(-y))


# --------------------------------------------------------------------------- the language model


class Block(nn.Module):
    """Pre-norm residual block: h <- h + Mamba(RMSNorm(h))."""

    def __init__(self, cfg: MambaConfig, device=None, dtype=None):
        super().__init__()
        self.residual_in_fp32 = cfg.residual_in_fp32
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, device=device, dtype=dtype)
        self.mixer = (Mamba if cfg.mixer == "mamba" else LTIMixer)(cfg, device=device, dtype=dtype)
        self.drop = nn.Dropout(cfg.dropout)  # an identity in eval mode; step() (generation) never drops

    def forward(self, h: Tensor, cache: Optional[MambaLayerCache] = None) -> Tensor:
        out = self.drop(self.mixer(self.norm(h.to(self.norm.weight.dtype)), cache))
        return (h.float() if self.residual_in_fp32 else h) + out

    def step(self, h: Tensor, cache: MambaLayerCache) -> Tensor:
        out = self.mixer.step(self.norm(h.to(self.norm.weight.dtype)), cache)
        return (h.float() if self.residual_in_fp32 else h) + out


class MambaBackbone(nn.Module):
    """Embedding, n_layer blocks, final norm (the reference's ``MixerModel``)."""

    def __init__(self, cfg: MambaConfig, device=None, dtype=None):
        super().__init__()
        self.embedding = nn.Embedding(cfg.vocab_size_padded, cfg.d_model, device=device, dtype=dtype)
        self.layers = nn.ModuleList([Block(cfg, device=device, dtype=dtype) for _ in range(cfg.n_layer)])
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps, device=device, dtype=dtype)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: Tensor, caches: Optional[list[MambaLayerCache]] = None) -> Tensor:
        h = self.drop(self.embedding(input_ids))  # (B, L, D)
        for i, layer in enumerate(self.layers):
            h = layer(h, None if caches is None else caches[i])
        return self.norm_f(h.to(self.norm_f.weight.dtype))

    def step(self, input_ids: Tensor, caches: list[MambaLayerCache]) -> Tensor:
        h = self.embedding(input_ids)  # (B, D)
        for layer, cache in zip(self.layers, caches):
            h = layer.step(h, cache)
        return self.norm_f(h.to(self.norm_f.weight.dtype))


class MambaLMHeadModel(nn.Module):
    """Mamba language model: logits over the padded vocabulary, shape (B, L, V_padded)."""

    def __init__(self, cfg: MambaConfig, device=None, dtype=None, init: bool = True):
        super().__init__()
        self.config = cfg
        self.backbone = MambaBackbone(cfg, device=device, dtype=dtype)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size_padded, bias=False, device=device, dtype=dtype)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight
        if init and (device is None or torch.device(device).type != "meta"):
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The reference initialization: N(0, 0.02) embedding, Mamba's Delta/A/D init, out_proj / sqrt(n_layer)."""
        nn.init.normal_(self.backbone.embedding.weight, std=self.config.initializer_range)
        if not self.config.tie_embeddings:
            self.lm_head.reset_parameters()
        for layer in self.backbone.layers:
            layer.norm.weight.fill_(1.0)
            layer.mixer.reset_parameters()
        self.backbone.norm_f.weight.fill_(1.0)

    def forward(self, input_ids: Tensor, caches: Optional[list[MambaLayerCache]] = None) -> Tensor:
        """input_ids (B, L) int64 -> logits (B, L, V_padded). `caches` (prefill) are updated in place."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}")
        return self.lm_head(self.backbone(input_ids, caches))

    def step(self, input_ids: Tensor, caches: list[MambaLayerCache]) -> Tensor:
        """One token per sequence: input_ids (B,) -> logits (B, V_padded), O(1) in the context length."""
        if input_ids.ndim != 1:
            raise ValueError(f"input_ids must be (B,), got shape {tuple(input_ids.shape)}")
        return self.lm_head(self.backbone.step(input_ids, caches))

    def allocate_cache(self, batch: int, device=None, dtype=None) -> list[MambaLayerCache]:
        p = self.lm_head.weight
        return [MambaLayerCache.zeros(batch, self.config, device=device or p.device, dtype=dtype or p.dtype)
                for _ in range(self.config.n_layer)]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # shared (tied) parameters count once

    # ---- saving (safetensors + JSON config, atomic)
    def save_pretrained(self, folder) -> None:
        from ssmlab.core.checkpoint import save_model

        save_model(folder, self, self.config)

    @classmethod
    def from_pretrained(cls, folder, device=None, dtype=None) -> "MambaLMHeadModel":
        """Load a folder written by `save_pretrained`, or a reference ``state-spaces/mamba-*`` folder."""
        from ssmlab.core.checkpoint import load_config_dict, load_model_state

        d = load_config_dict(folder)
        cfg = config_from_reference(d) if "ssm_cfg" in d or "rms_norm" in d else MambaConfig.from_dict(d)
        model = cls(cfg, device=device, dtype=dtype, init=False)
        return load_model_state(folder, model)


def config_from_reference(d: dict) -> MambaConfig:
    """MambaConfig from a reference ``mamba_ssm`` config.json (d_model, n_layer, vocab_size, ssm_cfg, ...)."""
    if not d.get("rms_norm", True):
        raise ValueError("only rms_norm=True Mamba checkpoints are supported")
    ssm = d.get("ssm_cfg") or {}
    if ssm.get("layer", "Mamba1") not in ("Mamba1",):
        raise ValueError(f"only Mamba1 layers are supported, got {ssm.get('layer')!r}")
    known = {"d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init_floor", "dt_scale", "dt_init", "conv_bias", "bias"}
    return MambaConfig(
        d_model=d["d_model"], n_layer=d["n_layer"], vocab_size=d["vocab_size"],
        residual_in_fp32=d.get("residual_in_fp32", True), tie_embeddings=d.get("tie_embeddings", True),
        pad_vocab_size_multiple=d.get("pad_vocab_size_multiple", 8),
        **{k: v for k, v in ssm.items() if k in known},
    )


__all__ = [
    "Block", "LTIMixer", "Mamba", "MambaBackbone", "MambaConfig", "MambaLMHeadModel", "MambaLayerCache", "PRESETS", "RMSNorm",
    "config_from_reference", "init_delta", "inverse_softplus", "param_count", "preset", "s4d_real_A",
]
