"""Decoding one token: the fused conv and SSM kernels against the unfused PyTorch step.

`Mamba.step` runs the block's two recurrences (the causal conv and the selective
SSM) either as one kernel each (`ssmlab.core.decode_step`, backend 'auto') or
as the plain PyTorch ops of the reference twins (backend 'ref', about thirty
small kernels a layer: the step as it was before the fusion). Two measurements
at each batch size, both paths:

1. ``layer``: one Mamba mixer's step (in_proj, conv, x_proj, dt_proj, SSM,
   out_proj) of the chosen size (130m: d_model 768, d_inner 1536, N 16, K 4);
2. ``model``: `MambaLMHeadModel.step` of the whole model (24 layers, norms,
   embedding and LM head for 130m).

On CUDA each is timed eagerly and replayed from a CUDA graph captured once
(rows ``graph``, as a server runs it: the Python and launch overheads are
gone, and what fusion still saves is the kernels' own time and count); CUDA
events and medians. On CPU: wall clock
(time.perf_counter) and medians, eager only. Before timing, the fused and
unfused steps are run once from the same state and their outputs compared.

    python stages/06_mamba_lm/bench_decode_step.py --quick        # CPU, a tiny model, seconds
    python stages/06_mamba_lm/bench_decode_step.py                # 130m, batch 1, 16, 64

Writes a JSON file (``--out``) atomically and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
from pathlib import Path
from typing import Callable

import torch

from ssmlab.core import native
from ssmlab.core.checkpoint import atomic_write_text
from ssmlab.core.mamba import Mamba, MambaLayerCache, MambaLMHeadModel, preset
from ssmlab.core.testing import rel_error
from ssmlab.core.timing import Timer

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "bench" / "decode_step.json"
PATHS = {"unfused": "ref", "fused": "auto"}  # row name -> Mamba.step backend


@contextlib.contextmanager
def step_backend(model: MambaLMHeadModel, backend: str):
    """Run every mixer's step with `backend` (MambaLMHeadModel.step passes none down)."""
    mixers = [layer.mixer for layer in model.backbone.layers]
    for m in mixers:
        m.step = functools.partial(type(m).step, m, backend=backend)  # an instance attribute shadows the method
    try:
        yield
    finally:
        for m in mixers:
            del m.step


def captured(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """fn captured once in a CUDA graph (after a warm-up on a side stream); returns its replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


def layer_step(mixer: Mamba, batch: int, backend: str, device, dtype) -> Callable[[], torch.Tensor]:
    """One mixer step on a fixed random token and cache (updated in place at every call)."""
    g = torch.Generator(device="cpu").manual_seed(batch)
    hidden = torch.randn(batch, mixer.cfg.d_model, generator=g).to(device, dtype)
    cache = MambaLayerCache.zeros(batch, mixer.cfg, device=device, dtype=dtype)
    return lambda: mixer.step(hidden, cache, backend=backend)


def model_step(model: MambaLMHeadModel, batch: int, backend: str, device) -> Callable[[], torch.Tensor]:
    """One step of the whole model on fixed tokens and caches (updated in place at every call)."""
    caches = model.allocate_cache(batch)
    ids = torch.arange(batch, device=device) % model.config.vocab_size

    def run() -> torch.Tensor:
        with step_backend(model, backend):
            return model.step(ids, caches)

    return run


def agreement(make: Callable[[str], Callable[[], torch.Tensor]]) -> float:
    """Relative difference of the fused and unfused steps' outputs, three steps from the same state."""
    fused, unfused = make("auto"), make("ref")
    for _ in range(3):
        a, b = fused(), unfused()
    return rel_error(a.float(), b.float())


def bench(make, what: str, batch: int, device: torch.device, timer: Timer, args, log) -> list[dict]:
    rows = []
    diff = agreement(make)
    modes = ["eager"] + (["graph"] if device.type == "cuda" and not args.no_graph else [])
    for mode in modes:
        for path, backend in PATHS.items():
            fn = make(backend)
            if mode == "graph":
                fn = captured(fn)
            times = timer(fn, args.warmup, args.repeats)
            row = {"what": what, "batch": batch, "mode": mode, "path": path, "median_ms": statistics.median(times) * 1e3,
                   "times_ms": [t * 1e3 for t in times], "fused_vs_unfused_rel_diff": diff}
            log(row)
            rows.append(row)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"Device: {meta['device_name']}; torch {meta['torch']}; {meta['config']}; dtype {meta['dtype']}", "",
             "| what | batch | mode | unfused (ms) | fused (ms) | speed-up | fused vs unfused (rel. diff) |",
             "|---|---|---|---|---|---|---|"]
    keys = sorted({(r["what"], r["batch"], r["mode"]) for r in rows}, key=lambda k: (k[0] != "layer", k[1], k[2]))
    for what, batch, mode in keys:
        t = {r["path"]: r for r in rows if (r["what"], r["batch"], r["mode"]) == (what, batch, mode)}
        u, f = t["unfused"]["median_ms"], t["fused"]["median_ms"]
        lines.append(f"| {what} | {batch} | {mode} | {u:.3f} | {f:.3f} | {u / f:.2f}x | "
                     f"{t['fused']['fused_vs_unfused_rel_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny model on CPU, few repeats (a smoke test, seconds)")
    p.add_argument("--size", default="130m", help="Mamba preset (130m: d_model 768, d_inner 1536, N 16, K 4)")
    p.add_argument("--vocab-size", type=int, default=50277, help="V (GPT-NeoX tokenizer: 50277)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--what", nargs="+", choices=["layer", "model"], default=["layer", "model"])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights and activations (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--no-graph", action="store_true", help="CUDA: skip the rows replayed from a CUDA graph")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON file written (atomically)")
    if p.parse_known_args(argv)[0].quick:  # tiny defaults; flags given explicitly still win
        p.set_defaults(size="tiny", vocab_size=256, batches=[1, 4], device="cpu", warmup=1, repeats=3,
                       out=str(DEFAULT_OUT.parent / "quick" / "decode_step.json"))
    return p.parse_args(argv)


@torch.no_grad()
def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    cfg = preset(args.size, vocab_size=args.vocab_size)
    torch.manual_seed(0)
    model = MambaLMHeadModel(cfg, device=device, dtype=dtype).eval()
    meta = {"device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
            "torch": torch.__version__, "backends": native.describe(), "dtype": str(dtype).replace("torch.", ""),
            "config": f"{args.size} (n_layer {cfg.n_layer}, d_model {cfg.d_model}, d_inner {cfg.d_inner}, "
                      f"N {cfg.d_state}, K {cfg.d_conv}, V {cfg.vocab_size_padded})",
            "torch_threads": torch.get_num_threads(), "quick": args.quick}
    timer = Timer(device)

    def log(row):
        print(json.dumps({k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in row.items() if k != "times_ms"}),
              flush=True)

    rows = []
    mixer = model.backbone.layers[0].mixer
    for batch in args.batches:
        if "layer" in args.what:
            rows += bench(lambda b: layer_step(mixer, batch, b, device, dtype), "layer", batch, device, timer, args, log)
        if "model" in args.what:
            rows += bench(lambda b: model_step(model, batch, b, device), "model", batch, device, timer, args, log)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"meta": meta, "rows": rows}
    atomic_write_text(json.dumps(result, indent=2) + "\n", out)
    print(markdown(rows, meta))
    print("wrote", out)
    return result


if __name__ == "__main__":
    main()
