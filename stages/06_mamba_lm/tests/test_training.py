"""The shared training recipe: weight-decay groups, schedule, accumulation, exact resume, atomic writes."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from ssmlab.core.checkpoint import atomic_write
from ssmlab.core.mamba import MambaLMHeadModel, preset
from ssmlab.core.training import (CHECKPOINT_NAME, EXTRA_STATE_KEY, LOG_NAME, EpochBatches, GeneratedBatches,
                                  TrainConfig, lr_factor, make_optimizer, make_scheduler, param_groups, train)
from ssmlab.datasets.synthetic import IGNORE, induction_heads

torch.set_num_threads(1)


def test_weight_decay_groups_exactly_as_specified():
    cfg = preset("tiny", vocab_size=20, n_layer=2, bias=True)
    model = MambaLMHeadModel(cfg)
    groups = {("decay" if g["weight_decay"] > 0 else "no_decay"): g for g in param_groups(model, 0.1)}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    expected_decay, expected_skip = set(), {"backbone.embedding.weight", "backbone.norm_f.weight"}
    for i in range(cfg.n_layer):
        p = f"backbone.layers.{i}."
        expected_decay |= {p + f"mixer.{n}.weight" for n in ("in_proj", "conv1d", "x_proj", "dt_proj", "out_proj")}
        expected_skip |= {p + "norm.weight", p + "mixer.A_log", p + "mixer.D"}
        expected_skip |= {p + f"mixer.{n}.bias" for n in ("in_proj", "conv1d", "dt_proj", "out_proj")}
    assert set(groups["decay"]["names"]) == expected_decay
    assert set(groups["no_decay"]["names"]) == expected_skip  # tied lm_head.weight is the embedding: listed once
    n_params = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n_params == model.num_parameters()


def test_untied_head_is_decayed_like_a_linear_layer():
    model = MambaLMHeadModel(preset("tiny", tie_embeddings=False))
    names = {n for g in param_groups(model, 0.1) if g["weight_decay"] > 0 for n in g["names"]}
    assert "lm_head.weight" in names and "backbone.embedding.weight" not in names


def test_optimizer_settings():
    opt = make_optimizer(MambaLMHeadModel(preset("tiny")), TrainConfig(lr=3e-4))
    assert isinstance(opt, torch.optim.AdamW)
    for g in opt.param_groups:
        assert g["betas"] == (0.9, 0.95) and g["lr"] == 3e-4 and "names" not in g
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.1]


def test_schedule_values_at_chosen_steps():
    # warmup 10, 110 steps in all, floor 0.1
    f = lambda s: lr_factor(s, 10, 110, 0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(10 + 99 // 2) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 49 / 99)))
    assert f(109) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))  # monotone after warmup
    assert lr_factor(0, 0, 5, 0.0) == pytest.approx(1.0)  # no warmup
    # the scheduler applies exactly these factors
    model = torch.nn.Linear(2, 2)
    cfg = TrainConfig(lr=2e-3, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg)
    seen = []
    for _ in range(110):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2e-3 * f(s) for s in range(110)])


def _task_loss(model, batch):
    x, y = batch
    logits = model(x)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE)
    return loss, {"acc": (logits.argmax(-1)[y != IGNORE] == y[y != IGNORE]).float().mean()}


def _fresh_model():
    torch.manual_seed(123)
    return MambaLMHeadModel(preset("tiny", d_model=16, vocab_size=10, d_state=4))


def _stream(kind):
    if kind == "generated":
        return GeneratedBatches(lambda g: induction_heads(4, seq_len=12, vocab_size=10, generator=g), seed=3)
    x, y = induction_heads(24, seq_len=12, vocab_size=10, generator=torch.Generator().manual_seed(4))
    return EpochBatches.from_tensors(x, y, batch_size=5, seed=1)  # 24 / 5: epochs wrap inside the run


class _Killed(Exception):
    pass


@pytest.mark.parametrize("kind", ["generated", "epochs"])
def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, kind):
    common = dict(lr=1e-2, max_steps=12, warmup_steps=3, log_every=1, progress=False, grad_accum=2, eval_every=4)
    eval_fn = lambda m: {"probe": m(torch.arange(10)[None]).sum()}  # noqa: E731
    full = train(_fresh_model(), _task_loss, _stream(kind), TrainConfig(**common, out_dir=str(tmp_path / "a")), eval_fn)

    def kill_at_7(step, record):
        if step == 7:
            raise _Killed

    cfg_b = TrainConfig(**common, out_dir=str(tmp_path / "b"), ckpt_every=5)
    with pytest.raises(_Killed):
        train(_fresh_model(), _task_loss, _stream(kind), cfg_b, eval_fn, on_step=kill_at_7)
    torch.manual_seed(999)  # the resumed process starts from a different global RNG state
    resumed = train(_fresh_model(), _task_loss, _stream(kind), cfg_b, eval_fn)
    assert resumed.resumed_from == 5  # the last checkpoint before the kill
    tail = [(h["kind"], h.get("loss"), h.get("probe")) for h in full.history if h["step"] > 5]
    again = [(h["kind"], h.get("loss"), h.get("probe")) for h in resumed.history]
    assert again == tail  # bit-identical losses and evaluations
    log = [json.loads(line) for line in (tmp_path / "b" / LOG_NAME).read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "train"] == list(range(1, 8)) + list(range(6, 13))


class _KeepLowest:
    """A minimal on_eval + extra_state: every validation seen, and the weights of the lowest probe."""

    def __init__(self):
        self.seen, self.best, self.weights = [], None, None

    def __call__(self, step, metrics, model):
        with torch.no_grad():
            # the weights handed over are those the plain metric names were computed on
            model.eval()
            assert _probe_value(model) == metrics["probe"]
            model.train()
        self.seen.append((step, metrics["probe"]))
        if self.best is None or metrics["probe"] < self.best[1]:
            self.best = (step, metrics["probe"])
            self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def state_dict(self):
        return {"seen": list(self.seen), "best": self.best, "weights": self.weights}

    def load_state_dict(self, state):
        self.seen, self.best, self.weights = list(state["seen"]), state["best"], state["weights"]


def _probe_value(model):
    return model(torch.arange(10)[None]).float().pow(2).mean().item()


@pytest.mark.parametrize("ema_decay", [0.0, 0.8])
def test_on_eval_state_resumes_with_the_run(tmp_path, ema_decay):
    """extra_state rides in the checkpoint: a killed run's resumed hook has seen every validation, once."""
    common = dict(lr=1e-2, max_steps=12, warmup_steps=3, progress=False, eval_every=2, ema_decay=ema_decay)
    eval_fn = lambda m: {"probe": _probe_value(m)}  # noqa: E731
    full = _KeepLowest()
    train(_fresh_model(), _task_loss, _stream("generated"), TrainConfig(**common, out_dir=str(tmp_path / "a")),
          eval_fn, on_eval=full, extra_state=full)
    assert [s for s, _ in full.seen] == [2, 4, 6, 8, 10, 12]

    def kill_at_7(step, record):
        if step == 7:
            raise _Killed

    cfg_b = TrainConfig(**common, out_dir=str(tmp_path / "b"), ckpt_every=4)  # a validation's step: on_eval first
    with pytest.raises(_Killed):
        killed = _KeepLowest()
        train(_fresh_model(), _task_loss, _stream("generated"), cfg_b, eval_fn, on_step=kill_at_7,
              on_eval=killed, extra_state=killed)
    resumed = _KeepLowest()
    res = train(_fresh_model(), _task_loss, _stream("generated"), cfg_b, eval_fn, on_eval=resumed, extra_state=resumed)
    assert res.resumed_from == 4
    assert resumed.seen == full.seen and resumed.best == full.best  # 2 and 4 restored, 6 .. 12 replayed
    for k, v in full.weights.items():
        assert torch.equal(resumed.weights[k], v), k


def test_checkpoint_without_extra_state_leaves_it_as_given(tmp_path):
    base = dict(lr=1e-2, max_steps=2, warmup_steps=1, progress=False, out_dir=str(tmp_path))
    train(_fresh_model(), _task_loss, _stream("generated"), TrainConfig(**base))
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=False)["extra"] == {}  # as before the hook
    kept = _KeepLowest()
    with pytest.warns(UserWarning, match="no extra_state"):
        train(_fresh_model(), _task_loss, _stream("generated"), TrainConfig(**{**base, "max_steps": 3}),
              lambda m: {"probe": _probe_value(m)}, on_eval=kept, extra_state=kept)
    assert [s for s, _ in kept.seen] == [3]
    ckpt = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=False)
    assert ckpt["extra"][EXTRA_STATE_KEY]["best"] == kept.best


def test_dropout_rng_is_restored(tmp_path):
    """The global torch RNG (dropout) is part of the checkpoint."""

    class Drop(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return F.dropout(self.lin(x), 0.5, self.training)

    loss = lambda m, b: m(b).pow(2).mean()  # noqa: E731
    data = lambda: GeneratedBatches(lambda g: torch.randn(3, 4, generator=g))  # noqa: E731
    common = dict(max_steps=6, warmup_steps=0, log_every=1, progress=False, out_dir=None)
    torch.manual_seed(0)
    ref = train(Drop(), loss, data(), TrainConfig(**common))
    torch.manual_seed(0)
    cfg = TrainConfig(**{**common, "out_dir": str(tmp_path), "max_steps": 6, "ckpt_every": 3})
    with pytest.raises(_Killed):
        train(Drop(), loss, data(), cfg, on_step=lambda s, r: (_ for _ in ()).throw(_Killed()) if s == 3 else None)
    torch.manual_seed(0)
    out = train(Drop(), loss, data(), cfg)
    assert [h["loss"] for h in out.history if h["kind"] == "train"] == [h["loss"] for h in ref.history][3:]


def test_gradient_accumulation_equals_big_batch():
    x = torch.randn(8, 5)
    y = torch.randn(8, 1)
    loss = lambda m, b: F.mse_loss(m(b[0]), b[1])  # noqa: E731
    results = []
    for accum, bs in [(1, 8), (4, 2)]:
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 1)
        data = EpochBatches.from_tensors(x, y, batch_size=bs, shuffle=False)
        train(model, loss, data, TrainConfig(lr=0.1, max_steps=3, warmup_steps=0, grad_accum=accum, progress=False))
        results.append(torch.cat([model.weight.flatten(), model.bias]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_gradient_clipping_at_one():
    model = torch.nn.Linear(3, 1)
    records = []
    loss = lambda m, b: 1e3 * m(b).sum()  # noqa: E731
    data = GeneratedBatches(lambda g: torch.ones(2, 3))
    train(model, loss, data, TrainConfig(max_steps=1, warmup_steps=0, progress=False), on_step=lambda s, r: records.append(r))
    assert records[0]["grad_norm"] > 1.0  # reported before clipping
    # after clipping the applied gradient has norm 1: AdamW's first step moves each weight by ~lr anyway,
    # so check the clip directly on a gradient
    model.zero_grad()
    loss(model, torch.ones(2, 3)).backward()
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    assert total > 1 and torch.cat([p.grad.flatten() for p in model.parameters()]).norm() == pytest.approx(1.0, rel=1e-5)


def test_time_limit_stops_with_checkpoint_and_resumes(tmp_path):
    cfg = TrainConfig(lr=1e-2, max_steps=5, warmup_steps=1, progress=False, out_dir=str(tmp_path), time_limit_s=1e-9)
    first = train(_fresh_model(), _task_loss, _stream("generated"), cfg)
    assert first.step == 1 and not first.finished and (tmp_path / CHECKPOINT_NAME).exists()
    assert first.history[-1]["kind"] == "stopped"
    cfg2 = TrainConfig(lr=1e-2, max_steps=5, warmup_steps=1, progress=False, out_dir=str(tmp_path))
    second = train(_fresh_model(), _task_loss, _stream("generated"), cfg2)
    assert second.resumed_from == 1 and second.step == 5 and second.finished


def test_bf16_autocast_selection():
    assert TrainConfig(device="cpu").autocast_dtype() is None
    assert TrainConfig(device="cuda").autocast_dtype() == torch.bfloat16
    assert TrainConfig(device="cuda", precision="fp32").autocast_dtype() is None
    assert TrainConfig(device="cpu", precision="bf16").autocast_dtype() == torch.bfloat16
    out = train(_fresh_model(), _task_loss, _stream("generated"),
                TrainConfig(max_steps=2, warmup_steps=0, precision="bf16", progress=False))
    assert all(math.isfinite(h["loss"]) for h in out.history)


@pytest.mark.parametrize("bad, match", [
    (dict(lr=0), "lr"), (dict(max_steps=0), "max_steps"), (dict(warmup_steps=11, max_steps=10), "warmup_steps"),
    (dict(grad_accum=0), "grad_accum"), (dict(precision="fp16"), "precision"), (dict(min_lr_ratio=2), "min_lr_ratio"),
    (dict(weight_decay=-1), "weight_decay"), (dict(eval_every=-1), "eval_every"),
])
def test_bad_train_config(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad)


def test_epoch_batches_cover_each_epoch_once_and_resume():
    data = EpochBatches(10, 3, fetch=lambda idx: idx, seed=0)
    first_epoch = torch.cat([next(data) for _ in range(3)])  # 9 of 10, last partial batch dropped
    assert len(set(first_epoch.tolist())) == 9
    state = data.state_dict()
    after = [next(data) for _ in range(4)]
    again = EpochBatches(10, 3, fetch=lambda idx: idx, seed=0)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(after, [next(again) for _ in range(4)]))
    with pytest.raises(ValueError, match="batch_size"):
        EpochBatches(4, 5, fetch=lambda i: i)
    with pytest.raises(ValueError, match="first dimension"):
        EpochBatches.from_tensors(torch.zeros(3), torch.zeros(4), batch_size=1)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def failing(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, failing)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]
