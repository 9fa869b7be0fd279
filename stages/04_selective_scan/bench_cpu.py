"""CPU benchmark of the selective scan: the fused native kernel against the
sequential reference, the three pure-PyTorch parallel scans and the reference
with its step compiled by torch.compile, over sequence lengths.

Wall time and process CPU time (summed over threads) are both recorded: on a
shared machine the wall time depends on the load, the CPU time much less.

Each (implementation, L) runs in a fresh subprocess so that its peak memory
can be read from the process's high-water mark (getrusage): peak RSS during
the forward (and then forward+backward) minus the RSS with only the inputs
allocated. Time is the median of --repeats runs after the first run (which measures the
memory and is the warm-up), or that first run alone where it is long.

Implementations whose previous length took longer than --time-budget seconds,
or whose estimated (B, D, N, L) working set exceeds --max-gb, are skipped at
longer lengths and recorded as skipped, with the reason.

    python stages/04_selective_scan/bench_cpu.py            # full sweep (slow: the reference)
    python stages/04_selective_scan/bench_cpu.py --lengths 256 1024 --impls native ref
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

IMPLS = ["native", "ref", "compiled_ref", "hillis_steele", "blelloch", "chunked"]
# Rough count of live float32 (B, D, N, L) tensors for fwd+bwd, to skip runs that would not fit.
WORKING_SET = {"hillis_steele": 40, "blelloch": 14, "chunked": 12, "ref": 0, "compiled_ref": 0, "native": 0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--batch", type=int, default=2, help="B")
    p.add_argument("--dim", type=int, default=256, help="D")
    p.add_argument("--dstate", type=int, default=16, help="N")
    p.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch and native (OpenMP) threads")
    p.add_argument("--time-budget", type=float, default=60.0, help="skip longer L once one fwd+bwd run took this long (s)")
    p.add_argument("--max-gb", type=float, default=6.0, help="skip runs whose estimated working set exceeds this")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--merge", action="store_true", help="keep other rows already in OUT/bench_cpu.json")
    p.add_argument("--worker", nargs=2, metavar=("IMPL", "L"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args) -> dict:
    """Runs in the subprocess: measure one (implementation, L)."""
    import torch

    from ssmlab.core import native
    from ssmlab.core import selective_scan as ss

    impl, L = args.worker[0], int(args.worker[1])
    torch.set_num_threads(args.threads)
    if native.backends()["cpu"]:
        native.native_module().set_openmp_threads(args.threads)
    backend = {"native": "cpu", "compiled_ref": "ref"}.get(impl, impl)
    if impl == "compiled_ref":
        ss.compile_reference_step(dynamic=False)
    g = torch.Generator().manual_seed(0)
    b, d, n = args.batch, args.dim, args.dstate
    # The Mamba layout: input-dependent B, C (B, N, L); D, z, delta_bias and softplus on.
    x = dict(u=torch.randn(b, d, L, generator=g), delta=torch.randn(b, d, L, generator=g) - 2.0,
             A=-torch.rand(d, n, generator=g) - 0.5, B=torch.randn(b, n, L, generator=g),
             C=torch.randn(b, n, L, generator=g), D=torch.randn(d, generator=g), z=torch.randn(b, d, L, generator=g),
             delta_bias=0.1 * torch.randn(d, generator=g))
    x = {k: v.requires_grad_() for k, v in x.items()}
    grad = torch.randn(b, d, L, generator=g)

    def fwd():
        with torch.no_grad():
            return ss.selective_scan(**x, delta_softplus=True, backend=backend)

    def fwd_bwd():
        out = ss.selective_scan(**x, delta_softplus=True, backend=backend)
        out.backward(grad)
        for v in x.values():
            v.grad = None

    # One tiny call first, so one-time costs (code pages, lazy init) stay out of the peak.
    small = {k: v[..., :8].detach().clone().requires_grad_() if v.dim() == 3 else v for k, v in x.items()}
    ss.selective_scan(**small, delta_softplus=True, backend=backend).sum().backward()
    base = rss_bytes()
    first = {}
    for name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):  # first runs: peak memory (and the compile)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        first[name] = (time.perf_counter() - t0, time.process_time() - c0)
        first[name + "_mem"] = peak_rss_bytes() - base

    res = {"impl": impl, "L": L, "peak_mb_fwd": first["fwd_mem"] / 2**20, "peak_mb_fwd_bwd": first["fwd_bwd_mem"] / 2**20}
    for name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        # A first run longer than a quarter of the budget is the measurement; else it was the warm-up.
        slow = first[name][0] > args.time_budget / 4
        times, cpu = ([first[name][0]], [first[name][1]]) if slow else ([], [])
        while len(times) < args.repeats and (not times or sum(times) < args.time_budget / 2):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        res[f"ms_{name}"] = 1e3 * statistics.median(times)
        res[f"cpu_ms_{name}"] = 1e3 * statistics.median(cpu)
        res[f"runs_{name}"] = len(times)
    return res


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    from tqdm import tqdm

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_cpu.json"
    stopped = {}
    meta = {"batch": args.batch, "dim": args.dim, "dstate": args.dstate, "threads": args.threads,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
    # --merge keeps the rows of earlier runs (same sizes) that this run does not redo.
    old = json.loads(path.read_text()) if args.merge and path.exists() else {"meta": meta, "rows": []}
    if args.merge and any(old["meta"].get(k) != meta[k] for k in ("batch", "dim", "dstate", "threads")):
        raise SystemExit(f"--merge: {path} holds another configuration {old['meta']}")
    rows = [r for r in old["rows"] if (r["impl"], r["L"]) not in {(i, L) for i in args.impls for L in args.lengths}]
    commands = old["meta"].get("commands", []) + [" ".join([Path(sys.argv[0]).name] + sys.argv[1:])]
    meta["commands"] = commands

    def save():
        path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    jobs = [(impl, L) for L in sorted(args.lengths) for impl in args.impls]
    for impl, L in tqdm(jobs, desc="bench"):
        est_gb = WORKING_SET[impl] * args.batch * args.dim * args.dstate * L * 4 / 2**30
        reason = stopped.get(impl) or (f"estimated working set {est_gb:.1f} GB > --max-gb {args.max_gb}" if est_gb > args.max_gb else None)
        if reason:
            rows.append({"impl": impl, "L": L, "skipped": reason})
            continue
        cmd = [sys.executable, __file__, "--worker", impl, str(L), "--batch", str(args.batch), "--dim", str(args.dim),
               "--dstate", str(args.dstate), "--repeats", str(args.repeats), "--threads", str(args.threads),
               "--time-budget", str(args.time_budget)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append({"impl": impl, "L": L, "skipped": f"failed: {proc.stderr.strip().splitlines()[-1:]}"})
            stopped[impl] = "an earlier length failed"
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["load_average_1min"] = os.getloadavg()[0]
        rows.append(row)
        save()
        tqdm.write(f"{impl:>14} L={L:>6}  fwd {row['ms_fwd']:10.1f} ms  fwd+bwd {row['ms_fwd_bwd']:10.1f} ms  "
                   f"cpu {row['cpu_ms_fwd_bwd']:10.1f} ms  peak fwd+bwd {row['peak_mb_fwd_bwd']:8.1f} MB  (load {os.getloadavg()[0]:.1f})")
        if row["ms_fwd_bwd"] / 1e3 > args.time_budget:
            stopped[impl] = f"fwd+bwd at L={L} took {row['ms_fwd_bwd'] / 1e3:.0f} s > --time-budget {args.time_budget:.0f} s"

    save()
    impls = [i for i in IMPLS if any(r["impl"] == i for r in rows)]
    table = markdown_table(rows, impls, sorted({r["L"] for r in rows}))
    (args.out / "bench_cpu.md").write_text(table)
    print(table)
    plot(rows, impls, args.out / "bench_cpu.png", meta)


def markdown_table(rows, impls, lengths) -> str:
    get = {(r["impl"], r["L"]): r for r in rows}
    lines = []
    for metric, title in (("ms_fwd", "forward, wall ms"), ("ms_fwd_bwd", "forward+backward, wall ms"),
                          ("cpu_ms_fwd", "forward, CPU ms (all threads)"),
                          ("cpu_ms_fwd_bwd", "forward+backward, CPU ms (all threads)"),
                          ("peak_mb_fwd_bwd", "forward+backward peak memory, MB")):
        lines += [f"\n{title}\n", "| L | " + " | ".join(impls) + " |", "|---" * (len(impls) + 1) + "|"]
        for L in lengths:
            cells = []
            for impl in impls:
                r = get.get((impl, L), {})
                cells.append(f"{r[metric]:.1f}" if metric in r else "–")
            lines.append(f"| {L} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows, impls, path, meta) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (metric, title) in zip(axes, (("ms_fwd", "forward time (ms)"), ("ms_fwd_bwd", "forward+backward time (ms)"),
                                          ("peak_mb_fwd_bwd", "forward+backward peak memory (MB)"))):
        for impl in impls:
            pts = [(r["L"], r[metric]) for r in rows if r["impl"] == impl and metric in r and r[metric] > 0]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"selective scan on CPU (B={meta['batch']}, D={meta['dim']}, N={meta['dstate']}, {meta['threads']} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
