"""Core equations: a damped oscillator, simulated continuously and with every discretization.

Draws (1) trajectories of the exact solution and of each discrete rule at one
step Δ, (2) the error against Δ on log-log axes with the fitted convergence
order of each rule, (3) the spectral radius of Ā against Δ (stability).

The input is a staircase that switches every `--hold` time units, so for Δ
dividing the hold time every rule sees the exact input: ZOH is then exact,
Euler is first order, bilinear second order. The truth is SciPy's solve_ivp.

    python stages/01_basic_ssm/core_equations.py            # ~10 s
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ssmlab.core.charlm import write_json  # noqa: E402
from ssmlab.core.discretize import spectral_radius  # noqa: E402
from ssmlab.core.ssm import damped_oscillator, run_discrete, simulate, simulate_zoh  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# (label, method, alpha, expected order)
RULES = [
    ("forward Euler", "forward_euler", None, 1),
    ("backward Euler", "backward_euler", None, 1),
    ("bilinear", "bilinear", None, 2),
    ("GBT α=0.25", "gbt", 0.25, 1),
    ("ZOH", "zoh", None, None),  # exact here: no order to fit
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--omega", type=float, default=2.0, help="natural frequency ω (rad / time unit)")
    p.add_argument("--zeta", type=float, default=0.1, help="damping ratio ζ (> 0: stable)")
    p.add_argument("--T", type=float, default=10.0, help="simulated time")
    p.add_argument("--hold", type=float, default=0.5, help="the input staircase switches every this many time units")
    p.add_argument("--delta", type=float, default=0.25, help="step Δ of the trajectory plot (must divide --hold)")
    p.add_argument("--levels", type=int, default=8, help="Δ = hold / 2^j for j = 0..levels-1 in the error study")
    p.add_argument("--fit-last", type=int, default=4, help="fit the order on the smallest this many Δ")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS, help="output folder for PNG and JSON")
    p.add_argument("--quick", action="store_true", help="short run for tests (T=4, 5 levels)")
    args = p.parse_args(argv)
    if args.quick:
        args.T, args.levels, args.fit_last = 4.0, 5, 3
    if args.zeta <= 0 or args.omega <= 0:
        p.error("--omega and --zeta must be > 0 (a stable oscillator)")
    if args.delta <= 0 or abs(args.hold / args.delta - round(args.hold / args.delta)) > 1e-9:
        p.error("--delta must be > 0 and divide --hold")
    if args.fit_last < 2 or args.fit_last > args.levels:
        p.error("--fit-last must be in [2, --levels]")
    return args


def discrete_run(sys, method, alpha, delta, u_hold, hold, x0):
    """States at t = Δ, 2Δ, ... under the staircase input (each step sees its held value)."""
    reps = int(round(hold / delta))
    u = np.repeat(u_hold, reps)  # (L,)
    Ad, Bd = sys.discretize(delta, method, alpha)
    return run_discrete(Ad, Bd, u, x0)


def main(argv=None):
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sys = damped_oscillator(args.omega, args.zeta)
    rng = np.random.default_rng(args.seed)
    n_hold = int(round(args.T / args.hold))
    u_hold = rng.uniform(-3, 3, n_hold)  # the staircase values
    x0 = np.array([1.0, 0.0])
    # Truth at the switching times, by the adaptive solver restarted at each switch.
    x_true = simulate_zoh(sys, u_hold, args.hold, x0=x0)  # (n_hold, N)

    # (1) trajectories at one Δ, and a dense exact curve
    t_fine = np.linspace(0, args.T, 2001)

    traj = {}
    for label, method, alpha, _ in RULES:
        traj[label] = discrete_run(sys, method, alpha, args.delta, u_hold, args.hold, x0)[:, 0]
    # exact curve: piecewise solve_ivp (restart at each switch for accuracy)
    q_fine = np.empty_like(t_fine)
    x = x0
    for k in range(n_hold):
        lo, hi = k * args.hold, (k + 1) * args.hold
        mask = (t_fine >= lo) & (t_fine <= hi)
        ts = np.unique(np.concatenate([[lo], t_fine[mask], [hi]]))
        xs, _ = simulate(sys, lambda t, k=k: np.array([u_hold[k]]), ts, x0=x)
        q_fine[mask] = xs[np.searchsorted(ts, t_fine[mask]), 0]
        x = xs[-1]

    # (2) error against Δ
    deltas = args.hold / 2.0 ** np.arange(args.levels)
    errors, orders = {}, {}
    for label, method, alpha, expected in RULES:
        errs = []
        for d in deltas:
            xs = discrete_run(sys, method, alpha, d, u_hold, args.hold, x0)
            at_switch = xs[int(round(args.hold / d)) - 1 :: int(round(args.hold / d))]  # states at k * hold
            errs.append(float(np.abs(at_switch - x_true).max()))
        errors[label] = errs
        if expected is not None:
            slope = np.polyfit(np.log(deltas[-args.fit_last :]), np.log(errs[-args.fit_last :]), 1)[0]
            orders[label] = float(slope)

    # (3) stability: spectral radius of Ā against Δ
    d_grid = torch.logspace(-2, 1.5, 200, dtype=torch.float64)
    A = torch.from_numpy(sys.A).expand(200, 2, 2)
    B = torch.from_numpy(sys.B).expand(200, 2, 1)
    from ssmlab.core.discretize import discretize

    rho = {label: spectral_radius(discretize(A, B, d_grid, method, alpha)[0]).numpy() for label, method, alpha, _ in RULES}

    fig, ax = plt.subplots(1, 3, figsize=(17, 4.6))
    ax[0].plot(t_fine, q_fine, "k-", lw=2, label="exact (solve_ivp)")
    t_disc = args.delta * np.arange(1, len(traj["ZOH"]) + 1)
    for (label, *_), m in zip(RULES, "o^sdx"):
        ax[0].plot(t_disc, traj[label], m + "--", ms=4, lw=0.8, label=label)
    lim = 3 * np.abs(q_fine).max()
    ax[0].set_ylim(-lim, lim)
    ax[0].set(xlabel="t", ylabel="position q(t)", title=f"damped oscillator, staircase input, Δ = {args.delta}")
    ax[0].legend(fontsize=8)
    for (label, *_), m in zip(RULES, "o^sdx"):
        name = f"{label} (order {orders[label]:.2f})" if label in orders else f"{label} (exact)"
        ax[1].loglog(deltas, np.maximum(errors[label], 1e-17), m + "-", label=name)
    ax[1].set(xlabel="Δ", ylabel="max error at switch times", title="error vs step: fitted convergence orders")
    ax[1].legend(fontsize=8)
    for label, *_ in RULES:
        ax[2].semilogx(d_grid.numpy(), rho[label], label=label)
    ax[2].axhline(1.0, color="k", lw=0.8, ls=":")
    ax[2].set_ylim(0, 2.5)
    ax[2].set(xlabel="Δ", ylabel="spectral radius of Ā", title="stability: |eig(Ā)| < 1 is stable")
    ax[2].legend(fontsize=8)
    fig.tight_layout()
    png = args.out / "core_equations.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)

    result = {
        "system": {"omega": args.omega, "zeta": args.zeta, "T": args.T, "hold": args.hold},
        "deltas": deltas.tolist(),
        "errors": errors,
        "fitted_orders": orders,
        "fit_on_smallest": args.fit_last,
        "forward_euler_unstable_above_delta": float(d_grid[rho["forward Euler"] > 1].min()) if (rho["forward Euler"] > 1).any() else None,
        "max_spectral_radius": {k: float(v.max()) for k, v in rho.items()},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    write_json(args.out / "core_equations.json", result)
    print("fitted convergence orders:", {k: round(v, 3) for k, v in orders.items()})
    print(f"ZOH max error: {max(errors['ZOH']):.2e} (exact up to the solver's tolerance)")
    print(f"wrote {png} and {args.out / 'core_equations.json'} in {result['seconds']} s")
    return result


if __name__ == "__main__":
    main()
