"""One residual backbone for sequence classification, with a choice of sequence mixer.

    tokens (B, L) -> embedding (B, L, D)
      -> n_layers x [ x <- x + Dropout(Mixer(LayerNorm(x)))         (pre-norm residual)
                      x <- x + Dropout(MLP(LayerNorm(x))) ]        (when mlp_ratio > 0)
      -> LayerNorm -> masked mean over the L valid positions (B, D)
      -> Linear(D, 1): one logit, P(positive) = sigmoid(logit)

Mixers (each a module on (B, L, D)):

* ``s4``: S4 with the DPLR kernel (``ssmlab.core.s4``), bidirectional by default;
* ``s4d``: S4D with a Vandermonde kernel (``ssmlab.core.s4d``);
* ``mamba``: the selective SSM block of stage 06 (``ssmlab.core.mamba.Mamba``,
  which runs stage 04's ``selective_scan``); causal, or with ``bidirectional``
  a second block that reads each sequence backwards (``BiMamba``);
* ``transformer``: multi-head self-attention, with an MLP sublayer
  (``mlp_ratio=4``): a pre-norm Transformer encoder with learned positions.

Padding: batches are padded on the right with id 0; every mixer input is
zeroed at padded positions (a bidirectional kernel would otherwise read them),
attention masks padded keys, and the pooling averages valid positions only,
so a review's logit does not depend on how much padding its batch has.

One config dataclass per model (`S4Config`, `S4DConfig`, `MambaClsConfig`,
`TransformerConfig`); `param_count` and `fit_d_model` size models to a common
parameter budget.

Shapes: B batch, L length, D model width (= H channels of the SSM layers),
N state size, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class ClassifierConfig:
    """Fields shared by every model; subclasses add the mixer's own."""

    vocab_size: int = 257  # V (byte level: 256 bytes + padding)
    d_model: int = 128  # D, model width (H channels for S4/S4D)
    n_layers: int = 4  # residual blocks
    dropout: float = 0.1  # after each mixer, and inside S4/S4D layers
    max_len: int = 4096  # longest input (positions of the Transformer, S4's kernel length)
    mlp_ratio: int = 0  # > 0: each block also has a pre-norm MLP sublayer of width mlp_ratio * D

    mixer = "none"  # class attribute: the registry key

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "max_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{type(self).__name__}.{name} must be a positive int, got {v!r}")
        if not isinstance(self.mlp_ratio, int) or self.mlp_ratio < 0:
            raise ValueError(f"mlp_ratio must be a non-negative int, got {self.mlp_ratio!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return {"mixer": self.mixer, **dataclasses.asdict(self)}


@dataclass
class S4Config(ClassifierConfig):
    """S4 (DPLR, HiPPO-LegS init, bilinear)."""

    d_state: int = 64  # N, state size per channel (N/2 stored conjugate pairs)
    bidirectional: bool = True  # a second kernel reads the sequence backwards
    dt_min: float = 1e-3  # Δ init, log-uniform in [dt_min, dt_max]
    dt_max: float = 1e-1

    mixer = "s4"


@dataclass
class S4DConfig(ClassifierConfig):
    """S4D (diagonal; Vandermonde kernel)."""

    d_state: int = 64  # N
    init: str = "legs"  # A init: "legs", "lin" or "real"
    method: str = "zoh"  # discretization: "zoh" or "bilinear"
    bidirectional: bool = True
    dt_min: float = 1e-3
    dt_max: float = 1e-1

    mixer = "s4d"


@dataclass
class MambaClsConfig(ClassifierConfig):
    """Mamba block (selective SSM, S6) as the mixer."""

    d_state: int = 16  # N
    expand: int = 2  # E: inner width E * D
    d_conv: int = 4  # K: causal depthwise conv width
    bidirectional: bool = False  # True: a second block reads each sequence backwards (BiMamba), outputs summed

    mixer = "mamba"


@dataclass
class TransformerConfig(ClassifierConfig):
    """Transformer encoder baseline (pre-norm)."""

    n_heads: int = 4  # attention heads (D must be divisible)
    mlp_ratio: int = 4  # the MLP sublayer of a Transformer layer
    bidirectional: bool = True  # False: causal attention (no padding mask needed; the fused kernels' fast path)

    mixer = "transformer"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")


CONFIGS = {c.mixer: c for c in (S4Config, S4DConfig, MambaClsConfig, TransformerConfig)}


def make_config(mixer: str, **kw) -> ClassifierConfig:
    if mixer not in CONFIGS:
        raise ValueError(f"mixer must be one of {sorted(CONFIGS)}, got {mixer!r}")
    return CONFIGS[mixer](**kw)


# ----------------------------------------------------------------------------- mixers


class SelfAttention(nn.Module):
    """Multi-head self-attention over valid positions (padded keys are masked), or causal."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        D = cfg.d_model
        self.h = cfg.n_heads
        self.causal = not cfg.bidirectional
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x (B, L, D), mask (B, L) True at valid positions -> (B, L, D)."""
        Bsz, L, D = x.shape
        P = D // self.h
        q, k, v = self.qkv(x).view(Bsz, L, 3, self.h, P).permute(2, 0, 3, 1, 4)  # 3 x (B, h, L, P)
        # The fused SDPA kernels (flash, memory-efficient) need a head size that
        # is a multiple of 8; budget-fitted widths often give others (d_model 88
        # = 4 heads of 22), and then attention falls back to the math kernel,
        # whose (B, h, L, L) scores run out of memory at bytes, L = 4096. Zero
        # columns change no score (the scale stays 1/sqrt(P)) and only add zero
        # output columns, dropped after.
        pad = -P % 8
        if pad:
            q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
        if self.causal:
            # Padding sits after every valid position, so causal attention never
            # lets a valid query see it: no mask, and the flash kernel applies.
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=P**-0.5)
        else:
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None, None, :], scale=P**-0.5)
        return self.proj(att[..., :P].transpose(1, 2).reshape(Bsz, L, D))


def mlp(D: int, ratio: int) -> nn.Module:
    return nn.Sequential(nn.Linear(D, ratio * D), nn.GELU(), nn.Linear(ratio * D, D))


class _Mixer(nn.Module):
    """Wrap a (B, L, D) -> (B, L, D) module so every mixer takes (x, mask)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.inner(x)


def reverse_valid(x: Tensor, lengths: Tensor) -> Tensor:
    """Reverse each row of x (B, L, ...) within its first lengths[b] positions; padding stays where it is.

    Its own inverse. Flipping the whole row would put the padding first, and a selective
    block is not at rest on zero inputs (conv and Δ biases), so the padding would leak in.
    """
    L = x.shape[1]
    t = torch.arange(L, device=x.device)[None, :]
    idx = torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)  # (B, L)
    return x.gather(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand_as(x))


class BiMamba(nn.Module):
    """Two Mamba blocks, one over the sequence and one over its valid part reversed; outputs summed.

    A causal block only lets a position see its past; for classification (no future to hide)
    the reversed block gives every position its future too, as the bidirectional S4/S4D kernels do.
    """

    def __init__(self, fwd: nn.Module, bwd: nn.Module):
        super().__init__()
        self.fwd, self.bwd = fwd, bwd

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        lengths = mask.sum(1)
        return self.fwd(x) + reverse_valid(self.bwd(reverse_valid(x, lengths)), lengths)


def make_mixer(cfg: ClassifierConfig) -> nn.Module:
    if isinstance(cfg, S4Config):
        from ssmlab.core.s4 import s4_layer

        return _Mixer(s4_layer(cfg.d_model, cfg.d_state, cfg.bidirectional, cfg.dropout, cfg.dt_min, cfg.dt_max,
                               l_max=cfg.max_len))
    if isinstance(cfg, S4DConfig):
        from ssmlab.core.s4d import s4d_layer

        return _Mixer(s4d_layer(cfg.d_model, cfg.d_state, cfg.init, cfg.method, cfg.bidirectional, cfg.dropout,
                                cfg.dt_min, cfg.dt_max))
    if isinstance(cfg, MambaClsConfig):
        from ssmlab.core.mamba import Mamba, MambaConfig

        mcfg = MambaConfig(d_model=cfg.d_model, n_layer=cfg.n_layers, vocab_size=cfg.vocab_size, d_state=cfg.d_state,
                           expand=cfg.expand, d_conv=cfg.d_conv)
        if cfg.bidirectional:
            return BiMamba(Mamba(mcfg), Mamba(mcfg))
        block = Mamba(mcfg)
        block.reset_parameters()  # a second draw, kept so earlier runs' seeds still give the same weights
        return _Mixer(block)
    if isinstance(cfg, TransformerConfig):
        return SelfAttention(cfg)
    raise TypeError(f"no mixer for config type {type(cfg).__name__}")


# ----------------------------------------------------------------------------- the model


class SequenceClassifier(nn.Module):
    """Embedding -> residual blocks of one mixer -> masked mean pool -> one logit."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        self.embedding = nn.Embedding(cfg.vocab_size, D, padding_idx=0)
        self.pos = nn.Embedding(cfg.max_len, D) if isinstance(cfg, TransformerConfig) else None
        self.norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(cfg.n_layers))
        self.mixers = nn.ModuleList(make_mixer(cfg) for _ in range(cfg.n_layers))
        n_mlp = cfg.n_layers if cfg.mlp_ratio else 0
        self.mlp_norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(n_mlp))
        self.mlps = nn.ModuleList(mlp(D, cfg.mlp_ratio) for _ in range(n_mlp))
        self.drop = nn.Dropout(cfg.dropout)
        self.norm_f = nn.LayerNorm(D)
        self.head = nn.Linear(D, 1)

    def forward(self, ids: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        """ids (B, L) int, lengths (B,) valid tokens per row (default: all) -> logits (B,)."""
        if ids.dim() != 2:
            raise ValueError(f"ids must be (B, L), got shape {tuple(ids.shape)}")
        Bsz, L = ids.shape
        if L > self.cfg.max_len:
            raise ValueError(f"sequence length {L} exceeds max_len={self.cfg.max_len}")
        if lengths is None:
            lengths = torch.full((Bsz,), L, device=ids.device)
        mask = torch.arange(L, device=ids.device)[None, :] < lengths[:, None]  # (B, L)
        m = mask.unsqueeze(-1)
        x = self.embedding(ids)
        if self.pos is not None:
            x = x + self.pos.weight[:L]
        x = self.drop(x)
        for i, (norm, mixer) in enumerate(zip(self.norms, self.mixers)):
            u = norm(x) * m  # padded positions feed zeros to the mixer
            x = x + self.drop(mixer(u, mask))
            if self.mlps:
                x = x + self.drop(self.mlps[i](self.mlp_norms[i](x)))
        x = self.norm_f(x) * m
        pooled = x.sum(1) / lengths.clamp(min=1).unsqueeze(-1).to(x.dtype)  # (B, D) mean of valid positions
        return self.head(pooled).squeeze(-1)


def build_model(cfg: ClassifierConfig) -> SequenceClassifier:
    return SequenceClassifier(cfg)


def param_count(model_or_cfg: Union[nn.Module, ClassifierConfig]) -> int:
    """Trainable parameters of a model, or of the model a config builds."""
    model = build_model(model_or_cfg) if isinstance(model_or_cfg, ClassifierConfig) else model_or_cfg
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def fit_d_model(cfg: ClassifierConfig, budget: int, multiple: int = 8) -> ClassifierConfig:
    """A copy of `cfg` whose d_model (a multiple of `multiple`) brings the parameter count closest to `budget`."""
    if budget < 1:
        raise ValueError(f"budget must be positive, got {budget}")
    if isinstance(cfg, TransformerConfig):
        multiple = math.lcm(multiple, cfg.n_heads)
    count = lambda d: param_count(dataclasses.replace(cfg, d_model=d))  # noqa: E731
    lo, hi = 1, 2
    while count(hi * multiple) < budget and hi < 4096:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # largest width under the budget lies in [lo, hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid * multiple) <= budget else (lo, mid)
    best = min((lo, hi), key=lambda k: abs(count(k * multiple) - budget))
    return dataclasses.replace(cfg, d_model=best * multiple)


# ----------------------------------------------------------------------------- language modelling


class CausalLM(nn.Module):
    """The same residual backbone as a causal language model: (B, L) ids -> (B, L, V) logits.

    For the character-level ladder (stages 01, 03, 05, 06). S4 / S4D mixers
    must be causal (``bidirectional=False``); the Transformer config is
    refused here (stage 06 has its own, with rotary positions and a KV cache).
    """

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        if getattr(cfg, "bidirectional", False):
            raise ValueError("a language model must be causal: set bidirectional=False")
        if isinstance(cfg, TransformerConfig):
            raise ValueError("CausalLM takes the SSM mixers; use ssmlab.core.transformer for the Transformer baseline")
        self.cfg = cfg
        D = cfg.d_model
        self.embedding = nn.Embedding(cfg.vocab_size, D)
        self.norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(cfg.n_layers))
        self.mixers = nn.ModuleList(make_mixer(cfg) for _ in range(cfg.n_layers))
        n_mlp = cfg.n_layers if cfg.mlp_ratio else 0
        self.mlp_norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(n_mlp))
        self.mlps = nn.ModuleList(mlp(D, cfg.mlp_ratio) for _ in range(n_mlp))
        self.drop = nn.Dropout(cfg.dropout)
        self.norm_f = nn.LayerNorm(D)
        self.head = nn.Linear(D, cfg.vocab_size, bias=False)
        self.head.weight = self.embedding.weight  # tied input and output embeddings
        nn.init.normal_(self.embedding.weight, std=0.02)  # small: tied logits start near uniform

    def forward(self, ids: Tensor) -> Tensor:
        if ids.dim() != 2:
            raise ValueError(f"ids must be (B, L), got shape {tuple(ids.shape)}")
        x = self.drop(self.embedding(ids))
        mask = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
        for i, (norm, mixer) in enumerate(zip(self.norms, self.mixers)):
            x = x + self.drop(mixer(norm(x), mask))
            if self.mlps:
                x = x + self.drop(self.mlps[i](self.mlp_norms[i](x)))
        return self.head(self.norm_f(x))
