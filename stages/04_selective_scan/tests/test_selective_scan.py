"""The selective scan: every implementation against the float64 reference.

Inputs are drawn fresh on every run (the seed is in each failure message).
Instead of the full cross product of lengths x N x layouts x options x dtypes
(too slow on a 2-core CPU), `CASES` covers every value of every axis in a few
combined cases, long lengths with small dim and N. Each case compares the
forward output, the last state and the gradients of every tensor argument
(u, delta, A, B, C, D, z, delta_bias, initial_state) under a loss that also
depends on the last state. Runs on CUDA as well where the CUDA backend exists.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssmlab.core import native
from ssmlab.core import selective_scan as ss
from ssmlab.core.testing import assert_close_rel, devices, requires_cuda

SEED = torch.seed() % 2**31
ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


@dataclasses.dataclass(frozen=True)
class Case:
    L: int
    N: int
    layout: str  # 'inv' (dim, N), 'var' (batch, N, L), 'grp' (batch, G, N, L); "inv/var" mixes B / C
    dtype: torch.dtype
    D: bool = True
    z: bool = True
    bias: bool = True
    softplus: bool = True
    h0: bool = True
    batch: int = 2
    dim: int = 4
    groups: int = 2

    def __str__(self) -> str:
        opts = "".join(k[0] for k in ("D", "z", "bias", "softplus", "h0") if getattr(self, k))
        return f"L{self.L}-N{self.N}-{self.layout}-{str(self.dtype)[6:]}-{opts or 'none'}"


CASES = [
    Case(1, 1, "inv", torch.float32),
    Case(2, 4, "var", torch.float16, D=False, z=False, bias=False, softplus=False, h0=False),
    Case(3, 16, "grp", torch.bfloat16, D=False, z=False),
    Case(127, 4, "grp", torch.float32, batch=1, dim=6, groups=3),
    Case(1000, 1, "var", torch.bfloat16, bias=False, h0=False, batch=1, dim=2),
    Case(4097, 4, "inv/var", torch.float32, batch=1, dim=2),
    Case(65, 16, "var/grp", torch.float16, softplus=False, bias=False, dim=4),
    Case(130, 16, "grp", torch.float64, batch=1, dim=2),
]


def _bc(kind: str, c: Case, g: torch.Generator) -> torch.Tensor:
    shape = {"inv": (c.dim, c.N), "var": (c.batch, c.N, c.L), "grp": (c.batch, c.groups, c.N, c.L)}[kind]
    return torch.randn(shape, generator=g, dtype=torch.float64)


def make_inputs(c: Case, seed: int) -> dict:
    """float64 master inputs on the CPU; Δ > 0 and A < 0 keep long scans stable."""
    g = torch.Generator().manual_seed(seed)
    b, d, L, N = c.batch, c.dim, c.L, c.N
    kb, kc = (c.layout.split("/") * 2)[:2] if "/" in c.layout else (c.layout, c.layout)
    x = {
        "u": torch.randn(b, d, L, generator=g, dtype=torch.float64),
        "delta": (torch.randn(b, d, L, generator=g, dtype=torch.float64) - 1.0) if c.softplus
        else 0.02 + 0.2 * torch.rand(b, d, L, generator=g, dtype=torch.float64),
        "A": -(0.2 + torch.rand(d, N, generator=g, dtype=torch.float64)),
        "B": _bc(kb, c, g),
        "C": _bc(kc, c, g),
        "D": torch.randn(d, generator=g, dtype=torch.float64) if c.D else None,
        "z": torch.randn(b, d, L, generator=g, dtype=torch.float64) if c.z else None,
        "delta_bias": 0.1 * torch.randn(d, generator=g, dtype=torch.float64) if c.bias else None,
        "initial_state": torch.randn(b, d, N, generator=g, dtype=torch.float64) if c.h0 else None,
    }
    x["grad_out"] = torch.randn(b, d, L, generator=g, dtype=torch.float64)
    x["grad_last"] = torch.randn(b, d, N, generator=g, dtype=torch.float64)
    return x


def cast(x: dict, dtype: torch.dtype, device: str) -> dict:
    """Activations (and input-dependent B/C) in `dtype`; parameters and state in float32 (float64 for float64)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out = {}
    for k in ARGS:
        t = x[k]
        if t is None:
            out[k] = None
            continue
        activation = k in ("u", "delta", "z") or (k in ("B", "C") and t.dim() > 2)
        out[k] = t.to(dtype if activation else acc).to(device)
    return out


def run(fn, x: dict, softplus: bool, grad_out: torch.Tensor, grad_last: torch.Tensor, **kw):
    """Forward, then backward of <out, grad_out> + <last, grad_last>; returns [out, last, grads...]."""
    ins = {k: (None if t is None else t.detach().clone().requires_grad_()) for k, t in x.items()}
    out, last = fn(**ins, delta_softplus=softplus, return_last_state=True, **kw)
    loss = (out.to(grad_out.dtype) * grad_out).sum() + (last.to(grad_last.dtype) * grad_last).sum()
    loss.backward()
    return [out, last] + [None if t is None else t.grad for t in ins.values()]


@functools.cache
def reference(c: Case, seed: int):
    """The float64 reference on the inputs as rounded to the case's dtype."""
    x = make_inputs(c, seed)
    rounded = {k: (None if t is None else t.to(torch.float64)) for k, t in cast(x, c.dtype, "cpu").items()}
    return run(ss.selective_scan_ref, rounded, c.softplus, x["grad_out"], x["grad_last"])


def backends(device: str, dtype: torch.dtype) -> list[str]:
    names = ["ref", "hillis_steele", "blelloch", "chunked"]
    if dtype != torch.float64:
        names.append(device)  # the native kernel of the device
    return names


def _backend_params():
    for device in ["cpu", "cuda"]:
        for c in CASES:
            for be in backends(device, c.dtype):
                marks = [] if device in devices() else [pytest.mark.skip(reason="needs a CUDA GPU and the CUDA build")]
                yield pytest.param(device, be, c, id=f"{device}-{be}-{c}", marks=marks)


OUTPUTS = ["out", "last_state"] + [f"grad {k}" for k in ARGS]


def assert_matches_reference(got: list, case: Case, label: str) -> None:
    """`run`'s outputs against the float64 reference of the same case and seed, output by output."""
    for name, a, b in zip(OUTPUTS, got, reference(case, SEED)):
        assert (a is None) == (b is None), name
        if a is not None:
            # Gradients of reductions over L (A, D, delta_bias, time-invariant B/C) sum many
            # rounded terms; allow a little more for them in low precision.
            factor = 2.0 if case.dtype in (torch.float16, torch.bfloat16) and name.startswith("grad") else 1.0
            assert_close_rel(a, b, case.dtype, f"{label} {case} {name} (seed {SEED})", factor=factor)


@pytest.mark.parametrize("device,backend,case", list(_backend_params()))
def test_matches_float64_reference(device, backend, case):
    if backend in ("cpu", "cuda") and not ss.has_native(torch.device(device)):
        pytest.skip(f"native selective scan for {device} not built")
    x = make_inputs(case, SEED)
    xs = cast(x, case.dtype, device)
    got = run(ss.selective_scan, xs, case.softplus, x["grad_out"].to(device), x["grad_last"].to(device), backend=backend)
    assert got[0].dtype == case.dtype, "out must have the input dtype"
    assert got[1].dtype == (torch.float64 if case.dtype == torch.float64 else torch.float32), "last state is float32"
    assert_matches_reference(got, case, backend)


# ---------------------------------------------------------------------------
# The CUDA kernels' length split (cuda_length_segments): the same scan
# ---------------------------------------------------------------------------

# Lengths that leave partial chunks and pieces of unequal size; every layout,
# the initial state and the last state's gradient (the split's combine and the
# backward's carry both pass through them).
SPLIT_CASES = [
    Case(1000, 16, "var", torch.float32, batch=2, dim=40),
    Case(777, 16, "var", torch.bfloat16, batch=1, dim=33),
    Case(640, 4, "inv/var", torch.float32, batch=2, dim=8),
    Case(513, 40, "grp", torch.float16, batch=2, dim=8, groups=2),
    Case(900, 16, "var", torch.float32, z=False, D=False, softplus=False, bias=False, h0=False, batch=1, dim=64),
]


@requires_cuda
@pytest.mark.parametrize("segments", [2, 3, 5, 64])
@pytest.mark.parametrize("case", SPLIT_CASES, ids=str)
def test_cuda_length_split_matches_float64_reference(case, segments):
    if not ss.has_native(torch.device("cuda")):
        pytest.skip("native selective scan for cuda not built")
    x = make_inputs(case, SEED)
    xs = cast(x, case.dtype, "cuda")
    gout, glast = x["grad_out"].to("cuda"), x["grad_last"].to("cuda")
    with ss.cuda_length_segments(segments):
        p = ss.cuda_segments_for(case.batch, case.dim, case.L, case.N, case.groups if "grp" in case.layout else 1)
        got = run(ss.selective_scan, xs, case.softplus, gout, glast, backend="cuda")
    n_chunks = -(-case.L // ss.chunk_len(torch.device("cuda")))
    assert 1 < p <= min(segments, n_chunks), f"asked for {segments} pieces of {n_chunks} chunks, got {p}"
    assert_matches_reference(got, case, f"cuda split {segments}")


@requires_cuda
def test_cuda_length_split_is_deterministic():
    if not ss.has_native(torch.device("cuda")):
        pytest.skip("native selective scan for cuda not built")
    case = SPLIT_CASES[0]
    x = make_inputs(case, SEED)
    xs = cast(x, case.dtype, "cuda")
    with ss.cuda_length_segments(4):
        a, b = (run(ss.selective_scan, xs, case.softplus, x["grad_out"].cuda(), x["grad_last"].cuda(), backend="cuda")
                for _ in range(2))
    for name, u, v in zip(OUTPUTS, a, b):
        if u is not None:
            assert torch.equal(u, v), f"{name} differs between two identical split runs"


def test_cuda_length_segments_validates_and_restores():
    with pytest.raises(ValueError, match="n must be an int >= 0"):
        with ss.cuda_length_segments(-1):
            pass
    with pytest.raises(ValueError, match="n must be an int >= 0"):
        with ss.cuda_length_segments(2.0):
            pass
    before = ss._CUDA_SEGMENTS
    with ss.cuda_length_segments(7):
        assert ss._CUDA_SEGMENTS == 7
    assert ss._CUDA_SEGMENTS == before


# ---------------------------------------------------------------------------
# Chunked prefill: the state carried across calls equals one call
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", ["native", "ref", "chunked"])
def test_chunks_with_carried_state_equal_one_call(device, backend):
    if backend == "native":
        backend = device
        if not ss.has_native(torch.device(device)):
            pytest.skip("native selective scan not built")
    c = Case(300, 8, "grp", torch.float32)
    x = make_inputs(c, SEED)
    xs = cast(x, torch.float32, device)
    go, gl = x["grad_out"].float().to(device), x["grad_last"].float().to(device)
    whole = run(ss.selective_scan, xs, True, go, gl, backend=backend)

    def chunked(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, return_last_state, backend):
        outs, h = [], initial_state
        for lo, hi in [(0, 100), (100, 101), (101, 228), (228, 300)]:
            sl = lambda t: t[..., lo:hi]  # noqa: E731
            o, h = ss.selective_scan(sl(u), sl(delta), A, sl(B), sl(C), D, sl(z), delta_bias, delta_softplus,
                                     True, h, backend=backend)
            outs.append(o)
        return torch.cat(outs, dim=-1), h

    parts = run(chunked, xs, True, go, gl, backend=backend)
    for name, a, b in zip(["out", "last_state"] + [f"grad {k}" for k in ARGS], parts, whole):
        assert_close_rel(a, b, torch.float32, f"chunked {backend} {name}", factor=0.1)


# ---------------------------------------------------------------------------
# gradcheck, custom-op checks, torch.compile, determinism
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["ref", "hillis_steele", "blelloch", "chunked"])
@pytest.mark.parametrize("layout", ["inv", "var", "grp"])
def test_gradcheck_float64(backend, layout):
    c = Case(5, 3, layout, torch.float64, batch=2, dim=4, groups=2)
    x = make_inputs(c, SEED)
    names = [k for k in ARGS if x[k] is not None]

    def f(*ts):
        kw = dict(zip(names, ts))
        out, last = ss.selective_scan(**kw, delta_softplus=True, return_last_state=True, backend=backend)
        return out, last

    inputs = tuple(x[k].clone().requires_grad_() for k in names)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def _op_samples(device: str):
    for layout, opts in [("var/grp", True), ("inv", False)]:
        c = Case(70, 4, layout, torch.float32, groups=2, D=opts, z=opts, bias=opts, h0=opts)
        x = cast(make_inputs(c, SEED), torch.float32, device)
        args = ss._normalise(*(x[k] for k in ARGS))
        yield [t.requires_grad_() if t is not None else None for t in args] + [True]


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    if not ss.has_native(torch.device(device)):
        pytest.skip("native selective scan not built")
    for args in _op_samples(device):
        torch.library.opcheck(ss._fwd_op, args)
        out, last, states = ss._fwd_op(*[a.detach() if a is not None and not isinstance(a, bool) else a for a in args])
        bwd_args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        torch.library.opcheck(ss._bwd_op, bwd_args + [states, torch.randn_like(out), torch.randn_like(last)])
        torch.library.opcheck(ss._bwd_op, bwd_args + [states, torch.randn_like(out), None])


@pytest.mark.parametrize("device", devices())
def test_torch_compile_fullgraph(device):
    if not ss.has_native(torch.device(device)):
        pytest.skip("native selective scan not built")
    c = Case(50, 4, "var", torch.float32)
    x = cast(make_inputs(c, SEED), torch.float32, device)

    def f(**kw):
        out, last = ss.selective_scan(**kw, delta_softplus=True, return_last_state=True)
        return out.sum() + last.sum()

    eager = f(**x)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(**x)
    torch.testing.assert_close(compiled, eager)


@pytest.mark.skipif(not ss.has_native(torch.device("cpu")), reason="native module not built")
def test_native_cpu_independent_of_thread_count():
    mod = native.native_module()
    c = Case(200, 8, "grp", torch.float32, batch=2, dim=12, groups=3)
    x = make_inputs(c, SEED)
    xs = cast(x, torch.float32, "cpu")
    before = mod.openmp_max_threads()
    results = []
    try:
        for threads in (1, 3):
            mod.set_openmp_threads(threads)
            results.append(run(ss.selective_scan, xs, True, x["grad_out"].float(), x["grad_last"].float(), backend="cpu"))
    finally:
        mod.set_openmp_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b), "native CPU results depend on the thread count"


def _check_native_cpu(c: Case, seed: int) -> None:
    x = make_inputs(c, seed)
    got = run(ss.selective_scan, cast(x, c.dtype, "cpu"), c.softplus, x["grad_out"], x["grad_last"], backend="cpu")
    for name, a, b in zip(["out", "last_state"] + [f"grad {k}" for k in ARGS], got, reference(c, seed)):
        if a is not None:
            assert_close_rel(a, b, c.dtype, f"cpu {c} {name} (seed {seed})")


@pytest.mark.skipif(not ss.has_native(torch.device("cpu")), reason="native module not built")
@pytest.mark.parametrize("N", [24, 40, 100])
def test_native_cpu_state_sizes(N):
    """The CPU kernel pads N to whole 8-float vectors and splits it into register
    blocks of up to 32 states: N = 24 (3 vectors), 40 and 100 (several blocks)."""
    _check_native_cpu(Case(150, N, "var/grp", torch.float32, batch=1, dim=4), SEED)


@pytest.mark.skipif(not ss.has_native(torch.device("cpu")), reason="native module not built")
def test_native_cpu_portable_kernels():
    """SSMLAB_SELECTIVE_SCAN_ISA=portable forces the kernels built for any CPU
    (instead of AVX2+FMA where the CPU has it); they must pass the same checks."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_selective_scan as t; "
            f"import torch; [t._check_native_cpu(t.Case(L, N, lay, dt), {SEED}) for L, N, lay, dt in "
            f"[(130, 16, 'var', torch.float32), (65, 40, 'inv/grp', torch.bfloat16), (3, 5, 'grp', torch.float16)]]")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "SSMLAB_SELECTIVE_SCAN_ISA": "portable"})
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_auto_backend_resolution():
    u = torch.zeros(1, 2, 3)
    assert ss.resolve_backend(u, "auto") == ("cpu" if ss.has_native(u.device) else "ref")
    assert ss.resolve_backend(u.double(), "auto") == "ref"
    assert ss.resolve_backend(u, "blelloch") == "blelloch"
    with pytest.raises(ValueError, match="unknown backend"):
        ss.resolve_backend(u, "fft")
    if ss.has_native(u.device):
        with pytest.raises(TypeError, match="float64"):
            ss.resolve_backend(u.double(), "cpu")
    with pytest.raises((ValueError, native.BackendUnavailableError)):
        ss.resolve_backend(u, "cuda")  # CPU tensors never run on the CUDA backend


# ---------------------------------------------------------------------------
# Bad inputs raise errors that name the argument
# ---------------------------------------------------------------------------


def _good():
    b, d, L, N = 2, 4, 5, 3
    return dict(u=torch.randn(b, d, L), delta=torch.rand(b, d, L), A=-torch.rand(d, N), B=torch.randn(b, N, L),
                C=torch.randn(d, N), D=torch.randn(d), z=torch.randn(b, d, L), delta_bias=torch.randn(d),
                initial_state=torch.randn(b, d, N))


def _nan(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


BAD = [
    ("u", lambda g: g["u"][0], ValueError, "u must be"),
    ("u", lambda g: g["u"][..., :0], ValueError, "at least one time step"),
    ("u", lambda g: g["u"].int(), TypeError, "u has dtype"),
    ("u", lambda g: [1.0], TypeError, "u must be a torch.Tensor"),
    ("delta", lambda g: g["delta"][..., :4], ValueError, "delta must have"),
    ("delta", lambda g: g["delta"].double(), TypeError, "delta is torch.float64"),
    ("z", lambda g: g["z"][:1], ValueError, "z must have"),
    ("A", lambda g: g["A"][:3], ValueError, "A must be"),
    ("A", lambda g: g["A"].to(torch.complex64), TypeError, "A is complex"),
    ("A", lambda g: _nan(g["A"]), ValueError, "A has non-finite"),
    ("B", lambda g: g["B"][..., :4], ValueError, "B must be"),
    ("B", lambda g: g["B"].unsqueeze(1).expand(2, 3, 3, 5), ValueError, "B has 3 groups"),
    ("B", lambda g: g["B"].half(), TypeError, "input-dependent B"),
    ("B", lambda g: torch.randn(2, 2, 2, 3, 5), ValueError, "B must be"),
    ("C", lambda g: g["C"][:, :2], ValueError, "time-invariant C"),
    ("C", lambda g: _nan(g["C"]), ValueError, "C has non-finite"),
    ("D", lambda g: g["D"][:3], ValueError, "D must be"),
    ("D", lambda g: _nan(g["D"]), ValueError, "D has non-finite"),
    ("delta_bias", lambda g: g["delta_bias"][None], ValueError, "delta_bias must be"),
    ("delta_bias", lambda g: g["delta_bias"].fill_(float("inf")), ValueError, "delta_bias has non-finite"),
    ("initial_state", lambda g: g["initial_state"][..., :2], ValueError, "initial_state must be"),
    ("initial_state", lambda g: _nan(g["initial_state"]), ValueError, "initial_state has non-finite"),
    ("initial_state", lambda g: g["initial_state"].to("meta"), ValueError, "initial_state is on meta"),
]


@pytest.mark.parametrize("arg,make,exc,match", BAD, ids=[f"{a}-{m}" for a, _, _, m in BAD])
def test_bad_inputs_name_the_argument(arg, make, exc, match):
    g = _good()
    g[arg] = make(g)
    with pytest.raises(exc, match=match):
        ss.selective_scan(**g, delta_softplus=True)


def test_groups_must_match_between_B_and_C():
    g = _good()
    g["B"] = torch.randn(2, 2, 3, 5)
    g["C"] = torch.randn(2, 4, 3, 5)
    with pytest.raises(ValueError, match="B has 2 groups but C has 4"):
        ss.selective_scan(**g)


@requires_cuda
def test_auto_backend_falls_back_for_states_the_cuda_kernel_cannot_hold():
    u = torch.randn(1, 2, 3, device="cuda")
    assert ss.resolve_backend(u, "auto", dstate=ss.CUDA_MAX_DSTATE) == "cuda"
    assert ss.resolve_backend(u, "auto", dstate=ss.CUDA_MAX_DSTATE + 1) == "ref"
