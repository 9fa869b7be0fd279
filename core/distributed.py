"""Data-parallel training with PyTorch's own stack: torchrun + DistributedDataParallel.

Launch any script that uses this module with ``torchrun``::

    torchrun --standalone --nproc_per_node 2 stages/06_mamba_lm/train_lm.py ...

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for
each process; `setup()` reads them (no variables: one ordinary process) and
opens the process group with NCCL on GPU, gloo on CPU.

What stays exactly as in single-process training (`ssmlab.core.training`):

* **The data stream is global.** Every rank walks the same global stream
  (same seed, same position) and keeps its own contiguous slice of each batch
  (`ShardedBatches`). The stream's state is therefore identical on all ranks,
  and a checkpoint holds *one* data position, valid for any world size that
  divides the batch.
* **The gradient is the global-batch gradient.** Each rank's loss is the mean
  over its slice; DDP averages the gradients over ranks, which equals the
  gradient of the mean over the global batch (equal slice sizes). Clipping,
  AdamW and the schedule then run identically on every rank. Gradient
  accumulation syncs only on the last micro-batch (DDP's ``no_sync`` flag).
* **Checkpoints are the single-process ones.** `DDPModel` returns the wrapped
  model's state dict (no ``module.`` prefix), and only rank 0 writes
  ``log.jsonl`` and ``checkpoint.pt``. On resume every rank reads rank 0's
  checkpoint. A run may be resumed with another number of processes.
* **Logged losses are global means**: each micro-batch loss is all-reduced
  before it is reported (the gradient still flows through the local loss).
* **Chunked runs** (``cfg.time_limit_s``): rank 0's clock decides, at
  checkpoint steps only, and every rank stops at the same step right after
  rank 0 has written that step's checkpoint (``result.finished`` is False).
* **The weight EMA** (``cfg.ema_decay``) is kept by every rank: the ranks'
  parameters are equal after each step, so their averages are too, and the
  checkpoint holds one. ``result.ema`` is set on every rank, stopped or not.

`train_distributed` wraps `ssmlab.core.training.train` with all of this; with
one process it is exactly `train`. Tested: two gloo CPU processes give the
parameters and losses of one process with the same global batch, and a killed
two-process run resumes to the same result (stage 06, test_distributed.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ssmlab.core.training import CHECKPOINT_NAME, LOG_NAME, TrainConfig, TrainResult, make_ema, train


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0  # global rank
    world_size: int = 1  # number of processes
    local_rank: int = 0  # rank on this host (GPU index)
    device: str = "cpu"  # this process's device, e.g. "cuda:1"
    backend: Optional[str] = None  # "nccl", "gloo", or None when not distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_from_variables(environ: Optional[dict] = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables; (0, 1, 0) when they are absent."""
    environ = os.environ if environ is None else environ
    try:
        rank = int(environ.get("RANK", 0))
        world = int(environ.get("WORLD_SIZE", 1))
        local = int(environ.get("LOCAL_RANK", rank))
    except ValueError as err:
        raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {err}") from err
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= RANK < WORLD_SIZE, got RANK={rank}, WORLD_SIZE={world}")
    return rank, world, local


def setup(device: str = "auto", timeout_s: float = 600.0) -> DistEnv:
    """Join the job described by the environment (torchrun) and pick this rank's device.

    device: "auto" (CUDA when available, else CPU), "cpu" or "cuda". On CUDA,
    rank r uses GPU LOCAL_RANK. Backend: NCCL on CUDA, gloo on CPU.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    rank, world, local = env_from_variables()
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but torch.cuda.is_available() is False")
    dev = f"cuda:{local}" if use_cuda else "cpu"
    if use_cuda:
        torch.cuda.set_device(local)
    if world == 1:
        return DistEnv(device=dev if use_cuda else "cpu")
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s),
                                **({"device_id": torch.device(dev)} if use_cuda else {}))
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=dev, backend=backend)


def teardown(env: DistEnv) -> None:
    """Leave the process group (a no-op for a single process)."""
    if env.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_mean(value: Tensor, env: DistEnv) -> Tensor:
    """The mean of `value` over ranks (a detached copy; `value` itself is left as it is)."""
    out = value.detach().clone()
    if env.distributed:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= env.world_size
    return out


def all_reduce_sum(value: Tensor, env: DistEnv) -> Tensor:
    out = value.detach().clone()
    if env.distributed:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def print0(env: DistEnv, *args, **kwargs) -> None:
    """print() on rank 0 only."""
    if env.is_main:
        print(*args, **kwargs, flush=True)


# --------------------------------------------------------------------------- data


def shard(batch: Any, rank: int, world_size: int) -> Any:
    """Rank `rank`'s contiguous slice (rows [r b, (r + 1) b), b = rows / world) of every tensor in a batch."""
    if isinstance(batch, Tensor):
        rows = batch.shape[0]
        if rows % world_size:
            raise ValueError(f"global batch of {rows} rows does not split evenly over {world_size} processes")
        b = rows // world_size
        return batch[rank * b:(rank + 1) * b]
    if isinstance(batch, (list, tuple)):
        return type(batch)(shard(t, rank, world_size) for t in batch)
    if isinstance(batch, dict):
        return {k: shard(v, rank, world_size) for k, v in batch.items()}
    return batch


class ShardedBatches:
    """This rank's slice of a global batch stream; its state is the global stream's state."""

    def __init__(self, data: Any, env: DistEnv):
        self.data, self.env = data, env

    def __iter__(self):
        return self

    def __next__(self):
        return shard(next(self.data), self.env.rank, self.env.world_size)

    def state_dict(self) -> dict:
        return self.data.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.data.load_state_dict(state)


# --------------------------------------------------------------------------- model


class DDPModel(DistributedDataParallel):
    """DistributedDataParallel whose state dict is the wrapped model's (no ``module.`` prefix).

    So a checkpoint written under DDP loads into the bare model and the other way round.
    """

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)


def wrap_model(model: nn.Module, env: DistEnv) -> nn.Module:
    """Move `model` to this rank's device and wrap it in `DDPModel` (returned as is for one process).

    DDP broadcasts rank 0's parameters at construction, so every rank starts equal.
    """
    model = model.to(env.device)
    if not env.distributed:
        return model
    ids = [torch.device(env.device).index] if env.device.startswith("cuda") else None
    return DDPModel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _split(out) -> tuple[Tensor, dict]:
    return out if isinstance(out, tuple) else (out, {})


def global_loss_fn(loss_fn: Callable, env: DistEnv, model: nn.Module, grad_accum: int) -> Callable:
    """Wrap a loss function for DDP.

    * Before each micro-batch's forward it sets DDP's ``require_backward_grad_sync``
      so gradients are all-reduced only on the last micro-batch of a step
      (what ``DDP.no_sync()`` does; `train` owns the loop, so the flag is set here).
      `train` starts every optimizer step at micro-batch 0, resumed or not.
    * The returned loss has the value of the global mean (for the logs) and the
      gradient of the local loss: ``loss + (global - loss).detach()``.
    """
    if not env.distributed:
        return loss_fn
    calls = [0]

    def wrapped(m: nn.Module, batch: Any):
        if isinstance(model, DistributedDataParallel):
            model.require_backward_grad_sync = (calls[0] + 1) % grad_accum == 0
        calls[0] += 1
        loss, metrics = _split(loss_fn(m, batch))
        g = all_reduce_mean(loss, env)
        loss = loss + (g - loss.detach())
        metrics = {k: all_reduce_mean(torch.as_tensor(v, dtype=torch.float64, device=g.device), env).item()
                   for k, v in metrics.items()}
        return loss, metrics

    return wrapped


# --------------------------------------------------------------------------- the loop


def _shadow_dir(out_dir: Path, rank: int) -> Path:
    return out_dir / f".rank{rank}"


def rank_config(cfg: TrainConfig, env: DistEnv) -> TrainConfig:
    """This rank's copy of the config: rank 0 writes as asked; the others write nothing durable.

    A rank r > 0 gets a private folder ``out_dir/.rank{r}`` into which rank 0's
    checkpoint is copied when resuming (so `train` restores the same state
    everywhere); it saves only once, at the end, and the folder is removed
    when training returns.
    """
    cfg = dataclasses.replace(cfg, device=env.device)
    if env.is_main:
        return cfg
    cfg = dataclasses.replace(cfg, progress=False)
    if cfg.out_dir is None:
        return cfg
    main_ckpt = Path(cfg.out_dir) / CHECKPOINT_NAME
    shadow = _shadow_dir(Path(cfg.out_dir), env.rank)
    shutil.rmtree(shadow, ignore_errors=True)
    shadow.mkdir(parents=True)
    if cfg.resume and main_ckpt.exists():
        shutil.copyfile(main_ckpt, shadow / CHECKPOINT_NAME)
    return dataclasses.replace(cfg, out_dir=str(shadow), ckpt_every=0)


def train_distributed(model: nn.Module, loss_fn: Callable, data: Any, cfg: TrainConfig, env: DistEnv,
                      eval_fn: Optional[Callable[[nn.Module], dict]] = None,
                      on_step: Optional[Callable[[int, dict], None]] = None,
                      on_eval: Optional[Callable[[int, dict, nn.Module], None]] = None,
                      extra_state: Any = None) -> TrainResult:
    """`ssmlab.core.training.train` over `env.world_size` processes (see the module docstring).

    model: the bare model (wrapped here) or a `DDPModel`; data: the *global* batch
    stream (same on every rank); cfg.device is replaced by env.device.
    eval_fn runs on every rank (it may use collectives, e.g. to split the
    validation set; see `sharded_mean`). on_eval and extra_state are train()'s:
    on_eval runs on every rank and is given the bare model (so state_dict()
    names carry no "module." prefix), and every rank restores extra_state from
    rank 0's checkpoint on resume, so ranks that decide alike stay alike.
    """
    if not env.distributed:
        return train(model, loss_fn, data, dataclasses.replace(cfg, device=env.device), eval_fn=eval_fn,
                     on_step=on_step, on_eval=on_eval, extra_state=extra_state)
    if cfg.time_limit_s > 0 and not cfg.ckpt_every:
        raise ValueError("under DDP, time_limit_s needs ckpt_every > 0 (the run stops at a checkpoint step)")
    ddp = model if isinstance(model, DistributedDataParallel) else wrap_model(model, env)
    local_cfg = dataclasses.replace(rank_config(cfg, env), time_limit_s=0.0)  # the limit is enforced below
    ema = make_ema(ddp, cfg)  # made here so that a run stopped by _OutOfTime still returns it
    barrier(env)  # every rank has read the checkpoint before rank 0 may write a new one
    t0 = time.perf_counter()

    def step_hook(step: int, record: dict) -> None:
        if on_step is not None:
            on_step(step, record)
        if cfg.time_limit_s > 0 and step % cfg.ckpt_every == 0 and step < cfg.max_steps:
            # rank 0's clock decides for everyone, so that all ranks stop at the same step
            if broadcast_flag(time.perf_counter() - t0 >= cfg.time_limit_s, env):
                raise _OutOfTime(step)

    eval_hook = None if on_eval is None else (lambda step, metrics, m: on_eval(step, metrics, unwrap(m)))
    try:
        result = train(ddp, global_loss_fn(loss_fn, env, ddp, cfg.grad_accum), ShardedBatches(data, env), local_cfg,
                       eval_fn=eval_fn, on_step=step_hook, ema=ema, on_eval=eval_hook, extra_state=extra_state)
    except _OutOfTime as stop:  # rank 0 wrote the checkpoint of this step just before the hook ran
        result = TrainResult(step=stop.step, finished=False, ema=ema)
        if env.is_main and cfg.out_dir is not None:
            with open(Path(cfg.out_dir) / LOG_NAME, "a", encoding="utf-8") as f:
                f.write(json.dumps({"kind": "stopped", "step": stop.step, "reason": "time_limit_s",
                                    "time_s": round(time.perf_counter() - t0, 3)}) + "\n")
    finally:
        ddp.require_backward_grad_sync = True
    if not env.is_main and cfg.out_dir is not None:
        shutil.rmtree(_shadow_dir(Path(cfg.out_dir), env.rank), ignore_errors=True)
    barrier(env)
    return result


class _OutOfTime(Exception):
    def __init__(self, step: int):
        super().__init__(f"time limit reached at step {step}")
        self.step = step


def _collective_device(env: DistEnv) -> str:
    return env.device if env.backend == "nccl" else "cpu"


def broadcast_flag(flag: bool, env: DistEnv) -> bool:
    """Rank 0's `flag`, on every rank (the others' `flag` is ignored).

    For a choice that only rank 0 can make (its clock, the files it alone
    writes) but that every rank must follow, e.g. whether to enter a collective.
    """
    if not env.distributed:
        return flag
    t = torch.tensor([float(flag)], device=_collective_device(env))
    dist.broadcast(t, src=0)
    return bool(t.item())


def sharded_mean(values_fn: Callable[[int, int], tuple[float, int]], env: DistEnv) -> float:
    """A mean over a data set split across ranks.

    values_fn(rank, world_size) -> (sum of this rank's values, count); the sums
    and counts are all-reduced, so every rank returns the global mean.
    """
    total, count = values_fn(env.rank, env.world_size)
    t = all_reduce_sum(torch.tensor([float(total), float(count)], dtype=torch.float64,
                                    device=_collective_device(env)), env)
    return (t[0] / t[1].clamp(min=1)).item()


__all__ = [
    "DDPModel", "DistEnv", "ShardedBatches", "all_reduce_mean", "all_reduce_sum", "barrier", "broadcast_flag",
    "env_from_variables", "global_loss_fn", "print0", "rank_config", "setup", "shard", "sharded_mean", "teardown",
    "train_distributed", "unwrap", "wrap_model",
]
