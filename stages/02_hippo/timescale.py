"""LegS's robustness to the time scale: the same signal, stretched over different durations T.

The signal f(t / T) (the `reconstruct.py` signal on [0, 1], stretched to
(0, T]) is sampled at a fixed rate 1/dt, so a longer T means more samples.
Each measure memorizes it with state size N; the final state's reconstruction
of the WHOLE history is scored (RMS error). LegT and FouT have a window θ and
LagT a scale θ fixed in advance (θ = 1): they only do well when T ≈ θ.
LegS's measure stretches with time (its 1/t factor; steps in log-time
Δτ_k = ln((k+1)/k) that depend on the sample index only), so it remembers the
whole history at every T; its error depends on the number of samples only
(the discretization error falls as samples get denser relative to the
signal's features), never on T itself: the same samples at any rate give the
same state (checked, recorded in the JSON).

    python stages/02_hippo/timescale.py         # ~1 minute on 2 cores
"""

from __future__ import annotations

import argparse
import importlib.util
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

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _smooth_signal():
    spec = importlib.util.spec_from_file_location("stage02_reconstruct", HERE / "reconstruct.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.smooth_signal


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--N", type=int, default=32, help="state size")
    p.add_argument("--dt", type=float, default=0.01, help="sampling step (fixed): L = T / dt samples")
    p.add_argument("--Ts", type=float, nargs="+", default=[0.25, 0.5, 1, 2, 4, 8, 16], help="durations T of the signal")
    p.add_argument("--theta", type=float, default=1.0, help="window / scale θ of LegT, LagT, FouT")
    p.add_argument("--method", choices=["zoh", "bilinear"], default="bilinear", help="discretization")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for timescale.png and timescale.json")
    p.add_argument("--quick", action="store_true", help="tiny run (for tests)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.quick:
        args.N, args.Ts, args.dt = 16, [0.5, 4.0], 0.02
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    smooth_signal = _smooth_signal()
    errors = {m: [] for m in hippo.MEASURES}
    same_samples = {}
    for T in tqdm(args.Ts, desc="time scales"):
        L = max(2, round(T / args.dt))
        u = torch.tensor(smooth_signal(L, seed=args.seed, noise=0.0))
        ages = (L - 1 - np.arange(L) + 0.5) * args.dt
        for m in hippo.MEASURES:
            c = hippo.hippo_states(u, m, args.N, args.dt, args.theta, args.method)[-1]
            approx = hippo.reconstruct(c, m, ages, hippo.window_of(m, L * args.dt, args.theta))
            errors[m].append(float(np.sqrt(np.mean((approx - u.numpy()) ** 2))))
    # the invariance itself: identical samples at two rates give identical LegS states
    u = torch.tensor(smooth_signal(100, seed=args.seed, noise=0.0))
    c1, c2 = (hippo.hippo_states(u, "legs", args.N, dt, method=args.method)[-1] for dt in (0.01, 10.0))
    same_samples["legs_state_max_abs_diff_dt_0.01_vs_10"] = float((c1 - c2).abs().max())
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for m in hippo.MEASURES:
        ax.loglog(args.Ts, errors[m], "-o", ms=4, label=m)
    ax.axvline(args.theta, color="k", lw=0.5, ls=":")
    ax.set_xlabel("duration T of the signal (θ = %g marked)" % args.theta)
    ax.set_ylabel("RMS error of the whole-history reconstruction")
    ax.set_title(f"time-scale robustness, N = {args.N}, dt = {args.dt}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / "timescale.png", dpi=110)
    plt.close("all")
    res = {"N": args.N, "dt": args.dt, "Ts": args.Ts, "theta": args.theta, "method": args.method,
           "rms_error": errors, **same_samples, "seconds": round(time.time() - t0, 1)}
    write_json(args.out / "timescale.json", res)
    for m in hippo.MEASURES:
        print(f"{m:5s} RMS error by T {args.Ts}: " + " ".join(f"{e:.2e}" for e in errors[m]))
    print(same_samples)
    return res


if __name__ == "__main__":
    main()
