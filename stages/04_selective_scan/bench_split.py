"""The CUDA scan with its length split across thread blocks, at a fixed number of tokens.

A training step holds batch x length constant, so a longer context means a
smaller batch, and the scan's grid (one block per 32 channels of one batch row)
shrinks with it: at batch 4 and 1536 channels it is 192 blocks for an H100's
132 SMs that hold 3 each. Splitting the length into pieces multiplies the
blocks (see cuda/include/ssmlab/selective_scan.h). This script times the
forward and the backward kernels at each (batch, length) with the split forced
to 1, 2, 4, 8 and 16 pieces and left to the kernel ("auto"), checks every split
result against the unsplit one, prints a table and writes JSON.

    python stages/04_selective_scan/bench_split.py                      # bf16, 65,536 tokens, D 1536, N 16
    python stages/04_selective_scan/bench_split.py --tokens 131072 --dtypes bfloat16 float32
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from bench_cuda import DTYPES, TENSOR_ARGS, make_inputs, time_ms
from ssmlab.core import native
from ssmlab.core import selective_scan as ssm
from ssmlab.core.testing import rel_error

HERE = Path(__file__).parent
# what the forward op (out, last state, chunk states) and the backward op (nine gradients) return
OUTPUT_NAMES = ("out", "last_state", "chunk_states", "grad_u", "grad_delta", "grad_A", "grad_B", "grad_C", "grad_D",
                "grad_z", "grad_delta_bias", "grad_h0")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=65536, help="batch x length, held constant")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--dim", type=int, default=1536)
    p.add_argument("--dstate", type=int, default=16)
    p.add_argument("--splits", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="forced piece counts (plus auto)")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=list(DTYPES))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", type=Path, default=HERE / "results")
    return p.parse_args(argv)


def time_split(args_n, softplus: bool, gout, segments: int, repeats: int) -> dict:
    """Forward and backward times (ms) and outputs with the split forced to `segments` (0: auto)."""
    fwd_op, bwd_op = torch.ops.ssmlab.selective_scan_fwd, torch.ops.ssmlab.selective_scan_bwd
    with ssm.cuda_length_segments(segments):
        out, last, states = fwd_op(*args_n, softplus)
        grads = bwd_op(*args_n, softplus, states, gout, None)
        fwd_ms = time_ms(lambda: fwd_op(*args_n, softplus), repeats, 3)
        bwd_ms = time_ms(lambda: bwd_op(*args_n, softplus, states, gout, None), repeats, 3)
    return dict(fwd_ms=fwd_ms, bwd_ms=bwd_ms, outputs=(out, last, states) + tuple(grads))


def main(argv=None) -> int:
    args = parse_args(argv)
    if not native.backends()["cuda"] or not ssm.has_native(torch.device("cuda")):
        raise SystemExit(f"needs a CUDA GPU and the CUDA selective scan in the native module: {native.describe()}")
    rows = []
    for dname in args.dtypes:
        for L in args.lengths:
            batch = args.tokens // L
            if batch < 1:
                print(f"skip L = {L}: more than --tokens {args.tokens}", file=sys.stderr)
                continue
            kw = make_inputs(batch, args.dim, L, args.dstate, DTYPES[dname], seed=L)
            args_n = ssm._normalise(*(kw[k] for k in TENSOR_ARGS))
            gout = torch.randn_like(kw["u"])
            base = None
            for seg in [*args.splits, 0]:
                with ssm.cuda_length_segments(seg):
                    used = ssm.cuda_segments_for(batch, args.dim, L, args.dstate)
                r = time_split(args_n, kw["delta_softplus"], gout, seg, args.repeats)
                outs = r.pop("outputs")
                if base is None:
                    base = outs
                diffs = {n: rel_error(a.float(), b.float()) for a, b, n in zip(outs, base, OUTPUT_NAMES) if a.numel()}
                worst = max(diffs, key=diffs.get)
                row = dict(dtype=dname, batch=batch, L=L, asked=seg or "auto", segments=used, **r,
                           fwd_bwd_ms=r["fwd_ms"] + r["bwd_ms"], max_rel_diff_vs_first=diffs[worst], worst=worst)
                rows.append(row)
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
            del kw, args_n, gout, base
            torch.cuda.empty_cache()

    print(f"\n{'dtype':9} {'B':>3} {'L':>6} {'asked':>5} {'used':>4} {'fwd ms':>8} {'bwd ms':>8} {'f+b ms':>8} {'rel diff':>9}")
    for r in rows:
        print(f"{r['dtype']:9} {r['batch']:3d} {r['L']:6d} {str(r['asked']):>5} {r['segments']:4d} {r['fwd_ms']:8.3f} "
              f"{r['bwd_ms']:8.3f} {r['fwd_bwd_ms']:8.3f} {r['max_rel_diff_vs_first']:9.1e}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu_bench_split.json"
    info = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, command=" ".join(sys.argv),
                sms=torch.cuda.get_device_properties(0).multi_processor_count)
    path.write_text(json.dumps({**info, "dim": args.dim, "N": args.dstate, "tokens": args.tokens, "rows": rows}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
