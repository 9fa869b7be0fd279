"""The length curriculum: `CurriculumBatches` (core/training.py) and `selective_copying.py --curriculum`.

The spec is parsed and refused as documented, each batch has its phase's length, and a run
stopped in the middle of a phase (exit 75, rerun) resumes to the losses of an uninterrupted run.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssmlab.core.mamba import MambaLMHeadModel, preset
from ssmlab.core.testing import load_script
from ssmlab.core.training import LOG_NAME, CurriculumBatches, TrainConfig, train
from ssmlab.datasets.synthetic import IGNORE, selective_copying

STAGE = Path(__file__).resolve().parents[1]
TINY = ["--models", "mamba", "--d-model", "8", "--n-tokens", "2", "--test-lens", "8,16", "--eval-samples", "4",
        "--batch-size", "4", "--no-progress", "--threads", "1"]


@pytest.fixture
def script(monkeypatch):
    monkeypatch.syspath_prepend(str(STAGE))  # as running the script would
    return load_script(STAGE / "selective_copying.py")


def _copying(length, g):
    return selective_copying(3, seq_len=length, n_tokens=2, vocab_size=10, generator=g)


# --------------------------------------------------------------------------- the spec


def test_spec_parses(script):
    assert script.parse_curriculum("256:2000,1024:2000,4096:4000") == [(256, 2000), (1024, 2000), (4096, 4000)]
    assert script.parse_curriculum(" 64 : 600 ") == [(64, 600)]  # one phase: a plain run, written as a curriculum


@pytest.mark.parametrize("spec, match", [
    ("256:2000,1024", "LENGTH:STEPS"), ("256-2000", "LENGTH:STEPS"), ("", "LENGTH:STEPS"), ("a:1", "LENGTH:STEPS"),
    ("256:-5", "LENGTH:STEPS"), ("256:2000,,1024:1", "LENGTH:STEPS"),
    ("256:0,1024:10", ">= 1 steps"), ("0:10", "length >= 1"),
    ("1024:10,256:10", "increase"), ("256:10,256:10", "increase"),
])
def test_malformed_specs_are_refused(script, spec, match):
    with pytest.raises(ValueError, match=match):
        script.parse_curriculum(spec)


def test_arguments_the_curriculum_sets(script, tmp_path):
    args = script.parse_args(["--preset", "paper", "--curriculum", "64:600,256:600", "--out", str(tmp_path)])
    assert args.curriculum == [(64, 600), (256, 600)]
    assert args.steps == 1200 and args.warmup == 60  # one schedule over the total, warmup 5% of it
    assert args.train_len == 256  # no --train-len: the last phase's length
    assert args.tag == "curriculum" and args.train_samples == 0
    same = script.parse_args(["--preset", "paper", "--curriculum", "64:600,256:600", "--train-len", "256",
                              "--steps", "1200", "--tag", "c2", "--out", str(tmp_path)])
    assert same.train_len == 256 and same.steps == 1200 and same.tag == "c2"
    plain = script.parse_args(["--preset", "paper", "--out", str(tmp_path)])
    assert plain.curriculum is None and plain.tag is None and plain.steps == 17000


@pytest.mark.parametrize("argv, match", [
    (["--preset", "study", "--curriculum", "32:10,64:10"], "--train-samples 0"),
    (["--preset", "paper", "--train-samples", "100", "--curriculum", "64:10,4096:10"], "--train-samples 0"),
    (["--preset", "paper", "--curriculum", "64:10,1024:10", "--train-len", "4096"], "must end at the training length"),
    (["--preset", "paper", "--curriculum", "64:10,256:10", "--steps", "30"], "add up to 20"),
    (["--preset", "paper", "--curriculum", "8:10,256:10"], "cannot hold 16 tokens"),
    (["--preset", "paper", "--curriculum", "256:10,64:10"], "increase"),
    (["--preset", "paper", "--curriculum", "64:0,256:10"], ">= 1 steps"),
    (["--preset", "paper", "--tag", "a/b"], "--tag"),
])
def test_bad_arguments_are_refused_with_a_message(script, capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        script.parse_args(argv)
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_help_mentions_the_curriculum():
    out = subprocess.run([sys.executable, str(STAGE / "selective_copying.py"), "--help"], capture_output=True,
                         text=True, timeout=300)
    text = " ".join(out.stdout.split())  # argparse wraps the help at the terminal width
    assert out.returncode == 0 and "--curriculum LEN:STEPS" in text and "Its steps replace --steps" in text
    assert "--tag" in text


# --------------------------------------------------------------------------- the data stream


def test_each_batch_has_its_phase_length():
    data = CurriculumBatches(_copying, [(4, 2), (7, 3), (12, 1)], seed=0)
    assert data.total == 6 and data.last_length == 4  # nothing drawn yet: the first phase
    lengths = []
    for _ in range(8):  # two batches past the end: the stream stays at the last length
        x, y = next(data)
        lengths.append(x.shape[1] - 2)  # the inputs hold the context, then n_tokens = 2 markers
        assert data.last_length == lengths[-1]
    assert lengths == [4, 4, 7, 7, 7, 12, 12, 12]
    assert [data.phase_of(i) for i in range(7)] == [0, 0, 1, 1, 1, 2, 2]


def test_state_resumes_mid_phase_and_refuses_other_phases():
    phases = [(4, 2), (7, 3)]
    data = CurriculumBatches(_copying, phases, seed=5)
    for _ in range(3):  # into the second phase
        next(data)
    state = data.state_dict()
    after = [next(data) for _ in range(3)]
    again = CurriculumBatches(_copying, phases, seed=99)  # the seed is in the saved generator state
    again.load_state_dict(state)
    assert again.drawn == 3 and again.last_length == 7
    for a, b in zip(after, [next(again) for _ in range(3)]):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="written with the curriculum"):
        CurriculumBatches(_copying, [(4, 2), (7, 4)], seed=5).load_state_dict(state)


@pytest.mark.parametrize("phases, match", [([], "at least one"), ([(4, 0)], ">= 1 batches"), ([(0, 3)], "length")])
def test_bad_phases(phases, match):
    with pytest.raises(ValueError, match=match):
        CurriculumBatches(_copying, phases)


class _Killed(Exception):
    pass


def _loss(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE)


def _model():
    torch.manual_seed(1)
    return MambaLMHeadModel(preset("tiny", d_model=8, vocab_size=10, d_state=4))


def test_train_killed_mid_phase_resumes_exactly(tmp_path):
    """train() with the stream: killed at step 5 (phase 2 of 3), resumed from step 4's checkpoint."""
    phases = [(4, 3), (6, 4), (9, 2)]
    common = dict(lr=1e-2, max_steps=9, warmup_steps=2, log_every=1, progress=False)
    full = train(_model(), _loss, CurriculumBatches(_copying, phases, seed=2), TrainConfig(**common, out_dir=str(tmp_path / "a")))

    def kill_at_5(step, record):
        if step == 5:
            raise _Killed

    cfg = TrainConfig(**common, out_dir=str(tmp_path / "b"), ckpt_every=4)
    with pytest.raises(_Killed):
        train(_model(), _loss, CurriculumBatches(_copying, phases, seed=2), cfg, on_step=kill_at_5)
    resumed_data = CurriculumBatches(_copying, phases, seed=2)
    resumed = train(_model(), _loss, resumed_data, cfg)
    assert resumed.resumed_from == 4 and resumed_data.drawn == 9
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history[4:]]  # bit-identical


# --------------------------------------------------------------------------- the script


def _losses(folder):
    log = [json.loads(line) for line in (folder / LOG_NAME).read_text().splitlines()]
    return {r["step"]: r["loss"] for r in log if r["kind"] == "train"}


def test_script_stopped_every_step_resumes_to_the_uninterrupted_run(script, tmp_path):
    """The time limit stops after each step (exit 75), mid-phase and at the boundary; reruns resume."""
    argv = TINY + ["--curriculum", "6:3,10:3"]
    assert script.main(argv + ["--out", str(tmp_path / "a")]) == 0
    chunked = argv + ["--out", str(tmp_path / "b"), "--time-limit-min", "1e-9"]
    codes = [script.main(chunked) for _ in range(6)]
    assert codes == [75] * 5 + [0]
    runs = "runs/selective_copying_cpu_curriculum_mamba"
    assert _losses(tmp_path / "b" / runs) == _losses(tmp_path / "a" / runs)  # every step, bit-identical
    a, b = (json.loads((tmp_path / d / "selective_copying_cpu_curriculum.json").read_text()) for d in "ab")
    assert a["models"]["mamba"]["accuracy"] == b["models"]["mamba"]["accuracy"]
    assert a["curriculum"] == [{"length": 6, "steps": 3}, {"length": 10, "steps": 3}]
    assert a["args"]["train_len"] == 10 and a["models"]["mamba"]["steps_done"] == 6


def test_curriculum_and_plain_results_do_not_collide(script, tmp_path):
    assert script.main(TINY + ["--steps", "2", "--train-len", "8", "--out", str(tmp_path)]) == 0
    assert script.main(TINY + ["--curriculum", "4:10,8:2", "--out", str(tmp_path)]) == 0  # validates every step
    plain = json.loads((tmp_path / "selective_copying_cpu.json").read_text())
    curr = json.loads((tmp_path / "selective_copying_cpu_curriculum.json").read_text())
    assert plain["curriculum"] is None and curr["curriculum"][0] == {"length": 4, "steps": 10}
    assert plain["models"]["mamba"]["resumed_from"] is None and curr["models"]["mamba"]["resumed_from"] is None
    log = [json.loads(line) for line in (tmp_path / "runs/selective_copying_cpu_curriculum_mamba" / LOG_NAME)
           .read_text().splitlines()]
    evals = {r["step"]: r for r in log if r["kind"] == "eval"}
    assert sorted(evals) == list(range(1, 13)) and all("val_acc" in r for r in evals.values())
    # the length just trained on, while it is not the final length
    assert all(("val_acc_phase" in evals[s]) == (s <= 10) for s in evals)
