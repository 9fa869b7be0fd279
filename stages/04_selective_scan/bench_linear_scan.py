"""Benchmark the linear-recurrence scan h_t = a_t h_{t-1} + b_t.

Times the native kernel (forward, forward+backward) against the PyTorch
reference loop and the Blelloch scan, and compares the kernel's achieved memory
bandwidth with a device-to-device copy measured on the same machine (the scan
reads a and b and writes h once: it is memory-bound, so the copy is its ceiling).

    python stages/04_selective_scan/bench_linear_scan.py                    # CPU, small shape
    python stages/04_selective_scan/bench_linear_scan.py --device cuda      # GPU, 8 x 1536 x 8192

Prints a table and writes JSON (default: stages/04_selective_scan/results/).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from ssmlab.core import native, scan

HERE = Path(__file__).parent


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch", type=int, default=None, help="default: 8 on cuda, 2 on cpu")
    p.add_argument("--channels", type=int, default=None, help="default: 1536 on cuda, 256 on cpu")
    p.add_argument("--length", type=int, default=None, help="default: 8192 on cuda, 4096 on cpu")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions (median reported)")
    p.add_argument("--skip-ref", action="store_true", help="skip the slow sequential reference")
    p.add_argument("--out", type=Path, default=HERE / "results")
    return p.parse_args()


def timer(device: str, fn, repeats: int, warmup: int = 3) -> float:
    """Median wall time of fn() in milliseconds (CUDA events on the GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: str, nbytes: int, repeats: int) -> float:
    """Device-to-device copy, counting bytes read plus bytes written, in GB/s."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = timer(device, lambda: dst.copy_(src), repeats)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def main() -> None:
    args = parse_args()
    device = args.device
    if device == "cuda" and not native.backends()["cuda"]:
        raise SystemExit(f"--device cuda needs the CUDA backend: {native.describe()}")
    gpu = device == "cuda"
    B = args.batch or (8 if gpu else 2)
    C = args.channels or (1536 if gpu else 256)
    L = args.length or (8192 if gpu else 4096)
    repeats = args.repeats or (50 if gpu else 5)
    print(native.describe())
    print(f"shape (B, C, L) = ({B}, {C}, {L}) on {torch.cuda.get_device_name() if gpu else platform.processor() or 'cpu'}")

    copy_gbs = copy_bandwidth(device, 8 * B * C * L if gpu else 4 * B * C * L, repeats)
    rows = []
    for name in args.dtypes:
        dtype = getattr(torch, name)
        a = (0.5 + 0.5 * torch.rand(B, C, L, device=device)).to(dtype)
        b = torch.randn(B, C, L, device=device).to(dtype)
        h0 = torch.randn(B, C, device=device)
        gy = torch.randn(B, C, L, device=device).to(dtype)
        elem = a.element_size()
        fwd_bytes = 3 * B * C * L * elem + 4 * B * C  # read a, b; write h (+ h0)
        bwd_bytes = 5 * B * C * L * elem + 8 * B * C  # read a, h, dy; write da, db (+ h0, dh0)

        def fwd(impl):
            return lambda: impl(a, b, h0)

        def fwd_bwd(impl):
            ar, br, hr = a.detach().requires_grad_(), b.detach().requires_grad_(), h0.detach().requires_grad_()

            def run():
                out = impl(ar, br, hr)
                out.backward(gy)
                ar.grad = br.grad = hr.grad = None
            return run

        backend = "cuda" if gpu else "cpu"
        impls = {f"native ({backend})": lambda a, b, h0: scan.linear_scan(a, b, h0, backend=backend),
                 "blelloch (PyTorch)": scan.linear_scan_blelloch}
        if not args.skip_ref:
            impls["sequential ref (PyTorch)"] = scan.linear_scan_ref
        for impl_name, impl in impls.items():
            slow = impl_name.startswith("sequential")
            reps = 1 if slow and gpu else (max(1, repeats // 5) if slow else repeats)
            t_f = timer(device, fwd(impl), reps, warmup=1 if slow else 3)
            t_fb = timer(device, fwd_bwd(impl), reps, warmup=1 if slow else 3)
            rows.append({
                "dtype": name, "impl": impl_name, "fwd_ms": t_f, "fwd_bwd_ms": t_fb,
                "fwd_GBps": fwd_bytes / (t_f * 1e-3) / 1e9,
                "bwd_GBps": bwd_bytes / ((t_fb - t_f) * 1e-3) / 1e9 if t_fb > t_f else None,
            })

    print(f"\ndevice-to-device copy: {copy_gbs:.0f} GB/s (read + write)")
    print(f"{'dtype':9} {'implementation':26} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd GB/s':>9} {'% copy':>7}")
    for r in rows:
        print(f"{r['dtype']:9} {r['impl']:26} {r['fwd_ms']:9.3f} {r['fwd_bwd_ms']:11.3f} "
              f"{r['fwd_GBps']:9.1f} {100 * r['fwd_GBps'] / copy_gbs:6.1f}%")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"linear_scan_{device}.json"
    result = {
        "command": "python stages/04_selective_scan/bench_linear_scan.py --device " + device,
        "device": torch.cuda.get_device_name() if gpu else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "shape": {"batch": B, "channels": C, "length": L}, "copy_GBps": copy_gbs, "rows": rows,
    }
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
