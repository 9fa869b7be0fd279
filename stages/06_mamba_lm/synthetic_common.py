"""What the two synthetic-task scripts share: build a model, train it with the shared recipe, score it per length.

Imported by `selective_copying.py` and `induction_heads.py` (the script's own
folder is on ``sys.path`` when a script runs). Library pieces come from
``ssmlab.core`` (model, training recipe) and ``ssmlab.datasets.synthetic``
(generators).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ssmlab.core.mamba import MambaConfig, MambaLMHeadModel
from ssmlab.core.state_passing import passed_states
from ssmlab.core.transformer import TransformerLM, match_mamba
from ssmlab.core.training import TrainConfig, train
from ssmlab.datasets.synthetic import IGNORE

# model kinds a script can train: (mixer, gated)
MODEL_KINDS = {
    "mamba": ("mamba", True),  # selective SSM (S6) + gate: the Mamba block
    "s4d": ("s4d", True),  # LTI (S4D-Real kernel) in the same gated block (like H3)
    "s4d-nogate": ("s4d", False),  # LTI without the gate (the paper's "S4" row)
    # attention baseline with rotary positions (the paper's MHA-RoPE row): as many layers as
    # the Mamba model, its MLP sized so the parameter count matches Mamba's within 5%
    "transformer": ("attention", True),
}


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", help=f"comma-separated, from {sorted(MODEL_KINDS)} (default: the preset's)")
    p.add_argument("--d-model", type=int, help="model width D")
    p.add_argument("--n-layer", type=int, help="number of blocks")
    p.add_argument("--d-state", type=int, default=16, help="SSM state size N")
    p.add_argument("--dt-min", type=float, default=1e-3, help="Mamba/S4D: initial Delta, log-uniform from this ...")
    p.add_argument("--dt-max", type=float, default=1e-1, help="... to this (the paper's 1e-3 .. 1e-1)")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--batch-size", type=int, help="training batch size")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--warmup", type=int, help="warmup steps (default: 5%% of steps)")
    p.add_argument("--eval-samples", type=int, help="test examples per length")
    p.add_argument("--eval-tokens", type=int, default=2**18, help="max tokens per evaluation forward pass")
    p.add_argument("--eval-budget", type=int, default=2**26,
                   help="max test tokens per length: long lengths get fewer examples (at least 32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 autocast on CUDA")
    p.add_argument("--state-passing", action="store_true",
                   help="Mamba: half of each batch starts from another training sequence's final state instead of "
                        "zero (ssmlab.core.state_passing), to length-generalize")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for these tiny models on a shared CPU)")
    p.add_argument("--time-limit-min", type=float, default=0.0,
                   help="stop training (checkpointed) after this many minutes; rerun the command to resume")
    p.add_argument("--out", type=Path, help="output folder for JSON and PNG (default: the stage's results/)")
    p.add_argument("--runs", type=Path, help="folder for checkpoints and JSON logs (default: <repo>/runs/06_mamba_lm, "
                                             "git-ignored; <out>/runs when --out is given)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def fill_defaults(args: argparse.Namespace, presets: dict) -> argparse.Namespace:
    """Unset options take the values of the chosen preset."""
    for key, value in {"models": "mamba", **presets[args.preset]}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.warmup is None:
        args.warmup = max(1, args.steps // 20)
    if args.state_passing and set(args.models.split(",")) != {"mamba"}:
        # refused before anything trains, not after the first model's run
        raise SystemExit(f"--state-passing is for the Mamba model only (--models mamba), got --models {args.models}")
    args._t_start = time.perf_counter()
    stage = Path(__file__).resolve().parent
    if args.runs is None:
        args.runs = args.out / "runs" if args.out is not None else stage.parents[1] / "runs" / stage.name
    if args.out is None:
        args.out = stage / "results"
    return args


def build_model(kind: str, vocab_size: int, args: argparse.Namespace) -> MambaLMHeadModel | TransformerLM:
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; choose from {sorted(MODEL_KINDS)}")
    mixer, gated = MODEL_KINDS[kind]
    mamba_cfg = MambaConfig(d_model=args.d_model, n_layer=args.n_layer, vocab_size=vocab_size,
                            d_state=args.d_state, mixer="mamba" if mixer == "attention" else mixer, gated=gated,
                            dt_min=getattr(args, "dt_min", 1e-3), dt_max=getattr(args, "dt_max", 1e-1),
                            dt_init_floor=min(1e-4, getattr(args, "dt_min", 1e-3)))
    torch.manual_seed(args.seed)
    if mixer == "attention":
        # heads of width 16 at these small widths (match_mamba's default of 64 would leave one head);
        # any MLP width (multiple=1): at D = 8 a multiple of 8 cannot land within 5%
        return TransformerLM(match_mamba(mamba_cfg, n_layer=args.n_layer, n_head=max(1, args.d_model // 16), multiple=1))
    return MambaLMHeadModel(mamba_cfg)


def masked_loss(model, batch):
    x, y = batch
    return _loss_and_acc(model(x).float(), y)


def state_passing_loss(model, batch):
    """`masked_loss` with the even rows of the batch started from their neighbour's final state."""
    x, y = batch
    return _loss_and_acc(model(x, passed_states(model, x)).float(), y)


def _loss_and_acc(logits, y):
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE)
    mask = y != IGNORE
    acc = (logits.argmax(-1)[mask] == y[mask]).float().mean()
    return loss, {"acc": acc}


@torch.no_grad()
def accuracy_at(model, make_batch: Callable[[int, torch.Generator], tuple], length: int, n_samples: int,
                eval_tokens: int, device: str, autocast_dtype, seed: int) -> float:
    """Answer-token accuracy over `n_samples` fresh test examples of one length (batched to `eval_tokens`)."""
    model.eval()
    g = torch.Generator().manual_seed(seed + 7919 * length)
    batch = max(1, min(n_samples, eval_tokens // length))
    right = total = 0
    done = 0
    while done < n_samples:
        b = min(batch, n_samples - done)
        x, y = make_batch(b, g)
        x, y = x.to(device), y.to(device)
        ctx = torch.autocast(torch.device(device).type, dtype=autocast_dtype) if autocast_dtype else _null()
        with ctx:
            logits = model(x)
        mask = y != IGNORE
        right += (logits.argmax(-1)[mask] == y[mask]).sum().item()
        total += mask.sum().item()
        done += b
    model.train()
    return right / total


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def time_left_s(args: argparse.Namespace) -> float:
    """Seconds left of --time-limit-min (counted from the script's start, across all its models); 0: no limit."""
    if not args.time_limit_min:
        return 0.0
    return max(1e-9, 60 * args.time_limit_min - (time.perf_counter() - args._t_start))


def train_model(model, data, args, out_dir: Path, eval_fn=None) -> dict:
    cfg = TrainConfig(lr=args.lr, max_steps=args.steps, warmup_steps=args.warmup, device=args.device,
                      precision=args.precision, seed=args.seed, log_every=max(1, args.steps // 50),
                      eval_every=args.steps // 10 if eval_fn else 0, ckpt_every=max(1, args.steps // 10),
                      out_dir=str(out_dir), progress=not args.no_progress, time_limit_s=time_left_s(args))
    t0 = time.perf_counter()
    loss = state_passing_loss if args.state_passing else masked_loss
    result = train(model, loss, data, cfg, eval_fn=eval_fn)
    log = out_dir / "log.jsonl"  # all chunks of a resumed run, not only this call's
    records = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()] if log.exists() else []
    last = [r for r in records if r.get("kind") == "train"]
    return {"steps_done": result.step, "finished": result.finished,
            "wall_time_this_call_s": round(time.perf_counter() - t0, 1),
            "final_train_loss": last[-1]["loss"] if last else None, "final_train_acc": last[-1].get("acc") if last else None,
            "autocast": str(cfg.autocast_dtype()), "resumed_from": result.resumed_from}


def save_results(out: Path, name: str, results: dict) -> dict:
    """Write <out>/<name>.json, keeping the models of an earlier run that this run did not train; returns the merged results."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        results["models"] = {**old.get("models", {}), **results["models"]}
    results["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in results["args"].items() if not k.startswith("_")}
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return results


def plot_accuracy(out: Path, name: str, curves: dict[str, dict[int, float]], title: str, train_len: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, acc in curves.items():
        lengths = sorted(acc)
        ax.plot(lengths, [100 * acc[n] for n in lengths], marker="o", label=label)
    ax.axvline(train_len, color="grey", ls="--", lw=1, label=f"train length {train_len}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("test sequence length")
    ax.set_ylabel("answer-token accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / f"{name}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def samples_for(length: int, args: argparse.Namespace) -> int:
    """Test examples at one length: --eval-samples, fewer for very long lengths (--eval-budget), at least 32."""
    return max(min(32, args.eval_samples), min(args.eval_samples, args.eval_budget // length))


def powers_of_two(lo: int, hi: int) -> list[int]:
    return [2**k for k in range(int(math.log2(lo)), int(math.log2(hi)) + 1)]
