"""train_imdb.py end to end on a generated archive: runs, resumes in chunks, writes its JSON and PNG."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "train_imdb.py"


def _run(args, env_cache):
    env = {"SSMLAB_DATA": str(env_cache), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_short_run_end_to_end_with_chunked_resume(tmp_path, isolated_cache, make_fake_imdb):
    archive = make_fake_imdb(tmp_path / "fake.tar.gz", per_folder=20)
    args = ["--data", str(archive), "--per-folder", "20", "--model", "s4d", "--s4d-init", "lin", "--tokenizer", "bpe",
            "--vocab-size", "400", "--d-model", "16", "--d-state", "8", "--steps", "4", "--batch-size", "8",
            "--eval-every", "2", "--device", "cpu", "--threads", "1", "--run-dir", str(tmp_path / "run"),
            "--results", str(tmp_path / "res"), "--no-progress", "--name", "t"]
    first = _run(args + ["--time-limit", "1e-6"], isolated_cache)  # stops after one step
    assert first.returncode == 3, first.stderr[-2000:]
    assert not (tmp_path / "res" / "t.json").exists()
    second = _run(args, isolated_cache)
    assert second.returncode == 0, second.stderr[-2000:]
    out = json.loads((tmp_path / "res" / "t.json").read_text())
    assert out["data"]["sizes"] == {"train": 36, "val": 4, "test": 40}
    assert 0 <= out["test"]["accuracy"] <= 1 and 0 <= out["test"]["roc_auc"] <= 1
    assert out["params"] > 0 and out["train_seconds"] > 0 and out["tokens_per_second"] > 0
    assert out["curves"]["train_step"] == [1, 2, 3, 4] and out["curves"]["val_step"] == [2, 4]
    assert (tmp_path / "res" / "t.png").stat().st_size > 1000


def test_missing_data_is_a_clear_error(tmp_path, isolated_cache):
    res = _run(["--data", str(tmp_path / "nowhere.tar.gz"), "--device", "cpu"], isolated_cache)
    assert res.returncode == 2 and "does not exist" in res.stderr


def test_help():
    res = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--tokenizer" in res.stdout and "--param-budget" in res.stdout
