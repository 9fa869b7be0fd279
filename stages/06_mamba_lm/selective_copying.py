"""Selective copying: Mamba (selective) against the same block with an LTI (S4D) core.

Presets (any option overrides them):

  cpu    minutes on a CPU: V=16, 4 tokens to copy, context 32, D=32
  study  the smaller reference-study setting: V=30, context 64 for training,
         128 for testing, 10,000 fixed training examples
  paper  the Mamba paper's setting: V=16, 16 tokens, context 4096, 2 layers,
         D=64 (run it on a GPU; split it with --time-limit-min)

Writes <out>/selective_copying_<preset>.json and .png (accuracy against
test context length, one curve per model).

    python stages/06_mamba_lm/selective_copying.py                       # cpu preset
    python stages/06_mamba_lm/selective_copying.py --preset paper --models mamba,s4d,s4d-nogate --device cuda
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

from synthetic_common import (accuracy_at, add_common_args, build_model, fill_defaults, plot_accuracy,
                              samples_for, save_results, train_model)
from ssmlab.core.training import EpochBatches, GeneratedBatches, TrainConfig
from ssmlab.datasets.synthetic import selective_copying

PRESETS = {
    "cpu": dict(vocab=16, n_tokens=4, train_len=32, test_lens="32,64,128,256", train_samples=0, d_model=32,
                n_layer=2, steps=800, batch_size=32, lr=3e-3, eval_samples=256, models="mamba,s4d,s4d-nogate"),
    "study": dict(vocab=30, n_tokens=16, train_len=64, test_lens="64,128,256", train_samples=10_000, d_model=64,
                  n_layer=2, steps=3000, batch_size=64, lr=2e-3, eval_samples=1000, models="mamba,s4d,s4d-nogate"),
    "paper": dict(vocab=16, n_tokens=16, train_len=4096, test_lens="1024,2048,4096,8192", train_samples=0,
                  d_model=64, n_layer=2, steps=8000, batch_size=64, lr=1e-3, eval_samples=1024,
                  models="mamba,s4d,s4d-nogate"),
}
EXIT_UNFINISHED = 75  # training stopped by --time-limit-min: rerun the same command to resume


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--vocab", type=int, help="vocabulary size V, including the noise and marker tokens")
    p.add_argument("--n-tokens", type=int, help="data tokens to remember and copy")
    p.add_argument("--train-len", type=int, help="context length during training")
    p.add_argument("--test-lens", help="comma-separated context lengths to test at")
    p.add_argument("--train-samples", type=int, help="size of a fixed training set (0: fresh examples every batch)")
    add_common_args(p)
    return fill_defaults(p.parse_args(argv), PRESETS)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    test_lens = [int(s) for s in args.test_lens.split(",")]
    name = f"selective_copying_{args.preset}"
    autocast = TrainConfig(device=args.device, precision=args.precision).autocast_dtype()
    results = {"task": "selective_copying", "preset": args.preset, "device": args.device,
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "models": {}}
    unfinished = False
    for kind in args.models.split(","):
        model = build_model(kind, args.vocab, args)
        make = partial(selective_copying, seq_len=args.train_len, n_tokens=args.n_tokens, vocab_size=args.vocab)
        if args.train_samples:
            x, y = make(args.train_samples, generator=torch.Generator().manual_seed(args.seed))
            data = EpochBatches.from_tensors(x, y, batch_size=args.batch_size, seed=args.seed)
        else:
            data = GeneratedBatches(lambda g: make(args.batch_size, generator=g), seed=args.seed)

        def eval_fn(m, _make=make):  # held-out accuracy at the training length, during training
            return {"val_acc": accuracy_at(m, lambda b, g: _make(b, generator=g), args.train_len, 128,
                                           args.eval_tokens, args.device, None, seed=10**6)}

        summary = train_model(model, data, args, args.runs / f"{name}_{kind}", eval_fn=eval_fn)
        if not summary["finished"]:
            print(f"[{kind}] stopped at step {summary['steps_done']}/{args.steps} (time limit); rerun to resume")
            unfinished = True
            continue
        acc, n_test = {}, {}
        for L in test_lens:
            gen = partial(selective_copying, seq_len=L, n_tokens=args.n_tokens, vocab_size=args.vocab)
            n_test[L] = samples_for(L + args.n_tokens, args)
            acc[L] = accuracy_at(model, lambda b, g, _gen=gen: _gen(b, generator=g), L + args.n_tokens,
                                 n_test[L], args.eval_tokens, args.device, autocast, args.seed)
            print(f"[{kind}] test context {L}: accuracy {100 * acc[L]:.2f}%")
        results["models"][kind] = {"params": model.num_parameters(), **summary, "accuracy": acc, "test_examples": n_test}
    if unfinished:
        return EXIT_UNFINISHED
    results = save_results(args.out, name, results)
    curves = {k: {int(n): a for n, a in v["accuracy"].items()} for k, v in results["models"].items()}
    title = f"Selective copying ({args.preset}: V={args.vocab}, {args.n_tokens} tokens)"
    png = plot_accuracy(args.out, name, curves, title, args.train_len)
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
