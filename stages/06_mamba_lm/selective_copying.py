"""Selective copying: Mamba (selective) against the same block with an LTI (S4D) core.

Presets (any option overrides them):

  cpu    minutes on a CPU: V=16, 4 tokens to copy, context 32, D=32
  study  the smaller reference-study setting: V=30, context 64 for training,
         128 for testing, 10,000 fixed training examples
  paper  the Mamba paper's setting: V=16, 16 tokens, context 4096, 2 layers,
         D=64 (run it on a GPU; split it with --time-limit-min)

Writes <out>/selective_copying_<preset>[_<tag>].json and .png (accuracy
against test context length, one curve per model).

Length curriculum (--curriculum 256:2000,1024:2000,4096:4000): train first at
short contexts, where steps are cheap and the task is learned quickly, then
continue the same model and optimizer at longer ones, ending at the training
length; one warmup + cosine schedule runs over all the phases' steps. The
test is unchanged (the paper's data at every test length).

    python stages/06_mamba_lm/selective_copying.py                       # cpu preset
    python stages/06_mamba_lm/selective_copying.py --preset paper --models mamba,s4d,s4d-nogate --device cuda
    python stages/06_mamba_lm/selective_copying.py --preset paper --models mamba --device cuda \
        --curriculum 256:2000,1024:2000,4096:4000                          # -> selective_copying_paper_curriculum.json
"""

from __future__ import annotations

import argparse
import re
import sys
from functools import partial
from pathlib import Path

import torch

from synthetic_common import (accuracy_at, add_common_args, build_model, fill_defaults, plot_accuracy,
                              samples_for, save_results, train_model)
from ssmlab.core.training import CurriculumBatches, EpochBatches, GeneratedBatches, TrainConfig
from ssmlab.datasets.synthetic import selective_copying

PRESETS = {
    "cpu": dict(vocab=16, n_tokens=4, train_len=32, test_lens="32,64,128,256", train_samples=0, d_model=32,
                n_layer=2, steps=800, batch_size=32, lr=3e-3, eval_samples=256, models="mamba,s4d,s4d-nogate"),
    "study": dict(vocab=30, n_tokens=16, train_len=64, test_lens="64,128,256", train_samples=10_000, d_model=64,
                  n_layer=2, steps=3000, batch_size=64, lr=2e-3, eval_samples=1000, models="mamba,s4d,s4d-nogate"),
    # steps and lr: the recipe measured to reach 99.9% at 4096 on an H100 in about 6 minutes
    # (8,000 steps at lr 1e-3 had reached 43% when the first run was stopped; README)
    "paper": dict(vocab=16, n_tokens=16, train_len=4096, test_lens="1024,2048,4096,8192", train_samples=0,
                  d_model=64, n_layer=2, steps=17000, batch_size=64, lr=2e-3, eval_samples=1024,
                  models="mamba,s4d,s4d-nogate"),
}
EXIT_UNFINISHED = 75  # training stopped by --time-limit-min: rerun the same command to resume
CURRICULUM_TAG = "curriculum"  # the result name's default suffix with --curriculum


def parse_curriculum(spec: str) -> list[tuple[int, int]]:
    """'256:2000,1024:2000,4096:4000' -> [(256, 2000), (1024, 2000), (4096, 4000)]: (context length, steps).

    Lengths must increase strictly (a curriculum goes from short to long) and every phase needs >= 1 step.
    """
    phases = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", part)
        if not m:
            raise ValueError(f"--curriculum: {part!r} is not LENGTH:STEPS (e.g. 256:2000,4096:4000)")
        phases.append((int(m[1]), int(m[2])))
    for length, steps in phases:
        if length < 1 or steps < 1:
            raise ValueError(f"--curriculum: phase {length}:{steps} needs a length >= 1 and >= 1 steps")
    lengths = [length for length, _ in phases]
    if any(b <= a for a, b in zip(lengths, lengths[1:])):
        raise ValueError(f"--curriculum: context lengths must increase from phase to phase, got {lengths}")
    return phases


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--vocab", type=int, help="vocabulary size V, including the noise and marker tokens")
    p.add_argument("--n-tokens", type=int, help="data tokens to remember and copy")
    p.add_argument("--train-len", type=int, help="context length during training")
    p.add_argument("--test-lens", help="comma-separated context lengths to test at")
    p.add_argument("--train-samples", type=int, help="size of a fixed training set (0: fresh examples every batch)")
    p.add_argument("--curriculum", metavar="LEN:STEPS,...",
                   help="length curriculum, e.g. 256:2000,1024:2000,4096:4000: train that many optimizer steps at "
                        "each context length in turn, same model and optimizer. Its steps replace --steps "
                        "(total = their sum, one warmup + cosine schedule over it); lengths must increase and the "
                        "last must be --train-len (without --train-len it becomes the training length). Fresh "
                        "examples only (--train-samples 0)")
    p.add_argument("--tag", help="suffix of the result name: <out>/selective_copying_<preset>_<tag>.json, and its "
                                 f"own checkpoints (default with --curriculum: {CURRICULUM_TAG!r}, so a curriculum run "
                                 "neither overwrites nor resumes the plain run)")
    add_common_args(p)
    args = p.parse_args(argv)
    try:
        _apply_curriculum(args)
        args = fill_defaults(args, PRESETS)
        _check_curriculum(args)
    except ValueError as e:
        p.error(str(e))
    return args


def _apply_curriculum(args: argparse.Namespace) -> None:
    """Before the preset fills in: the curriculum sets the steps (so the default warmup is 5% of its total)
    and, if not given, the training length; `args.curriculum` becomes the list of phases."""
    if args.tag is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", args.tag):
        raise ValueError(f"--tag {args.tag!r}: use letters, digits, '_', '-' and '.'")
    if args.curriculum is None:
        return
    phases = parse_curriculum(args.curriculum)
    total, last = sum(n for _, n in phases), phases[-1][0]
    if args.steps is not None and args.steps != total:
        raise ValueError(f"--curriculum's steps add up to {total}; --steps {args.steps} disagrees (leave it out)")
    if args.train_len is not None and args.train_len != last:
        raise ValueError(f"--curriculum must end at the training length: its last phase has length {last}, "
                         f"--train-len is {args.train_len}")
    args.curriculum, args.steps, args.train_len = phases, total, last
    if args.tag is None:
        args.tag = CURRICULUM_TAG


def _check_curriculum(args: argparse.Namespace) -> None:
    """After the preset fills in: what the curriculum needs of the preset's values."""
    if args.curriculum is None:
        return
    if args.train_samples:
        raise ValueError(f"--curriculum draws fresh examples at each phase's length: it needs --train-samples 0 "
                         f"(the {args.preset} preset uses a fixed set of {args.train_samples})")
    if args.curriculum[0][0] < args.n_tokens:
        raise ValueError(f"--curriculum: the first length {args.curriculum[0][0]} cannot hold "
                         f"{args.n_tokens} tokens to copy")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    test_lens = [int(s) for s in args.test_lens.split(",")]
    name = f"selective_copying_{args.preset}" + (f"_{args.tag}" if args.tag else "")
    autocast = TrainConfig(device=args.device, precision=args.precision).autocast_dtype()
    results = {"task": "selective_copying", "preset": args.preset, "device": args.device,
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "curriculum": [{"length": n, "steps": s} for n, s in args.curriculum] if args.curriculum else None,
               "models": {}}
    unfinished = False
    for kind in args.models.split(","):
        model = build_model(kind, args.vocab, args)
        make = partial(selective_copying, seq_len=args.train_len, n_tokens=args.n_tokens, vocab_size=args.vocab)
        if args.curriculum:
            data = CurriculumBatches(lambda n, g: make(args.batch_size, seq_len=n, generator=g), args.curriculum,
                                     seed=args.seed)
        elif args.train_samples:
            x, y = make(args.train_samples, generator=torch.Generator().manual_seed(args.seed))
            data = EpochBatches.from_tensors(x, y, batch_size=args.batch_size, seed=args.seed)
        else:
            data = GeneratedBatches(lambda g: make(args.batch_size, generator=g), seed=args.seed)
        eval_fn = partial(_validate, make=make, data=data, args=args)
        summary = train_model(model, data, args, args.runs / f"{name}_{kind}", eval_fn=eval_fn)
        if not summary["finished"]:
            where = f", curriculum length {data.last_length}" if args.curriculum else ""
            print(f"[{kind}] stopped at step {summary['steps_done']}/{args.steps} (time limit{where}); rerun to resume")
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
    if args.curriculum:
        title += "\ncurriculum " + ",".join(f"{n}:{s}" for n, s in args.curriculum)
    png = plot_accuracy(args.out, name, curves, title, args.train_len)
    print(f"wrote {png}")
    return 0


def _validate(m, make, data, args) -> dict:
    """Held-out accuracy during training (128 fixed examples).

    `val_acc` is always at the training length, with the examples the plain run
    uses: with a curriculum that is its final length, so its curve is the
    progress on the target and reads against the plain run's. With a
    curriculum, `val_acc_phase` is at the length just trained on, which says
    whether a phase was learned before the next began; without both, a low
    `val_acc` could not tell "not learned yet" from "learned short, not long".
    """
    metrics = {"val_acc": accuracy_at(m, lambda b, g: make(b, generator=g), args.train_len, 128,
                                      args.eval_tokens, args.device, None, seed=10**6)}
    if args.curriculum and data.last_length != args.train_len:
        n = data.last_length
        metrics["val_acc_phase"] = accuracy_at(m, lambda b, g: make(b, seq_len=n, generator=g), n, 128,
                                               args.eval_tokens, args.device, None, seed=10**6)
    return metrics


if __name__ == "__main__":
    sys.exit(main())
