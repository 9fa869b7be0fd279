"""train_imdb.py end to end on a generated archive: runs, resumes in chunks, writes its JSON and PNG."""

import json
import runpy
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "train_imdb.py"


@pytest.fixture(scope="module")
def main():
    return runpy.run_path(str(SCRIPT))["main"]


def test_short_run_end_to_end_with_chunked_resume(tmp_path, isolated_cache, make_fake_imdb, main):
    archive = make_fake_imdb(tmp_path / "fake.tar.gz", per_folder=20)
    args = ["--data", str(archive), "--per-folder", "20", "--model", "s4d", "--s4d-init", "lin", "--tokenizer", "bpe",
            "--vocab-size", "400", "--d-model", "16", "--d-state", "8", "--steps", "4", "--batch-size", "8",
            "--eval-every", "2", "--device", "cpu", "--run-dir", str(tmp_path / "run"),
            "--results", str(tmp_path / "res"), "--no-progress", "--name", "t"]
    assert main(args + ["--time-limit", "1e-6"]) == 3  # stops after one step, checkpointed
    assert not (tmp_path / "res" / "t.json").exists()
    assert main(args) == 0  # resumes and finishes
    out = json.loads((tmp_path / "res" / "t.json").read_text())
    assert out["data"]["sizes"] == {"train": 36, "val": 4, "test": 40}
    assert 0 <= out["test"]["accuracy"] <= 1 and 0 <= out["test"]["roc_auc"] <= 1
    assert out["params"] > 0 and out["train_seconds"] > 0 and out["tokens_per_second"] > 0
    assert out["curves"]["train_step"] == [1, 2, 3, 4] and out["curves"]["val_step"] == [2, 4]
    assert (tmp_path / "res" / "t.png").stat().st_size > 1000


def test_ema_run_scores_the_averaged_weights(tmp_path, isolated_cache, make_fake_imdb, main):
    archive = make_fake_imdb(tmp_path / "fake.tar.gz", per_folder=20)
    args = ["--data", str(archive), "--per-folder", "20", "--model", "s4d", "--s4d-init", "lin", "--tokenizer", "byte",
            "--d-model", "8", "--d-state", "4", "--n-layers", "1", "--max-len", "64", "--steps", "3",
            "--batch-size", "8", "--eval-every", "3", "--device", "cpu", "--run-dir", str(tmp_path / "run"),
            "--results", str(tmp_path / "res"), "--no-progress", "--name", "e", "--ema-decay", "0.5"]
    assert main(args) == 0
    out = json.loads((tmp_path / "res" / "e.json").read_text())
    assert out["train"]["ema_decay"] == 0.5 and out["scored_weights"] == "ema"
    curves = out["curves"]
    assert curves["val_step"] == [3] and curves["val_loss"] != curves["val_loss_live"]
    assert out["val"]["loss"] == curves["val_loss"][-1]  # the final scores are those of the EMA weights
    with pytest.raises(SystemExit, match="ema-decay"):
        main(args + ["--ema-decay", "1"])


def test_missing_data_is_a_clear_error(tmp_path, isolated_cache, main, capsys):
    assert main(["--data", str(tmp_path / "nowhere.tar.gz"), "--device", "cpu"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_help(main, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--tokenizer" in out and "--param-budget" in out


def test_bench_train_step_quick(tmp_path, capsys):
    """The step-time benchmark runs every model at tiny size and writes one row per model and tokenizer."""
    bench = runpy.run_path(str(SCRIPT.parent / "bench_train_step.py"))["main"]
    assert bench(["--device", "cpu", "--quick", "--warmup", "0", "--repeats", "1", "--models", "s4", "mamba",
                  "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_train_step_cpu_quick.json").read_text())["rows"]
    assert [(r["tokenizer"], r["model"]) for r in rows] == [("bpe", "s4"), ("bpe", "mamba"), ("byte", "s4"),
                                                            ("byte", "mamba")]
    assert all(r["status"] == "ok" and r["step_ms"] > 0 for r in rows)
