"""S4D: the diagonal state space layer (Gu, Gupta, Goel, Ré 2022, "On the
Parameterization and Initialization of Diagonal State Space Models").

H independent channels, each a diagonal SSM of state size N:

    x'(t) = A x(t) + B u(t),  y(t) = C x(t) + D u(t),   A = diag(A_1 .. A_N).

Complex modes come in conjugate pairs, so only N/2 of them are stored and the
kernel is ``2 Re(...)`` (a real system of size N). S4D-Real keeps N real modes.

Discretization with a learnable step Δ per channel (log-uniform init):

* ZOH:      dA = exp(Δ A),                    dB = (exp(Δ A) - 1) / A · B
* bilinear: dA = (1 + Δ A/2) / (1 - Δ A/2),   dB = Δ B / (1 - Δ A/2)

Convolution kernel (eq. 5 of the paper), a Vandermonde product:

    K_l = sum_n C_n dB_n dA_n^l = vandermonde(C·dB, log dA, L)

Initializations of A (section 4 of the paper), n = 0, 1, ...:

* ``legs``: the diagonal Λ of HiPPO-LegS's normal-plus-low-rank form
  (real part -1/2), B projected into its eigenbasis (``ssmlab.core.nplr``);
* ``lin``:  A_n = -1/2 + i π n, B_n = 1;
* ``real``: A_n = -(n + 1), B_n = 1 (N real modes, no conjugate pairs).

This module also holds the layer shared with S4 (`SSMConv`): the FFT
convolution by a kernel (causal or bidirectional), the D skip, GELU and a GLU
output projection, plus a recurrent step mode with an explicit state.

Shapes: B batch, H channels, N state size (N' = N/2 stored complex modes),
L length, c kernel copies (1 causal, 2 bidirectional).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssmlab.core import discretize as _disc
from ssmlab.core.cauchy import vandermonde, vandermonde_ref
from ssmlab.core.lti import causal_conv

INITS = ("legs", "lin", "real")
METHODS = ("zoh", "bilinear")


# ----------------------------------------------------------------------------- init and math


def s4d_init(N: int, init: str = "legs") -> tuple[Tensor, Tensor, bool]:
    """(A, B, conj) for one channel: complex64 modes (N/2 if conj else N), and whether they pair.

    `conj=True` means the real system of size N is these modes plus their
    complex conjugates, and outputs are ``2 Re`` of the stored half.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if not isinstance(N, int) or N < 1 or (init != "real" and N % 2):
        raise ValueError(f"N must be a positive int (even for complex inits), got {N!r}")
    n = torch.arange(N // 2, dtype=torch.float64)
    if init == "lin":
        A = torch.complex(torch.full_like(n, -0.5), math.pi * n)
        B = torch.ones_like(A)
    elif init == "real":
        A = torch.complex(-(torch.arange(N, dtype=torch.float64) + 1), torch.zeros(N, dtype=torch.float64))
        return A.to(torch.complex64), torch.ones_like(A).to(torch.complex64), False
    else:
        from ssmlab.core.s4 import legs_nplr  # HiPPO-LegS = V (Λ - P P^*) V^*: keep Λ and V^* B

        A, _, B = legs_nplr(N)
    return A.to(torch.complex64), B.to(torch.complex64), True


def discretize_diag(A: Tensor, B: Tensor, dt: Tensor, method: str = "zoh") -> tuple[Tensor, Tensor]:
    """(dA, dB) of a diagonal SSM: A, B (..., N) complex, dt (...) (stage 01's `discretize_diag`)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return _disc.discretize_diag(A, B, dt, method)


def log_dA(A: Tensor, dt: Tensor, method: str) -> Tensor:
    """log of dA (..., N), exact for ZOH (Δ A) so the Vandermonde powers lose nothing."""
    if method == "zoh":
        return dt.unsqueeze(-1) * A
    dtA = dt.unsqueeze(-1) * A
    return torch.log1p(dtA / 2) - torch.log1p(-dtA / 2)  # log((1 + ΔA/2) / (1 - ΔA/2))


def s4d_kernel_ref(A: Tensor, B: Tensor, C: Tensor, dt: Tensor, L: int, method: str = "zoh", conj: bool = True) -> Tensor:
    """K_l = C dA^l dB by explicit powering of the diagonal. A, B (H, N'), C (c, H, N'), dt (H,) -> (c, H, L)."""
    dA, dB = discretize_diag(A, B, dt, method)
    x, ks = dB, []
    for _ in range(L):
        ks.append((C * x).sum(-1))
        x = dA * x
    K = torch.stack(ks, dim=-1) if ks else C.new_zeros(C.shape[:-1] + (0,))
    return 2 * K.real if conj else K.real


def s4d_kernel(A: Tensor, B: Tensor, C: Tensor, dt: Tensor, L: int, method: str = "zoh", conj: bool = True,
               lean: bool = True) -> Tensor:
    """The same kernel by a Vandermonde product (lean: chunked, O(N + L) memory)."""
    _, dB = discretize_diag(A, B, dt, method)
    product = vandermonde if lean else vandermonde_ref
    K = product(C * dB, log_dA(A, dt, method), L)
    return 2 * K.real if conj else K.real


fft_conv = causal_conv  # stage 01's causal FFT convolution: u (..., L), K (..., L) -> (..., L)


# ----------------------------------------------------------------------------- modules


class S4DKernel(nn.Module):
    """Learnable diagonal SSM parameters of H channels; `forward(L)` gives the kernel (c, H, L)."""

    def __init__(self, H: int, N: int = 64, init: str = "legs", method: str = "zoh", channels: int = 1,
                 dt_min: float = 1e-3, dt_max: float = 1e-1, lean: bool = True):
        super().__init__()
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        A, B, self.conj = s4d_init(N, init)
        self.H, self.N, self.method, self.lean = H, N, method, lean
        Np = A.shape[0]
        log_dt = torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)  # Δ log-uniform
        self.log_dt = nn.Parameter(log_dt)
        self.A_log = nn.Parameter(torch.log(-A.real).repeat(H, 1))  # Re A = -exp(A_log) < 0 stays stable
        A_imag = A.imag.repeat(H, 1)
        if self.conj:
            self.A_imag = nn.Parameter(A_imag)
        else:
            self.register_buffer("A_imag", A_imag)  # S4D-Real: modes stay real
        self.B = nn.Parameter(torch.view_as_real(B.repeat(H, 1)).clone())  # (H, N', 2)
        C = torch.randn(channels, H, Np, dtype=torch.complex64) * (0.5**0.5 if self.conj else 1.0)
        self.C = nn.Parameter(torch.view_as_real(C).clone())  # (c, H, N', 2)
        for p in (self.log_dt, self.A_log, self.B) + ((self.A_imag,) if self.conj else ()):
            p._no_weight_decay = True  # SSM parameters: no weight decay (S4 convention)
            p._ssm_param = True  # their own lr when TrainConfig.ssm_lr > 0

    def params(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(A (H, N'), B (H, N'), C (c, H, N'), dt (H,)) as complex / real tensors."""
        A = torch.complex(-torch.exp(self.A_log), self.A_imag)
        return A, torch.view_as_complex(self.B), torch.view_as_complex(self.C), torch.exp(self.log_dt)

    def forward(self, L: int) -> Tensor:
        A, B, C, dt = self.params()
        return s4d_kernel(A, B, C, dt, L, self.method, self.conj, self.lean)

    def kernel_ref(self, L: int) -> Tensor:
        A, B, C, dt = self.params()
        return s4d_kernel_ref(A, B, C, dt, L, self.method, self.conj)

    def step_params(self) -> tuple[Tensor, Tensor, Tensor]:
        """(dA (H, N'), dB (H, N'), C (c, H, N')) for the recurrence."""
        A, B, C, dt = self.params()
        dA, dB = discretize_diag(A, B, dt, self.method)
        return dA, dB, C

    def default_state(self, batch: int) -> Tensor:
        return torch.zeros(batch, self.H, self.C.shape[-2], dtype=torch.complex64, device=self.C.device)

    def step(self, u: Tensor, state: Tensor, cache: Optional[tuple] = None) -> tuple[Tensor, Tensor]:
        """One step x <- dA x + dB u, y = C x: u (B, H), state (B, H, N') -> y (B, H), state."""
        dA, dB, C = cache if cache is not None else self.step_params()
        state = dA * state + dB * u.unsqueeze(-1)
        y = (C[0] * state).sum(-1)
        return (2 * y.real if self.conj else y.real), state


class SSMConv(nn.Module):
    """The layer shared by S4 and S4D: y = GLU(W · GELU(K * u + D u)), on (B, L, H).

    `kernel` is any module with ``forward(L) -> (c, H, L)`` and, for the step
    mode, ``step_params()``, ``default_state(B)`` and ``step(u, state, cache)``.
    Bidirectional layers use two kernels: one causal, one run on the reversed
    sequence (``c = 2``); they have no step mode.
    """

    def __init__(self, kernel: nn.Module, H: int, bidirectional: bool = False, dropout: float = 0.0, glu: bool = True):
        super().__init__()
        self.kernel, self.H, self.bidirectional = kernel, H, bidirectional
        self.D = nn.Parameter(torch.randn(H))  # skip connection
        self.dropout = nn.Dropout(dropout)
        self.glu = glu
        self.out = nn.Linear(H, 2 * H) if glu else nn.Linear(H, H)

    def _mix(self, y: Tensor) -> Tensor:
        y = self.dropout(F.gelu(y))
        y = self.out(y)
        return F.glu(y, dim=-1) if self.glu else y

    def forward(self, u: Tensor) -> Tensor:
        """u (B, L, H) -> (B, L, H)."""
        if u.dim() != 3 or u.shape[-1] != self.H:
            raise ValueError(f"u must be (B, L, H={self.H}), got {tuple(u.shape)}")
        L = u.shape[1]
        with torch.autocast(device_type=u.device.type, enabled=False):  # FFTs and kernels in float32
            x = u.float().transpose(1, 2)  # (B, H, L)
            K = self.kernel(L).float()  # (c, H, L)
            y = fft_conv(x, K[0])
            if self.bidirectional:
                y = y + fft_conv(x.flip(-1), K[1]).flip(-1)
            y = (y + self.D.unsqueeze(-1) * x).transpose(1, 2)  # (B, L, H)
        return self._mix(y.to(u.dtype))

    def default_state(self, batch: int) -> Tensor:
        return self.kernel.default_state(batch)

    def step(self, u: Tensor, state: Tensor, cache: Optional[tuple] = None) -> tuple[Tensor, Tensor]:
        """u (B, H) -> y (B, H), the next state. Pass `cache=self.kernel.step_params()` to reuse it."""
        if self.bidirectional:
            raise RuntimeError("a bidirectional layer sees the future: it has no step mode")
        y, state = self.kernel.step(u, state, cache)
        return self._mix(y + self.D * u), state


def s4d_layer(H: int, N: int = 64, init: str = "legs", method: str = "zoh", bidirectional: bool = False,
              dropout: float = 0.0, dt_min: float = 1e-3, dt_max: float = 1e-1, lean: bool = True) -> SSMConv:
    """An S4D layer on (B, L, H)."""
    kernel = S4DKernel(H, N, init, method, channels=2 if bidirectional else 1, dt_min=dt_min, dt_max=dt_max, lean=lean)
    return SSMConv(kernel, H, bidirectional, dropout)
