"""Induction heads: train at one length, test at every power of two up to far longer ones.

Presets (any option overrides them):

  cpu    minutes on a CPU: D=32, train at length 32, test 2^5 .. 2^10
  paper  the Mamba paper's setting: V=16, train at 256, 2 layers, D=64, test
         at every power of two from 2^6 to 2^20 (run it on a GPU)

Writes <out>/induction_heads_<preset>.json and .png (accuracy against test
length, one curve per model). `--models transformer` adds the attention
baseline with rotary positions (the paper's MHA-RoPE row of Table 11).

    python stages/06_mamba_lm/induction_heads.py                          # cpu preset
    python stages/06_mamba_lm/induction_heads.py --models mamba,transformer
    python stages/06_mamba_lm/induction_heads.py --preset paper --device cuda
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

from synthetic_common import (accuracy_at, add_common_args, build_model, fill_defaults, plot_accuracy,
                              powers_of_two, samples_for, save_results, train_model)
from ssmlab.core.training import GeneratedBatches, TrainConfig
from ssmlab.datasets.synthetic import induction_heads

PRESETS = {
    "cpu": dict(vocab=16, train_len=32, min_test=2**5, max_test=2**10, d_model=32, n_layer=2, steps=600,
                batch_size=32, lr=3e-3, eval_samples=128),
    "paper": dict(vocab=16, train_len=256, min_test=2**6, max_test=2**20, d_model=64, n_layer=2, steps=8000,
                  batch_size=64, lr=1e-3, eval_samples=512),
}
EXIT_UNFINISHED = 75  # training stopped by --time-limit-min: rerun the same command to resume


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--vocab", type=int, help="vocabulary size V, including the trigger token")
    p.add_argument("--train-len", type=int, help="sequence length during training")
    p.add_argument("--min-test", type=int, help="shortest test length (a power of two)")
    p.add_argument("--max-test", type=int, help="longest test length (a power of two)")
    add_common_args(p)
    return fill_defaults(p.parse_args(argv), PRESETS)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    name = f"induction_heads_{args.preset}"
    autocast = TrainConfig(device=args.device, precision=args.precision).autocast_dtype()
    results = {"task": "induction_heads", "preset": args.preset, "device": args.device,
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "models": {}}
    unfinished = False
    for kind in args.models.split(","):
        model = build_model(kind, args.vocab, args)
        make = partial(induction_heads, seq_len=args.train_len, vocab_size=args.vocab)
        data = GeneratedBatches(lambda g: make(args.batch_size, generator=g), seed=args.seed)

        def eval_fn(m, _make=make):
            return {"val_acc": accuracy_at(m, lambda b, g: _make(b, generator=g), args.train_len, 256,
                                           args.eval_tokens, args.device, None, seed=10**6)}

        summary = train_model(model, data, args, args.runs / f"{name}_{kind}", eval_fn=eval_fn)
        if not summary["finished"]:
            print(f"[{kind}] stopped at step {summary['steps_done']}/{args.steps} (time limit); rerun to resume")
            unfinished = True
            continue
        acc, n_test = {}, {}
        for L in powers_of_two(args.min_test, args.max_test):
            gen = partial(induction_heads, seq_len=L, vocab_size=args.vocab)
            n_test[L] = samples_for(L, args)
            acc[L] = accuracy_at(model, lambda b, g, _gen=gen: _gen(b, generator=g), L, n_test[L],
                                 args.eval_tokens, args.device, autocast, args.seed)
            print(f"[{kind}] test length {L}: accuracy {100 * acc[L]:.2f}%")
        results["models"][kind] = {"params": model.num_parameters(), **summary, "accuracy": acc, "test_examples": n_test}
    if unfinished:
        return EXIT_UNFINISHED
    results = save_results(args.out, name, results)
    curves = {k: {int(n): a for n, a in v["accuracy"].items()} for k, v in results["models"].items()}
    png = plot_accuracy(args.out, name, curves, f"Induction heads ({args.preset}: V={args.vocab})", args.train_len)
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
