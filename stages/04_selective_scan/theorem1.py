"""Theorem 1 of the Mamba paper, checked numerically.

With N = 1, A = -1, B = 1 and Δ = softplus(Linear(x_t)), the selective SSM
with zero-order hold is the gated recurrence

    h_t = (1 - g_t) h_{t-1} + g_t x_t,     g_t = σ(Linear(x_t)),

because exp(Δ A) = exp(-softplus(z)) = 1 - σ(z) and the ZOH input matrix is
B̄ = (1 - exp(-Δ)) = σ(z). Our operator (like Mamba's kernels) uses the
simpler Euler step B̄ = Δ B, so the ZOH input is obtained by feeding
u_t = x_t (1 - exp(-Δ_t)) / Δ_t; the script checks that this equals the gated
RNN to rounding error in every backend, and also reports how far the plain
Euler operator (u_t = x_t) is from it.

    python stages/04_selective_scan/theorem1.py [--length 500] [--batch 4]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ssmlab.core import selective_scan as ss


def gated_rnn(x: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
    """h_t = (1 - g_t) h_{t-1} + g_t x_t with g_t = σ(gate_logits_t); x, logits: (B, L)."""
    g = torch.sigmoid(gate_logits)
    h, out = torch.zeros_like(x[:, 0]), []
    for t in range(x.shape[1]):
        h = (1 - g[:, t]) * h + g[:, t] * x[:, t]
        out.append(h)
    return torch.stack(out, dim=1)


def selective_ssm(x: torch.Tensor, gate_logits: torch.Tensor, zoh: bool, backend: str) -> torch.Tensor:
    """The N = 1, A = -1, B = C = 1 selective scan with Δ = softplus(gate_logits)."""
    delta = F.softplus(gate_logits)
    u = x * (1 - torch.exp(-delta)) / delta if zoh else x
    one = torch.ones(1, 1, dtype=x.dtype)
    out = ss.selective_scan(u[:, None], gate_logits[:, None], -one, one, one, delta_softplus=True, backend=backend)
    return out[:, 0]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=500, help="L")
    p.add_argument("--batch", type=int, default=4, help="B")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)

    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, args.length, generator=g, dtype=torch.float64)
    w, b = torch.randn(2, generator=g, dtype=torch.float64)  # the Linear(x_t) of the theorem: w x_t + b
    logits = w * x + b
    want = gated_rnn(x, logits)

    results = {"length": args.length, "batch": args.batch, "max_abs_error": {}}
    backends = ["ref", "hillis_steele", "blelloch", "chunked"] + (["cpu"] if ss.has_native(torch.device("cpu")) else [])
    for backend in backends:
        dtype = torch.float32 if backend == "cpu" else torch.float64
        got = selective_ssm(x.to(dtype), logits.to(dtype), zoh=True, backend=backend).double()
        results["max_abs_error"][f"zoh/{backend}/{str(dtype)[6:]}"] = (got - want).abs().max().item()
    euler = selective_ssm(x, logits, zoh=False, backend="ref")
    results["max_abs_error"]["euler_input/ref/float64"] = (euler - want).abs().max().item()
    results["max_abs_state"] = want.abs().max().item()

    for name, err in results["max_abs_error"].items():
        print(f"{name:>28}: max |selective SSM - gated RNN| = {err:.2e}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "theorem1.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
