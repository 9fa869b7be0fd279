"""Check and benchmark the fused CUDA selective scan against its floor.

Three jobs, one script (all need a CUDA GPU and the CUDA build of the module):

    python stages/04_selective_scan/bench_cuda.py --check       # vs float64 reference, every option
    python stages/04_selective_scan/bench_cuda.py --sanitize    # one tiny fwd+bwd, for compute-sanitizer
    python stages/04_selective_scan/bench_cuda.py               # the benchmark table (+ JSON)

The benchmark (Mamba's setting: batch 8, dim 1536, N 16, input-dependent B
and C, z, D, delta_bias, softplus) times forward and forward+backward with
CUDA events around CUDA-graph replays (warm-up first, median of repeats), and
computes the floor on the machine it runs on: bytes that must cross device
memory (each input read once, each output written once) over the measured
device-to-device copy bandwidth, and the batch*dim*L*N exponentials over the
measured ex2 throughput; the larger of the two is the floor. It compares with
the best PyTorch parallel scan, torch.compile of that parallel reference, the
sequential PyTorch reference loop, and causal SDPA (12 heads of 64) on time
and memory. Prints a table and writes results/gpu_<dtypes>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ssmlab.core import native, scan
from ssmlab.core import selective_scan as ssm
from ssmlab.core.testing import REL_TOL, rel_error

HERE = Path(__file__).parent
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="correctness against the float64 reference, then exit")
    p.add_argument("--check-64bit", action="store_true", help="with --check: also a >2^31-element case (~50 GB of GPU memory)")
    p.add_argument("--sanitize", action="store_true", help="one tiny forward+backward (run under compute-sanitizer)")
    p.add_argument("--once", action="store_true",
                   help="one forward+backward at the benchmark shape, first length and dtype (run under ncu)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dim", type=int, default=1536)
    p.add_argument("--dstate", type=int, default=16)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192, 32768])
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=list(DTYPES))
    p.add_argument("--repeats", type=int, default=10, help="timed graph replays (median reported)")
    p.add_argument("--skip-baselines", action="store_true", help="time only the CUDA kernel and SDPA")
    p.add_argument("--baseline-max-len", type=int, default=2048, help="longest L for the PyTorch baselines")
    p.add_argument("--compile-max-len", type=int, default=2048, help="longest L for torch.compile (0: skip)")
    p.add_argument("--ref-len", type=int, default=2048, help="L for the sequential reference loop (0: skip)")
    p.add_argument("--segments", type=int, default=0,
                   help="force the kernels' length split to this many pieces (0: their own choice; bench_split.py times it)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    return p.parse_args()


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def make_inputs(batch, dim, L, N, dtype, *, layout="var", groups=1, z=True, D=True, bias=True, softplus=True,
                h0=False, device="cuda", seed=None):
    """Random inputs in Mamba's ranges (A < 0, Δ ~ softplus of N(-1, 0.5)); fresh unless seed is given."""
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    rn = lambda *s: torch.randn(*s, device=device, generator=g)  # noqa: E731
    u = rn(batch, dim, L).to(dtype)
    delta = (rn(batch, dim, L) * 0.5 - 1.0) if softplus else (torch.rand(batch, dim, L, device=device, generator=g) * 0.3 + 0.01)
    delta = delta.to(dtype)
    A = -torch.exp(rn(dim, N) * 0.5)
    if layout == "const":
        B, C = rn(dim, N), rn(dim, N)
    elif layout == "var":
        B, C = rn(batch, N, L).to(dtype), rn(batch, N, L).to(dtype)
    elif layout == "grouped":
        B, C = rn(batch, groups, N, L).to(dtype), rn(batch, groups, N, L).to(dtype)
    elif layout == "mixed":  # input-dependent B, time-invariant C
        B, C = rn(batch, N, L).to(dtype), rn(dim, N)
    else:
        raise ValueError(layout)
    return dict(
        u=u, delta=delta, A=A, B=B, C=C,
        D=rn(dim) if D else None,
        z=rn(batch, dim, L).to(dtype) if z else None,
        delta_bias=rn(dim) * 0.1 if bias else None,
        delta_softplus=softplus,
        initial_state=rn(batch, dim, N) if h0 else None,
    )


def poison_allocator(nbytes: int) -> None:
    """Fill free blocks of the caching allocator with NaN so unwritten outputs show up."""
    if nbytes > 0:
        t = torch.full((nbytes // 4 + 1,), float("nan"), device="cuda")
        del t


TENSOR_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def run_fwd_bwd(fn, kw, last: bool, seed: int):
    """out, last_state and the gradients of a random linear loss of both."""
    leaves = {k: kw[k].detach().clone().requires_grad_() for k in TENSOR_ARGS if kw[k] is not None}
    args = {**kw, **leaves}
    res = fn(**args, return_last_state=last)
    out, hL = res if last else (res, None)
    g = torch.Generator(device="cuda").manual_seed(seed)
    loss = (out.double() * torch.randn(out.shape, device="cuda", generator=g, dtype=torch.float64)).sum()
    if last:
        loss = loss + (hL.double() * torch.randn(hL.shape, device="cuda", generator=g, dtype=torch.float64)).sum()
    loss.backward()
    return out.detach(), None if hL is None else hL.detach(), {k: v.grad for k, v in leaves.items()}


# ---------------------------------------------------------------------------
# --check
# ---------------------------------------------------------------------------

CHECK_CASES = [
    # batch, dim, L, N, layout, groups, options
    dict(shape=(2, 5, 1, 1), layout="var"),
    dict(shape=(1, 3, 63, 3), layout="const"),
    dict(shape=(2, 37, 200, 16), layout="var", h0=True),
    dict(shape=(2, 40, 130, 17), layout="grouped", groups=4, h0=True),
    dict(shape=(1, 33, 65, 40), layout="mixed"),
    dict(shape=(2, 8, 300, 64), layout="grouped", groups=2, h0=True),
    dict(shape=(3, 70, 129, 16), layout="var", z=False, D=False, bias=False, softplus=False),
    dict(shape=(1, 64, 64, 2), layout="const", z=False, h0=True),
    dict(shape=(2, 96, 1000, 16), layout="var", h0=True),
]


def check(args) -> dict:
    results, failures = [], 0
    for dname in ("float32", "float16", "bfloat16"):
        dtype = DTYPES[dname]
        for case in CHECK_CASES:
            batch, dim, L, N = case["shape"]
            opts = {k: v for k, v in case.items() if k not in ("shape",)}
            for last in (False, True):
                kw = make_inputs(batch, dim, L, N, dtype, **opts)
                seed = int(torch.randint(0, 2**31, (1,)).item())
                ref_kw = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
                r_out, r_last, r_grads = run_fwd_bwd(ssm.selective_scan_ref, ref_kw, last, seed)
                runs = []
                for _ in range(2):
                    poison_allocator(64 << 20)
                    runs.append(run_fwd_bwd(lambda **a: ssm.selective_scan(**a, backend="cuda"), kw, last, seed))
                out, hL, grads = runs[0]
                errs = {"out": rel_error(out, r_out)}
                if last:
                    errs["last_state"] = rel_error(hL, r_last)
                for k in grads:
                    errs[f"grad_{k}"] = rel_error(grads[k], r_grads[k])
                same = torch.equal(runs[0][0], runs[1][0]) and all(
                    torch.equal(runs[0][2][k], runs[1][2][k]) for k in grads)
                tol = REL_TOL[dtype]
                ok = all(e <= tol for e in errs.values()) and same
                failures += not ok
                worst = max(errs, key=errs.get)
                results.append(dict(dtype=dname, shape=case["shape"], layout=case["layout"], options=opts,
                                    last_state=last, errors=errs, deterministic=same, ok=ok))
                print(f"{'ok  ' if ok else 'FAIL'} {dname:8} {str(case['shape']):18} {case['layout']:7} last={int(last)} "
                      f"worst {worst}={errs[worst]:.2e} (tol {tol:.0e}) bitwise-repeatable={same}", flush=True)
    if args.check_64bit:
        results.append(check_64bit())
        failures += not results[-1]["ok"]
    return {"cases": results, "failures": failures}


def check_64bit() -> dict:
    """batch*dim*L > 2^31: rows at the far end must equal a separate run of those rows alone."""
    batch, dim, L, N = 1, 2176, 1 << 20, 16
    kw = make_inputs(batch, dim, L, N, torch.bfloat16, z=False)
    rows = [0, dim // 2, dim - 1]
    gout = torch.randn(batch, dim, L, device="cuda", dtype=torch.bfloat16)
    glast = torch.randn(batch, dim, N, device="cuda")

    def run(kw_, gout_, glast_):
        u, delta = kw_["u"].requires_grad_(), kw_["delta"].requires_grad_()
        out, hL = ssm.selective_scan(**kw_, return_last_state=True, backend="cuda")
        torch.autograd.backward([out, hL], [gout_, glast_])
        return out.detach(), hL.detach(), u.grad, delta.grad

    res = run(kw, gout, glast)
    big = [t[:, rows].clone() for t in res]
    del res
    torch.cuda.empty_cache()
    sub = dict(kw)
    sub["u"], sub["delta"] = (kw[k].detach()[:, rows].contiguous() for k in ("u", "delta"))
    sub["A"], sub["D"], sub["delta_bias"] = kw["A"][rows], kw["D"][rows], kw["delta_bias"][rows]
    small = run(sub, gout[:, rows].contiguous(), glast[:, rows].contiguous())
    same = [bool(torch.equal(a, b)) for a, b in zip(big, small)]
    ok = all(same)
    print(f"{'ok  ' if ok else 'FAIL'} 64-bit indexing: batch*dim*L = {batch * dim * L} > 2^31; rows {rows} of the big run "
          f"equal separate runs (out, last_state, grad_u, grad_delta): {same}", flush=True)
    return dict(dtype="bfloat16", shape=(batch, dim, L, N), layout="var", what="64-bit indexing", ok=ok, equal=same)


# ---------------------------------------------------------------------------
# Timing and the floor
# ---------------------------------------------------------------------------


def time_ms(fn, repeats: int, iters: int = 1, graph: bool = True) -> float:
    """Median milliseconds per call of fn: CUDA events around a CUDA-graph replay of
    `iters` calls (plain launches if capture fails), after warm-up."""
    fn()
    torch.cuda.synchronize()
    run = None
    if graph:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()
            torch.cuda.current_stream().wait_stream(s)
            gr = torch.cuda.CUDAGraph()
            with torch.cuda.graph(gr):
                for _ in range(iters):
                    fn()
            run = gr.replay
        except Exception as err:  # noqa: BLE001 - any capture failure falls back to eager timing
            print(f"  (graph capture failed: {type(err).__name__}; timing eager launches)", file=sys.stderr)
            torch.cuda.synchronize()
    if run is None:
        def run():
            for _ in range(iters):
                fn()
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / iters)
    return statistics.median(times)


def copy_bandwidth_GBps() -> float:
    """Device-to-device copy (bytes read + written), the best of 256 MiB .. 2 GiB buffers."""
    best = 0.0
    for n in (1 << 26, 1 << 28, 1 << 29):  # float32 elements
        src = torch.empty(n, device="cuda").uniform_()
        dst = torch.empty_like(src)
        ms = time_ms(lambda: dst.copy_(src), 20, iters=5, graph=False)
        best = max(best, 2 * n * 4 / (ms * 1e-3) / 1e9)
        del src, dst
    return best


EX2_SRC = r"""
extern "C" __global__ void ex2_rate(float* out, int iters) {
  float x[8];
  for (int j = 0; j < 8; ++j) x[j] = 1e-3f * (threadIdx.x + j);
  for (int i = 0; i < iters; ++i) {
#pragma unroll
    for (int j = 0; j < 8; ++j) asm volatile("ex2.approx.ftz.f32 %0, %1;" : "=f"(x[j]) : "f"(-x[j]));
  }
  float s = 0.f;
  for (int j = 0; j < 8; ++j) s += x[j];
  out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}
"""


def ex2_rate_per_s() -> tuple[float, str]:
    """Measured ex2.approx throughput (exponentials per second) via a CuPy kernel."""
    try:
        import cupy as cp
    except ImportError:
        return 4.06e12, "not measured (no CuPy): the issue's H100 figure"
    kern = cp.RawKernel(EX2_SRC, "ex2_rate")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    blocks, threads, iters = sms * 8, 256, 4096
    out = cp.empty(blocks * threads, dtype=cp.float32)
    kern((blocks,), (threads,), (out, cp.int32(iters)))
    cp.cuda.Device().synchronize()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(10):
        start.record()
        kern((blocks,), (threads,), (out, cp.int32(iters)))
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end))
    return blocks * threads * 8 * iters / (statistics.median(times) * 1e-3), "measured (CuPy ex2.approx kernel)"


def floors(batch, dim, L, N, elem, copy_GBps, ex2_rate):
    """(fwd_bytes, bwd_bytes, exps, fwd floor ms, bwd floor ms)."""
    bdl, bnl = batch * dim * L, batch * N * L
    fwd_bytes = 4 * bdl * elem + 2 * bnl * elem  # read u, delta, z, B, C; write out
    bwd_bytes = 7 * bdl * elem + 2 * bnl * elem + 2 * bnl * 4  # read u, delta, z, gout; write gu, gdelta, gz; B, C in, grads out
    exps = batch * dim * L * N
    t_exp = exps / ex2_rate * 1e3
    return fwd_bytes, bwd_bytes, exps, max(fwd_bytes / copy_GBps / 1e6, t_exp), max(bwd_bytes / copy_GBps / 1e6, t_exp)


def peak_extra_mb(fn) -> float:
    """Peak GPU memory above what was allocated before fn() (inputs excluded), in MB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e6


# ---------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------


def bench(args) -> dict:
    copy_GBps = copy_bandwidth_GBps()
    ex2_rate, ex2_how = ex2_rate_per_s()
    print(f"device-to-device copy {copy_GBps:.0f} GB/s (read + write); ex2 {ex2_rate / 1e12:.2f} T/s {ex2_how}", flush=True)
    batch, dim, N = args.batch, args.dim, args.dstate
    rows = []
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        for L in args.lengths:
            kw = make_inputs(batch, dim, L, N, dtype, seed=L)
            elem = kw["u"].element_size()
            fwd_bytes, bwd_bytes, exps, floor_f, floor_b = floors(batch, dim, L, N, elem, copy_GBps, ex2_rate)
            row = dict(dtype=dname, L=L, floor_fwd_ms=floor_f, floor_fwd_bwd_ms=floor_f + floor_b,
                       floor_fwd_bound="exp" if exps / ex2_rate * 1e3 >= fwd_bytes / copy_GBps / 1e6 else "bytes")
            # correctness before speed, at the benchmark shape (L <= 2048: the float64 loop stays cheap)
            if L <= 2048:
                ref = ssm.selective_scan_ref(**{k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
                row["rel_err_fwd"] = rel_error(ssm.selective_scan(**kw, backend="cuda"), ref)
                del ref
            iters = 20 if L <= 2048 else 5
            args_n = ssm._normalise(*(kw[k] for k in TENSOR_ARGS))
            sp = kw["delta_softplus"]
            fwd_op = torch.ops.ssmlab.selective_scan_fwd
            bwd_op = torch.ops.ssmlab.selective_scan_bwd
            gout = torch.randn_like(kw["u"])
            res = fwd_op(*args_n, sp)
            states = res[2]
            row["cuda_fwd_ms"] = time_ms(lambda: fwd_op(*args_n, sp), args.repeats, iters)
            row["cuda_bwd_ms"] = time_ms(lambda: bwd_op(*args_n, sp, states, gout, None), args.repeats, iters)
            row["cuda_fwd_bwd_ms"] = row["cuda_fwd_ms"] + row["cuda_bwd_ms"]
            row["fwd_GBps"] = fwd_bytes / (row["cuda_fwd_ms"] * 1e-3) / 1e9
            row["fwd_floor_ratio"] = floor_f / row["cuda_fwd_ms"]
            row["fwd_bwd_floor_ratio"] = row["floor_fwd_bwd_ms"] / row["cuda_fwd_bwd_ms"]
            row["bwd_over_fwd"] = row["cuda_bwd_ms"] / row["cuda_fwd_ms"]
            del res, states
            # the public API (validation, autograd) in eager mode
            leaves = {k: kw[k].detach().clone().requires_grad_() for k in TENSOR_ARGS if kw[k] is not None}

            def api_fb():
                out = ssm.selective_scan(**{**kw, **leaves}, backend="cuda")
                out.backward(gout)
                for v in leaves.values():
                    v.grad = None

            row["api_fwd_ms"] = time_ms(lambda: ssm.selective_scan(**kw, backend="cuda"), args.repeats, 1, graph=False)
            row["api_fwd_bwd_ms"] = time_ms(api_fb, args.repeats, 1, graph=False)
            row["scan_mem_fwd_bwd_MB"] = peak_extra_mb(api_fb)
            # baselines
            if not args.skip_baselines and L <= args.baseline_max_len:
                best = None
                for name, fn in scan.PYTORCH_SCANS.items():
                    try:
                        t = time_ms(lambda: ssm.selective_scan_parallel(**kw, scan_fn=fn), 3, 1, graph=False)
                    except torch.OutOfMemoryError:
                        t = None
                    torch.cuda.empty_cache()
                    row[f"pt_{name}_fwd_ms"] = t
                    if t is not None and (best is None or t < best[1]):
                        best = (name, t)
                if best:
                    row["best_pytorch_scan"], row["best_pytorch_fwd_ms"] = best
                    row["speedup_vs_pytorch_scan"] = best[1] / row["cuda_fwd_ms"]
                    if L <= args.compile_max_len:
                        fn = scan.PYTORCH_SCANS[best[0]]
                        compiled = torch.compile(lambda kw_: ssm.selective_scan_parallel(**kw_, scan_fn=fn))
                        try:
                            t0 = time.perf_counter()
                            compiled(kw)
                            torch.cuda.synchronize()
                            row["compile_s"] = time.perf_counter() - t0
                            row["compiled_fwd_ms"] = time_ms(lambda: compiled(kw), 3, 1, graph=False)
                            row["speedup_vs_compiled"] = row["compiled_fwd_ms"] / row["cuda_fwd_ms"]
                        except Exception as err:  # noqa: BLE001 - report, do not die, on compiler trouble
                            row["compiled_error"] = f"{type(err).__name__}: {str(err)[:200]}"
                        torch.cuda.empty_cache()
            if not args.skip_baselines and L == args.ref_len:
                t = time_ms(lambda: ssm.selective_scan_ref(**kw), 1, 1, graph=False)
                row["sequential_ref_fwd_ms"] = t
                row["speedup_vs_sequential"] = t / row["cuda_fwd_ms"]
            # causal SDPA, 12 heads of 64, same batch and dtype
            H, Dh = 12, 64
            q, k, v = (torch.randn(batch, H, L, Dh, device="cuda", dtype=dtype) for _ in range(3))
            try:
                row["sdpa_fwd_ms"] = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                                             args.repeats, iters)
            except torch.OutOfMemoryError:
                row["sdpa_fwd_ms"] = None
            ql, kl, vl = (t.detach().clone().requires_grad_() for t in (q, k, v))
            go = torch.randn_like(q)

            def sdpa_fb():
                o = F.scaled_dot_product_attention(ql, kl, vl, is_causal=True)
                o.backward(go)
                ql.grad = kl.grad = vl.grad = None

            try:
                row["sdpa_fwd_bwd_ms"] = time_ms(sdpa_fb, args.repeats, 1, graph=False)
                row["sdpa_mem_fwd_bwd_MB"] = peak_extra_mb(sdpa_fb)
            except torch.OutOfMemoryError:
                row["sdpa_fwd_bwd_ms"] = row["sdpa_mem_fwd_bwd_MB"] = None
            del q, k, v, ql, kl, vl, go, kw, leaves, gout, args_n
            torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    return dict(copy_GBps=copy_GBps, ex2_per_s=ex2_rate, ex2_how=ex2_how, rows=rows)


def print_table(res: dict) -> None:
    print(f"\nfloor = max(bytes / {res['copy_GBps']:.0f} GB/s, exps / {res['ex2_per_s'] / 1e12:.2f} T/s)")
    hdr = (f"{'dtype':8} {'L':>6} {'fwd ms':>8} {'floor':>7} {'fl/t':>5} {'GB/s':>6} {'bwd ms':>8} {'b/f':>5} "
           f"{'fb fl/t':>7} {'x PT scan':>9} {'x compile':>9} {'x seq':>7} {'sdpa fwd':>8} {'sdpa f+b':>8} "
           f"{'scan MB':>8} {'sdpa MB':>8}")
    print(hdr)
    f = lambda x, w, p=2: f"{x:{w}.{p}f}" if isinstance(x, (int, float)) else f"{'-':>{w}}"  # noqa: E731
    for r in res["rows"]:
        print(f"{r['dtype']:8} {r['L']:6d} {f(r['cuda_fwd_ms'], 8, 3)} {f(r['floor_fwd_ms'], 7, 3)} "
              f"{f(r['fwd_floor_ratio'], 5)} {f(r['fwd_GBps'], 6, 0)} {f(r['cuda_bwd_ms'], 8, 3)} {f(r['bwd_over_fwd'], 5)} "
              f"{f(r['fwd_bwd_floor_ratio'], 7)} {f(r.get('speedup_vs_pytorch_scan'), 9, 1)} "
              f"{f(r.get('speedup_vs_compiled'), 9, 1)} {f(r.get('speedup_vs_sequential'), 7, 0)} "
              f"{f(r['sdpa_fwd_ms'], 8, 3)} {f(r['sdpa_fwd_bwd_ms'], 8, 3)} {f(r['scan_mem_fwd_bwd_MB'], 8, 0)} "
              f"{f(r['sdpa_mem_fwd_bwd_MB'], 8, 0)}")
    for dname in sorted({r["dtype"] for r in res["rows"]}):
        rs = [r for r in res["rows"] if r["dtype"] == dname]
        t = next((r["L"] for r in rs if r["sdpa_fwd_bwd_ms"] is None or r["cuda_fwd_bwd_ms"] < r["sdpa_fwd_bwd_ms"]), None)
        m = next((r["L"] for r in rs if r["sdpa_mem_fwd_bwd_MB"] is None or r["scan_mem_fwd_bwd_MB"] < r["sdpa_mem_fwd_bwd_MB"]), None)
        print(f"{dname}: scan beats causal SDPA (fwd+bwd time) from L = {t if t else 'none of the lengths'}; "
              f"on memory from L = {m if m else 'none of the lengths'}")


def main() -> None:
    args = parse_args()
    if not native.backends()["cuda"] or not ssm.has_native(torch.device("cuda")):
        raise SystemExit(f"needs a CUDA GPU and the CUDA selective scan in the native module: {native.describe()}")
    info = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, capability=torch.cuda.get_device_capability())
    if args.sanitize:
        for segments in (1, 3):  # unsplit, then the length split's first-pass kernels and combine (2 and 3 pieces)
            with ssm.cuda_length_segments(segments):
                for layout in ("var", "const"):
                    kw = make_inputs(2, 9, 70, 5, torch.float32, layout=layout, h0=True)
                    run_fwd_bwd(lambda **a: ssm.selective_scan(**a, backend="cuda"), kw, True, 1)
                    kw = make_inputs(1, 33, 130, 16, torch.bfloat16, layout=layout)
                    run_fwd_bwd(lambda **a: ssm.selective_scan(**a, backend="cuda"), kw, False, 2)
        torch.cuda.synchronize()
        print("sanitize case done")
        return
    if args.once:
        kw = make_inputs(args.batch, args.dim, args.lengths[0], args.dstate, DTYPES[args.dtypes[0]], seed=1)
        leaves = {k: kw[k].detach().requires_grad_() for k in ("u", "delta", "z")}
        out = ssm.selective_scan(**{**kw, **leaves}, backend="cuda")
        out.backward(torch.randn_like(out))
        torch.cuda.synchronize()
        print("one forward+backward done")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if args.check:
        with ssm.cuda_length_segments(args.segments):
            res = check(args)
        path = args.out / ("gpu_check.json" if not args.segments else f"gpu_check_segments{args.segments}.json")
        path.write_text(json.dumps({**info, "command": " ".join(sys.argv), **res}, indent=2))
        print(f"{res['failures']} failures; wrote {path}")
        raise SystemExit(1 if res["failures"] else 0)
    res = bench(args)
    print_table(res)
    path = args.out / f"gpu_bench_{'_'.join(args.dtypes)}.json"
    path.write_text(json.dumps({**info, "command": " ".join(sys.argv), "shape": dict(batch=args.batch, dim=args.dim, N=args.dstate),
                                **res}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
