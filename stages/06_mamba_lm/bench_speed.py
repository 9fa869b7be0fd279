"""Speed and memory of Mamba against the Transformer baseline at equal parameters (~130M by default).

Three measurements (CUDA events and medians on GPU; wall clock on CPU):

1. ``train``: training throughput (tokens/s) and peak memory of one optimizer
   step (forward, backward, AdamW; bf16 autocast on GPU) at L in
   {1024, 4096, 16384, 65536}, the batch set to keep B * L (tokens per step)
   constant. Out-of-memory is caught and reported, not fatal. With
   ``--compile`` each model is timed again with its body through
   ``torch.compile`` (rows ``<model>+compile``; the compiled loss is checked
   against the eager one on the same batch before timing).
2. ``gen``: generation throughput at batch {1, 16, 64}: a 2048-token prompt
   (prefill) then 256 greedy tokens; tokens/s = B * 256 / (prefill + decoding),
   and the decoding steps alone. Weights in bf16 on GPU. On CUDA, extra rows
   ``mamba-graph`` decode Mamba through one captured CUDA graph per batch
   size (`StaticMambaStep`, captured before timing, as a server would); the
   Transformer's growing KV cache is not captured (eager only).
3. ``memory``: memory against context length L at batch 1: the inference
   state after a prefill of L tokens (Mamba: conv + SSM state, constant; the
   Transformer: its KV cache, linear in L), the peak memory of that prefill,
   and the peak memory of one training step at batch 1.

Both models go through identical loops; the loss computes the vocabulary head
in chunks under activation checkpointing (the (B L, V) logits of a 50K-token
vocabulary would otherwise dominate the memory of both models equally and hide
the mixers' difference).

    python stages/06_mamba_lm/bench_speed.py --quick              # CPU, tiny models, seconds
    python stages/06_mamba_lm/bench_speed.py --sections train     # the H100 table (see gpu_runs_part2.sh)

Writes ``OUT/bench_<section>.json`` (merged with earlier runs of other
sections or models), a Markdown table ``OUT/bench_speed.md`` and PNGs.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ssmlab.core.checkpoint import atomic_write_text
from ssmlab.core.mamba import MambaConfig, MambaLMHeadModel, param_count as mamba_params, preset
from ssmlab.core.timing import Timer
from ssmlab.core.training import TrainConfig, make_optimizer
from ssmlab.core.transformer import build_matched_lm, match_mamba, param_count as transformer_params

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "bench"
MODELS = ("mamba", "transformer")
PLOTTED = ("mamba", "mamba-graph", "transformer")  # gen rows may also hold Mamba decoding through a CUDA graph


# --------------------------------------------------------------------------- timing and memory


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> Optional[float]:
    """Peak allocated memory since the last reset (GPU only; None on CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


# --------------------------------------------------------------------------- models


def hidden_states(model, ids, caches=None):
    """(B, L, D) normalised hidden states before the head, for either model."""
    if isinstance(model, MambaLMHeadModel):
        return model.backbone(ids, caches)
    return model.hidden_states(ids, caches)


def chunked_lm_loss(model, x, y, V: int, chunk_tokens: int = 8192, hidden=None):
    """Mean cross-entropy with the head computed `chunk_tokens` at a time under checkpointing.

    Same value and gradient as ``F.cross_entropy(model(x)[..., :V], y)``; only one
    chunk's logits live at a time. `hidden`: a replacement for
    ``hidden_states(model, .)`` (a compiled one).
    """
    h = (hidden or (lambda ids: hidden_states(model, ids)))(x).flatten(0, 1)  # (B L, D)
    targets = y.flatten()
    weight = model.lm_head.weight

    acc = torch.promote_types(h.dtype, torch.float32)  # float32 at least (float64 stays, for the test)

    def piece(h_chunk, t_chunk):
        logits = F.linear(h_chunk, weight)[:, :V].to(acc)
        return F.cross_entropy(logits, t_chunk, reduction="sum")

    total = h.new_zeros((), dtype=acc)
    for start in range(0, h.shape[0], chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        total = total + checkpoint(piece, h[sl], targets[sl], use_reentrant=False)
    return total / targets.numel()


# --------------------------------------------------------------------------- 1. training


def bench_train(name, mcfg, lengths, tokens_per_step, device, timer, warmup, repeats, log, compile=False,
                profile_dir: Optional[Path] = None) -> list[dict]:
    """Training rows of one model; `compile`: its body through torch.compile (rows named '<model>+compile').

    `profile_dir`: after timing each length, run two more steps under torch.profiler and
    write its table (operators and kernels by device time) to ``profile_<model>_L<L>.txt``.
    """
    rows = []
    torch.manual_seed(0)
    model, n_params, _ = build_matched_lm(name, mcfg, device=device)
    # dynamic=False: one graph per length, as a training run at one length would have
    hidden = torch.compile(lambda ids: hidden_states(model, ids), dynamic=False) if compile else None
    label = f"{name}+compile" if compile else name
    opt = make_optimizer(model, TrainConfig(lr=1e-4, max_steps=10, warmup_steps=0))
    amp = device.type == "cuda"
    V = mcfg.vocab_size
    for L in lengths:
        B = tokens_per_step // L
        row = {"section": "train", "model": label, "params": n_params, "L": L, "batch": B, "tokens_per_step": B * L}
        if B < 1:
            row.update(status="skipped", error=f"tokens_per_step {tokens_per_step} < L")
            rows.append(row)
            continue
        x = torch.randint(0, V, (B, L), device=device)
        y = torch.randint(0, V, (B, L), device=device)

        if hidden is not None:  # the compiled body must give the eager loss before it is timed
            # with autograd on, as in the timed steps, so this compiles the very graph they reuse
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                eager, compiled = chunked_lm_loss(model, x, y, V).item(), chunked_lm_loss(model, x, y, V, hidden=hidden).item()
            row["compile_loss_rel_diff"] = abs(compiled - eager) / abs(eager)
            if row["compile_loss_rel_diff"] > (2e-2 if amp else 1e-4):
                raise RuntimeError(f"{label} at L = {L}: compiled loss {compiled} differs from eager {eager}")

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = chunked_lm_loss(model, x, y, V, hidden=hidden)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        reset_memory(device)
        try:
            times = timer(step, warmup, repeats)
            med = statistics.median(times)
            row.update(status="ok", step_s=med, tokens_per_s=B * L / med, peak_gib=peak_gib(device),
                       times_s=times)
            if profile_dir is not None:
                profile_steps(step, device, profile_dir / f"profile_{label}_L{L}.txt", f"{label} L={L} B={B}")
        except RuntimeError as err:
            if not is_oom(err):
                raise
            row.update(status="OOM", error=str(err).splitlines()[0][:200], peak_gib=peak_gib(device))
        opt.zero_grad(set_to_none=True)
        x = y = None
        reset_memory(device)
        log(row)
        rows.append(row)
    del model, opt
    reset_memory(device)
    return rows


def profile_steps(step, device: torch.device, path: Path, title: str, steps: int = 2) -> None:
    """Where a training step's time goes: `steps` steps under torch.profiler, table sorted by device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=60, max_name_column_width=90)
    atomic_write_text(f"===== {title}, {steps} steps\n{table}\n\n{elementwise_by_caller(prof, device)}", path)
    print(f"profile -> {path}", flush=True)


ELEMENTWISE = ("aten::copy_", "aten::add_", "aten::add", "aten::fill_", "aten::zero_", "aten::mul", "aten::sum")


def elementwise_by_caller(prof, device: torch.device, depth: int = 3, rows: int = 30) -> str:
    """Time of copies, adds, fills, products and sums grouped by the operators that called them.

    The first table says how much time goes to `aten::copy_`; this one says *which* copy
    (the chain of parent operators, autograd nodes included, e.g. ``aten::to <
    _TokensToChannelsBackward``).
    """
    from collections import defaultdict

    cuda = device.type == "cuda"
    total, calls = defaultdict(float), defaultdict(int)
    for e in prof.events():
        if e.name not in ELEMENTWISE:
            continue
        chain, parent = [], e.cpu_parent
        while parent is not None and len(chain) < depth:
            chain.append(parent.name.replace("autograd::engine::evaluate_function: ", ""))
            parent = parent.cpu_parent
        key = " < ".join([e.name, *chain])
        us = getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0)) if cuda else e.self_cpu_time_total
        total[key] += us
        calls[key] += 1
    lines = [f"===== elementwise operators by caller ({'device' if cuda else 'CPU'} time, all profiled steps)",
             f"{'ms':>9} {'calls':>6}  operator < callers"]
    for key in sorted(total, key=total.get, reverse=True)[:rows]:
        lines.append(f"{total[key] / 1e3:9.2f} {calls[key]:6d}  {key}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- 2. generation


class StaticMambaStep:
    """Mamba's decoding step on fixed buffers, captured once in a CUDA graph and replayed.

    A Mamba layer's state has a fixed shape, so one step is a fixed sequence of
    kernels: capturing it removes the per-kernel launch cost that dominates
    small steps. `Mamba.step` updates each layer's cache tensors in place (the
    fused decoding kernels of `ssmlab.core.decode_step`), so the tensors
    allocated here are the state from one replay to the next. The
    Transformer's KV cache grows by one position per step, so its step cannot
    be captured this simply. Without `capture` (CPU, tests) the same buffer
    logic runs eagerly.
    """

    @torch.no_grad()  # captured with autograd on, the step would record graph nodes and take the unfused path
    def __init__(self, model: MambaLMHeadModel, batch: int, capture: bool):
        self.model = model
        self.caches = model.allocate_cache(batch)
        self.static = [(c.conv_state, c.ssm_state) for c in self.caches]
        self.token = torch.zeros(batch, dtype=torch.long, device=self.static[0][0].device)
        self.graph = None
        if capture:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):  # warm-up outside the graph (allocator, lazy init)
                for _ in range(2):
                    self._run()
            torch.cuda.current_stream().wait_stream(s)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._run()

    def _run(self) -> torch.Tensor:
        logits = self.model.step(self.token, self.caches)
        # A step that rebound a cache tensor instead of writing into it would be
        # replayed from stale buffers; the check is Python only (not captured).
        if any(c.conv_state is not conv or c.ssm_state is not ssm for c, (conv, ssm) in zip(self.caches, self.static)):
            raise RuntimeError("StaticMambaStep: model.step replaced a cache tensor instead of updating it in place")
        return logits

    def load(self, caches) -> None:
        """Continue from `caches` (e.g. just prefilled): copy their state into the static buffers."""
        for c, (conv, ssm) in zip(caches, self.static):
            conv.copy_(c.conv_state)
            ssm.copy_(c.ssm_state)

    @torch.no_grad()
    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        self.token.copy_(token)
        if self.graph is None:
            return self._run()
        self.graph.replay()
        return self.logits


@torch.no_grad()
def greedy_generate(model, prompt: torch.Tensor, new_tokens: int, V: int, max_seqlen: int,
                    static_step: Optional[StaticMambaStep] = None):
    """Prefill then `new_tokens` greedy steps, the same loop for both models; returns (ids, caches).

    static_step: decode Mamba through a `StaticMambaStep` (CUDA graph) instead of `model.step`.
    """
    B = prompt.shape[0]
    caches = (model.allocate_cache(B) if isinstance(model, MambaLMHeadModel)
              else model.allocate_cache(B, max_seqlen=max_seqlen))
    h = hidden_states(model, prompt, caches)[:, -1]  # (B, D): only the last position needs logits
    token = model.lm_head(h)[:, :V].argmax(-1)
    out = [token]
    if static_step is not None:
        static_step.load(caches)
        caches = static_step.caches
    for _ in range(new_tokens - 1):
        logits = model.step(token, caches) if static_step is None else static_step(token)
        token = logits[:, :V].argmax(-1)
        out.append(token)
    return torch.stack(out, 1), caches


def state_bytes(caches) -> int:
    return sum(c.nbytes() for c in caches)


def bench_gen(name, mcfg, batches, prompt_len, new_tokens, device, timer, warmup, repeats, log,
              graph: bool = False) -> list[dict]:
    """Generation rows for `name`; with `graph` (Mamba only) the decoding steps replay a CUDA graph."""
    rows = []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model, n_params, _ = build_matched_lm(name, mcfg, device=device, dtype=dtype)
    model.eval()
    V = mcfg.vocab_size
    for B in batches:
        row = {"section": "gen", "model": name + ("-graph" if graph else ""), "params": n_params, "batch": B,
               "prompt": prompt_len, "new_tokens": new_tokens, "dtype": str(dtype).replace("torch.", "")}
        prompt = torch.randint(0, V, (B, prompt_len), device=device)
        reset_memory(device)
        try:
            static = StaticMambaStep(model, B, capture=device.type == "cuda") if graph else None  # captured once, untimed

            def run(n):
                return greedy_generate(model, prompt, n, V, prompt_len + n, static)

            full = timer(lambda: run(new_tokens), warmup, repeats)
            first = timer(lambda: run(1), 0, repeats)
            _, caches = run(new_tokens)
            t_full, t_first = statistics.median(full), statistics.median(first)
            row.update(status="ok", total_s=t_full, prefill_s=t_first, tokens_per_s=B * new_tokens / t_full,
                       decode_tokens_per_s=B * (new_tokens - 1) / (t_full - t_first) if t_full > t_first else None,
                       state_mib=state_bytes(caches) / 2**20, peak_gib=peak_gib(device))
            del caches
        except RuntimeError as err:
            if not is_oom(err) and not graph:
                raise
            row.update(status="OOM" if is_oom(err) else "error", error=str(err).splitlines()[0][:200])
        prompt = static = None
        reset_memory(device)
        log(row)
        rows.append(row)
    del model
    reset_memory(device)
    return rows


# --------------------------------------------------------------------------- 3. memory against context


def bench_memory(name, mcfg, lengths, device, log) -> list[dict]:
    rows = []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    V = mcfg.vocab_size
    torch.manual_seed(0)
    model, n_params, _ = build_matched_lm(name, mcfg, device=device, dtype=dtype)
    model.eval()
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    for L in lengths:
        row = {"section": "memory", "model": name, "params": n_params, "L": L, "batch": 1, "weights_gib": weights_gib}
        ids = torch.randint(0, V, (1, L), device=device)
        reset_memory(device)
        try:
            _, caches = greedy_generate(model, ids, 2, V, L + 2)
            row.update(status="ok", state_mib=state_bytes(caches) / 2**20, infer_peak_gib=peak_gib(device))
            del caches
        except RuntimeError as err:
            if not is_oom(err):
                raise
            row.update(status="OOM", error=str(err).splitlines()[0][:200])
        reset_memory(device)
        log(row)
        rows.append(row)
    del model
    reset_memory(device)
    # training at batch 1: activations grow with L
    model, _, _ = build_matched_lm(name, mcfg, device=device)
    for row in rows:
        L = row["L"]
        x = torch.randint(0, V, (1, L), device=device)
        reset_memory(device)
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = chunked_lm_loss(model, x, x, V)
            loss.backward()
            row["train_peak_gib"] = peak_gib(device)
        except RuntimeError as err:
            if not is_oom(err):
                raise
            row["train_peak_gib"] = "OOM"
        model.zero_grad(set_to_none=True)
        loss = None
        reset_memory(device)
    del model
    reset_memory(device)
    return rows


# --------------------------------------------------------------------------- reporting


def load_rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())["rows"] if path.exists() else []


def merge(old: list[dict], new: list[dict], keys: tuple) -> list[dict]:
    """Rows of `new` replace rows of `old` with the same key values."""
    index = {tuple(r.get(k) for k in keys): r for r in old}
    for r in new:
        index[tuple(r.get(k) for k in keys)] = r
    def order(r):
        return tuple((0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)) for v in (r.get(k) for k in keys))

    return sorted(index.values(), key=order)


def fmt(v, spec=".3g") -> str:
    if v is None:
        return "-"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def ratio(rows, x_key, value_key, x, mamba: str = "mamba", transformer: str = "transformer") -> Optional[float]:
    m = next((r for r in rows if r["model"] == mamba and r.get(x_key) == x and r.get("status") == "ok"), None)
    t = next((r for r in rows if r["model"] == transformer and r.get(x_key) == x and r.get("status") == "ok"), None)
    return m[value_key] / t[value_key] if m and t else None


def markdown(train_rows, gen_rows, mem_rows, meta) -> str:
    lines = [f"Device: {meta['device_name']}; torch {meta['torch']}; Mamba config {meta['mamba_config']}; "
             f"params: {meta['params']}", ""]
    if train_rows:
        lines += ["| model | L | batch | tokens/s | step (ms) | peak memory (GiB) | status |", "|---|---|---|---|---|---|---|"]
        for r in train_rows:
            lines.append(f"| {r['model']} | {r['L']} | {r['batch']} | {fmt(r.get('tokens_per_s'), ',.0f')} | "
                         f"{fmt(r['step_s'] * 1e3 if r.get('step_s') else None, '.1f')} | {fmt(r.get('peak_gib'), '.2f')} | {r['status']} |")
        for L in sorted({r["L"] for r in train_rows}):
            q = ratio(train_rows, "L", "tokens_per_s", L)
            if q:
                lines.append(f"\nTraining throughput Mamba / Transformer at L = {L}: {q:.2f}x")
            q = ratio(train_rows, "L", "tokens_per_s", L, "mamba+compile", "transformer+compile")
            if q:
                lines.append(f"\nTraining throughput, both compiled, Mamba / Transformer at L = {L}: {q:.2f}x")
        lines.append("")
    if gen_rows:
        lines += ["| model | batch | tokens/s (prefill + decode) | decode tokens/s | prefill (ms) | state (MiB) | peak (GiB) | status |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in gen_rows:
            lines.append(f"| {r['model']} | {r['batch']} | {fmt(r.get('tokens_per_s'), ',.0f')} | "
                         f"{fmt(r.get('decode_tokens_per_s'), ',.0f')} | {fmt(r['prefill_s'] * 1e3 if r.get('prefill_s') else None, '.1f')} | "
                         f"{fmt(r.get('state_mib'), '.3f')} | {fmt(r.get('peak_gib'), '.2f')} | {r['status']} |")
        for B in sorted({r["batch"] for r in gen_rows}):
            for variant in ("mamba", "mamba-graph"):
                q = ratio(gen_rows, "batch", "tokens_per_s", B, variant)
                if q:
                    lines.append(f"\nGeneration throughput {variant} / transformer at batch {B}: {q:.2f}x")
        lines.append("")
    if mem_rows:
        lines += ["| model | L | inference state (MiB) | prefill peak (GiB) | training peak, batch 1 (GiB) |", "|---|---|---|---|---|"]
        for r in mem_rows:
            lines.append(f"| {r['model']} | {r['L']} | {fmt(r.get('state_mib'), '.3f')} | {fmt(r.get('infer_peak_gib'), '.2f')} | "
                         f"{fmt(r.get('train_peak_gib'), '.2f')} |")
        for name in MODELS:
            slope = loglog_slope([(r["L"], r.get("train_peak_gib")) for r in mem_rows if r["model"] == name])
            if slope is not None:
                lines.append(f"\n{name}: training memory at batch 1 grows as L^{slope:.2f} (log-log slope over the larger half of L)")
    return "\n".join(lines) + "\n"


def loglog_slope(points) -> Optional[float]:
    """Slope of log(value) against log(L) over the larger half of the L (where activations dominate weights)."""
    pts = sorted((L, v) for L, v in points if isinstance(v, (int, float)) and v > 0)
    pts = pts[len(pts) // 2 - (1 if len(pts) % 2 == 0 and len(pts) > 2 else 0):] if len(pts) > 2 else pts
    if len(pts) < 2:
        return None
    xs, ys = [math.log(L) for L, _ in pts], [math.log(v) for _, v in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else None


def plot(out: Path, train_rows, gen_rows, mem_rows, device_name: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        paths.append(out / name)

    def panel(ax, rows, x, y, xlabel, ylabel, title, logy=False) -> None:
        """One curve per model; an empty panel says so instead of failing on log axes."""
        drawn = False
        for name in PLOTTED:
            pts = [(r[x], r[y]) for r in rows if r["model"] == name and isinstance(r.get(y), (int, float))]
            if pts:
                ax.plot(*zip(*pts), "o-", label=name)
                drawn = True
            for r in rows:
                if r["model"] == name and r.get("status") == "OOM" and x in r:
                    ax.axvline(r[x], color="C1" if name == "transformer" else "C0", ls=":", lw=1)
                    ax.text(r[x], 0.5, f"{name} OOM", rotation=90, transform=ax.get_xaxis_transform(), fontsize=7)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        if drawn:
            ax.set_xscale("log", base=2)
            if logy:
                ax.set_yscale("log")
            ax.legend()
        else:
            ax.text(0.5, 0.5, "not measured here (GPU only)", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)

    if train_rows:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        panel(axes[0], train_rows, "L", "tokens_per_s", "sequence length L (B x L constant)", "training tokens/s",
              f"training throughput ({device_name})")
        panel(axes[1], train_rows, "L", "peak_gib", "sequence length L (B x L constant)", "peak memory (GiB)",
              "training peak memory")
        save(fig, "train_speed.png")
    if gen_rows:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        panel(ax, gen_rows, "batch", "tokens_per_s", "batch size", "generated tokens/s (prefill + decode)",
              f"generation throughput ({device_name})", logy=True)
        save(fig, "gen_throughput.png")
    if mem_rows:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        panel(axes[0], mem_rows, "L", "state_mib", "context length L", "inference state (MiB)",
              "generation state after L tokens (batch 1)", logy=True)
        panel(axes[1], mem_rows, "L", "train_peak_gib", "sequence length L", "peak memory (GiB)",
              "training step at batch 1", logy=True)
        save(fig, "memory_vs_context.png")
    return paths


# --------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models and sizes on CPU (a smoke test, seconds)")
    p.add_argument("--sections", nargs="+", choices=["train", "gen", "memory"], default=["train", "gen", "memory"])
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--size", default="130m", help="Mamba preset (the Transformer is matched to it)")
    p.add_argument("--vocab-size", type=int, default=50277, help="V (GPT-NeoX tokenizer: 50277)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536], help="training L")
    p.add_argument("--tokens-per-step", type=int, default=65536, help="B x L of each training step")
    p.add_argument("--gen-batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--no-graph", action="store_true",
                   help="gen: skip the extra Mamba rows that decode through a CUDA graph (they run on CUDA only)")
    p.add_argument("--graph-only", action="store_true",
                   help="gen: time Mamba's decoding only through the CUDA graph (skip its slow eager rows)")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--mem-lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536, 131072])
    p.add_argument("--compile", action="store_true",
                   help="train: also time each model with its body through torch.compile (rows '<model>+compile')")
    p.add_argument("--profile", action="store_true",
                   help="train: also profile two steps per row (torch.profiler) into OUT/profile_<model>_L<L>.txt")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--gen-warmup", type=int, default=1, help="gen: warm-up generations per row (eager ones take seconds)")
    p.add_argument("--gen-repeats", type=int, default=3, help="gen: timed generations per row")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    if p.parse_known_args(argv)[0].quick:  # tiny defaults; flags given explicitly still win
        p.set_defaults(size="tiny", vocab_size=256, lengths=[32, 64, 128], tokens_per_step=256, gen_batches=[1, 4],
                       prompt_len=32, new_tokens=8, mem_lengths=[32, 64, 128], warmup=1, repeats=2, gen_warmup=1,
                       gen_repeats=2, device="cpu",
                       out=str(DEFAULT_OUT / "quick"))
    args = p.parse_args(argv)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    mcfg = preset(args.size, vocab_size=args.vocab_size)
    tcfg = match_mamba(mcfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
            "torch": torch.__version__, "mamba_config": f"{args.size} (n_layer {mcfg.n_layer}, d_model {mcfg.d_model})",
            "transformer_config": tcfg.to_dict(),
            "params": {"mamba": mamba_params(mcfg), "transformer": transformer_params(tcfg)}, "quick": args.quick}
    timer = Timer(device)

    def log(row):
        keep = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items() if k != "times_s"}
        print(json.dumps(keep), flush=True)

    keys = {"train": ("model", "L"), "gen": ("model", "batch"), "memory": ("model", "L")}
    for section in args.sections:
        new = []
        for name in args.models:
            if section == "train":
                new += bench_train(name, mcfg, args.lengths, args.tokens_per_step, device, timer, args.warmup, args.repeats, log,
                                   profile_dir=out if args.profile else None)
                if args.compile:
                    new += bench_train(name, mcfg, args.lengths, args.tokens_per_step, device, timer, args.warmup,
                                       args.repeats, log, compile=True)
            elif section == "gen":
                graph = name == "mamba" and device.type == "cuda" and not args.no_graph
                if not (graph and args.graph_only):
                    new += bench_gen(name, mcfg, args.gen_batches, args.prompt_len, args.new_tokens, device, timer,
                                     args.gen_warmup, args.gen_repeats, log)
                if graph:
                    new += bench_gen(name, mcfg, args.gen_batches, args.prompt_len, args.new_tokens, device, timer,
                                     args.gen_warmup, args.gen_repeats, log, graph=True)
            else:
                new += bench_memory(name, mcfg, args.mem_lengths, device, log)
        path = out / f"bench_{section}.json"
        rows = merge(load_rows(path), new, keys[section])
        atomic_write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n", path)
    all_rows = {s: load_rows(out / f"bench_{s}.json") for s in keys}
    table = markdown(all_rows["train"], all_rows["gen"], all_rows["memory"], meta)
    atomic_write_text(table, out / "bench_speed.md")
    paths = plot(out, all_rows["train"], all_rows["gen"], all_rows["memory"], meta["device_name"])
    print(table)
    print("wrote", ", ".join(str(p) for p in [out / "bench_speed.md", *paths]))
    return all_rows


if __name__ == "__main__":
    main()
