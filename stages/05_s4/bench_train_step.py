"""Time one training step of each IMDb classifier (S4, S4D, Mamba, Transformer), alone on the device.

The training runs of `train_imdb.py` may share a GPU with other jobs, so their
wall times do not compare models fairly. This script builds each model exactly
as `train_imdb.py` would (same defaults, same parameter budget) and times a
full optimizer step (forward, backward, AdamW; bf16 autocast on GPU) on random
full-length batches: CUDA events and medians on GPU, wall clock on CPU.

    python stages/05_s4/bench_train_step.py                         # both tokenizations, all models
    python stages/05_s4/bench_train_step.py --tokenizer bpe --models s4 mamba
    python stages/05_s4/bench_train_step.py --device cpu --quick    # seconds, a smoke test

Writes a Markdown table to stdout and ``OUT/bench_train_step_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_imdb  # noqa: E402  (the script next to this one: same model choices and defaults)

from ssmlab.core.checkpoint import atomic_write_text  # noqa: E402
from ssmlab.core.seq_models import build_model, param_count  # noqa: E402
from ssmlab.core.timing import Timer  # noqa: E402
from ssmlab.core.training import TrainConfig, make_optimizer  # noqa: E402

VOCAB = {"bpe": 8192, "byte": 257}


def bench_one(model_name: str, tokenizer: str, a: argparse.Namespace, device: torch.device) -> dict:
    argv = ["--model", model_name, "--tokenizer", tokenizer, "--device", str(device)]
    if a.quick:
        argv += ["--max-len", "128", "--param-budget", "50000", "--n-layers", "2"]
    s = train_imdb.resolve_settings(train_imdb.parse_args(argv))
    vocab = VOCAB[tokenizer] if not a.quick else min(VOCAB[tokenizer], 1024)
    cfg = train_imdb.model_config(s, vocab)
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    opt = make_optimizer(model, TrainConfig(lr=1e-3, weight_decay=0.05, device=str(device)))
    batch = a.batch_size or s.batch_size
    ids = torch.randint(0, vocab, (batch, s.max_len), device=device)
    lens = torch.full((batch,), s.max_len, device=device)
    y = torch.randint(0, 2, (batch,), device=device).float()
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None

    def step():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = F.binary_cross_entropy_with_logits(model(ids, lens).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = Timer(device)(step, a.warmup, a.repeats)
    ms = 1e3 * statistics.median(times)
    row = {"model": model_name, "tokenizer": tokenizer, "params": param_count(model), "batch": batch,
           "length": s.max_len, "step_ms": ms, "tokens_per_s": batch * s.max_len / (ms / 1e3),
           "step_ms_all": [1e3 * t for t in times]}
    if device.type == "cuda":
        row["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=["s4", "s4d", "mamba", "transformer"],
                   default=["s4", "s4d", "mamba", "transformer"])
    p.add_argument("--tokenizer", nargs="+", choices=["bpe", "byte"], default=["bpe", "byte"])
    p.add_argument("--device", default="auto", help="cpu, cuda (default: cuda if available)")
    p.add_argument("--batch-size", type=int, default=None, help="default: train_imdb.py's")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="tiny models and length 128 (a smoke test)")
    p.add_argument("--out", default=str(HERE / "results"))
    a = p.parse_args(argv)
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(a.device)
    if a.warmup < 0 or a.repeats < 1:
        p.error("--warmup must be >= 0 and --repeats >= 1")

    rows = []
    print("| tokenizer | model | params | batch x length | step ms | tokens/s | peak MB |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for tok in a.tokenizer:
        for m in a.models:
            try:
                r = bench_one(m, tok, a, device)
            except torch.OutOfMemoryError as err:  # recorded, not fatal: the other rows still run
                r = {"model": m, "tokenizer": tok, "status": "out of memory", "error": str(err).splitlines()[0]}
                print(f"| {tok} | {m} | out of memory | | | | |", flush=True)
                rows.append(r)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            r["status"] = "ok"
            rows.append(r)
            print(f"| {tok} | {m} | {r['params']:,} | {r['batch']} x {r['length']} | {r['step_ms']:.2f} | "
                  f"{r['tokens_per_s']:,.0f} | {r.get('peak_mem_mb', float('nan')):.0f} |", flush=True)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_train_step_{device.type}{'_quick' if a.quick else ''}.json"
    atomic_write_text(json.dumps({"device": dev_name, "torch": torch.__version__, "command": " ".join(sys.argv),
                                  "rows": rows}, indent=1), path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
