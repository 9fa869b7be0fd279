"""Each stage 02 script runs in --quick mode and writes its figures and JSON with sane numbers."""

import json
from pathlib import Path

from ssmlab.core.testing import load_script

STAGE = Path(__file__).resolve().parents[1]


def load(script):
    return load_script(STAGE / f"{script}.py")


def test_matrices(tmp_path):
    load("matrices").main(["--quick", "--out", str(tmp_path)])
    r = json.loads((tmp_path / "matrices.json").read_text())
    for name in ("matrices.png", "eigenvalues.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    for m, e in r["measures"].items():
        assert e["max_real_eig_A"] < 1e-9, m
        assert e["spectral_radius"]["zoh"] <= 1 + 1e-9 and e["spectral_radius"]["bilinear"] <= 1 + 1e-9, m


def test_reconstruct(tmp_path):
    load("reconstruct").main(["--quick", "--out", str(tmp_path)])
    r = json.loads((tmp_path / "reconstruct.json").read_text())
    for name in ("reconstruct.png", "error_vs_n.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    for m in ("legt", "legs", "fout"):
        e = r["rms_error"][m]["zoh"]
        assert e[-1] < e[0] < r["signal_rms"] * 1.5, (m, e)


def test_timescale(tmp_path):
    load("timescale").main(["--quick", "--out", str(tmp_path)])
    r = json.loads((tmp_path / "timescale.json").read_text())
    assert (tmp_path / "timescale.png").stat().st_size > 10_000
    assert r["legs_state_max_abs_diff_dt_0.01_vs_10"] == 0.0
    # stretched 4x beyond its window, LegT forgets most of the history; LegS does not
    assert r["rms_error"]["legs"][-1] < 0.5 * r["rms_error"]["legt"][-1]


def test_help(capsys):
    import pytest

    for script in ("matrices", "reconstruct", "timescale"):
        with pytest.raises(SystemExit):
            load(script).main(["--help"])
        assert "usage" in capsys.readouterr().out
