"""The weight EMA (ssmlab.core.ema) and its place in the shared recipe: formula, swap, resume, train_lm.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ssmlab.core.ema import ParamEMA, averaged_parameters
from ssmlab.core.mamba import MambaLMHeadModel, preset
from ssmlab.core.testing import load_script
from ssmlab.core.training import (CHECKPOINT_NAME, LIVE_SUFFIX, GeneratedBatches, TrainConfig, make_ema,
                                  save_checkpoint, train)
from ssmlab.datasets.synthetic import IGNORE, induction_heads

torch.set_num_threads(1)
STAGE = Path(__file__).resolve().parents[1]


class Tiny(torch.nn.Module):
    """Two parameters, a buffer and a non-float parameter: what the EMA must average, and what it must not."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        self.b = torch.nn.Parameter(torch.tensor(0.5))
        self.register_buffer("count", torch.tensor(7.0))
        self.idx = torch.nn.Parameter(torch.tensor([3]), requires_grad=False)  # integer: never averaged


def _set(model: Tiny, w, b) -> None:
    with torch.no_grad():
        model.w.copy_(torch.tensor(w))
        model.b.fill_(b)


def test_update_matches_the_formula_by_hand():
    model = Tiny()
    ema = ParamEMA(model, decay=0.9)
    assert set(ema.shadow) == {"w", "b"}  # no buffer, no integer parameter
    _set(model, [3.0, 0.0], 1.5)
    ema.update(model)  # 0.9 * [1, -2] + 0.1 * [3, 0] = [1.2, -1.8];  0.9 * 0.5 + 0.1 * 1.5 = 0.6
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([1.2, -1.8]))
    torch.testing.assert_close(ema.shadow["b"], torch.tensor(0.6))
    _set(model, [0.0, 10.0], -0.4)
    ema.update(model)  # 0.9 * [1.2, -1.8] + 0.1 * [0, 10] = [1.08, -0.62];  0.9 * 0.6 - 0.04 = 0.5
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([1.08, -0.62]))
    torch.testing.assert_close(ema.shadow["b"], torch.tensor(0.5))
    assert ema.num_updates == 2
    assert model.count.item() == 7.0 and model.idx.item() == 3


def test_start_step_copies_then_averages():
    model = Tiny()
    ema = ParamEMA(model, decay=0.5, start_step=2)
    _set(model, [4.0, 4.0], 4.0)
    ema.update(model)  # update 1 <= start_step: a copy
    _set(model, [2.0, 2.0], 2.0)
    ema.update(model)  # update 2: a copy
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([2.0, 2.0]))
    _set(model, [0.0, 0.0], 0.0)
    ema.update(model)  # update 3: averaging, 0.5 * 2 + 0.5 * 0
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(ema.shadow["b"], torch.tensor(1.0))


def test_shadows_are_at_least_float32_and_tied_weights_count_once():
    model = MambaLMHeadModel(preset("tiny", d_model=16, vocab_size=10, d_state=4))  # lm_head tied to the embedding
    names = set(averaged_parameters(model))
    assert "lm_head.weight" not in names and "backbone.embedding.weight" in names
    ema = ParamEMA(model.to(torch.bfloat16), 0.99)
    assert {s.dtype for s in ema.shadow.values()} == {torch.float32}
    assert {s.dtype for s in ParamEMA(model.to(torch.float64), 0.99).shadow.values()} == {torch.float64}


def test_bf16_parameters_still_move_the_average():
    """The reason for float32 shadows: a 1e-3 step of the average is below bf16's resolution at 1."""
    model = torch.nn.Linear(1, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = ParamEMA(model, 0.999)
    with torch.no_grad():
        model.weight.fill_(2.0)
    for _ in range(10):
        ema.update(model)
    assert ema.shadow["weight"].item() == pytest.approx(2 - 0.999**10, rel=1e-6)


def test_swapped_in_restores_the_live_weights_exactly_even_on_error():
    torch.manual_seed(0)
    model = MambaLMHeadModel(preset("tiny", d_model=16, vocab_size=10, d_state=4))
    ema = ParamEMA(model, 0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update(model)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped_in(model) as m:
        assert m is model
        for name, p in averaged_parameters(model).items():
            assert torch.equal(p, ema.shadow[name])
        assert torch.equal(model.lm_head.weight, ema.shadow["backbone.embedding.weight"])  # still tied
    assert all(torch.equal(v, live[k]) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="boom"):
        with ema.swapped_in(model):
            raise RuntimeError("boom")
    assert all(torch.equal(v, live[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_state_dict_round_trip_and_mismatch():
    model = Tiny()
    ema = ParamEMA(model, 0.9)
    _set(model, [3.0, 0.0], 1.5)
    ema.update(model)
    other = ParamEMA(Tiny(), 0.9)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 1 and all(torch.equal(other.shadow[k], v) for k, v in ema.shadow.items())
    with pytest.raises(KeyError, match="do not match"):
        ema.update(torch.nn.Linear(2, 2))
    with pytest.raises(KeyError, match="does not match"):
        other.load_state_dict({"shadow": {"w": torch.zeros(2)}, "num_updates": 0})


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, float("nan")])
def test_decay_validation(bad):
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=bad)
    with pytest.raises(ValueError, match="decay"):
        ParamEMA(Tiny(), bad)


def test_start_step_validation_and_off_by_default():
    with pytest.raises(ValueError, match="ema_start_step"):
        TrainConfig(ema_decay=0.9, ema_start_step=-1)
    with pytest.raises(ValueError, match="decay"):
        ParamEMA(Tiny(), 0)  # off is the config's 0, not an EMA of decay 0
    assert make_ema(Tiny(), TrainConfig()) is None


# --------------------------------------------------------------------------- in the recipe


def _task_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE)


def _fresh_model():
    torch.manual_seed(123)
    return MambaLMHeadModel(preset("tiny", d_model=16, vocab_size=10, d_state=4))


def _stream():
    return GeneratedBatches(lambda g: induction_heads(4, seq_len=12, vocab_size=10, generator=g), seed=3)


def _probe(model):
    return {"probe": model(torch.arange(10)[None]).float().pow(2).mean()}


class _Killed(Exception):
    pass


def test_eval_logs_ema_and_live_metrics():
    cfg = TrainConfig(lr=1e-2, max_steps=6, warmup_steps=1, eval_every=3, progress=False, ema_decay=0.7)
    model = _fresh_model()
    res = train(model, _task_loss, _stream(), cfg, _probe)
    evals = [h for h in res.history if h["kind"] == "eval"]
    assert [h["step"] for h in evals] == [3, 6] and all(set(h) == {"kind", "step", "probe", "probe" + LIVE_SUFFIX}
                                                        for h in evals)
    model.eval()
    with torch.no_grad():
        assert evals[-1]["probe" + LIVE_SUFFIX] == _probe(model)["probe"].item()
        with res.ema.swapped_in(model):
            assert evals[-1]["probe"] == _probe(model)["probe"].item()
    assert evals[-1]["probe"] != evals[-1]["probe" + LIVE_SUFFIX]
    assert res.ema.num_updates == 6


def test_killed_and_resumed_run_with_ema_equals_uninterrupted(tmp_path):
    common = dict(lr=1e-2, max_steps=12, warmup_steps=3, log_every=1, progress=False, grad_accum=2, eval_every=4,
                  ema_decay=0.8, ema_start_step=2)
    full = train(_fresh_model(), _task_loss, _stream(), TrainConfig(**common, out_dir=str(tmp_path / "a")), _probe)

    def kill_at_7(step, record):
        if step == 7:
            raise _Killed

    cfg_b = TrainConfig(**common, out_dir=str(tmp_path / "b"), ckpt_every=5)
    with pytest.raises(_Killed):
        train(_fresh_model(), _task_loss, _stream(), cfg_b, _probe, on_step=kill_at_7)
    state = torch.load(tmp_path / "b" / CHECKPOINT_NAME, weights_only=False)
    assert state["step"] == 5 and state["ema"]["num_updates"] == 5
    torch.manual_seed(999)
    resumed = train(_fresh_model(), _task_loss, _stream(), cfg_b, _probe)
    assert resumed.resumed_from == 5
    keys = ("kind", "loss", "probe", "probe" + LIVE_SUFFIX)
    tail = [tuple(h.get(k) for k in keys) for h in full.history if h["step"] > 5]
    assert [tuple(h.get(k) for k in keys) for h in resumed.history] == tail  # bit-identical, EMA evals included
    assert resumed.ema.shadow.keys() == full.ema.shadow.keys()
    for name, s in full.ema.shadow.items():
        assert torch.equal(resumed.ema.shadow[name], s), name
    assert resumed.ema.num_updates == full.ema.num_updates == 12


def test_resuming_a_checkpoint_without_ema_starts_it_there(tmp_path):
    base = dict(lr=1e-2, max_steps=4, warmup_steps=1, progress=False, out_dir=str(tmp_path))
    train(_fresh_model(), _task_loss, _stream(), TrainConfig(**base))
    model = _fresh_model()
    with pytest.warns(UserWarning, match="no EMA state"):
        res = train(model, _task_loss, _stream(), TrainConfig(**{**base, "max_steps": 5}, ema_decay=0.5))
    assert res.resumed_from == 4 and res.ema.num_updates == 1
    ckpt = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=False)
    assert ckpt["ema"]["num_updates"] == 1


def test_a_passed_ema_must_match_the_config():
    model = _fresh_model()
    cfg = TrainConfig(max_steps=1, warmup_steps=0, progress=False, ema_decay=0.9)
    with pytest.raises(ValueError, match="not the one cfg asks for"):
        train(model, _task_loss, _stream(), cfg, ema=ParamEMA(model, 0.5))
    kept = ParamEMA(model, 0.9)
    assert train(model, _task_loss, _stream(), cfg, ema=kept).ema is kept and kept.num_updates == 1


def test_save_checkpoint_without_ema_has_none(tmp_path):
    model = Tiny()
    opt = torch.optim.SGD([model.w], lr=0.1)
    state = torch.load(save_checkpoint(tmp_path / "c.pt", model, opt, None, 0), weights_only=False)
    assert state["ema"] is None


# --------------------------------------------------------------------------- train_lm.py


def test_train_lm_with_ema_saves_and_reports_the_averaged_weights(tmp_path):
    from safetensors.torch import load_file

    text = tmp_path / "t.txt"
    text.write_text("\n".join(f"KING:\nthe crown of night and day {i % 7}." for i in range(300)), encoding="utf-8")
    train_lm = load_script(STAGE / "train_lm.py")
    out = tmp_path / "run"
    args = ["--text", str(text), "--out", str(out), "--model", "mamba", "--size", "test", "--steps", "6",
            "--seq-len", "32", "--batch-size", "4", "--warmup", "2", "--lr", "1e-2", "--eval-every", "3",
            "--eval-windows", "4", "--log-every", "3", "--ckpt-every", "3", "--no-progress", "--device", "cpu",
            "--ema-decay", "0.6", "--ema-start-step", "1"]
    res = train_lm.main(args)["mamba"]
    assert res["ema_decay"] == 0.6 and res["ema_start_step"] == 1 and res["saved_weights"] == "ema"
    log = train_lm.read_log(out / "mamba" / "log.jsonl")
    last = [r for r in log if r["kind"] == "eval"][-1]
    assert res["val_loss"] == last["val_loss"] and res["val_loss_live"] == last["val_loss_live"]
    assert res["val_loss"] != res["val_loss_live"] and math.isfinite(res["val_loss"])
    ckpt = torch.load(out / "mamba" / CHECKPOINT_NAME, weights_only=False)
    saved = load_file(str(out / "mamba" / "model" / "model.safetensors"))
    assert ckpt["ema"]["decay"] == 0.6 and set(ckpt["ema"]["shadow"]) <= set(saved)
    for name, s in ckpt["ema"]["shadow"].items():  # the published weights are the averaged ones
        assert torch.equal(saved[name], s), name
    assert any(not torch.equal(ckpt["model"][n], s) for n, s in ckpt["ema"]["shadow"].items())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mamba"]["saved_weights"] == "ema"
    with pytest.raises(SystemExit):
        train_lm.parse_args(["--ema-decay", "1"])
