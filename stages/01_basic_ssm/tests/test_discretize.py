"""Discretization: the rules equal their textbook formulas, ZOH is exact, orders and stability hold."""

import numpy as np
import pytest
import scipy.linalg
import torch

from ssmlab.core import discretize as dz
from ssmlab.core.ssm import ContinuousSSM, damped_oscillator, run_discrete, simulate, simulate_zoh
from ssmlab.core.testing import assert_close_rel

METHODS = ["forward_euler", "backward_euler", "bilinear", "zoh"]


def random_stable(N, M=1, batch=(), dtype=torch.float64, seed=0):
    """A with eigenvalues in the open left half plane (shifted random matrix), B random."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(*batch, N, N, generator=g, dtype=dtype) / N**0.5
    shift = torch.linalg.eigvals(A).real.amax(-1) + 0.3  # (batch)
    A = A - shift[..., None, None] * torch.eye(N, dtype=dtype)
    return A, torch.randn(*batch, N, M, generator=g, dtype=dtype)


def textbook(A, B, d, alpha):
    """GBT in NumPy, written from the formula: (I - αΔA)^{-1}(I + (1-α)ΔA), (I - αΔA)^{-1}ΔB."""
    I = np.eye(len(A))
    inv = np.linalg.inv(I - alpha * d * A)
    return inv @ (I + (1 - alpha) * d * A), inv @ (d * B)


@pytest.mark.parametrize("N", [1, 2, 5])
@pytest.mark.parametrize("method,alpha", [("forward_euler", 0.0), ("bilinear", 0.5), ("backward_euler", 1.0)])
def test_named_rules_equal_gbt_and_textbook(N, method, alpha):
    A, B = random_stable(N, M=2, seed=N)
    d = 0.37
    Ad, Bd = dz.discretize(A, B, d, method)
    Ag, Bg = dz.discretize(A, B, d, "gbt", alpha=alpha)
    At, Bt = textbook(A.numpy(), B.numpy(), d, alpha)
    for got, ref in ((Ad, torch.from_numpy(At)), (Bd, torch.from_numpy(Bt)), (Ag, Ad), (Bg, Bd)):
        assert_close_rel(got, ref, torch.float64, method)


@pytest.mark.parametrize("alpha", [0.1, 0.3, 0.8])
def test_gbt_any_alpha_matches_textbook(alpha):
    A, B = random_stable(4, seed=1)
    Ad, Bd = dz.gbt(A, B, 0.2, alpha)
    At, Bt = textbook(A.numpy(), B.numpy(), 0.2, alpha)
    assert_close_rel(Ad, torch.from_numpy(At), torch.float64, "Ad")
    assert_close_rel(Bd, torch.from_numpy(Bt), torch.float64, "Bd")


@pytest.mark.parametrize("N,M", [(1, 1), (2, 1), (3, 2), (6, 3)])
def test_zoh_equals_augmented_expm_and_inverse_formula(N, M):
    A, B = random_stable(N, M, seed=N + M)
    d = 0.5
    Ad, Bd = dz.zoh(A, B, d)
    aug = np.zeros((N + M, N + M))
    aug[:N, :N], aug[:N, N:] = A.numpy(), B.numpy()
    E = scipy.linalg.expm(d * aug)  # SciPy, an independent implementation
    assert_close_rel(Ad, torch.from_numpy(E[:N, :N]), torch.float64, "Ad vs scipy")
    assert_close_rel(Bd, torch.from_numpy(E[:N, N:]), torch.float64, "Bd vs scipy")
    Ar, Br = dz.zoh_ref(A, B, d)
    assert_close_rel(Ad, Ar, torch.float64, "Ad vs ref")
    assert_close_rel(Bd, Br, torch.float64, "Bd vs ref")


def test_zoh_singular_A_double_integrator():
    """x'' = u: A is nilpotent (singular), ZOH must give Ā = [[1, Δ], [0, 1]], B̄ = [Δ²/2, Δ]."""
    A = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    B = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    d = 0.3
    Ad, Bd = dz.zoh(A, B, d)
    assert_close_rel(Ad, torch.tensor([[1.0, d], [0.0, 1.0]], dtype=torch.float64), torch.float64, "Ad")
    assert_close_rel(Bd, torch.tensor([[d * d / 2], [d]], dtype=torch.float64), torch.float64, "Bd")
    Adg, Bdg = dz.discretize(torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64), d, diagonal=True)
    assert Adg.item() == 1.0 and abs(Bdg.item() - d) < 1e-15  # λ = 0: B̄ = Δ B


@pytest.mark.parametrize("delta", [0.05, 0.4, 2.0])
def test_zoh_exact_for_piecewise_constant_input(delta):
    sys = damped_oscillator(omega=3.0, zeta=0.2)
    u = np.random.default_rng(0).standard_normal(25)
    x_true = simulate_zoh(sys, u, delta, x0=np.array([1.0, -0.5]))
    Ad, Bd = sys.discretize(delta, "zoh")
    x_zoh = run_discrete(Ad, Bd, u, x0=np.array([1.0, -0.5]))
    err = np.abs(x_zoh - x_true).max() / np.abs(x_true).max()
    assert err < 1e-9, err


@pytest.mark.parametrize("method", ["forward_euler", "backward_euler", "bilinear", "zoh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_diagonal_closed_form_equals_dense(method, dtype):
    lam = torch.tensor([[-0.5, -2.0, 0.0, -1e-8], [-3.0, -0.1, -1.0, -7.0]], dtype=dtype)  # (H=2, N=4), incl. λ = 0
    B = torch.randn(2, 4, dtype=dtype)
    delta = torch.tensor([0.1, 0.7], dtype=dtype)
    Ad, Bd = dz.discretize(lam, B, delta, method, diagonal=True)
    Ad_dense, Bd_dense = dz.discretize(torch.diag_embed(lam), B.unsqueeze(-1), delta, method)
    assert_close_rel(torch.diag_embed(Ad), Ad_dense, dtype, "Ad")
    assert_close_rel(Bd, Bd_dense.squeeze(-1), dtype, "Bd")


def test_diagonal_complex_zoh_matches_scalar_formula():
    lam = torch.tensor([-0.5 + 3j, -0.1 - 1j], dtype=torch.complex128)
    Ad, Bd = dz.discretize_diag(lam, torch.ones(2, dtype=torch.complex128), 0.2)
    assert_close_rel(torch.view_as_real(Ad), torch.view_as_real(torch.exp(0.2 * lam)), torch.float64, "Ad")
    assert_close_rel(torch.view_as_real(Bd), torch.view_as_real((torch.exp(0.2 * lam) - 1) / lam), torch.float64, "Bd")


@pytest.mark.parametrize("method", METHODS)
def test_batched_equals_loop_and_float32(method):
    A, B = random_stable(3, 2, batch=(5,), seed=3)
    delta = torch.linspace(0.05, 1.0, 5, dtype=torch.float64)
    Ad, Bd = dz.discretize(A, B, delta, method)
    for h in range(5):
        a, b = dz.discretize(A[h], B[h], delta[h].item(), method)
        assert_close_rel(Ad[h], a, torch.float64, f"Ad[{h}]")
        assert_close_rel(Bd[h], b, torch.float64, f"Bd[{h}]")
    Ad32, Bd32 = dz.discretize(A.float(), B.float(), delta.float(), method)
    assert Ad32.dtype == torch.float32
    assert_close_rel(Ad32, Ad, torch.float32, "Ad fp32")
    assert_close_rel(Bd32, Bd, torch.float32, "Bd fp32")


@pytest.mark.parametrize("method", METHODS)
def test_differentiable_in_delta_A_B(method):
    A, B = random_stable(3, 1, seed=4)
    delta = torch.tensor(0.3, dtype=torch.float64)
    for t in (A, B, delta):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b, d: dz.discretize(a, b, d, method), (A, B, delta))
    lam = -torch.rand(4, dtype=torch.float64, requires_grad=True) - 0.1
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda l, bb, d: dz.discretize(l, bb, d, method, diagonal=True), (lam, b, delta))


# ----------------------------------------------------------------------------- convergence orders


def final_error(method, delta, T=4.0):
    """Max error over the trajectory of the free (u = 0) damped oscillator from x0 = (1, 0)."""
    sys = damped_oscillator(omega=2.0, zeta=0.1)
    L = int(round(T / delta))
    t = delta * np.arange(1, L + 1)
    x_true, _ = simulate(sys, lambda s: np.zeros(1), np.concatenate([[0.0], t]), x0=np.array([1.0, 0.0]))
    Ad, Bd = sys.discretize(delta, method)
    x = run_discrete(Ad, Bd, np.zeros(L), x0=np.array([1.0, 0.0]))
    return np.abs(x - x_true[1:]).max()


@pytest.mark.parametrize("method,order", [("forward_euler", 1), ("backward_euler", 1), ("bilinear", 2)])
def test_convergence_order(method, order):
    deltas = np.array([0.02, 0.01, 0.005, 0.0025])
    errs = np.array([final_error(method, d) for d in deltas])
    slope = np.polyfit(np.log(deltas), np.log(errs), 1)[0]
    assert abs(slope - order) < 0.15, f"{method}: fitted order {slope:.3f}, expected {order} ± 0.15"


def test_zoh_exact_on_free_response():
    assert final_error("zoh", 0.1) < 1e-9


# ----------------------------------------------------------------------------- stability


def test_stability_of_each_rule():
    """Stable A: bilinear and backward Euler give |eig(Ā)| < 1 for every Δ; forward Euler fails for large Δ."""
    deltas = torch.logspace(-3, 3, 25, dtype=torch.float64)
    for seed in range(5):
        A, B = random_stable(4, seed=seed)
        assert torch.linalg.eigvals(A).real.max() < 0
        for method in ("bilinear", "backward_euler", "zoh"):
            Ad, _ = dz.discretize(A.expand(25, 4, 4), B.expand(25, 4, 1), deltas, method)
            rho = dz.spectral_radius(Ad)
            assert (rho < 1).all(), f"{method}: spectral radius {rho.max():.4f} >= 1"
        Ad, _ = dz.discretize(A.expand(25, 4, 4), B.expand(25, 4, 1), deltas, "forward_euler")
        rho = dz.spectral_radius(Ad)
        lam = torch.linalg.eigvals(A)
        limit = (-2 * lam.real / lam.abs() ** 2).min()  # |1 + Δλ| < 1 iff Δ < -2 Re λ / |λ|²
        assert (rho[deltas > limit * 1.01] > 1).all() and (rho[deltas < limit * 0.99] < 1).all()


# ----------------------------------------------------------------------------- bad arguments


def test_bad_arguments_raise_clear_errors():
    A, B = random_stable(3)
    with pytest.raises(ValueError, match="delta"):
        dz.discretize(A, B, -0.1)
    with pytest.raises(ValueError, match="delta"):
        dz.discretize(A, B, 0.0, "bilinear")
    with pytest.raises(ValueError, match="delta"):
        dz.discretize(A, B, torch.tensor([0.1, -1.0]).double().reshape(2, 1, 1)[0, 0], "bilinear")
    with pytest.raises(ValueError, match="unknown discretization method"):
        dz.discretize(A, B, 0.1, "rk4")
    with pytest.raises(ValueError, match="B must be"):
        dz.discretize(A, torch.randn(4, 1, dtype=torch.float64), 0.1)
    with pytest.raises(ValueError, match="A must be a square"):
        dz.discretize(torch.randn(3, 2), torch.randn(3, 1), 0.1)
    with pytest.raises(ValueError, match="alpha"):
        dz.discretize(A, B, 0.1, "gbt")
    with pytest.raises(ValueError, match="alpha"):
        dz.discretize(A, B, 0.1, "gbt", alpha=1.5)
    with pytest.raises(ValueError, match="alpha"):
        dz.discretize(A, B, 0.1, "zoh", alpha=0.5)
    with pytest.raises(ValueError, match="diagonal A"):
        dz.discretize(torch.randn(3), torch.randn(4), 0.1, diagonal=True)
    with pytest.raises(ValueError, match="delta"):
        dz.discretize(A, B, torch.ones(2, 2, dtype=torch.float64))
