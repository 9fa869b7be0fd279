"""The fused causal depthwise conv (+ SiLU) against its F.conv1d twin, forward and backward."""

import pytest
import torch

from ssmlab.core import native
from ssmlab.core.causal_conv import causal_conv1d, causal_conv1d_ref

torch.set_num_threads(1)
HAVE_CPU = native.backends()["cpu"]
needs_cpu = pytest.mark.skipif(not HAVE_CPU, reason="native module not built")
needs_cuda = pytest.mark.skipif(not native.backends()["cuda"], reason="needs a GPU and the CUDA kernels")
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float16: dict(rtol=5e-3, atol=5e-3),
       torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}
# lengths around the vector width (8) and the chunk of one partial sum (1024)
SHAPES = [(1, 1, 1, 4), (2, 3, 7, 4), (2, 5, 16, 1), (3, 4, 33, 3), (1, 2, 1024, 4), (2, 3, 1031, 8), (1, 2, 2048, 2)]


def _inputs(B, C, L, K, dtype, device, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, L, generator=g, dtype=torch.float64)
    w = torch.randn(C, K, generator=g, dtype=torch.float64) / K ** 0.5
    b = torch.randn(C, generator=g, dtype=torch.float64) if bias else None
    gy = torch.randn(B, C, L, generator=g, dtype=torch.float64)
    cast = lambda t, dt: None if t is None else t.to(device=device, dtype=dt)  # noqa: E731
    return cast(x, dtype), cast(w, torch.float32), cast(b, torch.float32), cast(gy, dtype), (x, w, b, gy)


def _check_against_float64(B, C, L, K, dtype, device, bias, act, backend, seed=0, x_view=None):
    x, w, b, gy, exact = _inputs(B, C, L, K, dtype, device, bias, seed)
    if x_view is not None:
        x = x_view(x)
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    out = causal_conv1d(x, w, b, act, backend=backend)
    assert out.dtype == dtype and out.shape == (B, C, L) and out.is_contiguous()
    grads = torch.autograd.grad(out, leaves, gy)
    x64, w64, b64, gy64 = exact
    if x_view is not None:
        x64 = x.detach().double().cpu()
    leaves64 = [t.clone().requires_grad_() for t in (x64, w64, b64) if t is not None]
    ref = causal_conv1d_ref(*leaves64[:2], leaves64[2] if b is not None else None, act)
    grads64 = torch.autograd.grad(ref, leaves64, gy.double().cpu())
    scale = lambda t: max(1.0, t.abs().max().item())  # noqa: E731
    torch.testing.assert_close(out.double().cpu(), ref.detach(), **TOL[dtype])
    for got, want in zip(grads, grads64):
        # weight/bias gradients are sums over B*L terms: compare relative to their size
        s = scale(want)
        torch.testing.assert_close(got.double().cpu() / s, want / s, **TOL[dtype])
    return grads


@needs_cpu
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias,act", [(True, "silu"), (False, None)])
def test_cpu_kernel_matches_float64_reference(shape, dtype, bias, act):
    _check_against_float64(*shape, dtype, "cpu", bias, act, "cpu", seed=sum(shape))


@needs_cuda
@pytest.mark.parametrize("shape", SHAPES + [(4, 64, 4096, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias,act", [(True, "silu"), (False, None), (True, None)])
def test_cuda_kernel_matches_float64_reference(shape, dtype, bias, act):
    _check_against_float64(*shape, dtype, "cuda", bias, act, "cuda", seed=sum(shape))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if native.backends()["cuda"] else []))
def test_strided_x_is_read_in_place(device):
    """x as a channel slice of a wider tensor (in_proj's x half): unit stride along L, any other strides."""
    if not native.backends()[device]:
        pytest.skip("native module not built")
    view = lambda t: torch.cat([t, t], dim=1)[:, 1:1 + t.shape[1]]  # noqa: E731
    _check_against_float64(2, 3, 40, 4, torch.float32, device, True, "silu", device, x_view=view)


@needs_cpu
def test_float64_and_wide_kernels_fall_back_to_the_reference():
    x = torch.randn(2, 3, 10, dtype=torch.float64)
    w = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(causal_conv1d(x, w), causal_conv1d_ref(x, w))
    w9 = torch.randn(3, 9)
    x32 = torch.randn(2, 3, 10)
    torch.testing.assert_close(causal_conv1d(x32, w9), causal_conv1d_ref(x32, w9))
    with pytest.raises(ValueError, match="backend='ref'"):
        causal_conv1d(x, w, backend="cpu")


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if native.backends()["cuda"] else []))
def test_repeatable_bitwise(device):
    if not native.backends()[device]:
        pytest.skip("native module not built")
    x, w, b, gy, _ = _inputs(3, 8, 2500, 4, torch.float32, device, True, seed=5)
    runs = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        out = causal_conv1d(*leaves)
        runs.append([out] + list(torch.autograd.grad(out, leaves, gy)))
    for a, c in zip(*runs):
        assert torch.equal(a, c)


def test_conv1d_weight_layout_and_errors():
    x, w = torch.randn(2, 3, 10), torch.randn(3, 1, 4)
    torch.testing.assert_close(causal_conv1d(x, w), causal_conv1d_ref(x, w[:, 0]))
    with pytest.raises(ValueError, match="channels, width"):
        causal_conv1d(x, torch.randn(4, 4))
    with pytest.raises(ValueError, match="batch, channels, length"):
        causal_conv1d(torch.randn(3, 10), w)
    with pytest.raises(ValueError, match="bias"):
        causal_conv1d(x, w, torch.randn(4))
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, w, activation="relu")
    with pytest.raises(TypeError, match="floating-point"):
        causal_conv1d(torch.ones(2, 3, 10, dtype=torch.int64), w)


def test_matches_the_blocks_former_conv():
    """What the Mamba block computed before: nn.Conv1d(padding=K-1) sliced to L, then SiLU."""
    conv = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3)
    x = torch.randn(2, 6, 50)
    want = torch.nn.functional.silu(conv(x)[..., :50])
    torch.testing.assert_close(causal_conv1d(x, conv.weight, conv.bias), want, rtol=1e-5, atol=1e-5)


@needs_cpu
def test_traces_under_torch_compile():
    """The custom ops' fake implementations let torch.compile trace forward and backward (aot_eager: no codegen)."""
    x = torch.randn(2, 4, 20, requires_grad=True)
    w = torch.randn(4, 4, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    compiled = torch.compile(causal_conv1d, backend="aot_eager", fullgraph=True)
    out = compiled(x, w, b)
    grads = torch.autograd.grad(out.square().sum(), (x, w, b))
    out_e = causal_conv1d(x, w, b)
    grads_e = torch.autograd.grad(out_e.square().sum(), (x, w, b))
    torch.testing.assert_close(out, out_e)
    for g, ge in zip(grads, grads_e):
        torch.testing.assert_close(g, ge)


@needs_cpu
def test_an_explicit_backend_missing_from_an_old_build_is_an_error(monkeypatch):
    """backend='cpu' on a module built before the kernel existed raises instead of quietly running the reference."""
    import types

    from ssmlab.core import causal_conv

    monkeypatch.setattr(causal_conv.native, "native_module", lambda: types.SimpleNamespace())
    x, w = torch.randn(2, 3, 10), torch.randn(3, 4)
    with pytest.raises(native.BackendUnavailableError, match="rebuild"):
        causal_conv1d(x, w, backend="cpu")
    torch.testing.assert_close(causal_conv1d(x, w), causal_conv1d_ref(x, w))  # 'auto' falls back
