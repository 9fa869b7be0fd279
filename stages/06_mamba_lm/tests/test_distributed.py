"""Data-parallel training (ssmlab.core.distributed): two gloo CPU processes equal one process.

The two-process job is started with torch.multiprocessing (fork), each process
given the variables torchrun would set (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), so `setup()` runs exactly as under torchrun.
Forking spares each worker torchrun's start-up (a fresh interpreter importing
torch), and keeps the workers in one process group that a timeout can kill
(torchrun puts each worker in a session of its own).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from ssmlab.core import distributed as D
from ssmlab.core.testing import load_script
from ssmlab.core.training import CHECKPOINT_NAME, LOG_NAME, EpochBatches, TrainConfig, train
from ssmlab.core.transformer import TransformerConfig, TransformerLM

STAGE = Path(__file__).resolve().parents[1]
WORLD = 2
GLOBAL_BATCH = 8  # rows per micro-batch over all ranks
STEPS = 4


class Killed(Exception):
    pass


def _model() -> TransformerLM:
    torch.manual_seed(1)
    return TransformerLM(TransformerConfig(d_model=32, n_layer=2, n_head=2, vocab_size=16, d_ff=48))


def _data() -> EpochBatches:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 16, (40, 13), generator=g)
    return EpochBatches.from_tensors(ids[:, :-1], ids[:, 1:], batch_size=GLOBAL_BATCH, seed=3)


def _loss(model, batch):
    x, y = batch
    logits = model(x)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    return loss, {"acc": (logits.argmax(-1) == y).float().mean()}


def _cfg(out_dir) -> TrainConfig:
    # With a weight EMA, so that its DDP path (names through the wrapper, kept when the time limit stops) is covered.
    return TrainConfig(lr=3e-3, warmup_steps=1, max_steps=STEPS, grad_accum=2, log_every=1, ckpt_every=2,
                       out_dir=str(out_dir), progress=False, seed=5, ema_decay=0.5)


def _losses(out_dir) -> list[float]:
    lines = (Path(out_dir) / LOG_NAME).read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


def _as_rank(rank: int, port: int) -> None:
    """This process becomes rank `rank` of a WORLD-process job, as torchrun would make it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


def _worker(rank: int, port: int, root: str) -> None:
    _as_rank(rank, port)
    env = D.setup("cpu")
    assert env.world_size == WORLD and env.backend == "gloo" and env.rank == rank
    root = Path(root)
    # (a) uninterrupted
    model_a = _model()
    res_a = D.train_distributed(model_a, _loss, _data(), _cfg(root / "a"), env)
    # (b) killed right after the checkpoint of step 2, then resumed by the same command
    def kill(step, record):
        if step == 2:
            raise Killed

    with pytest.raises(Killed):
        D.train_distributed(_model(), _loss, _data(), _cfg(root / "b"), env, on_step=kill)
    model_b = _model()
    res_b = D.train_distributed(model_b, _loss, _data(), _cfg(root / "b"), env)
    assert res_b.resumed_from == 2
    # (c) a chunked run: the time limit stops every rank at the first checkpoint step, then the rerun finishes
    cfg_c = _cfg(root / "c")
    cfg_c.time_limit_s = 1e-6
    stopped = D.train_distributed(_model(), _loss, _data(), cfg_c, env)
    assert not stopped.finished and stopped.step == 2 and stopped.ema.num_updates == 2
    model_c = _model()
    res_c = D.train_distributed(model_c, _loss, _data(), _cfg(root / "c"), env)
    assert res_c.finished
    if env.is_main:
        torch.save({"a": model_a.state_dict(), "b": model_b.state_dict(), "c": model_c.state_dict(),
                    "ema": {k: r.ema.shadow for k, r in (("a", res_a), ("b", res_b), ("c", res_c))}}, root / "final.pt")
    D.teardown(env)


class _Keeper:
    """A keep-best stand-in: what on_eval saw, carried through checkpoints as extra_state."""

    def __init__(self):
        self.seen: list = []

    def __call__(self, step, metrics, model):
        assert not isinstance(model, torch.nn.parallel.DistributedDataParallel), "on_eval got the DDP wrapper"
        first = next(iter(model.state_dict()))
        self.seen.append([step, round(metrics["val_loss"], 6), first])

    def state_dict(self):
        return {"seen": [list(x) for x in self.seen]}

    def load_state_dict(self, state):
        self.seen = [list(x) for x in state["seen"]]


def _val(model) -> dict:
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, 16, (4, 13), generator=g)
    return {"val_loss": _loss(model, (ids[:, :-1], ids[:, 1:]))[0].item()}


def _hooks_worker(rank: int, port: int, root: str) -> None:
    """on_eval / extra_state under DDP: an uninterrupted run and a killed-and-resumed one keep the same record."""
    _as_rank(rank, port)
    env = D.setup("cpu")
    root = Path(root)
    records = {}
    for name, kill_at in (("whole", None), ("resumed", 2)):
        cfg = _cfg(root / name)
        cfg.eval_every = 1
        if kill_at is not None:
            def kill(step, record):
                if step == kill_at:
                    raise Killed

            doomed = _Keeper()
            with pytest.raises(Killed):
                D.train_distributed(_model(), _loss, _data(), cfg, env, eval_fn=_val, on_step=kill,
                                    on_eval=doomed, extra_state=doomed)
        keeper = _Keeper()
        D.train_distributed(_model(), _loss, _data(), cfg, env, eval_fn=_val, on_eval=keeper, extra_state=keeper)
        records[name] = keeper.seen
    (root / f"rank{rank}.json").write_text(json.dumps(records))
    D.teardown(env)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(worker: str, args: tuple, timeout: float) -> None:
    """Run `worker(rank, port, *args)` in WORLD processes; a hang fails the test after `timeout` s."""
    # Fork from a fresh interpreter: forking this process is unsafe once it has
    # run autograd on a GPU (autograd's device threads do not survive a fork).
    # No GPU for the workers either (these are the gloo CPU tests): on a GPU machine
    # a CUDA driver initialised before the fork (one torch.cuda query is enough) fails
    # every CUDA call in the children, AdamW's graph-capture check among them.
    code = (
        "import importlib.util, torch.multiprocessing as mp\n"
        f"spec = importlib.util.spec_from_file_location('ddp_workers', {__file__!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        f"mp.start_processes(m.{worker}, args=(m._free_port(), *{args!r}), nprocs=m.WORLD, start_method='fork', join=True)\n"
    )
    # A session of its own, so that a timeout kills the workers too and not only their parent.
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"{worker}: the {WORLD} processes were still running after {timeout} s (a collective that not "
                    f"every rank entered?)\n{log[-3000:]}")
    assert proc.returncode == 0, log[-3000:]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    _run_workers("_worker", (str(root),), timeout=600)
    return root


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    model = _model()
    res = train(model, _loss, _data(), _cfg(root))
    return root, model, res.ema.shadow


def test_two_processes_equal_one_process(ddp_run, single_run):
    single_dir, single_model, single_ema = single_run
    final = torch.load(ddp_run / "final.pt")
    ref = single_model.state_dict()
    assert final["a"].keys() == ref.keys()  # no "module." prefix
    start = _model().state_dict()
    for name, p in ref.items():
        moved = (p - start[name]).abs().max().item()
        err = (final["a"][name] - p).abs().max().item()
        assert err <= 1e-5 * max(1.0, p.abs().max().item()), f"{name}: DDP differs from one process by {err:.2e}"
        assert moved > 0 or p.ndim < 2, f"{name} did not train"
    assert final["ema"]["a"].keys() == single_ema.keys()  # names of the bare model
    for name, s in single_ema.items():
        torch.testing.assert_close(final["ema"]["a"][name], s, rtol=1e-5, atol=1e-5)
    single, ddp = _losses(single_dir), _losses(ddp_run / "a")
    assert len(ddp) == STEPS == len(single)
    assert max(abs(a - b) for a, b in zip(single, ddp)) < 1e-5, (single, ddp)  # logged: global-batch means


def test_two_process_resume_is_exact(ddp_run):
    final = torch.load(ddp_run / "final.pt")
    for name, p in final["a"].items():
        assert torch.equal(final["b"][name], p), f"{name}: resumed DDP run differs from the uninterrupted one"
        assert torch.equal(final["c"][name], p), f"{name}: the chunked DDP run differs from the uninterrupted one"
    for name, s in final["ema"]["a"].items():
        assert torch.equal(final["ema"]["b"][name], s) and torch.equal(final["ema"]["c"][name], s), f"EMA of {name}"
    assert _losses(ddp_run / "c") == _losses(ddp_run / "a")
    assert _losses(ddp_run / "b") == _losses(ddp_run / "a")  # steps 1-2 before the kill, 3-4 after
    assert not any(p.name.startswith(".rank") for p in (ddp_run / "b").iterdir()), "rank > 0 left files behind"


def test_ddp_checkpoint_loads_into_one_process(ddp_run, tmp_path):
    """The DDP checkpoint is a single-process checkpoint: resuming it in one process continues the run."""
    ckpt = ddp_run / "a" / CHECKPOINT_NAME
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == STEPS and not any(k.startswith("module.") for k in state["model"])
    model = _model()
    model.load_state_dict(state["model"])
    cfg = _cfg(tmp_path)
    cfg.max_steps = STEPS + 1
    (tmp_path / CHECKPOINT_NAME).write_bytes(ckpt.read_bytes())
    res = train(model, _loss, _data(), cfg)
    assert res.resumed_from == STEPS and res.step == STEPS + 1


def _lm_args(text: Path, out: Path) -> list[str]:
    """A train_lm.py run whose time limit is spent before training starts.

    Under DDP the limit is looked at on checkpoint steps only, so the run stops
    at step 1 for certain, and before its first validation (step 4).
    """
    return ["--text", str(text), "--out", str(out), "--model", "transformer", "--size", "test", "--seq-len", "16",
            "--batch-size", "4", "--steps", "4", "--warmup", "1", "--eval-every", "4", "--eval-windows", "4",
            "--ckpt-every", "1", "--time-limit-min", "1e-6", "--device", "cpu", "--no-progress"]


def _lm_worker(rank: int, port: int, argv: list[str]) -> None:
    _as_rank(rank, port)
    load_script(STAGE / "train_lm.py").main(argv)


@pytest.mark.slow
def test_train_lm_stopped_before_its_first_validation(tmp_path):
    """The validation that a run stopped before its first one gets after training is joined by every rank.

    It is collective (`sharded_mean`); when rank 0 alone entered it, rank 0
    waited in its all-reduce for ranks gone on to the teardown barrier: a hang.
    """
    text = tmp_path / "play.txt"
    text.write_text("KING:\nthe noble lord speaks to his queen of love and death.\n" * 60, encoding="utf-8")
    _run_workers("_lm_worker", (_lm_args(text, tmp_path / "ddp"),), timeout=120)
    res = json.loads((tmp_path / "ddp" / "transformer" / "result.json").read_text())
    assert res["world_size"] == WORLD and res["steps"] == 1 and not res["finished"]
    assert res["best_val_step"] is None  # validated after training, not during it
    one = load_script(STAGE / "train_lm.py").main(_lm_args(text, tmp_path / "one"))["transformer"]
    assert one["steps"] == 1 and one["best_val_step"] is None
    assert res["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5), "the ranks validated different weights"


def test_shard_and_env_errors():
    x = torch.arange(12).view(6, 2)
    parts = [D.shard((x, {"y": x}), r, 3) for r in range(3)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    assert torch.equal(parts[1][1]["y"], x[2:4])
    with pytest.raises(ValueError, match="does not split evenly"):
        D.shard(x, 0, 4)
    assert D.env_from_variables({}) == (0, 1, 0)
    with pytest.raises(ValueError, match="RANK"):
        D.env_from_variables({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="device"):
        D.setup("tpu")
    env = D.setup("cpu")  # no torchrun variables here: one plain process
    assert not env.distributed and env.is_main and env.device == "cpu"


def test_on_eval_and_extra_state_under_ddp(tmp_path):
    _run_workers("_hooks_worker", (str(tmp_path),), timeout=600)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    whole = ranks[0]["whole"]
    assert [s for s, _, _ in whole] == list(range(1, STEPS + 1))  # one call per validation
    assert all(not name.startswith("module.") for _, _, name in whole)  # the bare model
    for rec in ranks:
        # the resumed run's record came back from rank 0's checkpoint of step 2, then went on
        assert rec["whole"] == whole and rec["resumed"] == whole, rec
