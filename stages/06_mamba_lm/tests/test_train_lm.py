"""train_lm.py and generate.py end to end in a short mode (tiny models, a generated text), plus the BPE corpus."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssmlab.datasets.bpe import SEP_ID, load_bpe_corpus, split_documents
from ssmlab.core.testing import load_script
from ssmlab.core.transformer import build_matched_lm

STAGE = Path(__file__).resolve().parents[1]
ROOT = STAGE.parents[1]


def _script(name: str):
    return load_script(STAGE / f"{name}.py")


WORDS = "the king queen lord speaks to his her noble friend and heart of love death night day sword crown".split()


def _text(n_lines: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        speaker = rng.choice(["KING", "QUEEN", "LORD"])
        lines.append(f"{speaker}:\n" + " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))) + ".\n")
    return "\n".join(lines)


@pytest.fixture()
def text_file(tmp_path) -> Path:
    p = tmp_path / "play.txt"
    p.write_text(_text(400, 0), encoding="utf-8")
    return p


SHORT = ["--size", "test", "--steps", "8", "--seq-len", "32", "--batch-size", "4", "--warmup", "2", "--lr", "1e-2",
         "--eval-every", "4", "--eval-windows", "8", "--log-every", "2", "--ckpt-every", "4", "--no-progress",
         "--device", "cpu"]


def test_char_level_both_models_then_resume_and_generate(text_file, tmp_path, capsys):
    train_lm, generate = _script("train_lm"), _script("generate")
    out = tmp_path / "run"
    results = train_lm.main(["--text", str(text_file), "--out", str(out), *SHORT])
    assert set(results) == {"mamba", "transformer"}
    m, t = results["mamba"], results["transformer"]
    assert abs(t["params"] - m["params"]) <= 0.05 * m["params"]  # equal parameters
    assert m["train_tokens"] == t["train_tokens"] == 8 * 4 * 32  # equal tokens
    for r in results.values():
        log = train_lm.read_log(out / r["model"] / "log.jsonl")
        evals = [x["val_loss"] for x in log if x["kind"] == "eval"]
        assert len(evals) == 2 and evals[-1] < evals[0] < 1.1 * torch.log(torch.tensor(float(m["corpus"]["V"]))).item()
        assert r["val_bpc"] == pytest.approx(r["val_loss"] / 0.6931471805599453)
    assert (out / "learning_curves.png").stat().st_size > 1000
    assert set(json.loads((out / "summary.json").read_text())) == {"mamba", "transformer"}
    # the same command with more steps resumes from the checkpoint
    more = train_lm.main(["--text", str(text_file), "--out", str(out), "--model", "mamba", *SHORT[:3], "10", *SHORT[4:]])
    assert more["mamba"]["steps"] == 10
    # sampling from the saved model
    capsys.readouterr()
    res = generate.main(["--model-dir", str(out / "mamba" / "model"), "--prompt", "KING:", "--max-new-tokens", "5",
                         "--top-k", "3", "--num-samples", "2", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "prompt: 'KING:'" in printed and "tokens/s" in printed and "top_k=3" in printed
    assert len(res["samples"]) == 2 and all(len(s) == 5 for s in res["samples"]) and res["tokens_per_s"] > 0
    with pytest.raises(SystemExit, match="vocabulary"):
        generate.main(["--model-dir", str(out / "transformer" / "model"), "--prompt", "KING@", "--device", "cpu"])


def test_bpe_level_on_a_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SSMLAB_DATA", str(tmp_path / "cache"))
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(20):
        (docs / f"{i:02d}.txt").write_text(_text(30, i), encoding="utf-8")
    corpus = load_bpe_corpus(docs, vocab_size=320)
    assert corpus.n_docs == (18, 2) and corpus.V <= 320
    assert int((corpus.val_ids == SEP_ID).sum()) == 2 and int(corpus.val_ids[-1]) == SEP_ID  # one separator per document
    assert corpus.decode(corpus.encode("the king speaks")) == "the king speaks"
    again = load_bpe_corpus(docs, vocab_size=320)  # from the cache
    assert torch.equal(again.train_ids, corpus.train_ids) and again.V == corpus.V
    train_lm, generate = _script("train_lm"), _script("generate")
    out = tmp_path / "bpe"
    results = train_lm.main(["--level", "bpe", "--text", str(docs), "--vocab-size", "320", "--out", str(out), *SHORT])
    assert {r["level"] for r in results.values()} == {"bpe"}
    assert all(r["val_ppl"] < 320 and r["corpus"]["chars_per_token_val"] > 1 for r in results.values())
    res = generate.main(["--model-dir", str(out / "transformer" / "model"), "--prompt", "the king", "--max-new-tokens", "4",
                         "--greedy", "--device", "cpu"])
    assert isinstance(res["samples"][0], str)


def test_split_rules_and_errors(tmp_path):
    train, val = split_documents(["abcdefghij" * 10])
    assert train[0] + val[0] == "abcdefghij" * 10 and len(val[0]) == 10
    train, val = split_documents([str(i) for i in range(20)])
    assert val == ["9", "19"] and len(train) == 18
    with pytest.raises(Exception, match="at least 10"):
        split_documents(["a", "b"])
    train_lm = _script("train_lm")
    with pytest.raises(SystemExit):
        train_lm.parse_args(["--level", "char", "--text", "imdb"])
    with pytest.raises(SystemExit):
        train_lm.parse_args(["--steps", "0"])
    with pytest.raises(FileNotFoundError):
        load_bpe_corpus(tmp_path / "missing.txt", cache_root=tmp_path)


@pytest.mark.slow
def test_torchrun_two_processes(text_file, tmp_path):
    """train_lm.py under torchrun (2 gloo CPU processes) trains and writes one set of results."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(STAGE / "train_lm.py"), "--text", str(text_file), "--out", str(out), "--model", "transformer",
           "--threads", "1", *SHORT]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads((out / "transformer" / "result.json").read_text())
    assert res["world_size"] == 2 and res["steps"] == 8 and res["train_tokens"] == 8 * 4 * 32
    assert not any(p.name.startswith(".rank") for p in (out / "transformer").iterdir())


def test_time_limit_stops_at_a_checkpoint_and_the_rerun_finishes(text_file, tmp_path, monkeypatch):
    train_lm = _script("train_lm")
    args = ["--text", str(text_file), "--out", str(tmp_path / "chunked"), "--model", "transformer", *SHORT]
    stopped = train_lm.main([*args, "--time-limit-min", "1e-6"])["transformer"]
    assert not stopped["finished"] and stopped["steps"] == 1
    done = train_lm.main(args)["transformer"]
    assert done["finished"] and done["steps"] == 8
    monkeypatch.setattr(sys, "argv", ["train_lm.py", *args, "--steps", "12", "--time-limit-min", "1e-6"])
    with pytest.raises(SystemExit) as exit_info:  # a command-line run reports the unfinished state by its status
        train_lm.main()
    assert exit_info.value.code == train_lm.EXIT_UNFINISHED


def test_validation_after_an_early_stop_runs_in_eval_mode(text_file, tmp_path, monkeypatch):
    """A run stopped before its first validation is validated afterwards, like train() does: no dropout, no grad."""
    train_lm = _script("train_lm")
    seen = []
    make = train_lm.make_eval_fn

    def spying_make(*a, **k):
        inner = make(*a, **k)

        def eval_fn(model):
            seen.append((model.training, torch.is_grad_enabled()))
            return inner(model)
        return eval_fn

    monkeypatch.setattr(train_lm, "make_eval_fn", spying_make)
    args = ["--text", str(text_file), "--out", str(tmp_path / "early"), "--model", "mamba", *SHORT,
            "--dropout", "0.5", "--time-limit-min", "1e-6"]
    first = train_lm.main(args)["mamba"]
    assert not first["finished"] and first["steps"] == 1 and first["best_val_step"] is None
    assert seen and all(mode == (False, False) for mode in seen)


@pytest.mark.slow
def test_bench_speed_quick(tmp_path):
    """bench_speed.py's CPU smoke mode: every section runs, merges with earlier runs, writes table, JSON and PNGs."""
    bench = _script("bench_speed")
    small = ["--quick", "--lengths", "16", "32", "--gen-batches", "1", "2", "--mem-lengths", "16", "32",
             "--repeats", "1", "--warmup", "0", "--new-tokens", "3", "--prompt-len", "8", "--out", str(tmp_path)]
    bench.main([*small, "--models", "mamba"])
    rows = bench.main([*small, "--models", "transformer", "--sections", "train"])  # merged with the first run
    assert {(r["model"], r["L"]) for r in rows["train"]} == {(m, L) for m in ("mamba", "transformer") for L in (16, 32)}
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 and r["batch"] * r["L"] == 256 for r in rows["train"])
    gen = rows["gen"]
    assert [r["batch"] for r in gen] == [1, 2] and all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in gen)
    mem = {r["L"]: r for r in rows["memory"]}
    assert mem[16]["state_mib"] == mem[32]["state_mib"] > 0  # Mamba's inference state does not grow with L
    table = (tmp_path / "bench_speed.md").read_text()
    assert "Training throughput Mamba / Transformer at L = 32" in table
    assert all((tmp_path / n).exists() for n in ("train_speed.png", "gen_throughput.png", "memory_vs_context.png"))


def test_chunked_loss_equals_plain_loss():
    bench = _script("bench_speed")
    from ssmlab.core.mamba import MambaConfig

    torch.manual_seed(0)
    mcfg = MambaConfig(n_layer=2, d_model=16, vocab_size=30)
    for name in ("mamba", "transformer"):
        model, _, _ = build_matched_lm(name, mcfg, device="cpu")
        model.double()
        x, y = torch.randint(0, 30, (2, 9)), torch.randint(0, 30, (2, 9))
        plain = torch.nn.functional.cross_entropy(model(x)[..., :30].flatten(0, 1), y.flatten())
        g_plain = torch.autograd.grad(plain, model.lm_head.weight)[0]
        chunked = bench.chunked_lm_loss(model, x, y, 30, chunk_tokens=4)
        g_chunked = torch.autograd.grad(chunked, model.lm_head.weight)[0]
        assert chunked.item() == pytest.approx(plain.item(), rel=1e-12)
        assert torch.allclose(g_chunked, g_plain, rtol=1e-10, atol=1e-12)


def test_static_mamba_step_decodes_like_the_eager_loop():
    """The buffer logic that bench_speed captures in a CUDA graph (run eagerly here) gives the same tokens."""
    bench = _script("bench_speed")
    from ssmlab.core.mamba import MambaConfig

    torch.manual_seed(1)
    model, _, _ = build_matched_lm("mamba", MambaConfig(n_layer=2, d_model=16, vocab_size=30), device="cpu")
    model.eval()
    prompt = torch.randint(0, 30, (3, 7))
    eager, _ = bench.greedy_generate(model, prompt, 6, 30, 13)
    static = bench.StaticMambaStep(model, 3, capture=False)
    for _ in range(2):  # reusable: a second generation starts again from its own prefill
        ids, _ = bench.greedy_generate(model, prompt, 6, 30, 13, static)
        assert torch.equal(ids, eager)
    # built and called with autograd on, as bench_gen does: the step must still record no graph
    # (a recorded graph would also send 'auto' dispatch to the unfused reference path)
    assert not static(prompt[:, 0]).requires_grad
    seq = prompt
    for _ in range(6):  # and greedy decoding equals the argmax of the full forward pass
        seq = torch.cat([seq, model(seq)[:, -1, :30].argmax(-1, keepdim=True)], 1)
    assert torch.equal(eager, seq[:, 7:])


def test_weight_decay_flag_reaches_the_optimizer(text_file, tmp_path):
    train_lm = _script("train_lm")
    runs = {}
    for wd in (0.0, 0.5):
        res = train_lm.main(["--text", str(text_file), "--out", str(tmp_path / f"wd{wd}"), "--model", "mamba",
                             "--weight-decay", str(wd), *SHORT])
        runs[wd] = res["mamba"]
        assert runs[wd]["weight_decay"] == wd
    # same data, seed and schedule: only the decay differs, and it changes the trained model
    assert runs[0.0]["val_loss"] != runs[0.5]["val_loss"]
    with pytest.raises(ValueError, match="weight_decay"):
        train_lm.main(["--text", str(text_file), "--out", str(tmp_path / "bad"), "--model", "mamba",
                       "--weight-decay", "-1", *SHORT])
