"""A decoder-only Transformer baseline with the Mamba recipe (the paper's "Transformer++").

The Mamba paper compares against a GPT-3-style Transformer with the modern
recipe (Section 4.2, "Transformer++"): rotary position embeddings, SwiGLU MLP,
RMSNorm, no linear biases, a head tied to the embedding. This module is that
baseline, written so that it can be swapped for `ssmlab.core.mamba` anywhere:
same forward signature (ids (B, L) -> logits (B, L, V_padded)), the same
`step` / `allocate_cache` generation protocol (so `ssmlab.core.generation.generate`
drives both), the same safetensors save/load.

Glossary (code name -> symbol, shape letters as in the course):

    d_model   D     model width                  B  batch
    n_head    H     attention heads              L  length (queries)
    head_dim  P     D / H                        S  length of the keys (cache + new)
    d_ff      F     hidden width of the MLP      V  vocabulary (padded to a multiple of 8)

One block (pre-norm)::

    h = h + W_o · Attn(RoPE(W_q x), RoPE(W_k x), W_v x),   x = RMSNorm(h)
    h = h + W_down · (SiLU(W_gate x) * W_up x),            x = RMSNorm(h)   (SwiGLU; GELU: W_down GELU(W_up x))

Attention uses `F.scaled_dot_product_attention` (`causal_attention`), which
takes the FlashAttention kernel on a recent GPU under bf16/fp16; its readable
twin `causal_attention_ref` writes out softmax(Q K^T / sqrt(P) + mask) V.

Generation: a KV cache per layer (`KVCache`) holds the keys and values of every
past token, (B, H, S, P) each: it grows linearly with the context, which is
exactly what a Mamba cache does not do (`ssmlab.core.generation`).

`match_mamba(cfg)` builds the Transformer configuration with the parameter
count of a Mamba configuration (within 5%): a Transformer layer (4D^2 + 3DF)
weighs about two Mamba layers (6D^2), so it takes half the layers at the same
width and fits the MLP width F to the remaining budget.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssmlab.core.mamba import RMSNorm


# --------------------------------------------------------------------------- config


@dataclass
class TransformerConfig:
    """One decoder-only Transformer language model. Derived fields are set in `__post_init__`."""

    d_model: int = 768  # D, model width
    n_layer: int = 12  # number of residual blocks (attention + MLP each)
    n_head: int = 12  # H, attention heads; head_dim P = D / H must be even (rotary pairs)
    vocab_size: int = 50277  # V before padding
    d_ff: int = 0  # F, MLP hidden width; 0 = auto (SwiGLU: 8D/3 rounded up to a multiple of 64; GELU: 4D)
    mlp: str = "swiglu"  # "swiglu" (3 matrices) or "gelu" (2 matrices)
    rope_base: float = 10000.0  # rotary base: frequency of pair i is base^(-2i/P)
    norm_eps: float = 1e-5  # RMSNorm epsilon
    residual_in_fp32: bool = True  # keep the residual stream in float32 under autocast
    tie_embeddings: bool = True  # LM head shares the embedding matrix
    pad_vocab_size_multiple: int = 8  # V rounded up to a multiple of this
    initializer_range: float = 0.02  # std of every weight matrix at init
    rescale_prenorm_residual: bool = True  # output projections get std / sqrt(2 n_layer) (GPT-2 scheme)
    max_seq_len: int = 2048  # default KV-cache capacity (it grows when exceeded); no learned positions
    dropout: float = 0.0  # on the embedding and on each attention / MLP output, training only
    head_dim: int = field(init=False)  # P = D / H
    vocab_size_padded: int = field(init=False)  # V rounded up

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layer", "n_head", "vocab_size", "pad_vocab_size_multiple", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TransformerConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"TransformerConfig.d_model={self.d_model} must be divisible by n_head={self.n_head}")
        self.head_dim = self.d_model // self.n_head
        if self.head_dim % 2:
            raise ValueError(f"TransformerConfig: head_dim = d_model / n_head = {self.head_dim} must be even for rotary embeddings")
        if self.mlp not in ("swiglu", "gelu"):
            raise ValueError(f"TransformerConfig.mlp must be 'swiglu' or 'gelu', got {self.mlp!r}")
        if not isinstance(self.d_ff, int) or self.d_ff < 0:
            raise ValueError(f"TransformerConfig.d_ff must be an int >= 0 (0 = auto), got {self.d_ff!r}")
        if self.d_ff == 0:
            self.d_ff = 64 * math.ceil(8 * self.d_model / 3 / 64) if self.mlp == "swiglu" else 4 * self.d_model
        if self.rope_base <= 1:
            raise ValueError(f"TransformerConfig.rope_base must be > 1, got {self.rope_base}")
        if self.norm_eps <= 0:
            raise ValueError(f"TransformerConfig.norm_eps must be > 0, got {self.norm_eps}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TransformerConfig.dropout must be in [0, 1), got {self.dropout}")
        m = self.pad_vocab_size_multiple
        self.vocab_size_padded = (self.vocab_size + m - 1) // m * m

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @classmethod
    def from_dict(cls, d: dict) -> "TransformerConfig":
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(d) - names - {"head_dim", "vocab_size_padded"})
        if unknown:
            raise ValueError(f"unknown TransformerConfig fields: {unknown}")
        return cls(**{k: v for k, v in d.items() if k in names})


def param_count(cfg: TransformerConfig) -> int:
    """Number of distinct parameters, from the config alone."""
    D, F_ = cfg.d_model, cfg.d_ff
    attn = 4 * D * D  # W_q, W_k, W_v (one fused matrix) and W_o
    mlp = (3 if cfg.mlp == "swiglu" else 2) * D * F_
    layer = attn + mlp + 2 * D  # + two RMSNorm weights
    embed = cfg.vocab_size_padded * D
    return embed + cfg.n_layer * layer + D + (0 if cfg.tie_embeddings else embed)


def match_mamba(mamba_cfg, n_layer: Optional[int] = None, n_head: Optional[int] = None, mlp: str = "swiglu",
                multiple: int = 8, tol: float = 0.05, **overrides) -> TransformerConfig:
    """The Transformer config whose parameter count is within `tol` of a Mamba config's.

    Same width D and vocabulary; n_layer defaults to half the Mamba layers (one
    attention + MLP block weighs about two Mamba blocks); n_head defaults to
    D / 64 heads (head_dim 64) when D allows, else the largest head count <= D / 32
    with an even head_dim. The MLP width F is then solved for, rounded to
    `multiple`. Raises ValueError when no F > 0 lands within `tol`.
    """
    from ssmlab.core.mamba import param_count as mamba_param_count

    target = mamba_param_count(mamba_cfg)
    D = mamba_cfg.d_model
    n_layer = n_layer or max(1, mamba_cfg.n_layer // 2)
    if n_head is None:
        n_head = D // 64 if D % 64 == 0 else next(h for h in range(max(1, D // 32), 0, -1) if D % h == 0 and (D // h) % 2 == 0)
    base = dict(d_model=D, n_layer=n_layer, n_head=n_head, vocab_size=mamba_cfg.vocab_size, mlp=mlp,
                tie_embeddings=mamba_cfg.tie_embeddings, pad_vocab_size_multiple=mamba_cfg.pad_vocab_size_multiple,
                norm_eps=mamba_cfg.norm_eps, residual_in_fp32=mamba_cfg.residual_in_fp32,
                dropout=mamba_cfg.dropout)
    base.update(overrides)
    probe = TransformerConfig(**{**base, "d_ff": multiple})
    per_unit = probe.n_layer * (3 if probe.mlp == "swiglu" else 2) * probe.d_model  # params per unit of F
    fixed = param_count(probe) - per_unit * multiple
    d_ff = max(multiple, multiple * round((target - fixed) / per_unit / multiple))
    cfg = TransformerConfig(**{**base, "d_ff": d_ff})
    got = param_count(cfg)
    if abs(got - target) > tol * target:
        raise ValueError(
            f"match_mamba: no MLP width matches {target:,} Mamba parameters within {tol:.0%} "
            f"(best d_ff={d_ff} gives {got:,}); pass a different n_layer (now {n_layer})"
        )
    return cfg


def build_matched_lm(name: str, mamba_cfg, max_seq_len: int = 2048, device=None, dtype=None):
    """Stage 06's pair at one size: ``(model, n_params, cfg)``.

    name "mamba": the Mamba LM of `mamba_cfg`; "transformer": the Transformer
    baseline matched to it by `match_mamba` (parameters within 5%). Both map
    ids (B, L) to logits over the padded vocabulary (B, L, V_padded). `device`
    and `dtype` allocate the weights there directly (no CPU float32 copy first).
    """
    from ssmlab.core.mamba import MambaLMHeadModel, param_count as mamba_param_count

    if name == "mamba":
        return MambaLMHeadModel(mamba_cfg, device=device, dtype=dtype), mamba_param_count(mamba_cfg), mamba_cfg
    if name == "transformer":
        cfg = match_mamba(mamba_cfg, max_seq_len=max_seq_len)
        return TransformerLM(cfg, device=device, dtype=dtype), param_count(cfg), cfg
    raise ValueError(f"build_matched_lm: name must be 'mamba' or 'transformer', got {name!r}")


# --------------------------------------------------------------------------- rotary embeddings


def rotary_cos_sin(positions: Tensor, head_dim: int, base: float,
                   dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotation angles theta_{t,i} = t * base^(-2i/P): (L, P/2) each, in `dtype`."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=dtype, device=positions.device) / head_dim)
    angles = positions.to(dtype)[:, None] * inv_freq[None, :]  # (L, P/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (x_i, x_{i+P/2}) of x (B, H, L, P) by its angle ("rotate-half" layout).

    (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos), computed in float32 at least; so
    <RoPE(q, t), RoPE(k, s)> depends on t - s only (RoFormer, Su et al. 2021, Eq. 14).
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    x1, x2 = x.to(acc).chunk(2, dim=-1)  # (B, H, L, P/2) each
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)


# --------------------------------------------------------------------------- attention


def _causal_mask(L: int, S: int, device) -> Tensor:
    """Boolean (L, S) mask, True where query i (at position S - L + i) may see key j: j <= S - L + i."""
    return torch.ones(L, S, dtype=torch.bool, device=device).tril(diagonal=S - L)


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal softmax attention, fused: q (B, H, L, P), k and v (B, H, S, P) with S >= L -> (B, H, L, P).

    The L queries are the last L positions of the S keys (a KV cache holds the
    first S - L). Dispatches to `F.scaled_dot_product_attention` (flash /
    memory-efficient kernels on GPU).
    """
    L, S = q.shape[-2], k.shape[-2]
    if S < L:
        raise ValueError(f"causal_attention: keys ({S}) must be at least as many as queries ({L})")
    if L == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if L == 1:  # one new token sees every cached key
        return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_mask(L, S, q.device))


def causal_attention_ref(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The same as `causal_attention`, written out: softmax(Q K^T / sqrt(P) + causal mask) V."""
    L, S, P = q.shape[-2], k.shape[-2], q.shape[-1]
    if S < L:
        raise ValueError(f"causal_attention_ref: keys ({S}) must be at least as many as queries ({L})")
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(P)  # (B, H, L, S)
    scores = scores.masked_fill(~_causal_mask(L, S, q.device), float("-inf"))
    acc = torch.promote_types(scores.dtype, torch.float32)  # softmax in float32 at least (float64 stays)
    return torch.softmax(scores.to(acc), dim=-1).to(q.dtype) @ v


@dataclass
class KVCache:
    """Keys and values of every token seen so far, for one layer; grows with the context."""

    k: Tensor  # (B, H, capacity, P)
    v: Tensor  # (B, H, capacity, P)
    seqlen_offset: int = 0  # tokens stored (positions 0 .. seqlen_offset-1)

    @classmethod
    def zeros(cls, batch: int, cfg: TransformerConfig, capacity: int, device=None, dtype=torch.float32) -> "KVCache":
        shape = (batch, cfg.n_head, capacity, cfg.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, H, L, P) after the past ones; return all keys and values (B, H, S, P)."""
        start, end = self.seqlen_offset, self.seqlen_offset + k.shape[-2]
        if end > self.k.shape[-2]:  # grow geometrically: amortised O(1) per token
            new_cap = max(end, 2 * self.k.shape[-2])
            pad = (0, 0, 0, new_cap - self.k.shape[-2])
            self.k, self.v = F.pad(self.k, pad), F.pad(self.v, pad)
        self.k[:, :, start:end] = k.to(self.k.dtype)
        self.v[:, :, start:end] = v.to(self.v.dtype)
        self.seqlen_offset = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def nbytes(self, used_only: bool = True) -> int:
        """Bytes of keys and values held (only the used part by default)."""
        n = self.seqlen_offset if used_only else self.k.shape[-2]
        return 2 * self.k[:, :, :n].numel() * self.k.element_size()


class Attention(nn.Module):
    """Multi-head causal self-attention with rotary embeddings and no biases."""

    def __init__(self, cfg: TransformerConfig, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False, device=device, dtype=dtype)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False, device=device, dtype=dtype)

    def forward(self, x: Tensor, cache: Optional[KVCache] = None, attention=causal_attention) -> Tensor:
        """x (B, L, D) -> (B, L, D). With `cache`, the L tokens continue the cached ones."""
        Bsz, L, D = x.shape
        H, P = self.cfg.n_head, self.cfg.head_dim
        q, k, v = self.qkv(x).view(Bsz, L, 3, H, P).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, P)
        offset = cache.seqlen_offset if cache is not None else 0
        acc = torch.promote_types(q.dtype, torch.float32)
        cos, sin = rotary_cos_sin(torch.arange(offset, offset + L, device=x.device), P, self.cfg.rope_base, acc)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, H, S, P)
        y = attention(q, k, v)  # (B, H, L, P)
        return self.out_proj(y.transpose(1, 2).reshape(Bsz, L, D))


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): W_down(SiLU(W_gate x) * W_up x); or GELU: W_down GELU(W_up x)."""

    def __init__(self, cfg: TransformerConfig, device=None, dtype=None):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        n_in = 2 * cfg.d_ff if self.swiglu else cfg.d_ff
        self.up_proj = nn.Linear(cfg.d_model, n_in, bias=False, device=device, dtype=dtype)  # [W_gate; W_up] for SwiGLU
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        h = self.up_proj(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return self.down_proj(h)


class TransformerBlock(nn.Module):
    """h <- h + Attn(RMSNorm(h)); h <- h + MLP(RMSNorm(h))."""

    def __init__(self, cfg: TransformerConfig, device=None, dtype=None):
        super().__init__()
        self.residual_in_fp32 = cfg.residual_in_fp32
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps, device=device, dtype=dtype)
        self.attn = Attention(cfg, device=device, dtype=dtype)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps, device=device, dtype=dtype)
        self.mlp = MLP(cfg, device=device, dtype=dtype)
        self.drop = nn.Dropout(cfg.dropout)  # an identity in eval mode

    def forward(self, h: Tensor, cache: Optional[KVCache] = None, attention=causal_attention) -> Tensor:
        h = h.float() if self.residual_in_fp32 else h
        h = h + self.drop(self.attn(self.norm1(h.to(self.norm1.weight.dtype)), cache, attention))
        return h + self.drop(self.mlp(self.norm2(h.to(self.norm2.weight.dtype))))


# --------------------------------------------------------------------------- the language model


class TransformerLM(nn.Module):
    """Embedding, n_layer blocks, final RMSNorm, tied head: ids (B, L) -> logits (B, L, V_padded)."""

    def __init__(self, cfg: TransformerConfig, device=None, dtype=None, init: bool = True):
        super().__init__()
        self.config = cfg
        self.embedding = nn.Embedding(cfg.vocab_size_padded, cfg.d_model, device=device, dtype=dtype)
        self.layers = nn.ModuleList([TransformerBlock(cfg, device=device, dtype=dtype) for _ in range(cfg.n_layer)])
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps, device=device, dtype=dtype)
        self.drop = nn.Dropout(cfg.dropout)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size_padded, bias=False, device=device, dtype=dtype)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embedding.weight
        if init and (device is None or torch.device(device).type != "meta"):
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, 0.02) for every matrix; output projections N(0, 0.02 / sqrt(2 n_layer)); norms at 1."""
        cfg = self.config
        std = cfg.initializer_range
        out_std = std / math.sqrt(2 * cfg.n_layer) if cfg.rescale_prenorm_residual else std
        nn.init.normal_(self.embedding.weight, std=std)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)
        for layer in self.layers:
            nn.init.normal_(layer.attn.qkv.weight, std=std)
            nn.init.normal_(layer.mlp.up_proj.weight, std=std)
            nn.init.normal_(layer.attn.out_proj.weight, std=out_std)
            nn.init.normal_(layer.mlp.down_proj.weight, std=out_std)
            layer.norm1.weight.fill_(1.0)
            layer.norm2.weight.fill_(1.0)
        self.norm_f.weight.fill_(1.0)

    def forward(self, input_ids: Tensor, caches: Optional[list[KVCache]] = None, attention=causal_attention) -> Tensor:
        """input_ids (B, L) int64 -> logits (B, L, V_padded); `caches` (prefill / continuation) updated in place.

        `attention` may be `causal_attention_ref` (tests compare the two).
        """
        return self.lm_head(self.hidden_states(input_ids, caches, attention))

    def hidden_states(self, input_ids: Tensor, caches: Optional[list[KVCache]] = None,
                      attention=causal_attention) -> Tensor:
        """The final normalised hidden states (B, L, D), before the head (Mamba: ``model.backbone(ids)``)."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}")
        h = self.drop(self.embedding(input_ids))  # (B, L, D)
        for i, layer in enumerate(self.layers):
            h = layer(h, None if caches is None else caches[i], attention)
        return self.norm_f(h.to(self.norm_f.weight.dtype))

    def step(self, input_ids: Tensor, caches: list[KVCache]) -> Tensor:
        """One token per sequence: input_ids (B,) -> logits (B, V_padded). Cost grows with the cached length."""
        if input_ids.ndim != 1:
            raise ValueError(f"input_ids must be (B,), got shape {tuple(input_ids.shape)}")
        return self.forward(input_ids[:, None], caches)[:, 0]

    def allocate_cache(self, batch: int, max_seqlen: Optional[int] = None, device=None, dtype=None) -> list[KVCache]:
        """One empty KV cache per layer with room for `max_seqlen` tokens (default config.max_seq_len; grows if exceeded)."""
        p = self.lm_head.weight
        cap = max_seqlen or self.config.max_seq_len
        return [KVCache.zeros(batch, self.config, cap, device=device or p.device, dtype=dtype or p.dtype)
                for _ in range(self.config.n_layer)]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied parameters count once

    def save_pretrained(self, folder) -> None:
        from ssmlab.core.checkpoint import save_model

        save_model(folder, self, self.config)

    @classmethod
    def from_pretrained(cls, folder, device=None, dtype=None) -> "TransformerLM":
        from ssmlab.core.checkpoint import load_config_dict, load_model_state

        model = cls(TransformerConfig.from_dict(load_config_dict(folder)), device=device, dtype=dtype, init=False)
        return load_model_state(folder, model)


def kv_cache_nbytes(caches: list[KVCache]) -> int:
    """Bytes of keys and values held by a list of layer caches (grows with the context)."""
    return sum(c.nbytes() for c in caches)


__all__ = [
    "Attention", "KVCache", "MLP", "TransformerBlock", "TransformerConfig", "TransformerLM", "apply_rotary",
    "build_matched_lm", "causal_attention", "causal_attention_ref", "kv_cache_nbytes", "match_mamba", "param_count",
    "rotary_cos_sin",
]
