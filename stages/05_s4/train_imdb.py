"""Train a sequence classifier (S4, S4D, Mamba or a Transformer) on IMDb movie reviews.

    python stages/05_s4/train_imdb.py                       # S4D, BPE; small CPU subset or full data on GPU
    python stages/05_s4/train_imdb.py --model mamba --tokenizer bpe
    python stages/05_s4/train_imdb.py --model s4 --tokenizer byte --max-len 4096
    python stages/05_s4/train_imdb.py --data /path/to/aclImdb_v1.tar.gz    # or SSMLAB_IMDB=...

Data: see ``ssmlab.datasets.imdb`` (flag, $SSMLAB_IMDB, user cache,
../shared/datasets/aclImdb.tar.gz, download with MD5 check). The validation
split is carved from train; the test split is only used for the final report.

Defaults depend on the device: on a GPU the full data (22,500 train / 2,500
val / 25,000 test reviews); on a CPU a small, clearly reported stratified
subset and a small model, so a run takes minutes. Every choice can be set by
flags. Checkpoints go to --run-dir (re-running the same command resumes
exactly; with --time-limit a run stops cleanly and exits with code 3 so it can
be continued in chunks). The results JSON and a PNG of the curves go to
--results.

With --ema-decay B the recipe keeps an exponential moving average of the
weights (`ssmlab.core.ema`): validation during training and the final val /
test scores use the averaged weights; the log's ``val_*_live`` records (and
the dashed curve) are those of the weights being trained.

With --keep-best {auc,acc,loss} the final val / test scores use the weights of
the validation with the best ROC AUC, accuracy or loss (the earliest on a tie)
instead of the last ones: the test split still takes no part in the choice.
The candidates are the weights validated under the plain names ``val_*``,
so with --ema-decay the averaged weights. Their float32 copy (on the CPU)
rides in the checkpoint, so a resumed run selects as an uninterrupted one.
The results JSON names the selected step and its metric (``selected``) and
says ``scored_weights: best_live`` or ``best_ema``; the PNG marks the step.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ssmlab.core.seq_models import CONFIGS, build_model, fit_d_model, make_config, param_count
from ssmlab.core.training import CHECKPOINT_NAME, LOG_NAME, TrainConfig, train
from ssmlab.datasets.imdb import PER_FOLDER, load_imdb, tokenized_imdb
from ssmlab.datasets.locate import DataError
from ssmlab.datasets.tokenize import LengthBucketBatches, eval_batches

HERE = Path(__file__).resolve().parent
EXIT_UNFINISHED = 3  # --time-limit stopped the run before its last step: run the same command again

# --keep-best choice -> (logged validation metric, +1 if higher is better, -1 if lower is)
KEEP_BEST = {"auc": ("val_roc_auc", 1), "acc": ("val_accuracy", 1), "loss": ("val_loss", -1)}

# Defaults per (device kind, tokenizer); flags override any of them.
DEFAULTS = {
    ("cuda", "bpe"): dict(max_len=1024, vocab_size=8192, budget=6_000_000, n_layers=4, batch_size=32, epochs=5,
                          train_subset=None, val_subset=None, test_subset=None, lr=1e-3),
    ("cuda", "byte"): dict(max_len=4096, vocab_size=257, budget=1_000_000, n_layers=6, batch_size=32, epochs=6,
                           train_subset=None, val_subset=None, test_subset=None, lr=2e-3),
    ("cpu", "bpe"): dict(max_len=256, vocab_size=4096, budget=400_000, n_layers=2, batch_size=32, epochs=4,
                         train_subset=4000, val_subset=500, test_subset=2000, lr=5e-3),
    ("cpu", "byte"): dict(max_len=512, vocab_size=257, budget=100_000, n_layers=2, batch_size=32, epochs=3,
                          train_subset=4000, val_subset=500, test_subset=2000, lr=5e-3),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(CONFIGS), default="s4d", help="sequence mixer (default: s4d)")
    p.add_argument("--tokenizer", choices=["bpe", "byte"], default="bpe", help="subword BPE or raw bytes")
    p.add_argument("--data", default=None, help="aclImdb/ folder or .tar.gz (else $SSMLAB_IMDB, cache, "
                   "../shared/datasets, download)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--max-len", type=int, default=None, help="truncate reviews to this many tokens")
    p.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size, trained on train only "
                   "(default: 8192 on GPU, 4096 on CPU)")
    p.add_argument("--param-budget", type=int, default=None, help="choose d_model to match this many parameters")
    p.add_argument("--d-model", type=int, default=None, help="model width (overrides --param-budget)")
    p.add_argument("--n-layers", type=int, default=None)
    p.add_argument("--d-state", type=int, default=None, help="SSM state size N (default: 64 S4/S4D, 16 Mamba)")
    p.add_argument("--s4d-init", choices=["legs", "lin", "real"], default="legs")
    p.add_argument("--causal", action="store_true",
                   help="S4/S4D: one causal kernel instead of bidirectional; Transformer: causal attention")
    p.add_argument("--bidirectional", action="store_true",
                   help="Mamba: add a second block that reads each review backwards (BiMamba; Mamba is causal "
                        "by default)")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--ssm-lr", type=float, default=0.0,
                   help="S4/S4D: peak lr of the state-space parameters (A, B, delta), no weight decay, as in the "
                        "S4 papers (0: the same as --lr)")
    p.add_argument("--warmup-frac", type=float, default=0.1, help="fraction of steps spent in linear warmup")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema-decay", type=float, default=0.0,
                   help="decay of an EMA of the weights (0: off; e.g. 0.999): validation and the final scores use it")
    p.add_argument("--ema-start-step", type=int, default=0,
                   help="steps during which the EMA copies the weights before it averages")
    p.add_argument("--keep-best", choices=["none", *KEEP_BEST], default="none",
                   help="score val and test with the weights of the best validation by this metric "
                   "(default none: the last weights)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 autocast on GPU")
    p.add_argument("--train-subset", type=int, default=None, help="use this many training reviews (stratified)")
    p.add_argument("--val-subset", type=int, default=None)
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--full", action="store_true", help="all reviews even on CPU")
    p.add_argument("--val-fraction", type=float, default=0.1, help="part of train carved out for validation")
    p.add_argument("--eval-every", type=int, default=None, help="validate every this many steps (default: 4 times)")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=0, help="stop cleanly after this many seconds (exit 3)")
    p.add_argument("--run-dir", default=None, help="checkpoints and log (default: runs/05_s4/<name>)")
    p.add_argument("--results", default=str(HERE / "results"), help="folder for the JSON results and PNG")
    p.add_argument("--name", default=None, help="run name (default: imdb_<model>_<tokenizer>[_cpu])")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--per-folder", type=int, default=PER_FOLDER, help=argparse.SUPPRESS)  # tests: small archives
    return p.parse_args(argv)


def resolve_settings(a: argparse.Namespace) -> argparse.Namespace:
    """Fill unset flags from the device's defaults; validate."""
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(a.device).type
    d = DEFAULTS[("cuda" if kind == "cuda" else "cpu", a.tokenizer)]
    for key in ("max_len", "vocab_size", "n_layers", "batch_size", "epochs", "lr"):
        if getattr(a, key) is None:
            setattr(a, key, d[key])
    if a.param_budget is None:
        a.param_budget = d["budget"]
    for key in ("train_subset", "val_subset", "test_subset"):
        if getattr(a, key) is None and not a.full:
            setattr(a, key, d[key])
    a.subset = any(getattr(a, k) is not None for k in ("train_subset", "val_subset", "test_subset"))
    if a.name is None:
        a.name = f"imdb_{a.model}_{a.tokenizer}" + ("_cpu" if kind != "cuda" else "")
    if a.run_dir is None:
        a.run_dir = str(HERE.parents[1] / "runs" / "05_s4" / a.name)
    for key in ("max_len", "n_layers", "batch_size", "eval_batch_size"):
        if getattr(a, key) < 1:
            raise SystemExit(f"--{key.replace('_', '-')} must be >= 1")
    if a.epochs <= 0 or not 0 <= a.warmup_frac < 1:
        raise SystemExit("--epochs must be > 0 and --warmup-frac in [0, 1)")
    if a.bidirectional and (a.model != "mamba" or a.causal):
        raise SystemExit("--bidirectional is for --model mamba (S4, S4D and the Transformer are bidirectional "
                         "unless --causal), and not together with --causal")
    if not (a.ema_decay == 0 or 0 < a.ema_decay < 1) or a.ema_start_step < 0:
        raise SystemExit("--ema-decay must be 0 (off) or in (0, 1), --ema-start-step >= 0")
    if a.ssm_lr < 0 or (a.ssm_lr > 0 and a.model not in ("s4", "s4d")):
        raise SystemExit("--ssm-lr must be >= 0, and is for --model s4 or s4d (the models with state-space parameters "
                         "of their own)")
    return a


def model_config(a: argparse.Namespace, vocab_size: int):
    kw = dict(vocab_size=vocab_size, n_layers=a.n_layers, dropout=a.dropout, max_len=a.max_len)
    if a.d_state is not None:
        kw["d_state"] = a.d_state
    if a.model in ("s4", "s4d", "transformer"):
        kw["bidirectional"] = not a.causal
    elif a.model == "mamba":
        kw["bidirectional"] = a.bidirectional
    if a.model == "s4d":
        kw["init"] = a.s4d_init
    cfg = make_config(a.model, **kw)
    if a.d_model is not None:
        return dataclasses.replace(cfg, d_model=a.d_model)
    return fit_d_model(cfg, a.param_budget)


@torch.no_grad()
def predict(model, packed, device, batch_size: int, amp) -> np.ndarray:
    """P(positive) for every sequence of `packed`, in its order."""
    model.eval()
    probs = np.zeros(len(packed), dtype=np.float64)
    for idx, ids, lens in eval_batches(packed, batch_size):
        with amp():
            logits = model(ids.to(device), lens.to(device))
        probs[idx] = torch.sigmoid(logits.float()).cpu().numpy()
    return probs


def metrics(probs: np.ndarray, labels: np.ndarray) -> dict:
    from sklearn.metrics import roc_auc_score

    p = np.clip(probs, 1e-7, 1 - 1e-7)
    loss = float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))
    auc = float(roc_auc_score(labels, probs)) if len(np.unique(labels)) == 2 else float("nan")
    return {"accuracy": float(np.mean((probs > 0.5) == labels)), "roc_auc": auc, "loss": loss}


class KeptWeights:
    """The weights of the best validation so far, for --keep-best: `train`'s on_eval and extra_state.

    Only a strict improvement replaces them, so a tie keeps the earlier step (the argmax / argmin of
    the logged curve). A NaN (the AUC of a one-class validation set) is never better than a number.
    The copy is float32 on the CPU: it costs no GPU memory, and it loads back exactly into the
    float32 parameters that autocast trains.
    """

    def __init__(self, choice: str):
        self.choice = choice
        self.metric, self.sign = KEEP_BEST[choice]
        self.step, self.value, self.weights = None, None, None

    def better(self, value: float) -> bool:
        if self.step is None:
            return True
        if math.isnan(value):
            return False
        return math.isnan(self.value) or self.sign * (value - self.value) > 0

    def __call__(self, step: int, metrics: dict, model: torch.nn.Module) -> None:
        value = float(metrics[self.metric])
        if self.better(value):
            self.step, self.value = step, value
            self.weights = {k: t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype, copy=True)
                            for k, t in model.state_dict().items()}

    def state_dict(self) -> dict:
        return {"keep_best": self.choice, "step": self.step, "value": self.value, "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        if state["keep_best"] != self.choice:
            raise SystemExit(f"--keep-best {self.choice}, but this run's checkpoint selects by {state['keep_best']}: "
                             "resume with that choice, or start over with --fresh")
        self.step, self.value, self.weights = state["step"], state["value"], state["weights"]


def read_log(run_dir: Path) -> dict:
    """Curves from log.jsonl (all chunks); a step logged twice keeps its last record."""
    train, evals = {}, {}
    path = run_dir / LOG_NAME
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r.get("kind") == "train":
                train[r["step"]] = r["loss"]
            elif r.get("kind") == "eval":
                evals[r["step"]] = r
    steps = sorted(train)
    esteps = sorted(evals)
    curves = {"train_step": steps, "train_loss": [train[s] for s in steps], "val_step": esteps,
              "val_loss": [evals[s]["val_loss"] for s in esteps],
              "val_accuracy": [evals[s]["val_accuracy"] for s in esteps],
              "val_roc_auc": [evals[s]["val_roc_auc"] for s in esteps]}
    if esteps and all("val_loss_live" in evals[s] for s in esteps):  # an EMA run: val_* are the averaged weights
        curves["val_loss_live"] = [evals[s]["val_loss_live"] for s in esteps]
        curves["val_accuracy_live"] = [evals[s]["val_accuracy_live"] for s in esteps]
    return curves


def plot(curves: dict, title: str, path: Path, selected_step: int | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(curves["train_step"], curves["train_loss"], label="train (batch)", alpha=0.7)
    ema = "val_loss_live" in curves
    ax1.plot(curves["val_step"], curves["val_loss"], "o-", label="validation (EMA)" if ema else "validation")
    if ema:
        ax1.plot(curves["val_step"], curves["val_loss_live"], "--", label="validation (live weights)")
    ax1.set_xlabel("optimizer step"), ax1.set_ylabel("binary cross-entropy")
    ax2.plot(curves["val_step"], curves["val_accuracy"], "o-", label="val accuracy")
    ax2.plot(curves["val_step"], curves["val_roc_auc"], "s-", label="val ROC AUC")
    if selected_step is not None:
        for ax in (ax1, ax2):
            ax.axvline(selected_step, color="gray", linestyle=":", label=f"kept weights (step {selected_step})")
    ax1.legend()
    ax2.set_xlabel("optimizer step"), ax2.set_ylim(0.4, 1.0), ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    a = resolve_settings(parse_args(argv))
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    t_data = time.perf_counter()
    try:
        data = load_imdb(a.data, per_folder=a.per_folder)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tok = tokenized_imdb(data, a.tokenizer, a.max_len, a.vocab_size, a.val_fraction, a.seed,
                         a.train_subset, a.val_subset, a.test_subset)
    t_data = time.perf_counter() - t_data
    print(f"data: {tok.info['sizes']} reviews from {data.source} ({a.tokenizer}, max_len {a.max_len}, "
          f"V={tok.vocab_size}, mean {tok.info['mean_tokens']['train']:.0f} tokens; prepared in {t_data:.1f}s)")

    cfg = model_config(a, tok.vocab_size)
    torch.manual_seed(a.seed)
    model = build_model(cfg)
    n_params = param_count(model)
    print(f"model: {a.model} {cfg.to_dict()} -> {n_params:,} parameters")

    batches = LengthBucketBatches(tok.train, tok.y_train, min(a.batch_size, len(tok.train)), seed=a.seed)
    steps = a.steps or max(1, int(round(a.epochs * batches.steps_per_epoch())))
    eval_every = a.eval_every if a.eval_every is not None else max(1, steps // 4)
    run_dir = Path(a.run_dir)
    if a.fresh and run_dir.exists():
        for f in (CHECKPOINT_NAME, LOG_NAME, "progress.json"):
            (run_dir / f).unlink(missing_ok=True)
    tcfg = TrainConfig(lr=a.lr, max_steps=steps, warmup_steps=int(a.warmup_frac * steps), weight_decay=a.weight_decay,
                       grad_clip=a.grad_clip, device=a.device, precision=a.precision, seed=a.seed,
                       log_every=max(1, steps // 200), eval_every=eval_every, ckpt_every=max(50, steps // 10),
                       out_dir=str(run_dir), progress=not a.no_progress, time_limit_s=a.time_limit,
                       ema_decay=a.ema_decay, ema_start_step=a.ema_start_step, ssm_lr=a.ssm_lr)
    amp_dtype = tcfg.autocast_dtype()
    amp = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    counter = {"tokens": 0, "padded": 0}

    def loss_fn(model, batch):
        ids, lens, y = batch
        counter["tokens"] += int(lens.sum())
        counter["padded"] += ids.numel()
        logits = model(ids, lens).float()
        return F.binary_cross_entropy_with_logits(logits, y), {"acc": ((logits > 0) == (y > 0.5)).float().mean()}

    def eval_fn(model):
        m = metrics(predict(model, tok.val, device, a.eval_batch_size, amp), tok.y_val)
        return {f"val_{k}": v for k, v in m.items()}

    progress_path = run_dir / "progress.json"
    before = json.loads(progress_path.read_text()) if progress_path.exists() and not a.fresh else {}
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    kept = KeptWeights(a.keep_best) if a.keep_best != "none" else None
    result = train(model, loss_fn, batches, tcfg, eval_fn=eval_fn, on_eval=kept, extra_state=kept)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if before.get("step") != result.resumed_from:  # progress of a chunk that did not checkpoint: not counted
        before = {}
    total = {"step": result.step, "train_seconds": before.get("train_seconds", 0.0) + seconds,
             "tokens": before.get("tokens", 0) + counter["tokens"], "padded": before.get("padded", 0) + counter["padded"]}
    run_dir.mkdir(parents=True, exist_ok=True)
    progress_path.write_text(json.dumps(total))
    if not result.finished:
        print(f"stopped at step {result.step}/{steps} by --time-limit; run the same command again to continue")
        return EXIT_UNFINISHED

    scored = "ema" if result.ema is not None else "live"
    if kept is None:  # with an EMA, the averaged weights are the ones validated, hence the ones scored
        weights = result.ema.swapped_in(model) if result.ema is not None else contextlib.nullcontext()
    elif kept.weights is None:  # resumed at the end from a checkpoint written without --keep-best
        raise SystemExit(f"--keep-best {a.keep_best}: {run_dir / CHECKPOINT_NAME} holds no kept weights "
                         "(written without this flag after its last validation); start over with --fresh")
    else:  # already the EMA weights when the EMA is on: those are what on_eval receives
        model.load_state_dict(kept.weights)
        weights, scored = contextlib.nullcontext(), "best_" + scored
        print(f"scoring the weights of step {kept.step}: best {kept.metric} {kept.value:.4f}")
    with weights:
        t_eval = time.perf_counter()
        test = metrics(predict(model, tok.test, device, a.eval_batch_size, amp), tok.y_test)
        t_eval = time.perf_counter() - t_eval
        val = metrics(predict(model, tok.val, device, a.eval_batch_size, amp), tok.y_val)
    curves = read_log(run_dir)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    out = {
        "name": a.name, "model": a.model, "tokenizer": a.tokenizer, "device": dev_name,
        "subset": a.subset, "data": tok.info, "config": cfg.to_dict(), "params": n_params,
        "train": {"steps": steps, "batch_size": a.batch_size, "epochs": steps / batches.steps_per_epoch(), "lr": a.lr,
                  "weight_decay": a.weight_decay, "warmup_steps": tcfg.warmup_steps, "grad_clip": a.grad_clip,
                  "precision": str(amp_dtype) if amp_dtype else "fp32", "seed": a.seed,
                  "ema_decay": a.ema_decay, "ema_start_step": a.ema_start_step, "ssm_lr": a.ssm_lr},
        "keep_best": a.keep_best, "scored_weights": scored,
        "selected": {"step": kept.step, "metric": kept.metric, "value": kept.value} if kept is not None else None,
        "test": test, "val": val,
        "train_seconds": round(total["train_seconds"], 2),
        "tokens_per_second": round(total["tokens"] / max(total["train_seconds"], 1e-9), 1),
        "padded_tokens_per_second": round(total["padded"] / max(total["train_seconds"], 1e-9), 1),
        "test_eval_seconds": round(t_eval, 2), "data_prep_seconds": round(t_data, 2),
        "curves": curves, "command": "python stages/05_s4/train_imdb.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    results = Path(a.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{a.name}.json").write_text(json.dumps(out, indent=1))
    title = (f"IMDb {a.model}/{a.tokenizer}, {n_params / 1e6:.2f}M params: test acc {test['accuracy']:.3f}, "
             f"AUC {test['roc_auc']:.3f}" + (" (subset)" if a.subset else ""))
    plot(curves, title, results / f"{a.name}.png", kept.step if kept is not None else None)
    print(f"test: accuracy {test['accuracy']:.4f}, ROC AUC {test['roc_auc']:.4f} on {len(tok.test)} reviews; "
          f"train {out['train_seconds']:.0f}s, {out['tokens_per_second']:.0f} tokens/s -> {results / (a.name + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
