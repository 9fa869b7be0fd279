"""State passing (`ssmlab.core.state_passing`): a passed state is exactly the final state of the neighbouring sequence."""

import json
from pathlib import Path

import pytest
import torch

from ssmlab.core.mamba import MambaConfig, MambaLMHeadModel
from ssmlab.core.state_passing import even_rows, passed_states
from ssmlab.core.testing import load_script

STAGE = Path(__file__).resolve().parents[1]


def _model(mixer="mamba", seed=0):
    torch.manual_seed(seed)
    cfg = MambaConfig(d_model=16, n_layer=2, vocab_size=11, d_state=4, mixer=mixer)
    return MambaLMHeadModel(cfg).double()


@pytest.mark.parametrize("batch,length", [(1, 1), (2, 5), (5, 13)])
def test_passed_state_equals_running_the_concatenation(batch, length):
    model = _model()
    x = torch.randint(0, 11, (batch, length), generator=torch.Generator().manual_seed(batch * 100 + length))
    out = model(x, passed_states(model, x))
    plain = model(x)
    for i in range(batch):
        if i % 2:  # odd rows start from zero: the plain forward pass
            torch.testing.assert_close(out[i], plain[i], rtol=1e-10, atol=1e-10)
        else:  # even rows continue row i - 1 (row 0: the last row), as if it had been read first
            both = torch.cat([x[i - 1], x[i]])[None]
            torch.testing.assert_close(out[i], model(both)[0, length:], rtol=1e-10, atol=1e-10)


def test_rows_choose_which_sequences_get_a_state():
    model = _model(seed=1)
    x = torch.randint(0, 11, (4, 7), generator=torch.Generator().manual_seed(3))
    none = model(x, passed_states(model, x, rows=torch.zeros(4, dtype=torch.bool)))
    torch.testing.assert_close(none, model(x), rtol=1e-10, atol=1e-10)
    every = model(x, passed_states(model, x, rows=torch.ones(4, dtype=torch.bool)))
    assert (every - model(x)).abs().amax(-1).amax(-1).min() > 1e-6  # every row changed
    assert even_rows(5).tolist() == [True, False, True, False, True]


def test_gradients_flow_to_the_weights_not_into_the_passed_state():
    model = _model(seed=2)
    x = torch.randint(0, 11, (4, 6), generator=torch.Generator().manual_seed(5))
    caches = passed_states(model, x)
    assert all(not c.ssm_state.requires_grad and not c.conv_state.requires_grad for c in caches)
    model(x, caches).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_bad_inputs_raise():
    x = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="selective"):
        passed_states(_model(mixer="s4d"), x)
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        passed_states(_model(), x[0])
    with pytest.raises(ValueError, match="rows"):
        passed_states(_model(), x, rows=torch.ones(3, dtype=torch.bool))


def test_selective_copying_with_state_passing_runs(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(STAGE))  # as running the script would
    script = load_script(STAGE / "selective_copying.py")
    common = ["--steps", "3", "--d-model", "8", "--n-tokens", "2", "--train-len", "8", "--test-lens", "8,16",
              "--eval-samples", "4", "--batch-size", "4", "--no-progress", "--threads", "1", "--out", str(tmp_path),
              "--runs", str(tmp_path / "runs"), "--state-passing"]
    assert script.main(["--models", "mamba", *common]) == 0
    res = json.loads((tmp_path / "selective_copying_cpu.json").read_text())
    assert res["args"]["state_passing"] is True and res["models"]["mamba"]["steps_done"] == 3
    for models in ("s4d", "mamba,s4d"):  # refused before any model trains
        with pytest.raises(SystemExit, match="Mamba model only"):
            script.main(["--models", models, *common])
