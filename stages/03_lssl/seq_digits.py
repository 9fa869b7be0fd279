"""Sequential digits: classify scikit-learn's 8x8 digits read one pixel at a time (L = 64).

Trains a deep LSSL (HiPPO-LegS A, learned Δ, convolutional mode) and an LSTM
with about the same number of parameters on the same deterministic split,
and reports test accuracy, parameters and training time for each, on the
plain pixel order and (with --permuted, or --both) on a fixed permutation.

    python stages/03_lssl/seq_digits.py            # unpermuted, LSSL and LSTM
    python stages/03_lssl/seq_digits.py --both     # also the permuted task
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ssmlab.core.lssl import DeepLSSL, DeepLSSLConfig, LSTMClassifier, accuracy, train_classifier  # noqa: E402
from ssmlab.core.seq_models import param_count  # noqa: E402
from ssmlab.datasets.digits import N_CLASSES, load_digits_sequences  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--H", type=int, default=64, help="LSSL model width (channels)")
    p.add_argument("--N", type=int, default=32, help="LSSL state size per channel")
    p.add_argument("--layers", type=int, default=2, help="LSSL blocks")
    p.add_argument("--dt-min", type=float, default=0.01, help="smallest initial step Δ")
    p.add_argument("--dt-max", type=float, default=0.5, help="largest initial step Δ")
    p.add_argument("--lstm-hidden", type=int, default=0, help="LSTM hidden size (0: match the LSSL's parameters)")
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--lstm-epochs", type=int, default=25)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--ssm-lr", type=float, default=1e-3, help="learning rate of A, B and log Δ")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--permuted", action="store_true", help="the permuted-pixel task only")
    p.add_argument("--both", action="store_true", help="unpermuted and permuted")
    p.add_argument("--no-lstm", action="store_true", help="skip the LSTM baseline")
    p.add_argument("--time-limit", type=float, default=0.0, help="seconds per model before stopping (0: none)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS, help="output folder for PNG and JSON")
    p.add_argument("--quick", action="store_true", help="tiny run for tests")
    args = p.parse_args(argv)
    if args.quick:
        args.H, args.N, args.layers, args.epochs, args.lstm_epochs, args.lr = 32, 8, 1, 5, 1, 1e-2
        args.dt_min, args.dt_max = 0.1, 2.0
    if min(args.H, args.N, args.layers, args.epochs, args.lstm_epochs, args.batch) < 1:
        p.error("sizes, epochs and --batch must be >= 1")
    return args


def matched_lstm_hidden(target: int) -> int:
    """Largest hidden size whose one-layer LSTM (d_input 1) plus head has at most `target` parameters."""
    h = 1
    while param_count(LSTMClassifier(1, h + 1, N_CLASSES)) <= target:
        h += 1
    return h


def run_model(name, model, split, epochs, args):
    bar = tqdm(total=epochs, desc=name, leave=False)
    out = train_classifier(model, split.x_train, split.y_train, epochs, lr=args.lr, batch_size=args.batch,
                           ssm_lr=args.ssm_lr, time_limit_s=args.time_limit, seed=args.seed,
                           progress=lambda e, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.3f}")))
    bar.close()
    return {"model": name, "params": param_count(model), "test_acc": accuracy(model, split.x_test, split.y_test),
            "train_acc": accuracy(model, split.x_train, split.y_train), "seconds": round(out["seconds"], 1),
            "epochs": out["epochs_done"], "loss_history": out["loss_history"]}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    tasks = [False, True] if args.both else [args.permuted]
    results = []
    for permuted in tasks:
        split = load_digits_sequences(permuted)
        task = "permuted" if permuted else "sequential"
        torch.manual_seed(args.seed)
        cfg = DeepLSSLConfig(d_input=1, d_output=N_CLASSES, H=args.H, N=args.N, n_layers=args.layers,
                             dropout=0.1, dt_min=args.dt_min, dt_max=args.dt_max)
        lssl = DeepLSSL(cfg)
        results.append({"task": task, **run_model(f"LSSL {task}", lssl, split, args.epochs, args)})
        if not args.no_lstm:
            hidden = args.lstm_hidden or matched_lstm_hidden(param_count(lssl))
            torch.manual_seed(args.seed)
            lstm = LSTMClassifier(1, hidden, N_CLASSES)
            results.append({"task": task, "hidden": hidden,
                            **run_model(f"LSTM {task}", lstm, split, args.lstm_epochs, args)})
        for r in results[-2:] if not args.no_lstm else results[-1:]:
            print(f"{r['task']:>10} {r['model']:<16} params {r['params']:>7,}  test acc {r['test_acc']:.4f}  "
                  f"{r['epochs']} epochs in {r['seconds']:.0f} s")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        ax.plot(range(1, len(r["loss_history"]) + 1), r["loss_history"],
                label=f"{r['model']} ({r['params']:,} p): test acc {r['test_acc']:.3f}")
    ax.set(xlabel="epoch", ylabel="training cross-entropy", yscale="log", title="sequential 8x8 digits (L = 64)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "seq_digits.png", dpi=110)
    plt.close(fig)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (args.out / "seq_digits.json").write_text(json.dumps({"results": results, "config": config,
                                                          "data": split.describe()}, indent=2) + "\n")
    return results


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f} s")
