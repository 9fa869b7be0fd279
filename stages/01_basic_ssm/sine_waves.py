"""Training on sine waves: a small SSM model learns to continue sums of sines.

Each series is a sum of sines with fixed periods (`--periods`) and random
amplitudes and phases, a fresh draw for every example (`--random-periods K`
draws the periods per series too: a much harder task). The model (`SSMSequenceModel`:
a linear encoder, SSM blocks, a linear decoder) is trained, in convolutional
mode, to predict the next value at every step (mean squared error). Then, on
held-out series, it forecasts `--horizon` steps after a `--context` of
observed values by feeding its own predictions back in, in recurrent mode
(one `step` per value, constant memory): the streaming use of the same weights.

    python stages/01_basic_ssm/sine_waves.py                 # ~1-2 min on 2 cores
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

from ssmlab.core.charlm import write_json  # noqa: E402
from ssmlab.core.ssm import SSMSequenceModel  # noqa: E402
from ssmlab.core.training import GeneratedBatches, TrainConfig, train  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def sine_sums(batch: int, length: int, n_sines: int, generator: torch.Generator,
              periods: Optional[list[float]] = None, period_range=(8.0, 64.0)) -> Tensor:
    """(B, length) sums of n_sines sines with amplitudes in [0.5, 1.5] / n_sines and uniform phases.

    Periods (in steps): the given `periods` for every series, or (None) log-uniform in
    `period_range`, drawn afresh per series.
    """
    if periods is not None:
        period = torch.tensor(periods, dtype=torch.float32).view(1, -1, 1).expand(batch, -1, 1)
        n_sines = len(periods)
    else:
        lo, hi = math.log(period_range[0]), math.log(period_range[1])
        period = torch.exp(torch.rand(batch, n_sines, 1, generator=generator) * (hi - lo) + lo)
    amp = (0.5 + torch.rand(batch, n_sines, 1, generator=generator)) / n_sines
    phase = 2 * math.pi * torch.rand(batch, n_sines, 1, generator=generator)
    t = torch.arange(length, dtype=torch.float32)
    return (amp * torch.sin(2 * math.pi * t / period + phase)).sum(1)


def next_value_loss(model, batch) -> Tensor:
    """MSE of the one-step-ahead prediction at every position."""
    (series,) = batch
    pred = model(series[:, :-1, None])[..., 0]  # (B, L-1)
    return F.mse_loss(pred, series[:, 1:])


@torch.no_grad()
def forecast(model: SSMSequenceModel, context: Tensor, horizon: int) -> Tensor:
    """Feed `context` (B, Lc) step by step, then `horizon` own predictions: -> (B, horizon)."""
    states, caches = model.init_state(context.shape[0]), [b.ssm.discrete() for b in model.blocks]
    for t in range(context.shape[1]):
        y, states = model.step(states, context[:, t : t + 1], caches)
    out = []
    for _ in range(horizon):
        out.append(y[:, 0])
        y, states = model.step(states, y, caches)
    return torch.stack(out, 1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--periods", type=float, nargs="+", default=[12.0, 25.0, 47.0],
                   help="periods (steps) of the sines, shared by every series; amplitudes and phases vary")
    p.add_argument("--random-periods", type=int, default=0, metavar="K",
                   help="instead: K sines with periods drawn per series in [8, 64] (a harder task)")
    p.add_argument("--length", type=int, default=256, help="training series length L")
    p.add_argument("--context", type=int, default=192, help="observed steps before forecasting")
    p.add_argument("--horizon", type=int, default=128, help="forecast steps")
    p.add_argument("--H", type=int, default=32, help="SSM channels")
    p.add_argument("--N", type=int, default=8, help="SSM state size per channel")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--eval-series", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS, help="output folder for PNG and JSON")
    p.add_argument("--quick", action="store_true", help="short run for tests")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.length, args.context, args.horizon, args.eval_series, args.H = 60, 96, 64, 32, 32, 16
    if min(args.length, args.context, args.horizon, args.steps) < 1 or min(args.periods) <= 0:
        p.error("sizes and --steps must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    model = SSMSequenceModel(1, 1, H=args.H, N=args.N, n_layers=args.layers, dt_min=1e-2, dt_max=1.0)
    periods = None if args.random_periods else args.periods
    n_sines = args.random_periods or len(args.periods)
    data = GeneratedBatches(lambda g: (sine_sums(args.batch, args.length, n_sines, g, periods),), seed=args.seed)
    cfg = TrainConfig(lr=args.lr, max_steps=args.steps, warmup_steps=min(20, args.steps), weight_decay=0.0,
                      log_every=1, seed=args.seed)
    hist = train(model, next_value_loss, data, cfg).history
    losses = [r["loss"] for r in hist if r["kind"] == "train"]

    g = torch.Generator().manual_seed(10_000 + args.seed)
    series = sine_sums(args.eval_series, args.context + args.horizon, n_sines, g, periods)
    model.eval()
    with torch.no_grad():
        one_step = F.mse_loss(model(series[:, :-1, None])[..., 0], series[:, 1:]).item()
        repeat_last = F.mse_loss(series[:, :-1], series[:, 1:]).item()  # baseline: predict the last value
    pred = forecast(model, series[:, : args.context], args.horizon)
    truth = series[:, args.context :]
    mse_by_h = ((pred - truth) ** 2).mean(0)  # (horizon,)
    variance = truth.var().item()

    fig, ax = plt.subplots(1, 3, figsize=(17, 4.5))
    ax[0].semilogy(losses)
    ax[0].set(xlabel="step", ylabel="train MSE (next value)", title="training (convolutional mode)")
    t = torch.arange(args.context + args.horizon)
    for i, c in zip(range(2), ("C0", "C1")):
        ax[1].plot(t, series[i], color=c, lw=1, alpha=0.6, label=f"truth {i}")
        ax[1].plot(t[args.context :], pred[i], color=c, ls="--", lw=2, label=f"forecast {i}")
    ax[1].axvline(args.context, color="k", ls=":")
    ax[1].set(xlabel="t", title=f"forecast after {args.context} observed steps (recurrent mode)")
    ax[1].legend(fontsize=8)
    ax[2].plot(torch.arange(1, args.horizon + 1), mse_by_h)
    ax[2].axhline(variance, color="k", ls=":", label="variance of the truth")
    ax[2].set(xlabel="forecast step h", ylabel="MSE", title="forecast error vs horizon", yscale="log")
    ax[2].legend()
    fig.tight_layout()
    png = args.out / "sine_waves.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)

    result = {
        "first_loss": sum(losses[:10]) / len(losses[:10]), "last_loss": sum(losses[-10:]) / len(losses[-10:]),
        "val_one_step_mse": one_step, "val_repeat_last_value_mse": repeat_last,
        "forecast_mse_mean": mse_by_h.mean().item(), "forecast_mse_first_16": mse_by_h[:16].mean().item(),
        "truth_variance": variance, "params": sum(p.numel() for p in model.parameters()),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    write_json(args.out / "sine_waves.json", result)
    print(f"train MSE {result['first_loss']:.4f} -> {result['last_loss']:.5f}; held-out one-step MSE {one_step:.5f} "
          f"(repeat-last baseline {repeat_last:.4f})")
    print(f"forecast MSE over {args.horizon} steps: {result['forecast_mse_mean']:.4f} (variance {variance:.4f})")
    print(f"wrote {png} in {result['seconds']} s")
    return result


if __name__ == "__main__":
    main()
