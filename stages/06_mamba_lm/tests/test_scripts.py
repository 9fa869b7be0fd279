"""The synthetic-task scripts: --help (a real subprocess), and tiny end-to-end runs writing JSON and PNG.

The runs call each script's `main(argv)` in this process (saving the interpreter start-up);
`monkeypatch.syspath_prepend` puts the stage folder on the path as running the script would.
"""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from ssmlab.core.testing import load_script

STAGE = Path(__file__).resolve().parents[1]


def _script(name, monkeypatch):
    monkeypatch.syspath_prepend(str(STAGE))
    return load_script(STAGE / f"{name}.py")


def test_help_in_a_subprocess():
    out = subprocess.run([sys.executable, str(STAGE / "induction_heads.py"), "--help"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "--preset" in out.stdout and "--time-limit-min" in out.stdout


def test_selective_copying_tiny_run(tmp_path, monkeypatch):
    script = _script("selective_copying", monkeypatch)
    rc = script.main(["--models", "mamba,s4d-nogate,transformer", "--steps", "3", "--d-model", "8", "--n-tokens", "2",
                      "--train-len", "8", "--test-lens", "8,16", "--eval-samples", "4", "--batch-size", "4",
                      "--no-progress", "--threads", "1", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "selective_copying_cpu.json").read_text())
    assert set(res["models"]) == {"mamba", "s4d-nogate", "transformer"}
    for m in res["models"].values():
        assert set(m["accuracy"]) == {"8", "16"} and all(0 <= a <= 1 for a in m["accuracy"].values())
        assert m["steps_done"] == 3 and m["params"] > 0
    assert (tmp_path / "selective_copying_cpu.png").stat().st_size > 1000


def test_induction_heads_tiny_run_time_limit_and_resume(tmp_path, monkeypatch):
    script = _script("induction_heads", monkeypatch)
    common = ["--steps", "4", "--d-model", "8", "--train-len", "8", "--min-test", "8", "--max-test", "16",
              "--eval-samples", "4", "--batch-size", "4", "--no-progress", "--threads", "1", "--out", str(tmp_path)]
    assert script.main(common + ["--time-limit-min", "1e-9"]) == 75  # stopped after one step: rerun to resume
    assert not (tmp_path / "induction_heads_cpu.json").exists()
    assert script.main(common) == 0
    res = json.loads((tmp_path / "induction_heads_cpu.json").read_text())
    assert res["models"]["mamba"]["steps_done"] == 4 and set(res["models"]["mamba"]["accuracy"]) == {"8", "16"}
    assert (tmp_path / "induction_heads_cpu.png").exists()


def test_unknown_model_kind_is_refused(tmp_path, monkeypatch):
    script = _script("induction_heads", monkeypatch)
    with pytest.raises(ValueError, match="unknown model kind"):
        script.main(["--models", "lstm", "--steps", "1", "--out", str(tmp_path), "--no-progress"])


@pytest.mark.parametrize("d_model,vocab", [(32, 16), (64, 16), (64, 32)])
def test_transformer_baseline_matches_mamba_parameters(d_model, vocab, monkeypatch):
    common = _script("synthetic_common", monkeypatch)
    args = SimpleNamespace(d_model=d_model, n_layer=2, d_state=16, seed=0)
    mamba = common.build_model("mamba", vocab, args)
    attn = common.build_model("transformer", vocab, args)
    assert abs(attn.num_parameters() - mamba.num_parameters()) <= 0.05 * mamba.num_parameters()
    assert len(attn.layers) == 2 and attn.config.head_dim == 16
