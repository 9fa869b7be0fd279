"""The continuous-time linear state space model and its ground-truth simulator.

    x'(t) = A x(t) + B u(t),    y(t) = C x(t) + D u(t)

u(t) in R^M is the input, x(t) in R^N the state, y(t) in R^P the output.
M = P = 1 is one channel (SISO); larger M, P are multi-channel (MIMO).

The ground truth is an adaptive Runge-Kutta solver (SciPy's `solve_ivp`,
DOP853 at tight tolerances), not a hand-written integrator, so the errors of
the discretizations in `ssmlab.core.discretize` can be measured against it.
The simulator is NumPy float64: the reference, not a layer.

The second half is the same system as a learnable PyTorch layer
(`SSMLayer`: H channels, parameters A, B, C, D and Δ, discretized at every
forward pass and applied as a causal convolution) and the small models of
stage 01 built on it (`SSMSequenceModel`, `SSMCharLM`).

Shapes: B batch, L length, H channels, N state size, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from scipy.integrate import solve_ivp
from torch import Tensor, nn

from ssmlab.core.discretize import discretize
from ssmlab.core.lti import causal_conv, ssm_kernel, ssm_step


@dataclass
class ContinuousSSM:
    """x' = A x + B u, y = C x + D u (float64 arrays; D defaults to zeros)."""

    A: np.ndarray  # (N, N) state matrix: the dynamics
    B: np.ndarray  # (N, M) input matrix
    C: np.ndarray  # (P, N) output matrix
    D: Optional[np.ndarray] = None  # (P, M) feed-through (skip) matrix

    def __post_init__(self):
        self.A = np.atleast_2d(np.asarray(self.A, dtype=np.float64))
        N = self.A.shape[0]
        if self.A.shape != (N, N):
            raise ValueError(f"A must be square (N, N), got {self.A.shape}")
        self.B = np.asarray(self.B, dtype=np.float64).reshape(N, -1)
        self.C = np.asarray(self.C, dtype=np.float64).reshape(-1, N)
        M, P = self.B.shape[1], self.C.shape[0]
        self.D = np.zeros((P, M)) if self.D is None else np.asarray(self.D, dtype=np.float64).reshape(P, M)

    @property
    def N(self) -> int:  # state size
        return self.A.shape[0]

    @property
    def M(self) -> int:  # input channels
        return self.B.shape[1]

    @property
    def P(self) -> int:  # output channels
        return self.C.shape[0]

    def is_stable(self) -> bool:
        """Asymptotically stable iff every eigenvalue of A has a negative real part."""
        return bool(np.linalg.eigvals(self.A).real.max() < 0)

    def discretize(self, delta: float, method: str = "zoh", alpha: Optional[float] = None) -> tuple[np.ndarray, np.ndarray]:
        """(Ā, B̄) as float64 arrays, by `ssmlab.core.discretize.discretize`."""
        Ad, Bd = discretize(torch.from_numpy(self.A), torch.from_numpy(self.B), delta, method, alpha)
        return Ad.numpy(), Bd.numpy()


def damped_oscillator(omega: float = 2.0, zeta: float = 0.1) -> ContinuousSSM:
    """A mass on a spring with damping, driven by a force u:  q'' + 2ζω q' + ω² q = u.

    State x = (position q, velocity q'), output y = q. Stable for ζ > 0.
    """
    A = np.array([[0.0, 1.0], [-omega**2, -2.0 * zeta * omega]])
    return ContinuousSSM(A=A, B=np.array([[0.0], [1.0]]), C=np.array([[1.0, 0.0]]))


def simulate(ssm: ContinuousSSM, u: Callable[[float], np.ndarray], t_eval: np.ndarray,
             x0: Optional[np.ndarray] = None, rtol: float = 1e-11, atol: float = 1e-12) -> tuple[np.ndarray, np.ndarray]:
    """Integrate from t_eval[0] with input function u(t) -> (M,). Returns (x (T, N), y (T, P)).

    For inputs with jumps use `simulate_zoh`, which restarts the solver at each jump.
    """
    t_eval = np.asarray(t_eval, dtype=np.float64)
    x0 = np.zeros(ssm.N) if x0 is None else np.asarray(x0, dtype=np.float64)
    if x0.shape != (ssm.N,):
        raise ValueError(f"x0 must have shape ({ssm.N},), got {x0.shape}")

    def f(t, x):
        return ssm.A @ x + ssm.B @ np.atleast_1d(u(t))

    sol = solve_ivp(f, (t_eval[0], t_eval[-1]), x0, method="DOP853", t_eval=t_eval, rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"solve_ivp failed: {sol.message}")
    x = sol.y.T  # (T, N)
    us = np.stack([np.atleast_1d(u(t)) for t in t_eval])  # (T, M)
    return x, x @ ssm.C.T + us @ ssm.D.T


def simulate_zoh(ssm: ContinuousSSM, u: np.ndarray, delta: float, x0: Optional[np.ndarray] = None,
                 rtol: float = 1e-11, atol: float = 1e-12) -> np.ndarray:
    """States at t = Δ, 2Δ, ..., LΔ for the piecewise-constant input u(t) = u_k on ((k-1)Δ, kΔ].

    u (L, M) or (L,). Returns x (L, N): x[k] is the state at the end of step k,
    the quantity the ZOH recurrence x_k = Ā x_{k-1} + B̄ u_k produces exactly.
    """
    if delta <= 0:
        raise ValueError(f"delta must be > 0, got {delta}")
    u = np.asarray(u, dtype=np.float64).reshape(len(u), -1)
    x = np.zeros(ssm.N) if x0 is None else np.asarray(x0, dtype=np.float64)
    out = []
    for uk in u:
        sol = solve_ivp(lambda t, s: ssm.A @ s + ssm.B @ uk, (0.0, delta), x, method="DOP853", rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"solve_ivp failed: {sol.message}")
        x = sol.y[:, -1]
        out.append(x)
    return np.stack(out)


def run_discrete(Ad: np.ndarray, Bd: np.ndarray, u: np.ndarray, x0: Optional[np.ndarray] = None) -> np.ndarray:
    """x_k = Ā x_{k-1} + B̄ u_k for k = 1..L (NumPy, MIMO). u (L, M) or (L,) -> x (L, N)."""
    u = np.asarray(u, dtype=np.float64).reshape(len(u), -1)
    x = np.zeros(Ad.shape[0]) if x0 is None else np.asarray(x0, dtype=np.float64)
    out = []
    for uk in u:
        x = Ad @ x + Bd @ uk
        out.append(x)
    return np.stack(out)


# ============================================================================= a learnable SSM layer
#
# The same continuous system, now with learnable parameters, H independent
# channels of state size N, discretized afresh at every forward pass (so Δ, A,
# B are trained through the discretization) and applied in convolutional mode.


def dissipative_A(L_factor: Tensor, W: Tensor, eps: float = 1e-3) -> Tensor:
    """A = -(L Lᵀ + εI) + (W - Wᵀ): its symmetric part is negative definite, so every
    eigenvalue has real part <= -ε and the system is stable for any parameters.
    (..., N, N) -> (..., N, N)."""
    I = torch.eye(L_factor.shape[-1], dtype=L_factor.dtype, device=L_factor.device)
    return -(L_factor @ L_factor.transpose(-1, -2) + eps * I) + (W - W.transpose(-1, -2))


class SSMLayer(nn.Module):
    """H channels, each a SISO continuous SSM (A (N, N), B (N,), C (N,), D, Δ), discretized
    by `method` and run as a causal convolution: (B, L, H) -> (B, L, H).

    A is parameterized as `dissipative_A` (stable by construction); Δ is
    learned in log space, initialized log-uniformly in [dt_min, dt_max] so
    different channels see different time scales.
    """

    def __init__(self, H: int, N: int = 16, dt_min: float = 1e-3, dt_max: float = 1e-1, method: str = "zoh",
                 a_scale: float = 0.5, skew_scale: float = 1.0):
        super().__init__()
        if H < 1 or N < 1:
            raise ValueError(f"H and N must be >= 1, got H={H}, N={N}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        if method not in ("zoh", "bilinear", "backward_euler"):  # the rules that keep a stable A stable
            raise ValueError(f"method must be 'zoh', 'bilinear' or 'backward_euler', got {method!r}")
        self.H, self.N, self.method = H, N, method
        self.A_L = nn.Parameter(math.sqrt(a_scale) * torch.eye(N).repeat(H, 1, 1))  # (H, N, N): -(L Lᵀ) = -a_scale I
        self.A_W = nn.Parameter(skew_scale * torch.randn(H, N, N) / math.sqrt(N))  # (H, N, N): rotation part
        self.B = nn.Parameter(torch.randn(H, N) / math.sqrt(N))  # (H, N)
        self.C = nn.Parameter(torch.randn(H, N) / math.sqrt(N))  # (H, N)
        self.D = nn.Parameter(torch.ones(H))  # (H,) skip connection
        log_dt = torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        self.log_dt = nn.Parameter(log_dt)  # (H,) log Δ

    def discrete(self) -> tuple[Tensor, Tensor]:
        """(Ā (H, N, N), B̄ (H, N)) for the current parameters."""
        A = dissipative_A(self.A_L, self.A_W)
        Ad, Bd = discretize(A, self.B.unsqueeze(-1), torch.exp(self.log_dt), self.method)
        return Ad, Bd.squeeze(-1)

    def kernel(self, L: int) -> Tensor:
        """K (H, L) = (C B̄, C Ā B̄, ..., C Ā^{L-1} B̄)."""
        Ad, Bd = self.discrete()
        return ssm_kernel(Ad, Bd, self.C, L)

    def forward(self, u: Tensor) -> Tensor:  # u (B, L, H)
        K = self.kernel(u.shape[1])  # (H, L)
        y = causal_conv(u.transpose(1, 2), K)  # (B, H, L)
        return y.transpose(1, 2) + self.D * u

    def step(self, x: Tensor, u_t: Tensor, cache: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
        """Recurrent mode, one step: state x (B, H, N), input u_t (B, H) -> (y_t (B, H), new x).

        Pass ``cache=self.discrete()`` to avoid re-discretizing at every step.
        """
        Ad, Bd = cache if cache is not None else self.discrete()
        return ssm_step(Ad, Bd, self.C, x, u_t, self.D)


class SSMBlock(nn.Module):
    """Pre-norm residual block: x + W·GELU(SSM(LayerNorm(x))). Sequence mixing in the SSM,
    channel mixing in W. (B, L, H) -> (B, L, H)."""

    def __init__(self, H: int, N: int = 16, dropout: float = 0.0, **ssm_kw):
        super().__init__()
        self.norm = nn.LayerNorm(H)
        self.ssm = SSMLayer(H, N, **ssm_kw)
        self.mix = nn.Linear(H, H)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop(self.mix(F.gelu(self.ssm(self.norm(x)))))

    def step(self, state: Tensor, x_t: Tensor, cache=None) -> tuple[Tensor, Tensor]:
        """One time step: x_t (B, H), SSM state (B, H, N) -> (output (B, H), new state)."""
        y, state = self.ssm.step(state, self.norm(x_t), cache)
        return x_t + self.drop(self.mix(F.gelu(y))), state


class SSMSequenceModel(nn.Module):
    """Linear encoder -> n_layers SSMBlocks -> LayerNorm -> linear decoder. (B, L, d_in) -> (B, L, d_out)."""

    def __init__(self, d_in: int, d_out: int, H: int = 64, N: int = 16, n_layers: int = 2, **block_kw):
        super().__init__()
        self.encoder = nn.Linear(d_in, H)
        self.blocks = nn.ModuleList([SSMBlock(H, N, **block_kw) for _ in range(n_layers)])
        self.norm = nn.LayerNorm(H)
        self.decoder = nn.Linear(H, d_out)

    def forward(self, u: Tensor) -> Tensor:
        x = self.encoder(u)  # (B, L, H)
        for block in self.blocks:
            x = block(x)
        return self.decoder(self.norm(x))

    def init_state(self, batch: int) -> list[Tensor]:
        """Zero states for `step`, one (B, H, N) per block."""
        p = self.encoder.weight
        return [torch.zeros(batch, b.ssm.H, b.ssm.N, dtype=p.dtype, device=p.device) for b in self.blocks]

    def step(self, states: list[Tensor], u_t: Tensor, caches=None) -> tuple[Tensor, list[Tensor]]:
        """Recurrent mode for streaming: u_t (B, d_in) -> (output (B, d_out), new states).

        `caches` = [block.ssm.discrete() for block in self.blocks] skips re-discretizing.
        """
        x = self.encoder(u_t)
        new = []
        for i, block in enumerate(self.blocks):
            x, st = block.step(states[i], x, None if caches is None else caches[i])
            new.append(st)
        return self.decoder(self.norm(x)), new


class SSMCharLM(nn.Module):
    """The first SSM language model: embedding -> SSMBlocks -> logits. (B, L) ids -> (B, L, V)."""

    def __init__(self, V: int, H: int = 128, N: int = 16, n_layers: int = 4, **block_kw):
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.blocks = nn.ModuleList([SSMBlock(H, N, **block_kw) for _ in range(n_layers)])
        self.norm = nn.LayerNorm(H)
        self.head = nn.Linear(H, V)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed(ids)  # (B, L, H)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))  # (B, L, V)
