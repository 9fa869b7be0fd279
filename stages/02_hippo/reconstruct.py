"""Online function approximation: each HiPPO measure memorizes a signal; reconstruct it from the final state.

A smooth random signal (a sum of `--freqs` sines and cosines with 1/f
amplitudes, plus a little filtered noise) is sampled L times on (0, T] and
fed through the discretized HiPPO dynamics of each measure (`hippo.hippo_states`).
From the final state alone, the history is reconstructed with the measure's
basis (`hippo.reconstruct`) and compared with the truth over each measure's
window: the last θ time units for LegT, LagT (its scale) and FouT, the whole
history for LegS. Two figures: reconstructions at several N, and the RMS
error against N (log scale), for ZOH and bilinear discretization.

    python stages/02_hippo/reconstruct.py        # ~1 minute on 2 cores
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
from tqdm import tqdm  # noqa: E402

from ssmlab.core import hippo  # noqa: E402
from ssmlab.core.charlm import write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def smooth_signal(L: int, T: float = 1.0, freqs: int = 5, noise: float = 0.1, seed: int = 0) -> np.ndarray:
    """(L,) samples at t_k = (k + 1) T / L of a random sum of sines/cosines (periods T/1 .. T/freqs) plus smoothed noise."""
    rng = np.random.default_rng(seed)
    x = np.arange(1, L + 1) / L
    f = np.arange(1, freqs + 1)
    a, b = rng.normal(size=freqs) / f, rng.normal(size=freqs) / f
    s = np.sin(2 * np.pi * np.outer(x, f)) @ a + np.cos(2 * np.pi * np.outer(x, f)) @ b
    width = max(1, L // 100)
    s += noise * np.convolve(rng.normal(size=L + width - 1), np.ones(width) / np.sqrt(width), mode="valid")
    return s


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--L", type=int, default=1000, help="number of samples on (0, T], T = 1")
    p.add_argument("--theta", type=float, default=1.0, help="window θ of LegT and FouT (the whole signal by default)")
    p.add_argument("--lagt-theta", type=float, default=0.1, help="time scale of LagT's exponential measure")
    p.add_argument("--Ns", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128], help="state sizes for error vs N")
    p.add_argument("--show-Ns", type=int, nargs="+", default=[8, 32, 128], help="state sizes drawn in the reconstruction plot")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for reconstruct.png, error_vs_n.png, reconstruct.json")
    p.add_argument("--quick", action="store_true", help="tiny run (for tests)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.quick:
        args.L, args.Ns, args.show_Ns = 200, [4, 16], [4, 16]
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    L, dt = args.L, 1.0 / args.L
    u = torch.tensor(smooth_signal(L, seed=args.seed))
    theta = {"legt": args.theta, "legs": 1.0, "lagt": args.lagt_theta, "fout": args.theta}
    # LagT's weight e^{-a/θ} decays: score it over 3θ of history, where it still has weight e^-3
    horizon = {"legt": args.theta, "legs": 1.0, "lagt": 3 * args.lagt_theta, "fout": args.theta}
    Ns = sorted(set(args.Ns) | set(args.show_Ns))
    errors = {m: {meth: [] for meth in ("zoh", "bilinear")} for m in hippo.MEASURES}
    recon = {}
    ages = (L - 1 - np.arange(L) + 0.5) * dt  # sample j holds on (t_j - dt, t_j]; its centre's age
    for m in tqdm(hippo.MEASURES, desc="measures"):
        for meth in ("zoh", "bilinear"):
            for N in tqdm(Ns, desc=f"{m}/{meth}", leave=False):
                c = hippo.hippo_states(u, m, N, dt, theta[m], meth)[-1]
                keep = ages <= horizon[m] * (1 + 1e-12)
                approx = hippo.reconstruct(c, m, ages[keep], hippo.window_of(m, 1.0, theta[m]))
                errors[m][meth].append(float(np.sqrt(np.mean((approx - u.numpy()[keep]) ** 2))))
                if meth == "zoh" and N in args.show_Ns:
                    recon[(m, N)] = (1.0 - ages[keep], approx)
    t_axis = np.arange(1, L + 1) * dt
    fig, axes = plt.subplots(1, 4, figsize=(18, 4), sharey=True)
    for j, m in enumerate(hippo.MEASURES):
        axes[j].plot(t_axis, u.numpy(), "k", lw=2, alpha=0.4, label="signal")
        for N in args.show_Ns:
            s, y = recon[(m, N)]
            axes[j].plot(s, y, lw=1, label=f"N={N}")
        axes[j].axvspan(1 - horizon[m], 1, color="y", alpha=0.1)
        axes[j].set_title(f"{m} (window shaded)")
        axes[j].set_xlabel("time s (reconstructed at t = 1)")
        axes[j].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "reconstruct.png", dpi=110)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for m in hippo.MEASURES:
        for meth, ls in (("zoh", "-o"), ("bilinear", "--x")):
            ax.semilogy(Ns, errors[m][meth], ls, label=f"{m} {meth}", ms=4)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("state size N")
    ax.set_ylabel("RMS reconstruction error over the window")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / "error_vs_n.png", dpi=110)
    plt.close("all")
    res = {"L": L, "dt": dt, "theta": theta, "horizon": horizon, "Ns": Ns, "rms_error": errors,
           "signal_rms": float(np.sqrt(np.mean(u.numpy() ** 2))), "seconds": round(time.time() - t0, 1),
           "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    write_json(args.out / "reconstruct.json", res)
    for m in hippo.MEASURES:
        print(f"{m:5s} zoh RMS error by N {Ns}: " + " ".join(f"{e:.2e}" for e in errors[m]["zoh"]))
    return res


if __name__ == "__main__":
    main()
