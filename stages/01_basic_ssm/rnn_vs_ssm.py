"""RNN vs SSM on a task that needs long memory: recall a symbol seen k steps ago.

Each sequence has k + 1 steps: at t = 0 one of C symbols (one-hot), then k
blank steps, then at the last step a query flag; the model must name the
symbol at the last step. Chance accuracy is 1/C.

Three models of similar size are trained the same way (AdamW, warmup +
cosine, clipping) for each k: a tanh RNN, an LSTM and a linear SSM layer
(`ssmlab.core.ssm.SSMSequenceModel`, one block). The script reports held-out
accuracy against k, and, at initialisation with k = max, the norm of the
gradient of the loss with respect to each input u_t against the distance
k - t: how much signal flows back through time.

    python stages/01_basic_ssm/rnn_vs_ssm.py                 # ~3-4 min on 2 cores
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from ssmlab.core.charlm import write_json  # noqa: E402
from ssmlab.core.ssm import SSMLayer  # noqa: E402
from ssmlab.core.training import GeneratedBatches, TrainConfig, train  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("tanh RNN", "LSTM", "SSM")


def delayed_recall(batch: int, k: int, n_symbols: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(u (B, k+1, C+1), target (B,)): symbol one-hot at t = 0, blanks, query flag at t = k."""
    target = torch.randint(0, n_symbols, (batch,), generator=generator)
    u = torch.zeros(batch, k + 1, n_symbols + 1)
    u[torch.arange(batch), 0, target] = 1.0
    u[:, k, n_symbols] = 1.0  # the query
    return u, target


class RNNClassifier(nn.Module):
    """nn.RNN (tanh) or nn.LSTM, then a linear read-out of the last hidden state."""

    def __init__(self, cell: str, d_in: int, hidden: int, n_out: int):
        super().__init__()
        self.rnn = (nn.LSTM if cell == "lstm" else nn.RNN)(d_in, hidden, batch_first=True)
        self.out = nn.Linear(hidden, n_out)

    def forward(self, u: Tensor) -> Tensor:  # (B, L, d_in) -> (B, L, n_out)
        return self.out(self.rnn(u)[0])


def make_model(name: str, args) -> nn.Module:
    d_in = args.symbols + 1
    if name == "tanh RNN":
        return RNNClassifier("rnn", d_in, args.rnn_hidden, args.symbols)
    if name == "LSTM":
        return RNNClassifier("lstm", d_in, args.lstm_hidden, args.symbols)
    return nn.Sequential(  # a linear SSM layer between linear maps: linear in u end to end
        _ToChannels(d_in, args.ssm_H),
        SSMLayer(args.ssm_H, args.ssm_N, dt_min=args.dt_min, dt_max=args.dt_max, a_scale=args.ssm_decay),
        nn.Linear(args.ssm_H, args.symbols),
    )


class _ToChannels(nn.Linear):
    """u (B, L, d_in) -> (B, L, H) without bias: blank steps stay exactly zero."""

    def __init__(self, d_in: int, H: int):
        super().__init__(d_in, H, bias=False)


def recall_loss(model: nn.Module, batch) -> tuple[Tensor, dict]:
    u, target = batch
    logits = model(u)[:, -1]  # the answer is read at the last (query) step
    loss = F.cross_entropy(logits, target)
    return loss, {"acc": (logits.argmax(-1) == target).float().mean()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", type=int, nargs="+", default=[10, 30, 100, 300, 1000], help="delays k to train on")
    p.add_argument("--symbols", type=int, default=8, help="C, the number of symbols (chance = 1/C)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per (model, k)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-2, help="peak learning rate (same for every model)")
    p.add_argument("--rnn-hidden", type=int, default=64)
    p.add_argument("--lstm-hidden", type=int, default=32)
    p.add_argument("--ssm-H", type=int, default=32, help="SSM channels H")
    p.add_argument("--ssm-N", type=int, default=8, help="SSM state size N per channel")
    p.add_argument("--dt-min", type=float, default=1e-3, help="smallest initial SSM step Δ")
    p.add_argument("--dt-max", type=float, default=1e-1, help="largest initial SSM step Δ")
    p.add_argument("--ssm-decay", type=float, default=0.01,
                   help="initial decay rate of the SSM (A = -decay I + rotation): memory lasts ~1/(decay Δ) steps")
    p.add_argument("--eval-batch", type=int, default=512, help="held-out examples per (model, k)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS, help="output folder for PNG and JSON")
    p.add_argument("--quick", action="store_true", help="short run for tests")
    args = p.parse_args(argv)
    if args.quick:
        args.ks, args.steps, args.eval_batch = [5, 20], 40, 128
    if min(args.ks) < 1 or args.symbols < 2 or args.steps < 1:
        p.error("need every k >= 1, --symbols >= 2, --steps >= 1")
    return args


def gradient_through_time(model: nn.Module, k: int, n_symbols: int, seed: int) -> list[float]:
    """||d loss / d u_t|| averaged over a batch, for t = 0..k, loss read at t = k."""
    u, target = delayed_recall(64, k, n_symbols, torch.Generator().manual_seed(seed))
    u.requires_grad_(True)
    loss, _ = recall_loss(model, (u, target))
    (g,) = torch.autograd.grad(loss, u)
    return g.norm(dim=-1).mean(0).tolist()  # (k+1,)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = {name: [] for name in MODELS}
    params = {}
    runs = [(name, k) for k in args.ks for name in MODELS]
    for name, k in tqdm(runs, desc="train (model, k)"):
        torch.manual_seed(args.seed)
        model = make_model(name, args)
        params[name] = sum(p.numel() for p in model.parameters())
        data = GeneratedBatches(lambda g, k=k: delayed_recall(args.batch, k, args.symbols, g), seed=args.seed)
        cfg = TrainConfig(lr=args.lr, max_steps=args.steps, warmup_steps=min(10, args.steps), weight_decay=0.0,
                          log_every=1, progress=False, seed=args.seed)
        t = time.perf_counter()
        hist = train(model, recall_loss, data, cfg).history
        losses = [r["loss"] for r in hist if r["kind"] == "train"]
        with torch.no_grad():
            batch = delayed_recall(args.eval_batch, k, args.symbols, torch.Generator().manual_seed(10_000 + k))
            _, m = recall_loss(model, batch)
        results[name].append({"k": k, "acc": m["acc"].item(), "first_loss": sum(losses[:5]) / len(losses[:5]),
                              "last_loss": sum(losses[-5:]) / len(losses[-5:]), "seconds": round(time.perf_counter() - t, 2)})
        tqdm.write(f"{name:9s} k={k:5d}: held-out accuracy {results[name][-1]['acc']:.3f} "
                   f"(loss {results[name][-1]['first_loss']:.3f} -> {results[name][-1]['last_loss']:.3f})")

    k_max = max(args.ks)
    grads = {}
    for name in MODELS:
        torch.manual_seed(args.seed)
        grads[name] = gradient_through_time(make_model(name, args), k_max, args.symbols, args.seed)

    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, m in zip(MODELS, "os^"):
        ax[0].semilogx([r["k"] for r in results[name]], [r["acc"] for r in results[name]], m + "-",
                       label=f"{name} ({params[name]:,} params)")
    ax[0].axhline(1 / args.symbols, color="k", ls=":", label="chance")
    ax[0].set(xlabel="delay k", ylabel="held-out accuracy", ylim=(0, 1.05),
              title=f"recall a symbol from k steps ago ({args.steps} steps each)")
    ax[0].legend(fontsize=8)
    dist = list(range(k_max, -1, -1))  # k - t for t = 0..k
    for name in MODELS:
        ax[1].semilogy(dist, [max(g, 1e-30) for g in grads[name]], label=name)
    ax[1].set(xlabel="distance k - t", ylabel="||d loss / d u_t||", title=f"gradient through time at init, k = {k_max}")
    ax[1].legend()
    fig.tight_layout()
    png = args.out / "rnn_vs_ssm.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)

    summary = {"params": params, "results": results, "steps": args.steps, "symbols": args.symbols,
               "grad_norm_at_t0_over_t_end": {n: grads[n][0] / grads[n][-1] if grads[n][-1] else None for n in MODELS},
               "grad_norm_through_time": {"k": k_max, "per_t": grads},
               "seconds": round(time.perf_counter() - t0, 2)}
    write_json(args.out / "rnn_vs_ssm.json", summary)
    print("held-out accuracy by k:")
    for name in MODELS:
        print(f"  {name:9s}", "  ".join(f"k={r['k']}: {r['acc']:.2f}" for r in results[name]))
    print("gradient at t=0 relative to t=k:", {n: f"{v:.1e}" if v is not None else None
                                               for n, v in summary["grad_norm_at_t0_over_t_end"].items()})
    print(f"wrote {png} in {summary['seconds']} s")
    return summary


if __name__ == "__main__":
    main()
