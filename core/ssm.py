"""The continuous-time linear state space model and its ground-truth simulator.

    x'(t) = A x(t) + B u(t),    y(t) = C x(t) + D u(t)

u(t) in R^M is the input, x(t) in R^N the state, y(t) in R^P the output.
M = P = 1 is one channel (SISO); larger M, P are multi-channel (MIMO).

The ground truth is an adaptive Runge-Kutta solver (SciPy's `solve_ivp`,
DOP853 at tight tolerances), not a hand-written integrator, so the errors of
the discretizations in `ssmlab.core.discretize` can be measured against it.
Everything here is NumPy float64: this is the reference, not a layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from scipy.integrate import solve_ivp

from ssmlab.core.discretize import discretize


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
