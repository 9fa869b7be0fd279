"""ladder.py: --help, a --quick run end to end, and rungs of one size at the default."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssmlab.core.ladder import RUNGS, build_rung
from ssmlab.core.seq_models import param_count
from ssmlab.core.testing import load_script

STAGE = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_help_in_a_subprocess():
    out = subprocess.run([sys.executable, str(STAGE / "ladder.py"), "--help"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "--rungs" in out.stdout and "--quick" in out.stdout


def test_quick_run_writes_one_finite_bpc_per_rung(tmp_path):
    result = load_script(STAGE / "ladder.py").main(["--quick", "--no-progress", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "ladder.json").read_text())
    assert list(saved["rungs"]) == list(RUNGS) == ["ssm", "lssl", "s4d", "mamba", "transformer"]
    for name, r in saved["rungs"].items():
        assert math.isfinite(r["val_bpc"]) and 0 < r["val_bpc"] < 10, name
        assert r["val_bpc"] == pytest.approx(result["rungs"][name]["val_bpc"])
        assert r["steps"] == saved["protocol"]["steps"] and r["val_curve"][-1][0] == r["steps"]
        for key in ("params", "batch", "seq_len", "lr", "tokens_per_s"):
            assert r[key] > 0, (name, key)
        assert r["train_seconds"] >= 0 and "ladder.py" in r["command"] and r["machine"], name
    assert (tmp_path / "ladder.png").stat().st_size > 10_000


def test_same_batches_for_every_rung(tmp_path):
    """Equal seeds give equal first losses for equal models: the stream does not depend on the rung."""
    script = load_script(STAGE / "ladder.py")
    common = ["--quick", "--no-progress", "--steps", "2", "--warmup", "1", "--eval-every", "0"]
    a = script.main(common + ["--rungs", "ssm,lssl", "--out", str(tmp_path / "a")])
    b = script.main(common + ["--rungs", "lssl", "--out", str(tmp_path / "b")])
    assert a["rungs"]["lssl"]["train_curve"] == b["rungs"]["lssl"]["train_curve"]


def test_default_sizes_within_25_percent():
    counts = {name: param_count(build_rung(name, V=83)) for name in RUNGS}
    mid = (max(counts.values()) + min(counts.values())) / 2
    assert all(abs(c - mid) <= 0.25 * mid for c in counts.values()), counts
    assert max(counts.values()) <= 1.25 * min(counts.values()), counts


@pytest.mark.parametrize("name", list(RUNGS))
def test_rung_maps_ids_to_logits_over_the_vocabulary(name):
    torch.manual_seed(0)
    model = build_rung(name, V=11, size="quick")
    logits = model(torch.randint(0, 11, (2, 9)))
    assert logits.shape == (2, 9, 11) and torch.isfinite(logits).all()


def test_bad_arguments_are_refused():
    script = load_script(STAGE / "ladder.py")
    for argv in (["--rungs", "rnn"], ["--lr", "rnn=1e-3"], ["--lr", "mamba=-1"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            script.parse_args(argv)
