"""Selection made visible, and what it adds: S6 (selective) vs S4 (time-invariant).

Trains two small models of identical shape on selective copying (data tokens
at random positions among noise, to be repeated in order after the context):
one whose SSM has input-dependent Δ, B, C (the Mamba mixer, our selective
scan) and one whose Δ, B, C are fixed parameters (the LTI mixer: an S4D
convolution). Then it draws, for a few test sequences, the step size Δ_t of
the selective model's first layer (its most selective channels): large Δ on the tokens
to keep (the state is overwritten with the input), small Δ on noise (the
state is carried through unchanged).

    python stages/04_selective_scan/selectivity.py [--steps 400] [--seq-len 64]

Writes results/selectivity.json, selectivity_delta.png, s4_vs_s6.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ssmlab.core.mamba import MambaLMHeadModel, preset
from ssmlab.datasets import synthetic


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=24, help="context length L")
    p.add_argument("--n-tokens", type=int, default=2, help="data tokens to copy")
    p.add_argument("--vocab-size", type=int, default=6, help="V: noise, marker and V-2 data symbols")
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--d-state", type=int, default=16, help="N")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    return p.parse_args(argv)


def make_model(args, mixer: str) -> MambaLMHeadModel:
    torch.manual_seed(args.seed)
    cfg = preset("tiny", mixer=mixer, d_model=args.d_model, n_layer=args.n_layer, d_state=args.d_state,
                 vocab_size=args.vocab_size)
    return MambaLMHeadModel(cfg)


def train(model, args, desc: str) -> list[dict]:
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed + 1)
    test_x, test_y = synthetic.selective_copying(128, args.seq_len, args.n_tokens, args.vocab_size,
                                                 generator=torch.Generator().manual_seed(12345))
    log = []
    for step in tqdm(range(1, args.steps + 1), desc=desc):
        x, y = synthetic.selective_copying(args.batch_size, args.seq_len, args.n_tokens, args.vocab_size, generator=g)
        logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=synthetic.IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, args.steps // 10) == 0 or step == args.steps:
            with torch.no_grad():
                acc = synthetic.answer_accuracy(model(test_x), test_y).item()
            log.append({"step": step, "loss": loss.item(), "test_token_accuracy": acc})
    return log


@torch.no_grad()
def delta_of_first_layer(model, x: torch.Tensor) -> torch.Tensor:
    """Δ_t = softplus(dt_proj(x_proj(x)) + bias) of layer 0, every channel: (B, L, ED)."""
    mixer = model.backbone.layers[0].mixer
    seen = {}
    handle = mixer.x_proj.register_forward_hook(lambda mod, inp, out: seen.__setitem__("x_dbl", out))
    model(x)
    handle.remove()
    R = mixer.cfg.dt_rank
    dt = seen["x_dbl"][..., :R] @ mixer.dt_proj.weight.T + mixer.dt_proj.bias  # (B, L, ED)
    return F.softplus(dt)


def plot_delta(delta: torch.Tensor, x: torch.Tensor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 0.6 * delta.shape[0] + 1.2))
    im = ax.imshow(delta.numpy(), aspect="auto", cmap="magma")
    for i in range(x.shape[0]):
        cols = (x[i] >= 2).nonzero().flatten().tolist()
        ax.scatter(cols, [i] * len(cols), marker="v", s=30, c="cyan", label="data token" if i == 0 else None)
        markers = (x[i] == synthetic.MARKER).nonzero().flatten().tolist()
        ax.scatter(markers, [i] * len(markers), marker="s", s=14, c="white", label="marker" if i == 0 else None)
    ax.set_xlabel("position t")
    ax.set_ylabel("example")
    ax.set_title("selective copying: step size Δ_t of the first S6 layer (mean of its 8 most selective channels)")
    fig.colorbar(im, ax=ax, label="Δ")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_curves(logs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, log in logs.items():
        ax.plot([r["step"] for r in log], [r["test_token_accuracy"] for r in log], marker="o", label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel("test token accuracy")
    ax.set_title("selective copying: S4 (LTI) vs S6 (selective)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    logs, seconds = {}, {}
    models = {}
    for name, mixer in (("S6 (selective)", "mamba"), ("S4 (time-invariant)", "s4d")):
        t0 = time.perf_counter()
        models[name] = make_model(args, mixer)
        logs[name] = train(models[name], args, name)
        seconds[name] = time.perf_counter() - t0
    x, _ = synthetic.selective_copying(6, args.seq_len, args.n_tokens, args.vocab_size,
                                       generator=torch.Generator().manual_seed(7))
    delta = delta_of_first_layer(models["S6 (selective)"], x)[:, : args.seq_len]  # (B, L, ED), the context
    data = x[:, : args.seq_len] >= 2
    # Per channel: mean Δ on data tokens over mean Δ on noise. Channels specialise,
    # so the heat map shows the mean over the 8 most selective channels.
    ratio = delta[data].mean(0) / delta[~data].mean(0)  # (ED,)
    top = ratio.topk(min(8, ratio.numel())).indices
    plot_delta(delta[..., top].mean(-1), x[:, : args.seq_len], args.out / "selectivity_delta.png")
    plot_curves(logs, args.out / "s4_vs_s6.png")
    result = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "final_test_token_accuracy": {k: v[-1]["test_token_accuracy"] for k, v in logs.items()},
              "delta_data_over_noise": {"all_channels_mean": (delta[data].mean() / delta[~data].mean()).item(),
                                        "top8_channels": ratio[top].tolist(),
                                        "channels_above_2x": int((ratio > 2).sum()), "channels": ratio.numel()},
              "train_seconds": seconds, "log": logs}
    (args.out / "selectivity.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("final_test_token_accuracy", "delta_data_over_noise")}, indent=1))
    return result


if __name__ == "__main__":
    main()
