"""The linear-recurrence scan h_t = a_t h_{t-1} + b_t: every backend against
the float64 reference, forward and backward, and clear errors on bad input.

Inputs are drawn fresh for every case; a_t in (0.5, 1) keeps the recurrence
stable over long lengths so relative errors are meaningful.
"""

import pytest
import torch

from ssmlab.core import native, scan
from ssmlab.core.testing import assert_close_rel, devices, requires_cuda, requires_native

LENGTHS = [1, 2, 3, 127, 1000, 4097]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def make_inputs(shape, dtype, device, with_h0, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    a = (0.5 + 0.5 * torch.rand(shape, generator=g, dtype=torch.float64)).to(device)
    b = torch.randn(shape, generator=g, dtype=torch.float64).to(device)
    h0 = torch.randn(shape[:2], generator=g, dtype=torch.float64).to(device) if with_h0 else None
    return a, b, h0


def reference(a, b, h0, grad_out):
    """Forward and gradients of the sequential loop in float64."""
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    h064 = h0.detach().double().requires_grad_() if h0 is not None else None
    out = scan.linear_scan_ref(a64, b64, h064)
    out.backward(grad_out.double())
    return out, a64.grad, b64.grad, (h064.grad if h0 is not None else None)


def run_backend(backend, a, b, h0, dtype, grad_out):
    a_ = a.to(dtype).requires_grad_()
    b_ = b.to(dtype).requires_grad_()
    h0_ = h0.detach().float().requires_grad_() if h0 is not None else None  # state in float32
    if dtype == torch.float64 and h0 is not None:
        h0_ = h0.detach().double().requires_grad_()
    out = scan.linear_scan(a_, b_, h0_, backend=backend)
    out.backward(grad_out.to(dtype))
    return out, a_.grad, b_.grad, (h0_.grad if h0 is not None else None)


def backends_for(device):
    names = ["ref", "blelloch"]
    if device == "cpu" and native.backends()["cpu"]:
        names.append("cpu")
    if device == "cuda":
        names.append("cuda")
    return names


CASES = [
    (device, backend, L)
    for device in devices()
    for backend in backends_for(device)
    for L in LENGTHS
    if not (backend == "ref" and L > 1000)  # the loop itself is the reference
]


@pytest.mark.parametrize("device,backend,L", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_h0", [False, True], ids=["h0=None", "h0"])
def test_matches_float64_reference(device, backend, L, dtype, with_h0):
    shape = (2, 3, L)
    a, b, h0 = make_inputs(shape, torch.float64, device, with_h0)
    # Inputs rounded to the tested dtype first, so the reference sees the same numbers.
    a, b = a.to(dtype).double(), b.to(dtype).double()
    grad_out = torch.randn(shape, dtype=torch.float64, device=device).to(dtype).double()
    ref = reference(a, b, h0, grad_out)
    got = run_backend(backend, a, b, h0, dtype, grad_out)
    assert got[0].dtype == dtype and got[0].shape == shape
    for name, x, r in zip(("out", "grad_a", "grad_b", "grad_h0"), got, ref):
        if r is not None:
            assert_close_rel(x, r, dtype, f"{backend}/{device} {name} L={L}")


@requires_native
@pytest.mark.parametrize("device", devices())
def test_strided_and_broadcast_inputs(device):
    """Non-contiguous batch/channel strides (a broadcast a) reach the kernel as strides."""
    a_row = 0.5 + 0.5 * torch.rand(1, 5, 300, dtype=torch.float64, device=device)
    a = a_row.expand(4, 5, 300)
    b = torch.randn(5, 4, 300, dtype=torch.float64, device=device).transpose(0, 1)
    backend = "cuda" if device == "cuda" else "cpu"
    assert_close_rel(scan.linear_scan(a, b, backend=backend), scan.linear_scan_ref(a, b), torch.float64)


@requires_native
def test_gradcheck_native_cpu():
    a, b, h0 = make_inputs((2, 2, 9), torch.float64, "cpu", True)
    fn = lambda a, b, h0: scan.linear_scan(a, b, h0, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (a.requires_grad_(), b.requires_grad_(), h0.requires_grad_()))


@requires_native
@pytest.mark.parametrize("device", devices())
def test_custom_op_passes_opcheck(device):
    a, b, h0 = make_inputs((2, 3, 17), torch.float32, device, True)
    a, b, h0 = a.float().requires_grad_(), b.float().requires_grad_(), h0.float().requires_grad_()
    torch.library.opcheck(torch.ops.ssmlab.linear_scan.default, (a, b, h0))
    torch.library.opcheck(torch.ops.ssmlab.linear_scan.default, (a, b, None))


@requires_native
def test_torch_compile_has_no_graph_break():
    a, b, h0 = make_inputs((2, 3, 40), torch.float32, "cpu", True)
    a, b, h0 = a.float(), b.float(), h0.float()
    fn = torch.compile(lambda a, b, h0: scan.linear_scan(a, b, h0, backend="cpu") * 2, fullgraph=True, backend="eager")
    assert_close_rel(fn(a, b, h0), 2 * scan.linear_scan_ref(a, b, h0), torch.float32)


@requires_native
def test_native_cpu_is_thread_count_independent():
    a, b, h0 = make_inputs((3, 8, 513), torch.float32, "cpu", True)
    a, b, h0 = a.float(), b.float(), h0.float()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = scan.linear_scan(a, b, h0, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, scan.linear_scan(a, b, h0, backend="cpu"))


@requires_cuda
def test_cuda_writes_every_element():
    """Poison the caching allocator's memory first: an unwritten output would show NaN."""
    torch.empty(8 << 20, device="cuda").fill_(float("nan"))
    a, b, h0 = make_inputs((3, 5, 3001), torch.float32, "cuda", True)
    out = scan.linear_scan(a.float(), b.float(), h0.float(), backend="cuda")
    assert torch.isfinite(out).all()
    assert_close_rel(out, scan.linear_scan_ref(a, b, h0), torch.float32)


# ---------------------------------------------------------------------------
# Bad input: a clear exception naming the argument, never a crash
# ---------------------------------------------------------------------------

GOOD = lambda: (torch.rand(2, 3, 5), torch.rand(2, 3, 5))  # noqa: E731


@pytest.mark.parametrize(
    "a,b,h0,match",
    [
        (torch.rand(2, 3, 5), torch.rand(2, 3, 4), None, "a has shape"),
        (torch.rand(3, 5), torch.rand(3, 5), None, "b must be \\(batch, channels, length\\)"),
        (torch.rand(2, 3, 5), torch.rand(2, 3, 5, dtype=torch.float64), None, "a is torch.float32 but b is torch.float64"),
        (torch.randint(0, 3, (2, 3, 5)), torch.randint(0, 3, (2, 3, 5)), None, "a has dtype torch.int64"),
        (torch.rand(2, 3, 5), torch.rand(2, 3, 5), torch.rand(3, 2), "h0 must be \\(batch, channels\\)"),
        (torch.rand(2, 3, 5), torch.rand(2, 3, 5), torch.ones(2, 3, dtype=torch.int32), "h0 must be floating point"),
        ([1.0], torch.rand(2, 3, 5), None, "a must be a torch.Tensor"),
    ],
)
def test_bad_inputs_raise_clear_errors(a, b, h0, match):
    with pytest.raises((TypeError, ValueError), match=match):
        scan.linear_scan(a, b, h0)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        scan.linear_scan(*GOOD(), backend="fast")


@pytest.mark.skipif(native.backends()["cuda"], reason="checks the error on a machine without a GPU")
def test_cuda_backend_without_gpu_names_the_problem():
    with pytest.raises((native.BackendUnavailableError, ValueError), match="not available|cannot run"):
        scan.linear_scan(*GOOD(), backend="cuda")
