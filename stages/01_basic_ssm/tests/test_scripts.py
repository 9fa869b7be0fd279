"""Each script runs in --quick mode, writes its JSON and PNG, and its training reduces the loss."""

import json
from pathlib import Path

import pytest
import torch

from ssmlab.core.testing import load_script

STAGE = Path(__file__).resolve().parents[1]


def load(script):
    return load_script(STAGE / f"{script}.py")


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # the scripts set their own thread count


def run(script, tmp_path, *extra):
    out = tmp_path / script
    load(script).main(["--quick", "--out", str(out), *extra])
    assert (out / f"{script}.png").stat().st_size > 10_000
    return json.loads((out / f"{script}.json").read_text())


def test_core_equations(tmp_path):
    r = run("core_equations", tmp_path)
    assert abs(r["fitted_orders"]["bilinear"] - 2) < 0.2
    assert abs(r["fitted_orders"]["forward Euler"] - 1) < 0.2
    assert max(r["errors"]["ZOH"]) < 1e-8


def test_dual_computation(tmp_path):
    r = run("dual_computation", tmp_path)
    assert all(c["max_abs_diff"] < 1e-10 for c in r["equality_check_float64"])
    assert {c["L"] for c in r["equality_check_float64"]} >= {1, 7}
    assert all(len(v) > 0 for v in r["timings"].values())


def test_rnn_vs_ssm_reduces_loss(tmp_path):
    r = run("rnn_vs_ssm", tmp_path, "--steps", "60")
    for name, rows in r["results"].items():
        assert rows[0]["last_loss"] < rows[0]["first_loss"], f"{name}: loss did not decrease at k={rows[0]['k']}"


def test_sine_waves_reduces_loss(tmp_path):
    r = run("sine_waves", tmp_path)
    assert r["last_loss"] < 0.5 * r["first_loss"]
    assert r["val_one_step_mse"] < r["val_repeat_last_value_mse"] * 1.5


def test_char_lm_reduces_loss(tmp_path):
    text = tmp_path / "tiny.txt"
    text.write_text("To be, or not to be, that is the question.\nWhether 'tis nobler in the mind to suffer\n" * 200)
    r = run("char_lm", tmp_path, "--text", str(text))
    assert r["last_loss"] < 0.8 * r["first_loss"]
    assert r["val_bpc"] < 5.0 and r["corpus"]["source"] == str(text)
    assert r["sample"].startswith(r["sample_prompt"])


@pytest.mark.parametrize("script,args,msg", [
    ("core_equations", ["--delta", "-1"], "--delta"),
    ("core_equations", ["--zeta", "0"], "--zeta"),
    ("dual_computation", ["--min-log2", "5", "--max-log2", "3"], "min-log2"),
    ("char_lm", ["--temperature", "-1"], "temperature"),
])
def test_bad_cli_arguments(script, args, msg, capsys):
    with pytest.raises(SystemExit) as exc:
        load(script).parse_args(args)
    assert exc.value.code == 2 and msg in capsys.readouterr().err


def test_char_lm_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load("char_lm").main(["--quick", "--text", str(tmp_path / "nope.txt"), "--out", str(tmp_path)])


@pytest.mark.parametrize("script", ["core_equations", "dual_computation", "rnn_vs_ssm", "sine_waves", "char_lm"])
def test_help(script, capsys):
    with pytest.raises(SystemExit) as exc:
        load(script).parse_args(["--help"])
    assert exc.value.code == 0 and "--quick" in capsys.readouterr().out
