"""Dual computation: one discrete SSM, two algorithms, same output; and the quadratic wall.

1. On random stable systems (float64), the recurrent mode (a loop of
   x_k = Ā x_{k-1} + B̄ u_k) and the convolutional mode (kernel K, then FFT)
   agree to rounding error.
2. Time against sequence length L of one SSM layer (H channels, state N) in
   both modes, and of one causal softmax attention layer of the same width,
   computed the textbook way (the L x L score matrix is materialised). A mode
   stops growing L once one point takes longer than --max-seconds, or (for
   attention) once its score matrices would need more than --attn-mem-gib.

    python stages/01_basic_ssm/dual_computation.py          # ~1-2 min
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from ssmlab.core.charlm import write_json  # noqa: E402
from ssmlab.core.discretize import discretize  # noqa: E402
from ssmlab.core.lti import ssm_convolutional, ssm_recurrent  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--H", type=int, default=64, help="channels (SSM) = model width (attention)")
    p.add_argument("--N", type=int, default=16, help="state size per channel")
    p.add_argument("--min-log2", type=int, default=6, help="smallest L = 2^min_log2")
    p.add_argument("--max-log2", type=int, default=17, help="largest L = 2^max_log2")
    p.add_argument("--max-seconds", type=float, default=4.0, help="stop a mode after a point slower than this")
    p.add_argument("--attn-mem-gib", type=float, default=2.0, help="attention's memory limit for its L x L matrices")
    p.add_argument("--check-lengths", type=int, nargs="+", default=[1, 2, 7, 100, 1023, 4096],
                   help="lengths of the recurrent == convolutional check")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 gives steadier timings on a shared CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS, help="output folder for PNG and JSON")
    p.add_argument("--quick", action="store_true", help="short run for tests")
    args = p.parse_args(argv)
    if args.quick:
        args.max_log2, args.check_lengths, args.max_seconds, args.H = 9, [1, 2, 7, 100], 1.0, 16
    if args.min_log2 < 0 or args.max_log2 < args.min_log2:
        p.error("need 0 <= --min-log2 <= --max-log2")
    if args.H < 1 or args.N < 1:
        p.error("--H and --N must be >= 1")
    return args


def random_system(H, N, dtype, seed):
    """H stable SISO systems, ZOH-discretized with Δ in [0.01, 0.1]: (Ā, B̄, C, D)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(H, N, N, generator=g, dtype=dtype) / math.sqrt(N)
    A = A - (torch.linalg.eigvals(A).real.amax(-1) + 0.1)[:, None, None] * torch.eye(N, dtype=dtype)
    B = torch.randn(H, N, 1, generator=g, dtype=dtype)
    delta = torch.exp(torch.empty(H, dtype=dtype).uniform_(math.log(0.01), math.log(0.1), generator=g))
    Ad, Bd = discretize(A, B, delta, "zoh")
    return Ad, Bd.squeeze(-1), torch.randn(H, N, generator=g, dtype=dtype), torch.randn(H, generator=g, dtype=dtype)


def naive_causal_attention(x, Wq, Wk, Wv):
    """softmax(Q Kᵀ / sqrt(d) + causal mask) V with the L x L scores materialised. x (L, d)."""
    q, k, v = x @ Wq, x @ Wk, x @ Wv
    scores = (q @ k.T) / math.sqrt(x.shape[-1])  # (L, L)
    L = x.shape[0]
    scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def timed(fn, reps):
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    # 1. recurrent == convolutional (float64)
    check = []
    for L in args.check_lengths:
        Ad, Bd, C, D = random_system(4, args.N, torch.float64, args.seed + L)
        u = torch.randn(2, 4, L, dtype=torch.float64)  # (B, H, L)
        y_rec, _ = ssm_recurrent(Ad, Bd, C, u, D)
        y_conv = ssm_convolutional(Ad, Bd, C, u, D)
        err = (y_rec - y_conv).abs().max().item()
        check.append({"L": L, "max_abs_diff": err, "max_abs_y": y_rec.abs().max().item()})
        print(f"L={L:6d}: max |recurrent - convolutional| = {err:.2e}")

    # 2. time against L (float32, batch 1)
    Ad, Bd, C, D = random_system(args.H, args.N, torch.float32, args.seed)
    g = torch.Generator().manual_seed(args.seed)
    W = [torch.randn(args.H, args.H, generator=g) / math.sqrt(args.H) for _ in range(3)]
    lengths = [2**k for k in range(args.min_log2, args.max_log2 + 1)]
    modes = {
        "recurrent": lambda u: ssm_recurrent(Ad, Bd, C, u, D)[0],
        "convolutional": lambda u: ssm_convolutional(Ad, Bd, C, u, D),
        "attention": lambda u: naive_causal_attention(u[0].T, *W),
    }
    timings = {m: [] for m in modes}
    stopped = {}
    bar = tqdm(total=len(lengths) * len(modes), desc="timing")
    with torch.no_grad():
        for L in lengths:
            u = torch.randn(1, args.H, L)
            for mode, fn in modes.items():
                bar.update(1)
                if mode in stopped:
                    continue
                if mode == "attention":
                    need_gib = 3 * L * L * 4 / 2**30  # scores, mask, probabilities: three L x L arrays
                    if need_gib > args.attn_mem_gib:
                        stopped[mode] = f"at L={L}: needs ~{need_gib:.1f} GiB for its L x L matrices > {args.attn_mem_gib} GiB"
                        continue
                reps = 1 if mode == "recurrent" or L >= 4096 else 3
                s = timed(lambda: fn(u), reps)
                timings[mode].append({"L": L, "seconds": s})
                if s > args.max_seconds:
                    stopped[mode] = f"after L={L}: {s:.2f} s > {args.max_seconds} s"
    bar.close()

    def memory_bytes(mode, L):
        """Bytes of the largest intermediate tensors, computed from their shapes (float32, batch 1)."""
        n = 1 << (2 * L - 2).bit_length()  # FFT size of causal_conv
        if mode == "attention":
            return 3 * L * L * 4 + 4 * L * args.H * 4  # L x L scores, mask (1 byte, counted as 4), probabilities; q, k, v, y
        if mode == "convolutional":
            return 3 * args.H * (n // 2 + 1) * 8 + args.H * (n + 2 * L) * 4  # 3 spectra, padded output, K and y
        return args.H * args.N * 4 + 2 * args.H * L * 4  # state x, and the stacked outputs y

    fig, ax = plt.subplots(1, 3, figsize=(17, 4.5))
    for mode, m in zip(modes, "os^"):
        Ls = [p["L"] for p in timings[mode]]
        ax[2].loglog(Ls, [memory_bytes(mode, L) / 2**20 for L in Ls], m + "-", label=mode)
    ax[2].axhline(args.attn_mem_gib * 1024, color="r", ls=":", label=f"limit {args.attn_mem_gib} GiB")
    ax[2].set(xlabel="sequence length L", ylabel="MiB (from tensor shapes)", title="memory of the largest intermediates")
    ax[2].legend()
    for mode, m in zip(modes, "os^"):
        pts = timings[mode]
        ax[0].loglog([p["L"] for p in pts], [p["seconds"] for p in pts], m + "-", label=mode)
    ax[0].set(xlabel="sequence length L", ylabel="seconds (forward, batch 1)",
              title=f"one layer, H={args.H}, N={args.N}: time vs L")
    ax[0].legend()
    ax[1].loglog([c["L"] for c in check], [max(c["max_abs_diff"], 1e-18) for c in check], "o-")
    ax[1].axhline(1e-10, color="r", ls=":", label="1e-10")
    ax[1].set(xlabel="L", ylabel="max |y_rec - y_conv|", title="recurrent vs convolutional (float64)")
    ax[1].legend()
    fig.tight_layout()
    png = args.out / "dual_computation.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)

    result = {
        "equality_check_float64": check,
        "timings": timings,
        "memory_mib": {m: [{"L": p["L"], "mib": memory_bytes(m, p["L"]) / 2**20} for p in timings[m]] for m in modes},
        "stopped": stopped,
        "H": args.H, "N": args.N, "threads": args.threads,
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    write_json(args.out / "dual_computation.json", result)
    for mode in modes:
        last = timings[mode][-1] if timings[mode] else None
        print(f"{mode:14s} longest L timed: {last['L'] if last else '-'} ({last['seconds']:.3f} s)"
              + (f"; stopped {stopped[mode]}" if mode in stopped else ""))
    print(f"wrote {png} in {result['seconds']} s")
    return result


if __name__ == "__main__":
    main()
