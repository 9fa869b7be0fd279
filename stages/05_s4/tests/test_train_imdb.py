"""train_imdb.py end to end on a generated archive: runs, resumes in chunks, writes its JSON and PNG."""

import contextlib
import dataclasses
import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

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


def _keep_best_args(archive, run_dir, res_dir, *extra):
    # lr 0.1 on 28 reviews: the validation AUC peaks at step 2 and falls back, so the choice matters
    return ["--data", str(archive), "--per-folder", "20", "--model", "s4d", "--s4d-init", "lin", "--tokenizer", "byte",
            "--d-model", "8", "--d-state", "4", "--n-layers", "1", "--max-len", "64", "--steps", "8",
            "--batch-size", "8", "--eval-every", "1", "--val-fraction", "0.3", "--lr", "0.1", "--device", "cpu",
            "--run-dir", str(run_dir), "--results", str(res_dir), "--no-progress", "--name", "k", *extra]


def _val_at(out, step):
    c = out["curves"]
    i = c["val_step"].index(step)
    return {"accuracy": c["val_accuracy"][i], "roc_auc": c["val_roc_auc"][i], "loss": c["val_loss"][i]}


def test_keep_best_scores_the_weights_of_the_best_validation(tmp_path, isolated_cache, make_fake_imdb, main):
    archive = make_fake_imdb(tmp_path / "fake.tar.gz", per_folder=20)
    args = _keep_best_args(archive, tmp_path / "run", tmp_path / "res", "--keep-best", "auc")
    assert main(args) == 0
    out = json.loads((tmp_path / "res" / "k.json").read_text())
    auc = out["curves"]["val_roc_auc"]
    step = out["curves"]["val_step"][int(np.argmax(auc))]  # the first of equal maxima
    assert out["keep_best"] == "auc" and out["scored_weights"] == "best_live"
    assert out["selected"] == {"step": step, "metric": "val_roc_auc", "value": max(auc)}
    assert step < 8  # else this test would not tell the kept weights from the last ones
    assert out["val"] == _val_at(out, step)  # bit for bit: the weights scored are those validated at `step`

    # The test split, scored here from the checkpoint's copy, gives the JSON's numbers.
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    kept = ckpt["extra"]["extra_state"]
    assert kept["step"] == step and all(w.dtype == torch.float32 and w.device.type == "cpu"
                                        for w in kept["weights"].values())
    g = main.__globals__
    a = g["resolve_settings"](g["parse_args"](args))
    tok = g["tokenized_imdb"](g["load_imdb"](a.data, per_folder=a.per_folder), a.tokenizer, a.max_len, a.vocab_size,
                              a.val_fraction, a.seed, a.train_subset, a.val_subset, a.test_subset)
    model = g["build_model"](g["model_config"](a, tok.vocab_size))
    model.load_state_dict(kept["weights"])
    probs = g["predict"](model, tok.test, torch.device("cpu"), a.eval_batch_size, contextlib.nullcontext)
    assert g["metrics"](probs, tok.y_test) == out["test"]
    assert (tmp_path / "res" / "k.png").stat().st_size > 1000

    # none: the run as before the flag (the same training, the last weights scored, nothing extra checkpointed)
    assert main(_keep_best_args(archive, tmp_path / "last", tmp_path / "res", "--keep-best", "none")) == 0
    last = json.loads((tmp_path / "res" / "k.json").read_text())
    assert last["keep_best"] == "none" and last["selected"] is None and last["scored_weights"] == "live"
    assert last["curves"] == out["curves"] and last["val"] == _val_at(last, 8) != out["val"]
    ckpt_last = torch.load(tmp_path / "last" / "checkpoint.pt", weights_only=False)
    assert ckpt_last["extra"] == {}
    for k, v in ckpt["model"].items():  # keeping copies changed nothing in training
        assert torch.equal(ckpt_last["model"][k], v), k

    with pytest.raises(SystemExit, match="selects by auc"):  # another metric cannot continue this selection
        main(_keep_best_args(archive, tmp_path / "run", tmp_path / "res", "--keep-best", "loss"))


def test_keep_best_survives_a_kill_and_resume(tmp_path, isolated_cache, make_fake_imdb, main, monkeypatch):
    archive = make_fake_imdb(tmp_path / "fake.tar.gz", per_folder=20)
    assert main(_keep_best_args(archive, tmp_path / "a", tmp_path / "ra", "--keep-best", "auc")) == 0
    full = json.loads((tmp_path / "ra" / "k.json").read_text())

    class Killed(Exception):
        pass

    real_train = main.__globals__["train"]

    def killed_at_3(model, loss_fn, data, cfg, **kw):  # checkpoint at 2, the best step; dies at 3
        def on_step(step, record):
            if step == 3:
                raise Killed
        return real_train(model, loss_fn, data, dataclasses.replace(cfg, ckpt_every=2), on_step=on_step, **kw)

    args = _keep_best_args(archive, tmp_path / "b", tmp_path / "rb", "--keep-best", "auc")
    with monkeypatch.context() as m, pytest.raises(Killed):  # a context: isolated_cache's patches stay
        m.setitem(main.__globals__, "train", killed_at_3)
        main(args)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"] == 2
    assert full["selected"]["step"] == 2 and full["curves"]["val_roc_auc"][2] == full["selected"]["value"]
    assert main(args) == 0  # replays 3 .. 8; step 3 ties step 2's AUC, so only the restored copy keeps step 2
    resumed = json.loads((tmp_path / "rb" / "k.json").read_text())
    for key in ("selected", "scored_weights", "val", "test"):
        assert resumed[key] == full[key], key


def test_keep_best_with_ema_selects_the_averaged_weights(tmp_path, isolated_cache, make_fake_imdb, main):
    archive = make_fake_imdb(tmp_path / "fake.tar.gz", per_folder=20)
    args = _keep_best_args(archive, tmp_path / "run", tmp_path / "res", "--keep-best", "loss", "--ema-decay", "0.5")
    assert main(args) == 0
    out = json.loads((tmp_path / "res" / "k.json").read_text())
    c = out["curves"]
    step = c["val_step"][int(np.argmin(c["val_loss"]))]  # val_loss: the EMA weights; val_loss_live is not chosen on
    assert out["scored_weights"] == "best_ema" and out["selected"]["step"] == step < 8
    assert out["val"] == _val_at(out, step)  # the EMA weights of that step, not the live ones:
    assert out["val"]["loss"] != c["val_loss_live"][c["val_step"].index(step)]


def test_keep_best_rejects_unknown_metrics(main, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--keep-best", "f1"])
    assert exc.value.code == 2 and "invalid choice: 'f1'" in capsys.readouterr().err


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


def test_bidirectional_mamba_flag(main):
    g = main.__globals__
    a = g["resolve_settings"](g["parse_args"](["--model", "mamba", "--bidirectional", "--device", "cpu"]))
    cfg = g["model_config"](a, 300)
    assert cfg.bidirectional and type(g["build_model"](cfg).mixers[0]).__name__ == "BiMamba"
    a = g["resolve_settings"](g["parse_args"](["--model", "mamba", "--device", "cpu"]))
    assert not g["model_config"](a, 300).bidirectional  # Mamba stays causal by default
    for bad in (["--model", "s4d", "--bidirectional"], ["--model", "mamba", "--bidirectional", "--causal"]):
        with pytest.raises(SystemExit, match="bidirectional"):
            g["resolve_settings"](g["parse_args"](bad + ["--device", "cpu"]))


def test_ssm_lr_run_trains_the_state_space_parameters_at_their_own_rate(tmp_path, isolated_cache, make_fake_imdb,
                                                                         main):
    archive = make_fake_imdb(tmp_path / "fake.tar.gz", per_folder=20)
    args = ["--data", str(archive), "--per-folder", "20", "--model", "s4d", "--s4d-init", "lin", "--tokenizer", "byte",
            "--d-model", "16", "--d-state", "8", "--steps", "3", "--batch-size", "8", "--lr", "4e-3",
            "--ssm-lr", "1e-3", "--device", "cpu", "--run-dir", str(tmp_path / "run"),
            "--results", str(tmp_path / "res"), "--no-progress", "--name", "t"]
    assert main(args) == 0
    out = json.loads((tmp_path / "res" / "t.json").read_text())
    assert out["train"]["ssm_lr"] == 1e-3 and out["train"]["lr"] == 4e-3
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    peaks = sorted(g["initial_lr"] for g in state["optimizer"]["param_groups"])
    assert peaks == pytest.approx([1e-3, 4e-3, 4e-3])  # the ssm group, then decay and no_decay
    g = main.__globals__
    for bad in (["--model", "mamba", "--ssm-lr", "1e-3"], ["--model", "s4d", "--ssm-lr", "-1"]):
        with pytest.raises(SystemExit, match="ssm-lr"):
            g["resolve_settings"](g["parse_args"](bad + ["--device", "cpu"]))
