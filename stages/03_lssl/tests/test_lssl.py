"""LSSL: convolutional = recurrent, kernels, gradients, the deep model's modes, checkpoints, bad input."""

import pytest
import torch

from ssmlab.core.checkpoint import save_model, load_model_state
from ssmlab.core.hippo import transition
from ssmlab.core.lssl import LSSL, DeepLSSL, DeepLSSLConfig, LSSLConfig

torch.set_num_threads(1)


def layer(H, N, seed=0, **kw):
    torch.manual_seed(seed)
    return LSSL(LSSLConfig(H=H, N=N, dt_min=0.01, dt_max=0.5, **kw)).double()


@pytest.mark.parametrize("H,N,L", [(1, 1, 1), (2, 2, 2), (3, 5, 17), (4, 16, 64), (1, 7, 100)])
def test_conv_equals_recurrent(H, N, L):
    m = layer(H, N)
    u = torch.randn(2, L, H, dtype=torch.float64)
    y_conv, y_rec = m(u), m.forward_recurrent(u)
    assert (y_conv - y_rec).abs().max() < 1e-8 * max(1.0, y_rec.abs().max().item())


@pytest.mark.parametrize("H,N,L", [(1, 3, 1), (3, 4, 33), (2, 16, 256)])
def test_kernel_matches_ref(H, N, L):
    m = layer(H, N, bidirectional=True)
    K, K_ref = m.kernel(L), m.kernel_ref(L)
    assert K.shape == (2, H, L)
    assert (K - K_ref).abs().max() < 1e-10 * max(1.0, K_ref.abs().max().item())


def test_bidirectional_is_forward_plus_flipped_backward():
    m = layer(3, 6, bidirectional=True)
    u = torch.randn(2, 20, 3, dtype=torch.float64)
    K = m.kernel(20)
    v = u.transpose(1, 2)
    causal = lambda x, k: torch.stack([sum(k[..., j] * x[..., t - j] for j in range(t + 1))  # noqa: E731
                                       for t in range(x.shape[-1])], -1)
    want = causal(v, K[0]) + causal(v.flip(-1), K[1]).flip(-1) + m.D[:, None] * v
    torch.testing.assert_close(m(u), want.transpose(1, 2), rtol=1e-10, atol=1e-10)
    with pytest.raises(RuntimeError, match="bidirectional"):
        m.step(u[:, 0], m.initial_state(2))


def test_gradients_reach_A_B_C_dt():
    m = layer(3, 8)
    m(torch.randn(2, 30, 3, dtype=torch.float64)).square().sum().backward()
    for name in ("A", "B", "C", "D", "log_dt"):
        g = getattr(m, name).grad
        assert g is not None and torch.isfinite(g).all() and g.abs().max() > 0, name


def test_initialization():
    cfg = LSSLConfig(H=64, N=6, dt_min=1e-3, dt_max=1e-1)
    m = LSSL(cfg)
    A, B = transition("legs", 6)
    torch.testing.assert_close(m.A.double(), A, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m.B[5].double(), B, rtol=1e-6, atol=1e-6)
    dt = m.log_dt.exp()
    assert (dt >= 1e-3 * (1 - 1e-6)).all() and (dt <= 1e-1 * (1 + 1e-6)).all()
    assert dt.max() / dt.min() > 10  # spread over the log range
    frozen = LSSL(LSSLConfig(H=2, N=4, learn_A=False))
    assert not frozen.A.requires_grad


def test_discrete_is_stable_at_init():
    m = layer(8, 32)
    Ad, _ = m.discrete()
    assert torch.linalg.eigvals(Ad).abs().max() < 1


@pytest.mark.parametrize("n_layers", [1, 3])
def test_lm_step_mode_equals_forward(n_layers):
    torch.manual_seed(0)
    lm = DeepLSSL(DeepLSSLConfig(vocab_size=13, H=8, N=5, n_layers=n_layers, dt_min=0.01, dt_max=0.5)).double().eval()
    ids = torch.randint(0, 13, (2, 21))
    logits = lm(ids)
    states, outs = lm.initial_state(2), []
    for t in range(ids.shape[1]):
        out, states = lm.step(ids[:, t], states)
        outs.append(out)
    assert (torch.stack(outs, 1) - logits).abs().max() < 1e-8


def test_lm_is_causal():
    torch.manual_seed(0)
    lm = DeepLSSL(DeepLSSLConfig(vocab_size=7, H=8, N=4, n_layers=2)).double().eval()
    ids = torch.randint(0, 7, (1, 16))
    ids2 = ids.clone()
    ids2[0, 10:] = (ids2[0, 10:] + 1) % 7
    torch.testing.assert_close(lm(ids)[:, :10], lm(ids2)[:, :10], rtol=0, atol=1e-12)


def test_classifier_shapes_and_bidirectional():
    for bid in (False, True):
        m = DeepLSSL(DeepLSSLConfig(d_input=3, d_output=5, H=8, N=4, bidirectional=bid))
        assert m(torch.randn(4, 11, 3)).shape == (4, 5)


def test_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(0)
    cfg = DeepLSSLConfig(vocab_size=9, H=8, N=4, n_layers=2)
    a = DeepLSSL(cfg).eval()
    save_model(tmp_path / "ckpt", a, cfg)
    torch.manual_seed(1)
    b = load_model_state(tmp_path / "ckpt", DeepLSSL(cfg)).eval()
    ids = torch.randint(0, 9, (3, 17))
    assert torch.equal(a(ids), b(ids))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="dt_min"):
        LSSLConfig(dt_min=0.1, dt_max=0.01)
    with pytest.raises(ValueError, match="H and N"):
        LSSLConfig(H=0)
    with pytest.raises(ValueError, match="causal"):
        DeepLSSLConfig(vocab_size=5, bidirectional=True)
    with pytest.raises(ValueError, match="u must be"):
        LSSL(LSSLConfig(H=4, N=2))(torch.randn(2, 3, 5))
    with pytest.raises(RuntimeError, match="step mode"):
        DeepLSSL(DeepLSSLConfig()).step(torch.zeros(1), [])
