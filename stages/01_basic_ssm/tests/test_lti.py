"""The discrete LTI SSM: recurrent == convolutional, fast paths == their references."""

import pytest
import torch

from ssmlab.core import lti
from ssmlab.core.discretize import discretize
from ssmlab.core.ssm import SSMLayer, SSMSequenceModel
from ssmlab.core.testing import assert_close_rel

LENGTHS = [1, 2, 3, 7, 64, 129]


def random_system(H=3, N=5, dtype=torch.float64, seed=0, method="zoh"):
    """H random stable SISO systems, discretized: (Ā (H, N, N), B̄ (H, N), C (H, N), D (H,))."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(H, N, N, generator=g, dtype=dtype) / N**0.5
    A = A - (torch.linalg.eigvals(A).real.amax(-1) + 0.2)[:, None, None] * torch.eye(N, dtype=dtype)
    B = torch.randn(H, N, 1, generator=g, dtype=dtype)
    delta = torch.rand(H, generator=g, dtype=dtype) * 0.5 + 0.05
    Ad, Bd = discretize(A, B, delta, method)
    C, D = torch.randn(H, N, generator=g, dtype=dtype), torch.randn(H, generator=g, dtype=dtype)
    return Ad, Bd.squeeze(-1), C, D


@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("method", ["zoh", "bilinear"])
def test_recurrent_equals_convolutional_float64(L, method):
    for seed in range(3):
        Ad, Bd, C, D = random_system(seed=seed, method=method)
        u = torch.randn(2, 3, L, dtype=torch.float64)  # (B, H, L)
        y_rec, _ = lti.ssm_recurrent(Ad, Bd, C, u, D)
        y_conv = lti.ssm_convolutional(Ad, Bd, C, u, D)
        err = (y_rec - y_conv).abs().max().item()
        assert err < 1e-10, f"L={L}: max |recurrent - convolutional| = {err:.2e}"


@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_doubling_equals_ref_forward_backward(L, dtype):
    Ad, Bd, C, _ = random_system(H=2, N=4, seed=L)
    Ad, Bd, C = (t.to(dtype).requires_grad_() for t in (Ad, Bd, C))
    K, K_ref = lti.ssm_kernel(Ad, Bd, C, L), lti.ssm_kernel_ref(Ad, Bd, C, L)
    assert K.shape == (2, L)
    assert_close_rel(K, K_ref, dtype, "K")
    w = torch.randn_like(K)
    g = torch.autograd.grad((K * w).sum(), (Ad, Bd, C), materialize_grads=True)  # L = 1 never uses Ad
    g_ref = torch.autograd.grad((K_ref * w).sum(), (Ad, Bd, C), materialize_grads=True)
    for name, a, b in zip(("Ad", "Bd", "C"), g, g_ref):
        assert_close_rel(a, b, dtype, f"grad {name}", factor=10)


@pytest.mark.parametrize("L,Lk", [(1, 1), (2, 2), (5, 5), (33, 33), (100, 100), (50, 7), (7, 50)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fft_causal_conv_equals_ref_forward_backward(L, Lk, dtype):
    u = torch.randn(2, 3, L, dtype=dtype, requires_grad=True)
    K = torch.randn(3, Lk, dtype=dtype, requires_grad=True)
    y, y_ref = lti.causal_conv(u, K), lti.causal_conv_ref(u, K)
    assert y.shape == (2, 3, L)
    assert_close_rel(y, y_ref, dtype, "y", factor=10)
    w = torch.randn_like(y)
    g, g_ref = torch.autograd.grad((y * w).sum(), (u, K)), torch.autograd.grad((y_ref * w).sum(), (u, K))
    for name, a, b in zip(("u", "K"), g, g_ref):
        assert_close_rel(a, b, dtype, f"grad {name}", factor=10)


def test_conv_is_causal():
    u = torch.randn(1, 40, dtype=torch.float64)
    K = torch.randn(1, 40, dtype=torch.float64)
    u2 = u.clone()
    u2[0, 25:] += 1.0  # change the future
    y, y2 = lti.causal_conv(u, K), lti.causal_conv(u2, K)
    assert torch.allclose(y[0, :25], y2[0, :25], atol=1e-12) and not torch.allclose(y[0, 25:], y2[0, 25:])


def test_streaming_steps_equal_whole_sequence():
    """Feeding inputs one at a time through ssm_step (explicit state) gives the batch result."""
    Ad, Bd, C, D = random_system(seed=5)
    u = torch.randn(4, 3, 30, dtype=torch.float64)
    y_all, x_last = lti.ssm_recurrent(Ad, Bd, C, u, D)
    x = torch.zeros(4, 3, 5, dtype=torch.float64)
    first, x_mid = lti.ssm_recurrent(Ad, Bd, C, u[..., :12], D)  # a stream cut in two pieces
    second, x_end = lti.ssm_recurrent(Ad, Bd, C, u[..., 12:], D, x0=x_mid)
    assert_close_rel(torch.cat([first, second], -1), y_all, torch.float64, "split stream")
    assert_close_rel(x_end, x_last, torch.float64, "final state")
    for t in range(30):
        y_t, x = lti.ssm_step(Ad, Bd, C, x, u[..., t], D)
        assert_close_rel(y_t, y_all[..., t], torch.float64, f"step {t}")


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
def test_layer_step_mode_equals_conv_mode(method):
    torch.manual_seed(0)
    layer = SSMLayer(H=4, N=6, method=method).double()
    u = torch.randn(2, 17, 4, dtype=torch.float64)
    y = layer(u)
    x, cache, ys = torch.zeros(2, 4, 6, dtype=torch.float64), layer.discrete(), []
    for t in range(17):
        y_t, x = layer.step(x, u[:, t], cache)
        ys.append(y_t)
    assert_close_rel(torch.stack(ys, 1), y, torch.float64, "layer step vs conv")


def test_layer_is_stable_and_causal():
    torch.manual_seed(1)
    layer = SSMLayer(H=8, N=4)
    with torch.no_grad():
        layer.A_W.mul_(20.0)  # any parameters: A stays dissipative
        layer.A_L.normal_()
    from ssmlab.core.discretize import spectral_radius
    assert (spectral_radius(layer.discrete()[0]) < 1).all()
    model = SSMSequenceModel(3, 2, H=8, N=4)
    u = torch.randn(1, 20, 3)
    u2 = u.clone()
    u2[:, 10:] = 0
    assert torch.allclose(model(u)[:, :10], model(u2)[:, :10], atol=1e-5)


def test_bad_arguments():
    Ad, Bd, C, _ = random_system()
    with pytest.raises(ValueError, match="Bd"):
        lti.ssm_kernel(Ad, Bd[:, :3], C, 4)
    with pytest.raises(ValueError, match="C"):
        lti.ssm_kernel_ref(Ad, Bd, C[:, :2], 4)
    with pytest.raises(ValueError, match="Ad"):
        lti.ssm_kernel(Ad[..., :3], Bd, C, 4)
    with pytest.raises(ValueError, match="L"):
        lti.ssm_kernel(Ad, Bd, C, 0)
    with pytest.raises(ValueError, match="dt_min"):
        SSMLayer(4, dt_min=-1.0)
    with pytest.raises(ValueError, match="method"):
        SSMLayer(4, method="forward_euler")


def test_sequence_model_step_equals_forward():
    torch.manual_seed(2)
    model = SSMSequenceModel(2, 3, H=6, N=4, n_layers=2).double()
    u = torch.randn(3, 11, 2, dtype=torch.float64)
    y = model(u)
    states, caches, ys = model.init_state(3), [b.ssm.discrete() for b in model.blocks], []
    for t in range(11):
        y_t, states = model.step(states, u[:, t], caches)
        ys.append(y_t)
    assert_close_rel(torch.stack(ys, 1), y, torch.float64, "model step vs forward")
