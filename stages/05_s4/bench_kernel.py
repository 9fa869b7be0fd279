"""Kernel generation time and memory against the length L: naive vs memory-lean, S4 and S4D.

    python stages/05_s4/bench_kernel.py                         # CPU: H=64, L = 256 .. 16384
    python stages/05_s4/bench_kernel.py --device cuda --H 256   # GPU: L up to 131072

For each kernel (S4: Cauchy + Woodbury + iFFT; S4D: Vandermonde) and each
path (``naive``: the (N x L) matrix is materialized and kept for autograd;
``lean``: chunked, recomputed in the backward pass), one measurement is the
forward plus backward pass of the kernel of H channels with state size N
(what one training step pays), timed as the median of --repeats runs after a
warm-up, and its peak memory above the memory held before it:
``torch.cuda.max_memory_allocated`` on a GPU, the growth of the process's
peak resident set (Linux VmHWM, reset through /proc/self/clear_refs) on a
CPU. A path is skipped at lengths where its estimated footprint exceeds
--max-gb. Results: JSON and a PNG in --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ssmlab.core.s4 import s4_kernel
from ssmlab.core.s4d import s4d_kernel

HERE = Path(__file__).resolve().parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--H", type=int, default=None, help="channels (default: 64 on CPU, 256 on GPU)")
    p.add_argument("--N", type=int, default=64, help="state size (N/2 stored conjugate pairs)")
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help="default: powers of 4 from 256 up to 16384 (CPU) or 131072 (GPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-gb", type=float, default=None, help="skip a path whose estimate exceeds this (default: 4 CPU, 40 GPU)")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def make_params(H: int, N: int, device: torch.device, seed: int = 0):
    """Random S4 and S4D parameters at HiPPO-like scales (requires_grad, complex64)."""
    g = torch.Generator().manual_seed(seed)
    Np = N // 2
    Lam = torch.complex(-0.5 * torch.ones(H, Np), torch.pi * torch.arange(Np).float().repeat(H, 1))
    P = torch.randn(1, H, Np, generator=g, dtype=torch.complex64) * 0.5
    B = torch.randn(H, Np, generator=g, dtype=torch.complex64)
    C = torch.randn(1, H, Np, generator=g, dtype=torch.complex64)
    dt = torch.exp(torch.empty(H).uniform_(-6.9, -2.3, generator=g))
    return [t.to(device).requires_grad_(True) for t in (Lam, P, B, C, dt)]


def run_once(kind: str, lean: bool, params, L: int) -> None:
    Lam, P, B, C, dt = params
    if kind == "s4":
        K = s4_kernel(Lam, P, B, C, dt, L, lean=lean)
    else:
        K = s4d_kernel(Lam, B, C, dt, L, "zoh", True, lean=lean)
    K.square().sum().backward()
    for p in params:
        p.grad = None


def estimate_bytes(kind: str, lean: bool, H: int, N: int, L: int) -> float:
    """Rough footprint: complex64 (rows x H x N x length) kept by autograd (naive) or one chunk (lean)."""
    rows, length = (4, L // 2 + 1) if kind == "s4" else (1, L)
    per = rows * H * N * 8
    return per * (min(length, 1024) * 3 if lean else length * 4)


def _read_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_bytes(fn, device: torch.device) -> float:
    """Peak memory above the starting point while fn() runs."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    base = _read_status("VmRSS")
    fn()
    return _read_status("VmHWM") - base


def time_it(fn, device: torch.device, repeats: int) -> float:
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for kind in ("s4", "s4d"):
        for lean, style in ((False, "o--"), (True, "s-")):
            pts = [r for r in rows if r["kernel"] == kind and r["lean"] == lean and r["seconds"] is not None]
            if not pts:
                continue
            label = f"{kind.upper()} {'lean' if lean else 'naive'}"
            ax1.loglog([r["L"] for r in pts], [r["seconds"] * 1e3 for r in pts], style, label=label)
            ax2.loglog([r["L"] for r in pts], [max(r["peak_mb"], 1e-2) for r in pts], style, label=label)
    ax1.set_xlabel("L"), ax1.set_ylabel("forward + backward (ms)"), ax1.legend()
    ax2.set_xlabel("L"), ax2.set_ylabel("peak memory above baseline (MB)"), ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(a.device)
    gpu = device.type == "cuda"
    H = a.H or (256 if gpu else 64)
    lengths = a.lengths or [256 * 4**k for k in range(6 if gpu else 4)] + ([131072] if gpu else [])
    max_bytes = (a.max_gb or (40.0 if gpu else 4.0)) * 2**30
    params = make_params(H, a.N, device)
    rows = []
    jobs = [(kind, lean, L) for L in lengths for kind in ("s4", "s4d") for lean in (False, True)]
    for kind, lean, L in tqdm(jobs, desc="kernels"):
        row = {"kernel": kind, "lean": lean, "L": L, "H": H, "N": a.N, "seconds": None, "peak_mb": None}
        if estimate_bytes(kind, lean, H, a.N, L) > max_bytes:
            row["skipped"] = f"estimated footprint over {max_bytes / 2**30:.0f} GB"
        else:
            fn = lambda: run_once(kind, lean, params, L)  # noqa: E731
            try:
                row["peak_mb"] = round(peak_bytes(fn, device) / 2**20, 2)
                row["seconds"] = time_it(fn, device, a.repeats)
            except torch.cuda.OutOfMemoryError:
                row["skipped"] = "out of memory"
                torch.cuda.empty_cache()
        rows.append(row)
        tqdm.write(json.dumps(row))
    name = f"bench_kernel_{'cuda' if gpu else 'cpu'}"
    dev_name = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"device": dev_name, "H": H, "N": a.N, "rows": rows}, indent=1))
    plot(rows, f"S4 / S4D kernel generation, H={H}, N={a.N}, {dev_name}", out / f"{name}.png")
    print(f"wrote {out / (name + '.json')} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
