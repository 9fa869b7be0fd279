"""The HiPPO matrices as heat maps, and the eigenvalues of each A and of its discretizations.

For every measure (LegT, LegS, LagT, FouT) at state size N: a heat map of
A (signed, symmetric colour scale), then the spectrum of A in the complex
plane and the spectra of Ā = discretize(A, Δ) by ZOH, bilinear and forward
Euler on the unit disc. The JSON records the largest real part of eig(A)
and the spectral radius of each Ā (stable iff < 1, marginal at 1).

    python stages/02_hippo/matrices.py            # a few seconds
"""

from __future__ import annotations

import argparse
import math
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
from ssmlab.core.discretize import discretize, spectral_radius  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("zoh", "bilinear", "forward_euler")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--N", type=int, default=16, help="state size of the heat maps and spectra")
    p.add_argument("--delta", type=float, default=0.05, help="step Δ of the discretizations (LegS: a log-time step)")
    p.add_argument("--theta", type=float, default=1.0, help="window θ of LegT/FouT, time scale of LagT")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for matrices.png, eigenvalues.png, matrices.json")
    p.add_argument("--quick", action="store_true", help="small N (for tests)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    N = 6 if args.quick else args.N
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.2))
    fig2, axes2 = plt.subplots(2, 4, figsize=(16, 8))
    res = {"N": N, "delta": args.delta, "theta": args.theta, "measures": {}}
    for j, m in enumerate(tqdm(hippo.MEASURES, desc="measures")):
        A, B = hippo.transition(m, N, args.theta)
        v = A.abs().max().item()
        im = axes[j].imshow(A.numpy(), cmap="RdBu_r", vmin=-v, vmax=v)
        axes[j].set_title(f"{m}: A ({N}x{N})")
        fig.colorbar(im, ax=axes[j], fraction=0.046)
        ev = torch.linalg.eigvals(A).numpy()
        axes2[0, j].scatter(ev.real, ev.imag, s=12)
        axes2[0, j].axvline(0, color="k", lw=0.5)
        axes2[0, j].set_title(f"{m}: eig(A)")
        axes2[0, j].set_xlabel("Re λ")
        axes2[0, j].set_ylabel("Im λ")
        circle = np.exp(1j * np.linspace(0, 2 * math.pi, 200))
        axes2[1, j].plot(circle.real, circle.imag, "k", lw=0.5)
        entry = {"max_real_eig_A": float(ev.real.max()), "spectral_radius": {}}
        for method, mk in zip(METHODS, "o^x"):
            Ad, _ = discretize(A, B[:, None], args.delta, method)
            evd = torch.linalg.eigvals(Ad).numpy()
            axes2[1, j].scatter(evd.real, evd.imag, s=14, marker=mk, label=method)
            entry["spectral_radius"][method] = spectral_radius(Ad).item()
        axes2[1, j].set_aspect("equal")
        axes2[1, j].set_title(f"{m}: eig(Ā), Δ = {args.delta}")
        axes2[1, j].legend(fontsize=7)
        res["measures"][m] = entry
    fig.suptitle("HiPPO transition matrices A (red > 0, blue < 0)")
    fig.tight_layout()
    fig.savefig(args.out / "matrices.png", dpi=110)
    fig2.tight_layout()
    fig2.savefig(args.out / "eigenvalues.png", dpi=110)
    plt.close("all")
    res["seconds"] = round(time.time() - t0, 2)
    write_json(args.out / "matrices.json", res)
    for m, e in res["measures"].items():
        print(f"{m}: max Re eig(A) = {e['max_real_eig_A']:+.3f}; spectral radius "
              + ", ".join(f"{k} {v:.4f}" for k, v in e["spectral_radius"].items()))
    return res


if __name__ == "__main__":
    main()
