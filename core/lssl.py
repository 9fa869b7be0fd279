"""The Linear State Space Layer (LSSL) and a deep LSSL model
(Gu, Johnson, Goel, Saab, Dao, Rudra, Ré 2021, "Combining Recurrent,
Convolutional, and Continuous-time Models with Linear State-Space Layers").

One LSSL maps H input channels to H output channels, each channel an
independent single-input single-output SSM of state size N:

    x'(t) = A x(t) + B_h u_h(t),    y_h(t) = C_h x(t) + D_h u_h(t)

* A (N, N) starts as HiPPO-LegS (stage 02) and is shared by the channels
  (learnable unless ``learn_A=False``): it is what gives the state memory;
* B_h starts as LegS's B, C_h as Gaussian noise; D_h is the skip term;
* Δ_h, the step of channel h, is learned in log space, initialized
  log-uniformly in [Δ_min, Δ_max]: each channel sees the input at its own
  time scale (LSSL paper, section 4);
* discretization by the bilinear transform (LSSL eq. 3, GBT with α = 1/2),
  reusing `ssmlab.core.discretize`:  Ā_h = (I - Δ_h/2 A)^{-1}(I + Δ_h/2 A),
  B̄_h = (I - Δ_h/2 A)^{-1} Δ_h B_h.

Two computation modes give the same outputs (tested to 1e-8 in float64):

* convolutional (training): the kernel K_h = (C_h B̄_h, C_h Ā_h B̄_h, ...,
  C_h Ā_h^{L-1} B̄_h) by Krylov powers with doubling (`ssmlab.core.lti.ssm_kernel`,
  O(log L) matrix products), then a causal FFT convolution (`lti.causal_conv`);
* recurrent (streaming inference): `step` advances x_k = Ā x_{k-1} + B̄ u_k
  one input at a time with an explicit state.

Bidirectional layers add a second C (C_back) whose kernel runs over the
reversed sequence; they have no recurrent mode (they see the future).

`DeepLSSL` stacks layers as post-norm residual blocks
    z = LayerNorm(z + Dropout(GLU(W · GELU(LSSL(z)))))
(post-norm because a pre-norm LayerNorm of a linearly encoded scalar pixel,
LN(w p + b), would throw the pixel's intensity away)
with an encoder (linear for real inputs, embedding for tokens) and a head:
mean-pooled classification, or next-token logits for a character LM.

Shapes: B batch, L length, H channels, N state size, V vocabulary, c kernel copies (1 or 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssmlab.core.discretize import bilinear
from ssmlab.core.hippo import transition
from ssmlab.core.lti import causal_conv, ssm_kernel, ssm_kernel_ref


@dataclass
class LSSLConfig:
    """One LSSL layer."""

    H: int = 64  # H: channels, each an independent SISO SSM
    N: int = 32  # N: state size per channel (size of the HiPPO-LegS A)
    dt_min: float = 1e-3  # Δ_min: smallest initial step (longest memory)
    dt_max: float = 1e-1  # Δ_max: largest initial step (shortest memory)
    learn_A: bool = True  # A learnable (LSSL) or frozen at HiPPO-LegS (LSSL-fixed)
    bidirectional: bool = False  # add a backward kernel (C_back); no recurrent mode then

    def __post_init__(self):
        if self.H < 1 or self.N < 1:
            raise ValueError(f"H and N must be >= 1, got H={self.H}, N={self.N}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={self.dt_min}, dt_max={self.dt_max}")


class LSSL(nn.Module):
    """H channels of x' = A x + B u, y = C x + D u, bilinear-discretized with learned Δ. (B, L, H) -> (B, L, H)."""

    def __init__(self, cfg: LSSLConfig):
        super().__init__()
        self.cfg = cfg
        A, B = transition("legs", cfg.N)
        self.A = nn.Parameter(A.float(), requires_grad=cfg.learn_A)  # (N, N)
        self.B = nn.Parameter(B.float().repeat(cfg.H, 1))  # (H, N)
        c = 2 if cfg.bidirectional else 1
        self.C = nn.Parameter(torch.randn(c, cfg.H, cfg.N) / math.sqrt(cfg.N))  # (c, H, N): forward [, backward]
        self.D = nn.Parameter(torch.randn(cfg.H))  # (H,)
        u = torch.rand(cfg.H)
        self.log_dt = nn.Parameter(math.log(cfg.dt_min) + u * (math.log(cfg.dt_max) - math.log(cfg.dt_min)))  # (H,)

    def discrete(self) -> tuple[Tensor, Tensor]:
        """(Ā (H, N, N), B̄ (H, N)) by the bilinear transform with Δ_h = exp(log_dt_h)."""
        Ad, Bd = bilinear(self.A, self.B[..., None], self.log_dt.exp())  # (H, N, N), (H, N, 1)
        return Ad, Bd[..., 0]

    def kernel(self, L: int) -> Tensor:
        """K (c, H, L): K[., h, l] = C_h Ā_h^l B̄_h, by Krylov doubling."""
        Ad, Bd = self.discrete()
        return ssm_kernel(Ad, Bd, self.C, L)

    def kernel_ref(self, L: int) -> Tensor:
        """Same as `kernel`, one matrix-vector product per step."""
        Ad, Bd = self.discrete()
        return ssm_kernel_ref(Ad, Bd, self.C, L)

    def forward(self, u: Tensor) -> Tensor:
        """Convolutional mode. u (B, L, H) -> y (B, L, H)."""
        if u.ndim != 3 or u.shape[-1] != self.cfg.H:
            raise ValueError(f"u must be (B, L, H) with H = {self.cfg.H}, got shape {tuple(u.shape)}")
        L = u.shape[1]
        K = self.kernel(L)  # (c, H, L)
        v = u.transpose(1, 2)  # (B, H, L)
        y = causal_conv(v, K[0])
        if self.cfg.bidirectional:  # anti-causal part: convolve the reversed sequence
            y = y + causal_conv(v.flip(-1), K[1]).flip(-1)
        y = y + self.D[:, None] * v
        return y.transpose(1, 2)

    def initial_state(self, batch: int) -> Tensor:
        return torch.zeros(batch, self.cfg.H, self.cfg.N, dtype=self.A.dtype, device=self.A.device)

    def step(self, u_t: Tensor, x: Tensor, discrete: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
        """Recurrent mode, one step: u_t (B, H), x (B, H, N) -> (y_t (B, H), new x).

        Pass `discrete` = self.discrete() to reuse (Ā, B̄) across steps.
        """
        if self.cfg.bidirectional:
            raise RuntimeError("a bidirectional LSSL sees the future: it has no recurrent step mode")
        Ad, Bd = self.discrete() if discrete is None else discrete
        x = torch.einsum("hnm,bhm->bhn", Ad, x) + Bd * u_t[..., None]  # x_k = Ā x_{k-1} + B̄ u_k
        y = (self.C[0] * x).sum(-1) + self.D * u_t  # y_k = C x_k + D u_k
        return y, x

    def forward_recurrent(self, u: Tensor) -> Tensor:
        """Recurrent mode over a whole sequence (reference for `forward`). u (B, L, H) -> (B, L, H)."""
        disc = self.discrete()
        x = self.initial_state(u.shape[0]).to(u.dtype)
        ys = []
        for t in range(u.shape[1]):
            y, x = self.step(u[:, t], x, disc)
            ys.append(y)
        return torch.stack(ys, dim=1)


# ----------------------------------------------------------------------------- the deep model


@dataclass
class DeepLSSLConfig:
    """A stack of LSSL blocks with an encoder and a head (classifier or character LM)."""

    d_input: int = 1  # features per input step (ignored when vocab_size > 0)
    d_output: int = 10  # classes of the classifier (ignored when vocab_size > 0)
    vocab_size: int = 0  # V: > 0 makes a causal LM: token embedding in, next-token logits out
    H: int = 64  # H: model width = LSSL channels
    N: int = 32  # N: state size of each channel
    n_layers: int = 2  # LSSL blocks
    dropout: float = 0.0  # after each block's gated projection
    dt_min: float = 1e-3  # Δ_min of the log-uniform initialization
    dt_max: float = 1e-1  # Δ_max
    learn_A: bool = True  # A learnable (else frozen at HiPPO-LegS)
    bidirectional: bool = False  # classification only: kernels in both directions

    def __post_init__(self):
        if self.n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {self.n_layers}")
        if self.vocab_size < 0 or (self.vocab_size == 0 and (self.d_input < 1 or self.d_output < 1)):
            raise ValueError("need vocab_size > 0 (LM), or d_input >= 1 and d_output >= 1 (classifier)")
        if self.vocab_size > 0 and self.bidirectional:
            raise ValueError("a language model must be causal: bidirectional=False")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def is_lm(self) -> bool:
        return self.vocab_size > 0

    def layer(self) -> LSSLConfig:
        return LSSLConfig(self.H, self.N, self.dt_min, self.dt_max, self.learn_A, self.bidirectional)


class LSSLBlock(nn.Module):
    """LayerNorm(z + Dropout(GLU(W GELU(LSSL(z))))). (B, L, H) -> (B, L, H)."""

    def __init__(self, cfg: DeepLSSLConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.H)
        self.lssl = LSSL(cfg.layer())
        self.out = nn.Linear(cfg.H, 2 * cfg.H)  # GLU halves it back to H
        self.drop = nn.Dropout(cfg.dropout)

    def mix(self, y: Tensor) -> Tensor:
        return self.drop(F.glu(self.out(F.gelu(y)), dim=-1))

    def forward(self, z: Tensor) -> Tensor:
        return self.norm(z + self.mix(self.lssl(z)))

    def step(self, z_t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """z_t (B, H), state x (B, H, N) -> (B, H), new state."""
        y, x = self.lssl.step(z_t, x)
        return self.norm(z_t + self.mix(y)), x


class DeepLSSL(nn.Module):
    """Classifier: x (B, L, d_input) -> logits (B, d_output). LM: ids (B, L) -> logits (B, L, V)."""

    def __init__(self, cfg: DeepLSSLConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = nn.Embedding(cfg.vocab_size, cfg.H) if cfg.is_lm else nn.Linear(cfg.d_input, cfg.H)
        self.blocks = nn.ModuleList(LSSLBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.H)
        self.head = nn.Linear(cfg.H, cfg.vocab_size if cfg.is_lm else cfg.d_output)

    def forward(self, x: Tensor) -> Tensor:
        z = self.encoder(x)  # (B, L, H)
        for block in self.blocks:
            z = block(z)
        z = self.norm(z)
        return self.head(z if self.cfg.is_lm else z.mean(dim=1))  # LM: (B, L, V); classifier: mean over L

    def initial_state(self, batch: int) -> list[Tensor]:
        return [b.lssl.initial_state(batch) for b in self.blocks]

    def step(self, x_t: Tensor, states: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """LM recurrent mode: ids x_t (B,) -> (next-token logits (B, V), new states). O(H N^2) per token."""
        if not self.cfg.is_lm:
            raise RuntimeError("step mode is for the language model (the classifier pools over the whole sequence)")
        z = self.encoder(x_t)  # (B, H)
        new = []
        for block, s in zip(self.blocks, states):
            z, s = block.step(z, s)
            new.append(s)
        return self.head(self.norm(z)), new


# ----------------------------------------------------------------------------- classification: training and baseline


class LSTMClassifier(nn.Module):
    """The recurrent baseline: an LSTM over the sequence, classified from its last hidden state. (B, L, d) -> (B, C)."""

    def __init__(self, d_input: int, hidden: int, d_output: int, n_layers: int = 1):
        super().__init__()
        self.lstm = nn.LSTM(d_input, hidden, num_layers=n_layers, batch_first=True)
        self.head = nn.Linear(hidden, d_output)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x)  # (B, L, hidden)
        return self.head(out[:, -1])


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    """Fraction of correctly classified sequences (eval mode)."""
    was = model.training
    model.eval()
    right = sum((model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum().item()
                for i in range(0, len(x), batch_size))
    model.train(was)
    return right / len(y)


def ssm_param_groups(model: nn.Module, lr: float, weight_decay: float, ssm_lr: float) -> list[dict]:
    """SSM parameters (A, B, log Δ) at their own learning rate and without weight decay (as in LSSL/S4)."""
    ssm, other = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (ssm if name.split(".")[-1] in ("A", "B", "log_dt") else other).append(p)
    groups = [{"params": other, "lr": lr, "weight_decay": weight_decay}]
    return groups + ([{"params": ssm, "lr": ssm_lr, "weight_decay": 0.0}] if ssm else [])


def train_classifier(model: nn.Module, x: Tensor, y: Tensor, epochs: int, lr: float = 3e-3, batch_size: int = 64,
                     weight_decay: float = 0.01, ssm_lr: Optional[float] = None, time_limit_s: float = 0.0,
                     seed: int = 0, progress=None) -> dict:
    """AdamW + cosine decay, cross-entropy, shuffled mini-batches; stops early at `time_limit_s` (0: never).

    `progress(epoch, loss)` is called after each epoch (e.g. to update a tqdm bar). Returns the loss history.
    """
    import time

    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    opt = torch.optim.AdamW(ssm_param_groups(model, lr, weight_decay, lr if ssm_lr is None else ssm_lr))
    steps_per_epoch = -(-len(x) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                                total_steps=epochs * steps_per_epoch, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    t0, history, model_was = time.perf_counter(), [], model.training
    model.train()
    for epoch in range(epochs):
        order, total = torch.randperm(len(x), generator=g), 0.0
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        history.append(total / len(x))
        if progress is not None:
            progress(epoch, history[-1])
        if time_limit_s and time.perf_counter() - t0 > time_limit_s:
            break
    model.train(model_was)
    return {"loss_history": history, "epochs_done": len(history), "seconds": time.perf_counter() - t0}
