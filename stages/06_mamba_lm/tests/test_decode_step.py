"""The fused single-token decoding steps (`ssmlab.core.decode_step`) against their float64 references.

Inputs are drawn fresh on every run (the seed is in each failure message).
Every native backend (CPU, and CUDA where it exists) runs the full grid of
sizes B x C x N (or K) x dtype; the optional arguments are cycled inside each
case. Then the identities: steps of the conv equal the causal convolution of
the sequence, steps of the SSM equal the selective scan; then dispatch,
errors, torch.compile and the Mamba block's step.
"""

from __future__ import annotations

import itertools
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ssmlab.core import decode_step as ds
from ssmlab.core import native
from ssmlab.core.selective_scan import selective_scan
from ssmlab.core.testing import load_script, requires_cuda, requires_native

SEED = torch.seed() % 2**31
BATCHES, CHANNELS, STATES, WIDTHS = (1, 3, 17), (1, 5, 64, 130), (1, 4, 16, 33), (2, 4)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Relative error of an output against float64: float32 arithmetic, then the
# rounding of the output to its dtype (bfloat16 keeps 8 bits, float16 11).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
STATE_TOL = 1e-5  # the SSM state is float32 whatever the inputs

DEVICES = [
    pytest.param("cpu", marks=requires_native),
    pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda]),
]


def _gen(*key) -> torch.Generator:
    """A generator per case, derived from SEED (str hashes differ between processes, crc32 does not)."""
    return torch.Generator().manual_seed(zlib.crc32(repr((SEED, *key)).encode()))


def _randn(g, *shape, dtype=torch.float32, device="cpu", scale=1.0, shift=0.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype).to(device)


def _f64(t):
    return None if t is None else t.detach().to("cpu", torch.float64)


def _check(what, got, want, tol):
    """||got - want|| relative to the larger of ||want|| and sqrt(numel), i.e. 1 per element.

    The inputs are O(1), and so are the terms of every output; a sum that cancels
    to nearly 0 (a lone output element can) is judged against its terms' size,
    not against the small result, where float32 rounding alone would fail it.
    """
    got64, want64 = got.detach().to("cpu", torch.float64), want.detach().to("cpu", torch.float64)
    scale = max(want64.norm().item(), want64.numel() ** 0.5)
    err = (got64 - want64).norm().item() / scale if torch.isfinite(got64).all() else float("inf")
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e} (seed {SEED})"


# --------------------------------------------------------------------------- the grid


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", WIDTHS)
@pytest.mark.parametrize("C", CHANNELS)
@pytest.mark.parametrize("batch", BATCHES)
def test_conv_update_matches_float64_reference(batch, C, K, dtype, device):
    g = _gen("conv", batch, C, K, str(dtype))
    # (state dtype, weight dtype, bias, activation): the model's own dtype, then a float32 state and weights
    for state_dtype, w_dtype, bias, act in [(dtype, dtype, True, "silu"), (torch.float32, torch.float32, False, None),
                                            (dtype, torch.float32, True, None), (torch.float32, dtype, False, "silu")]:
        conv_state = _randn(g, batch, C, K, dtype=state_dtype, device=device)
        x = _randn(g, batch, C, dtype=dtype, device=device)
        weight = _randn(g, C, K, dtype=w_dtype, device=device, scale=0.5)
        b = _randn(g, C, dtype=w_dtype, device=device) if bias else None
        state64 = _f64(conv_state)
        want = ds.causal_conv1d_update_ref(state64, _f64(x), _f64(weight), _f64(b), act)
        before = conv_state.data_ptr()
        out = ds.causal_conv1d_update(conv_state, x, weight, b, act, backend=device)
        case = f"B{batch} C{C} K{K} x {dtype} state {state_dtype} w {w_dtype} bias {bias} {act}"
        assert out.dtype == dtype and out.shape == (batch, C) and out.device.type == device, case
        _check(f"conv out ({case})", out, want, TOL[dtype])
        # x is exact in the state's dtype here (same or wider), so the new state is exact
        assert conv_state.data_ptr() == before and torch.equal(_f64(conv_state), state64), case


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N", STATES)
@pytest.mark.parametrize("C", CHANNELS)
@pytest.mark.parametrize("batch", BATCHES)
def test_ssm_update_matches_float64_reference(batch, C, N, dtype, device):
    g = _gen("ssm", batch, C, N, str(dtype))
    A = -torch.exp(_randn(g, C, N, device=device, scale=0.5))
    for has_D, has_z, has_bias, softplus in itertools.product((True, False), repeat=4):
        state = _randn(g, batch, C, N, device=device)
        x = _randn(g, batch, C, dtype=dtype, device=device)
        # Δ near 0.3 either way: through softplus, or given directly (then positive)
        dt = _randn(g, batch, C, dtype=dtype, device=device, scale=0.5, shift=-1.0) if softplus else \
            torch.rand(batch, C, generator=g).mul(0.5).to(dtype).to(device)
        B, Cm = _randn(g, batch, N, dtype=dtype, device=device), _randn(g, batch, N, dtype=dtype, device=device)
        D = _randn(g, C, device=device) if has_D else None
        z = _randn(g, batch, C, dtype=dtype, device=device) if has_z else None
        dt_bias = _randn(g, C, device=device, scale=0.1) if has_bias else None
        state64 = _f64(state)
        want = ds.selective_state_update_ref(state64, *map(_f64, (x, dt, A, B, Cm, D, z, dt_bias)), softplus)
        before = state.data_ptr()
        y = ds.selective_state_update(state, x, dt, A, B, Cm, D, z, dt_bias, softplus, backend=device)
        case = f"B{batch} C{C} N{N} {dtype} D {has_D} z {has_z} dt_bias {has_bias} softplus {softplus}"
        assert y.dtype == dtype and y.shape == (batch, C) and y.device.type == device, case
        _check(f"y ({case})", y, want, TOL[dtype])
        assert state.data_ptr() == before, case
        _check(f"state ({case})", state, state64, STATE_TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N", [32, 64, 65, 256])
def test_large_state_sizes(N, device):
    """The CUDA kernel keeps up to 32 or 64 states in registers and loops beyond: every branch, at its edges."""
    g = _gen("large", N)
    batch, C = 2, 70
    for dtype in (torch.float32, torch.bfloat16):
        state = _randn(g, batch, C, N, device=device)
        x, z = _randn(g, batch, C, dtype=dtype, device=device), _randn(g, batch, C, dtype=dtype, device=device)
        dt = _randn(g, batch, C, dtype=dtype, device=device, shift=-1.0)
        B, Cm = _randn(g, batch, N, dtype=dtype, device=device), _randn(g, batch, N, dtype=dtype, device=device)
        A, D = -torch.exp(_randn(g, C, N, device=device, scale=0.5)), _randn(g, C, device=device)
        state64 = _f64(state)
        want = ds.selective_state_update_ref(state64, *map(_f64, (x, dt, A, B, Cm, D, z, None)))
        y = ds.selective_state_update(state, x, dt, A, B, Cm, D, z, backend=device)
        _check(f"y (N {N}, {dtype})", y, want, TOL[dtype])
        _check(f"state (N {N}, {dtype})", state, state64, STATE_TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_input_dtypes(device):
    """Each activation may have its own dtype: the kernel reads each as it is."""
    g = _gen("mixed")
    batch, C, N = 3, 70, 16
    x = _randn(g, batch, C, dtype=torch.bfloat16, device=device)
    dt = _randn(g, batch, C, dtype=torch.float16, device=device, shift=-1.0)
    B, Cm = _randn(g, batch, N, device=device), _randn(g, batch, N, dtype=torch.float16, device=device)
    z = _randn(g, batch, C, device=device)
    A = -torch.exp(_randn(g, C, N, device=device, scale=0.5))
    state = _randn(g, batch, C, N, device=device)
    state64 = _f64(state)
    want = ds.selective_state_update_ref(state64, *map(_f64, (x, dt, A, B, Cm, None, z, None)))
    y = ds.selective_state_update(state, x, dt, A, B, Cm, None, z, backend=device)
    assert y.dtype == torch.bfloat16
    _check("mixed y", y, want, TOL[torch.bfloat16])
    _check("mixed state", state, state64, STATE_TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_views_are_read_and_written_in_place(device):
    """The layouts of Mamba.step: x, z halves of one tensor, B, C slices of another; states as views."""
    g = _gen("views")
    batch, C, N, K, R = 5, 36, 16, 4, 3
    xz = _randn(g, batch, 2 * C, device=device)
    x, z = xz.chunk(2, dim=-1)
    dbc = _randn(g, batch, R + 2 * N, device=device)
    _, B, Cm = dbc.split([R, N, N], dim=-1)
    dt = _randn(g, C, batch, device=device).t()  # transposed: batch stride 1
    A = -torch.exp(_randn(g, 2 * N, C, device=device, scale=0.5)).t()[:, ::2]  # (C, N), both strides odd
    big = _randn(g, batch, C, 2 * N, device=device)
    state = big[..., 1::2]  # every other state: stride 2 along N
    conv_big = _randn(g, batch, C, K + 3, device=device)
    conv_state = conv_big[..., 2:2 + K]  # a window of a longer buffer
    weight = _randn(g, C, 1, K, device=device)[:, 0, :]  # the depthwise Conv1d weight without its middle axis
    for t in (x, z, B, Cm, dt, A, state, conv_state):
        assert not t.is_contiguous()
    big_want, conv_want = _f64(big), _f64(conv_big)
    want_conv = ds.causal_conv1d_update_ref(conv_want[..., 2:2 + K], _f64(x), _f64(weight))
    want_y = ds.selective_state_update_ref(big_want[..., 1::2], *map(_f64, (x, dt, A, B, Cm, None, z, None)))
    got_conv = ds.causal_conv1d_update(conv_state, x, weight, backend=device)
    got_y = ds.selective_state_update(state, x, dt, A, B, Cm, None, z, backend=device)
    _check("conv out", got_conv, want_conv, TOL[torch.float32])
    _check("y", got_y, want_y, TOL[torch.float32])
    _check("conv buffer", conv_big, conv_want, 1e-7)  # only the window changed, exactly
    _check("state buffer", big, big_want, STATE_TOL)  # the skipped states untouched
    assert torch.equal(big[..., ::2].cpu(), big_want[..., ::2].float())


@pytest.mark.parametrize("device", DEVICES)
def test_nan_stays_in_its_channel(device):
    batch, C, N = 2, 20, 5
    g = _gen("nan")
    state = torch.zeros(batch, C, N, device=device)
    x = _randn(g, batch, C, device=device)
    x[1, 3] = float("nan")
    A = -torch.ones(C, N, device=device)
    B, Cm = torch.ones(batch, N, device=device), torch.ones(batch, N, device=device)
    y = ds.selective_state_update(state, x, torch.zeros_like(x), A, B, Cm, backend=device)
    assert torch.isnan(y[1, 3]) and torch.isnan(state[1, 3]).all()
    mask = torch.ones_like(y, dtype=torch.bool)
    mask[1, 3] = False
    assert torch.isfinite(y[mask]).all() and torch.isfinite(state[mask]).all()


# --------------------------------------------------------------------------- identities


@pytest.mark.parametrize("backend", ["ref", pytest.param("cpu", marks=requires_native),
                                     pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])])
def test_steps_equal_the_selective_scan(backend):
    """L steps from an initial state give the scan's outputs and its last state."""
    device = "cuda" if backend == "cuda" else "cpu"
    g = _gen("scan", backend)
    batch, C, N, L = 3, 10, 16, 12
    u, delta, z = (_randn(g, batch, C, L, device=device) for _ in range(3))
    A = -torch.exp(_randn(g, C, N, device=device, scale=0.5))
    B, Cm = _randn(g, batch, N, L, device=device), _randn(g, batch, N, L, device=device)
    D, bias = _randn(g, C, device=device), _randn(g, C, device=device, scale=0.1)
    h0 = _randn(g, batch, C, N, device=device)
    out, last = selective_scan(u, delta, A, B, Cm, D, z, bias, True, return_last_state=True, initial_state=h0)
    state = h0.clone()
    ys = [ds.selective_state_update(state, u[..., t], delta[..., t], A, B[..., t], Cm[..., t], D, z[..., t], bias,
                                    True, backend=backend) for t in range(L)]
    _check("steps vs scan: y", torch.stack(ys, -1), out, 1e-5)
    _check("steps vs scan: last state", state, last, 1e-5)


@pytest.mark.parametrize("backend", ["ref", pytest.param("cpu", marks=requires_native),
                                     pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])])
def test_steps_equal_the_causal_convolution(backend):
    """From a zero state, conv steps give the causal depthwise convolution of the whole sequence."""
    device = "cuda" if backend == "cuda" else "cpu"
    g = _gen("conv-seq", backend)
    batch, C, K, L = 2, 7, 4, 9
    x = _randn(g, batch, C, L, device=device)
    weight, bias = _randn(g, C, 1, K, device=device), _randn(g, C, device=device)
    want = F.silu(F.conv1d(x, weight, bias, padding=K - 1, groups=C)[..., :L])
    state = torch.zeros(batch, C, K, device=device)
    got = torch.stack([ds.causal_conv1d_update(state, x[..., t], weight[:, 0], bias, backend=backend)
                       for t in range(L)], -1)
    _check("conv steps vs conv1d", got, want, 1e-6)
    assert torch.equal(state, x[..., L - K:])


def test_reference_is_differentiable_through_the_in_place_state():
    """Two steps of the reference under autograd (the state overwritten in between) give the scan's gradients."""
    g = _gen("grad")
    batch, C, N, L = 2, 3, 4, 2
    u, delta = (_randn(g, batch, C, L, dtype=torch.float64).requires_grad_() for _ in range(2))
    A = (-torch.exp(_randn(g, C, N, dtype=torch.float64))).requires_grad_()
    B, Cm = (_randn(g, batch, N, L, dtype=torch.float64).requires_grad_() for _ in range(2))
    inputs = (u, delta, A, B, Cm)
    out, last = selective_scan(u, delta, A, B, Cm, delta_softplus=True, return_last_state=True, backend="ref")
    want = torch.autograd.grad(out.sum() + last.square().sum(), inputs)
    state = torch.zeros(batch, C, N, dtype=torch.float64)
    ys = [ds.selective_state_update(state, u[..., t], delta[..., t], A, B[..., t], Cm[..., t]) for t in range(L)]
    got = torch.autograd.grad(torch.stack(ys, -1).sum() + state.square().sum(), inputs)
    for name, a, b in zip("u delta A B C".split(), got, want):
        _check(f"grad {name}", a, b, 1e-12)


# --------------------------------------------------------------------------- dispatch and errors


def _small(dtype=torch.float32, device="cpu"):
    g = _gen("small")
    batch, C, N, K = 2, 3, 4, 4
    ssm = dict(state=torch.zeros(batch, C, N, device=device), x=_randn(g, batch, C, dtype=dtype, device=device),
               dt=_randn(g, batch, C, dtype=dtype, device=device), A=-torch.ones(C, N, device=device),
               B=_randn(g, batch, N, dtype=dtype, device=device), C=_randn(g, batch, N, dtype=dtype, device=device),
               D=torch.ones(C, device=device), z=_randn(g, batch, C, dtype=dtype, device=device),
               dt_bias=torch.zeros(C, device=device))
    conv = dict(conv_state=torch.zeros(batch, C, K, dtype=dtype, device=device), x=ssm["x"],
                weight=_randn(g, C, K, dtype=dtype, device=device), bias=torch.zeros(C, dtype=dtype, device=device))
    return conv, ssm


def test_float64_runs_the_reference_in_float64():
    conv, ssm = _small(torch.float64)
    ssm["state"], ssm["A"] = ssm["state"].double(), ssm["A"].double()
    assert ds.resolve_backend("selective_state_update", "auto", ssm["x"], tuple(ssm.values())) == "ref"
    assert ds.selective_state_update(**ssm).dtype == torch.float64
    assert ds.causal_conv1d_update(**conv).dtype == torch.float64
    with pytest.raises(TypeError, match="float64"):
        ds.causal_conv1d_update(**conv, backend="cpu")


@requires_native
def test_auto_backend_choice():
    conv, ssm = _small()
    tensors = tuple(ssm.values())
    assert ds.resolve_backend("selective_state_update", "auto", ssm["x"], tensors) == "cpu"
    assert ds.resolve_backend("selective_state_update", "ref", ssm["x"], tensors) == "ref"
    ssm["x"].requires_grad_()
    assert ds.resolve_backend("selective_state_update", "auto", ssm["x"], tensors) == "ref"  # the kernels have no backward
    with torch.no_grad():
        assert ds.resolve_backend("selective_state_update", "auto", ssm["x"], tensors) == "cpu"
    with pytest.raises(ValueError, match="no backward"):
        ds.selective_state_update(**ssm, backend="cpu")
    with pytest.raises(ValueError, match="unknown backend"):
        ds.causal_conv1d_update(**conv, backend="triton")
    with pytest.raises((ValueError, native.BackendUnavailableError)):
        ds.causal_conv1d_update(**conv, backend="cuda")  # CPU tensors (or no CUDA here)


@requires_native
def test_a_module_without_the_kernels_names_the_fix(monkeypatch):
    conv, ssm = _small()
    monkeypatch.setattr(ds, "_HAS_KERNEL", {})
    monkeypatch.delattr(native.native_module(), "selective_state_update_cpu")
    y = ds.selective_state_update(**{k: v.clone() for k, v in ssm.items()})  # 'auto' falls back to the reference
    assert torch.equal(y, ds.selective_state_update_ref(**ssm))
    with pytest.raises(native.BackendUnavailableError, match="pip install -e ."):
        ds.selective_state_update(**ssm, backend="cpu")


def _bad_conv():
    C = "conv_state"
    return [
        ({"x": [1.0]}, TypeError, "x must be a torch.Tensor"),
        ({C: None}, TypeError, "conv_state must be a torch.Tensor"),
        ({"weight": torch.ones(3, 4, dtype=torch.int64)}, TypeError, "weight has dtype torch.int64"),
        ({"bias": torch.ones(3, dtype=torch.complex64)}, TypeError, "bias has dtype"),
        ({"x": torch.ones(2, 3, 1)}, ValueError, "x must be \\(batch, channels\\)"),
        ({C: torch.zeros(2, 3)}, ValueError, "conv_state must be"),
        ({C: torch.zeros(2, 4, 4)}, ValueError, "conv_state must be"),
        ({C: torch.zeros(2, 3, 0)}, ValueError, "K >= 1"),
        ({"weight": torch.ones(3, 1, 4)}, ValueError, "weight must be \\(channels, K\\)"),
        ({"weight": torch.ones(3, 3)}, ValueError, "weight must be"),
        ({"bias": torch.ones(4)}, ValueError, "bias must be"),
        ({"activation": "relu"}, ValueError, "activation"),
        ({"weight": torch.ones(3, 4, device="meta")}, ValueError, "weight is on meta"),
        ({C: torch.zeros(1, 3, 4).expand(2, 3, 4)}, ValueError, "broadcast"),
    ]


def _bad_ssm():
    return [
        ({"x": None}, TypeError, "x must be a torch.Tensor"),
        ({"dt": 1.0}, TypeError, "dt must be a torch.Tensor"),
        ({"z": "gate"}, TypeError, "z must be a torch.Tensor or None"),
        ({"state": torch.zeros(2, 3, 4, dtype=torch.bfloat16)}, TypeError, "state has dtype"),
        ({"A": -torch.ones(3, 4, dtype=torch.float16)}, TypeError, "A has dtype"),
        ({"D": torch.ones(3, dtype=torch.bfloat16)}, TypeError, "D has dtype"),
        ({"B": torch.ones(2, 4, dtype=torch.int32)}, TypeError, "B has dtype"),
        ({"x": torch.ones(2, 3, 1)}, ValueError, "x must be \\(batch, channels\\)"),
        ({"dt": torch.ones(2, 4)}, ValueError, "dt must have x's shape"),
        ({"z": torch.ones(3, 3)}, ValueError, "z must have x's shape"),
        ({"state": torch.zeros(2, 3)}, ValueError, "state must be"),
        ({"state": torch.zeros(2, 3, 0)}, ValueError, "N >= 1"),
        ({"A": -torch.ones(3, 5)}, ValueError, "A must be \\(channels, N\\)"),
        ({"B": torch.ones(2, 5)}, ValueError, "B must be \\(batch, N\\)"),
        ({"C": torch.ones(1, 4)}, ValueError, "C must be \\(batch, N\\)"),
        ({"D": torch.ones(4)}, ValueError, "D must be \\(channels,\\)"),
        ({"dt_bias": torch.ones(3, 1)}, ValueError, "dt_bias must be"),
        ({"C": torch.ones(2, 4, device="meta")}, ValueError, "C is on meta"),
        ({"state": torch.zeros(2, 3, 1).expand(2, 3, 4)}, ValueError, "broadcast"),
    ]


@pytest.mark.parametrize("change, error, match", _bad_conv())
def test_bad_conv_inputs_raise(change, error, match):
    conv, _ = _small()
    with pytest.raises(error, match=match):
        ds.causal_conv1d_update(**{**conv, **change})


@pytest.mark.parametrize("change, error, match", _bad_ssm())
def test_bad_ssm_inputs_raise(change, error, match):
    _, ssm = _small()
    with pytest.raises(error, match=match):
        ds.selective_state_update(**{**ssm, **change})


# --------------------------------------------------------------------------- compile, graphs, the block


@requires_native
def test_torch_compile_traces_the_custom_ops():
    """Under torch.compile the kernels are custom ops that declare their in-place state: no graph break."""
    conv, ssm = _small()

    def step(conv_state, state, x, weight, dt, A, B, C):
        u = ds.causal_conv1d_update(conv_state, x, weight)
        return ds.selective_state_update(state, u, dt, A, B, C)

    args = (conv["conv_state"], ssm["state"], ssm["x"], conv["weight"], ssm["dt"], ssm["A"], ssm["B"], ssm["C"])
    eager_args = [a.clone() for a in args]
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        for _ in range(2):
            got, want = compiled(*args), step(*eager_args)
            assert torch.equal(got, want)
    assert torch.equal(args[0], eager_args[0]) and torch.equal(args[1], eager_args[1])


@pytest.mark.cuda
@requires_cuda
def test_cuda_graph_replays_update_the_states():
    conv, ssm = _small(device="cuda")

    def step():
        u = ds.causal_conv1d_update(conv["conv_state"], ssm["x"], conv["weight"], conv["bias"])
        return ds.selective_state_update(ssm["state"], u, ssm["dt"], ssm["A"], ssm["B"], ssm["C"], ssm["D"], ssm["z"])

    conv_ref, ssm_ref = {k: v.clone() for k, v in conv.items()}, {k: v.clone() for k, v in ssm.items()}
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up, outside the graph
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = step()
    conv["conv_state"].copy_(conv_ref["conv_state"])
    ssm["state"].copy_(ssm_ref["state"])
    for _ in range(3):
        graph.replay()
        u = ds.causal_conv1d_update_ref(conv_ref["conv_state"], ssm_ref["x"], conv_ref["weight"], conv_ref["bias"])
        want = ds.selective_state_update_ref(ssm_ref["state"], u, ssm_ref["dt"], ssm_ref["A"], ssm_ref["B"],
                                             ssm_ref["C"], ssm_ref["D"], ssm_ref["z"])
        _check("graph y", y, want, 1e-5)
        _check("graph state", ssm["state"], ssm_ref["state"], 1e-5)


@pytest.mark.cuda
@requires_cuda
def test_static_mamba_step_in_a_cuda_graph_decodes_like_the_eager_loop():
    """bench_speed's StaticMambaStep relies on Mamba.step writing into the cache tensors it captured."""
    from ssmlab.core.mamba import MambaConfig
    from ssmlab.core.transformer import build_matched_lm

    bench = load_script(Path(__file__).resolve().parents[1] / "bench_speed.py")
    torch.manual_seed(1)
    model, _, _ = build_matched_lm("mamba", MambaConfig(n_layer=2, d_model=32, vocab_size=30), device="cuda")
    model.eval()
    prompt = torch.randint(0, 30, (3, 7), device="cuda")
    eager, _ = bench.greedy_generate(model, prompt, 8, 30, 15)
    static = bench.StaticMambaStep(model, 3, capture=True)
    for _ in range(2):
        ids, _ = bench.greedy_generate(model, prompt, 8, 30, 15, static)
        assert torch.equal(ids, eager)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mamba_step_fused_equals_unfused(device, dtype):
    """Mamba.step through the kernels equals its plain-PyTorch form, and updates the cache tensors in place."""
    from ssmlab.core.mamba import MambaLMHeadModel, preset

    torch.manual_seed(SEED)
    model = MambaLMHeadModel(preset("tiny", vocab_size=30), device=device, dtype=dtype).eval()
    caches, caches_ref = model.allocate_cache(3), model.allocate_cache(3)
    buffers = [(c.conv_state, c.ssm_state) for c in caches]
    with torch.no_grad():
        for _ in range(4):
            token = torch.randint(0, 30, (3,), device=device)
            h = model.backbone.embedding(token)
            for layer, c, c_ref in zip(model.backbone.layers, caches, caches_ref):
                x = layer.norm(h)
                got, want = layer.mixer.step(x, c), layer.mixer.step(x, c_ref, backend="ref")
                _check("Mamba.step", got, want, 1e-5 if dtype == torch.float32 else 2e-2)
                h = h + want
    assert all(c.conv_state is conv and c.ssm_state is ssm for c, (conv, ssm) in zip(caches, buffers))
    for c, c_ref in zip(caches, caches_ref):
        _check("ssm state", c.ssm_state, c_ref.ssm_state, 1e-5 if dtype == torch.float32 else 2e-2)
        assert torch.equal(c.conv_state, c_ref.conv_state)


def test_benchmark_quick(tmp_path):
    bench = load_script(Path(__file__).resolve().parents[1] / "bench_decode_step.py")
    result = bench.main(["--quick", "--out", str(tmp_path / "bench.json")])
    assert (tmp_path / "bench.json").exists()
    rows = result["rows"]
    assert {r["what"] for r in rows} == {"layer", "model"}
    assert {r["path"] for r in rows} >= {"unfused", "fused"}
    assert all(r["median_ms"] > 0 for r in rows)
