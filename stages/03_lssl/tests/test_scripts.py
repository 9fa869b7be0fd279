"""Each script runs in --quick mode, writes its JSON and PNG, and learns."""

import json
import math
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
    torch.set_num_threads(n)


def test_seq_digits_classifier_learns(tmp_path):
    load("seq_digits").main(["--quick", "--out", str(tmp_path)])
    r = json.loads((tmp_path / "seq_digits.json").read_text())
    assert (tmp_path / "seq_digits.png").stat().st_size > 10_000
    lssl, lstm = r["results"]
    assert lssl["model"].startswith("LSSL") and lstm["model"].startswith("LSTM")
    assert lssl["loss_history"][-1] < 0.95 * lssl["loss_history"][0]
    assert lssl["test_acc"] > 0.18  # chance is 0.1 (5 short epochs of a tiny model)
    assert abs(lstm["params"] - lssl["params"]) < 0.2 * lssl["params"]  # matched parameter budget


def test_char_lm_learns(tmp_path):
    r = load("char_lm").main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "char_lm.json").read_text())
    assert (tmp_path / "char_lm.png").stat().st_size > 10_000
    assert saved["val_bpc"] == pytest.approx(r["val_bpc"])
    assert r["last_loss"] < r["first_loss"]
    assert r["val_bpc"] < math.log2(r["corpus"]["V"])  # better than uniform
    assert len(r["sample"]) == len(r["sample_prompt"]) + 40


def test_char_lm_scores_the_ladder_protocol_by_default():
    """Same evaluation as stage 01 and the ladder: the first 65,536 validation characters, windows of 256."""
    from ssmlab.core.charlm import CharLMConfig

    args = load("char_lm").parse_args([])
    assert args.eval_chars == CharLMConfig.eval_chars == 65536
    assert args.seq_len == CharLMConfig.eval_seq_len == 256  # stage 03 evaluates in windows of --seq-len
