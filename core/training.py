"""The shared training recipe (Mamba paper, Appendix E; used by stages 05 and 06).

The recipe:

* AdamW with betas (0.9, 0.95) and weight decay 0.1, **not** applied to biases,
  normalisation weights, embeddings, ``A_log`` and ``D`` (see `param_groups`);
  optionally (``ssm_lr > 0``) the S4/S4D state-space parameters (A, B, Δ)
  in a group of their own with that peak lr and no weight decay, the S4
  papers' convention;
* learning rate: linear warmup, then cosine decay to ``min_lr_ratio * lr``
  (see `lr_factor`);
* gradient clipping at global norm 1.0;
* bfloat16 autocast on GPU (``precision="auto"``), float32 on CPU;
* gradient accumulation over ``grad_accum`` micro-batches;
* an evaluation hook, a tqdm progress bar, JSON log lines;
* optionally an exponential moving average of the weights (``ema_decay > 0``,
  `ssmlab.core.ema.ParamEMA`), updated after every optimizer step. Evaluation
  then runs twice: the plain metric names (``val_loss``) are those of the
  EMA weights, the ones with the suffix ``_live`` (``val_loss_live``) those
  of the live weights. The plain names go to whatever reads them (best
  validation loss, curves, early stopping), so they describe the weights a
  script saves, which are the EMA weights (``result.ema.swapped_in(model)``);
* atomic checkpoints with **exact resume**: model, optimizer, scheduler, step,
  the EMA (when on), the RNG states of torch (CPU and CUDA), numpy and
  `random`, and the position of the data stream. A run killed and resumed
  reproduces the losses (and EMA) of an uninterrupted run (tested on CPU in
  stage 06).
* two hooks for choosing weights by validation: ``on_eval(step, metrics,
  model)`` runs after each validation, before that step's checkpoint, with
  the weights the plain metric names describe (the EMA weights when the EMA
  is on); ``extra_state`` (anything with ``state_dict`` / ``load_state_dict``)
  is saved in every checkpoint and restored on resume, so what ``on_eval``
  keeps (the best weights so far) resumes with the run.

API in one screen::

    from ssmlab.core.training import TrainConfig, train, EpochBatches

    cfg = TrainConfig(lr=1e-3, max_steps=2000, warmup_steps=100, out_dir="runs/x")
    batches = EpochBatches.from_tensors(x, y, batch_size=32, seed=0)   # resumable stream

    def loss_fn(model, batch):          # batch is already on cfg.device
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits.flatten(0, -2), y.flatten())   # or (loss, {"acc": ...})

    def eval_fn(model):                 # called under no_grad, model.eval(), autocast
        return {"val_loss": ..., "val_acc": ...}

    result = train(model, loss_fn, batches, cfg, eval_fn=eval_fn)
    result.history        # list of the JSON records written to out_dir/log.jsonl
    # with TrainConfig(ema_decay=0.999, ...): result.ema, and `with result.ema.swapped_in(model): save(model)`
    # keeping the best weights: train(..., on_eval=best, extra_state=best), best(step, metrics, model)
    # copying the weights when metrics improve, best.state_dict() / load_state_dict() holding them

Re-running the same command with ``resume=True`` (the default) continues from
``out_dir/checkpoint.pt`` when it exists; with ``time_limit_s`` a long run
stops cleanly (checkpoint written, ``result.finished == False``) so it can be
run in chunks of bounded wall time.

Data streams: anything with ``__next__`` works; for exact resume it must also
have ``state_dict()`` / ``load_state_dict()``. Three are provided:
`EpochBatches` (shuffled epochs over an indexable data set; state = epoch and
cursor), `GeneratedBatches` (a function of a seeded `torch.Generator`, for
synthetic tasks; state = the generator's state) and `CurriculumBatches`
(generated batches whose length grows in phases, a length curriculum; state =
the generator's state and the number of batches drawn, so a resumed run picks
up in the right phase).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from ssmlab.core.checkpoint import atomic_torch_save
from ssmlab.core.ema import ParamEMA

CHECKPOINT_NAME = "checkpoint.pt"
EXTRA_STATE_KEY = "extra_state"  # where train() keeps its extra_state in the checkpoint's "extra" dict
LOG_NAME = "log.jsonl"
LIVE_SUFFIX = "_live"  # with an EMA, eval metrics of the live weights are logged as name + LIVE_SUFFIX

# Parameter names (last component) that never get weight decay, besides every
# tensor of fewer than 2 dimensions (biases, norm weights) and embeddings.
NO_DECAY_NAMES = ("A_log", "D")


# --------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Hyperparameters of the recipe. Defaults follow the Mamba paper (Appendix E.2)."""

    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to min_lr_ratio * lr
    warmup_steps: int = 100  # linear warmup length, in optimizer steps
    max_steps: int = 1000  # total optimizer steps (the cosine reaches its floor here)
    weight_decay: float = 0.1  # AdamW decoupled weight decay (decay group only)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW (beta1, beta2)
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # max global gradient norm; <= 0 disables clipping
    grad_accum: int = 1  # micro-batches per optimizer step
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", ...
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 elsewhere), "bf16", "fp32"
    seed: int = 0  # seeds torch, numpy and random at the start of a fresh run
    log_every: int = 10  # write a JSON train record every this many steps (and at the last)
    eval_every: int = 0  # call eval_fn every this many steps (0: only at the end)
    ckpt_every: int = 0  # checkpoint every this many steps (0: only at the end); needs out_dir
    out_dir: Optional[str] = None  # where log.jsonl and checkpoint.pt go (None: nothing written)
    resume: bool = True  # continue from out_dir/checkpoint.pt when it exists
    time_limit_s: float = 0.0  # stop (after a checkpoint) once this much wall time has passed; 0: no limit.
    # Lets a long run be split into chunks: rerun the same command and it resumes.
    progress: bool = True  # tqdm progress bar
    ema_decay: float = 0.0  # β of the weight EMA (0: off; e.g. 0.999 averages over ~1000 steps)
    ema_start_step: int = 0  # the EMA copies the weights for this many steps before averaging
    # (so that it does not keep the random initialisation with weight β^t; see core/ema.py)
    ssm_lr: float = 0.0  # peak lr of parameters tagged `_ssm_param` (S4/S4D's A, B, Δ; no weight decay);
    # 0: they train at `lr` like the rest. The schedule scales it like `lr`.

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError(f"warmup_steps must be in [0, max_steps={self.max_steps}], got {self.warmup_steps}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        if self.ssm_lr < 0:
            raise ValueError(f"ssm_lr must be >= 0 (0: the same as lr), got {self.ssm_lr}")
        if not (self.ema_decay == 0 or 0 < self.ema_decay < 1):
            raise ValueError(f"ema_decay must be 0 (off) or in (0, 1), got {self.ema_decay}")
        for name in ("log_every", "eval_every", "ckpt_every", "time_limit_s", "ema_start_step"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        self.betas = tuple(self.betas)

    def autocast_dtype(self) -> Optional[torch.dtype]:
        """The autocast dtype this config asks for on its device (None: no autocast)."""
        if self.precision == "bf16" or (self.precision == "auto" and torch.device(self.device).type == "cuda"):
            return torch.bfloat16
        return None


# --------------------------------------------------------------------------- optimizer


def no_decay(name: str, param: Tensor, embedding_params: set[int]) -> bool:
    """True for biases, norm weights (any tensor of < 2 dims), embeddings, A_log and D."""
    last = name.rsplit(".", 1)[-1]
    return (
        param.ndim < 2
        or id(param) in embedding_params
        or last in NO_DECAY_NAMES
        or getattr(param, "_no_weight_decay", False)
    )


def param_groups(model: nn.Module, weight_decay: float, ssm_lr: float = 0.0) -> list[dict]:
    """AdamW groups: ``decay`` (matrices, conv kernels) and ``no_decay`` (the rest).

    With ``ssm_lr > 0`` the parameters tagged ``_ssm_param`` (the state-space
    parameters of S4 and S4D) leave ``no_decay`` for a third group, ``ssm``,
    with that peak lr and no weight decay: their gradients are of another
    scale than the projections', and the S4 papers train them slower.
    Each group also carries ``names`` (the parameter names, for inspection and
    tests) and ``group`` (its name). A parameter shared by two modules (a
    tied LM head) is listed once.
    """
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups = {"decay": {"weight_decay": weight_decay}, "no_decay": {"weight_decay": 0.0},
              "ssm": {"weight_decay": 0.0, "lr": ssm_lr}}
    for name, g in groups.items():
        g.update(params=[], names=[], group=name)
    for name, p in model.named_parameters():  # de-duplicates shared parameters
        if not p.requires_grad:
            continue
        if ssm_lr > 0 and getattr(p, "_ssm_param", False):
            key = "ssm"
        else:
            key = "no_decay" if no_decay(name, p, embedding_params) else "decay"
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [g for g in groups.values() if g["params"]]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    groups = param_groups(model, cfg.weight_decay, cfg.ssm_lr)
    for g in groups:  # AdamW would keep extra keys in its state dict; keep the labels out of it
        g.pop("names"), g.pop("group")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


# --------------------------------------------------------------------------- schedule


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for the update made at optimizer step `step` (0-based).

    Warmup: (step + 1) / warmup_steps for step < warmup_steps, so the first
    update already moves and step warmup_steps - 1 reaches the peak.
    Cosine: from 1 at step = warmup_steps down to min_lr_ratio at step =
    max_steps - 1 (the last update), then flat at min_lr_ratio.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(max_steps - 1 - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class WarmupCosine:
    """Picklable lr lambda for `torch.optim.lr_scheduler.LambdaLR` (its fields go in the state dict)."""

    warmup_steps: int
    max_steps: int
    min_lr_ratio: float

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.warmup_steps, self.max_steps, self.min_lr_ratio)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))


def make_ema(model: nn.Module, cfg: TrainConfig) -> Optional[ParamEMA]:
    """The weight EMA the config asks for (None when ``cfg.ema_decay == 0``), started at the current weights."""
    return ParamEMA(model, cfg.ema_decay, cfg.ema_start_step) if cfg.ema_decay > 0 else None


# --------------------------------------------------------------------------- data streams


class EpochBatches:
    """Shuffled mini-batches over ``n`` examples, epoch after epoch, resumable.

    ``fetch(indices)`` turns a LongTensor of example indices into a batch
    (e.g. a tuple of tensors). Epoch ``e`` uses the permutation drawn from
    ``seed + e``, so the position (epoch, cursor) determines everything.
    The last incomplete batch of an epoch is dropped (``drop_last``) or kept.
    """

    def __init__(self, n: int, batch_size: int, fetch: Callable[[Tensor], Any], seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if batch_size < 1 or (drop_last and batch_size > n):
            raise ValueError(f"batch_size must be in [1, n={n}] with drop_last, got {batch_size}")
        self.n, self.batch_size, self.fetch, self.seed = n, batch_size, fetch, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch, self.cursor = 0, 0
        self._perm = self._permutation(0)

    @classmethod
    def from_tensors(cls, *tensors: Tensor, batch_size: int, seed: int = 0, **kw) -> "EpochBatches":
        n = len(tensors[0])
        if any(len(t) != n for t in tensors):
            raise ValueError(f"tensors must have the same first dimension, got {[len(t) for t in tensors]}")
        return cls(n, batch_size, lambda idx: tuple(t[idx] for t in tensors), seed=seed, **kw)

    def _permutation(self, epoch: int) -> Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        end = self.cursor + self.batch_size
        if end > self.n and (self.drop_last or self.cursor >= self.n):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)
            end = self.batch_size
        idx = self._perm[self.cursor:min(end, self.n)]
        self.cursor = min(end, self.n)
        return self.fetch(idx)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor, self.seed = state["epoch"], state["cursor"], state["seed"]
        self._perm = self._permutation(self.epoch)


class GeneratedBatches:
    """Batches drawn on the fly by ``make(generator)`` from one seeded `torch.Generator` (CPU).

    For synthetic tasks: the stream's state is the generator's state.
    """

    def __init__(self, make: Callable[[torch.Generator], Any], seed: int = 0):
        self.make = make
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        return self.make(self.generator)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class CurriculumBatches:
    """Generated batches whose length follows a curriculum: ``make(length, generator)`` in phases.

    ``phases`` is a list of ``(length, n_batches)``: the first ``n_batches``
    batches are drawn at the first length, the next ones at the second, and
    so on; after the last phase the stream stays at the last length. With
    ``grad_accum == 1`` a batch is an optimizer step, so the phases are counted
    in steps while the learning-rate schedule runs once over their total.
    One seeded `torch.Generator` (CPU) serves every phase. The state is that
    generator's state and the number of batches drawn, so a run resumed from a
    checkpoint continues in the phase, and at the batch, where it stopped.
    """

    def __init__(self, make: Callable[[int, torch.Generator], Any], phases: list[tuple[int, int]], seed: int = 0):
        phases = [(int(length), int(n)) for length, n in phases]
        if not phases:
            raise ValueError("a curriculum needs at least one phase")
        if any(length < 1 or n < 1 for length, n in phases):
            raise ValueError(f"every phase needs a length >= 1 and >= 1 batches, got {phases}")
        self.make, self.phases = make, phases
        self.generator = torch.Generator().manual_seed(seed)
        self.drawn = 0  # batches drawn so far

    @property
    def total(self) -> int:
        """Batches in all phases together."""
        return sum(n for _, n in self.phases)

    def phase_of(self, index: int) -> int:
        """Which phase (0-based) batch number `index` (0-based) belongs to; the last one past the end."""
        end = 0
        for k, (_, n) in enumerate(self.phases):
            end += n
            if index < end:
                return k
        return len(self.phases) - 1

    def length_at(self, index: int) -> int:
        """The length of batch number `index` (0-based)."""
        return self.phases[self.phase_of(index)][0]

    @property
    def last_length(self) -> int:
        """The length of the batch drawn last (the first phase's before any batch): what was just trained on."""
        return self.length_at(max(self.drawn - 1, 0))

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        batch = self.make(self.length_at(self.drawn), self.generator)
        self.drawn += 1
        return batch

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "drawn": self.drawn, "phases": [list(p) for p in self.phases]}

    def load_state_dict(self, state: dict) -> None:
        saved = [tuple(p) for p in state["phases"]]
        if saved != self.phases:
            # resuming under other phases would silently train a run that neither curriculum describes
            raise ValueError(f"the checkpoint was written with the curriculum {saved}, not {self.phases}")
        self.generator.set_state(state["generator"])
        self.drawn = state["drawn"]


def to_device(batch: Any, device: Union[str, torch.device]) -> Any:
    """Move every tensor in a (nested) tuple / list / dict to `device`."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


# --------------------------------------------------------------------------- RNG + checkpoints


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Union[str, os.PathLike], model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, step: int, data: Any = None, cfg: Optional[TrainConfig] = None,
                    extra: Optional[dict] = None, ema: Optional[ParamEMA] = None) -> Path:
    """Atomically write everything exact resume needs (see module docstring)."""
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_state(),
        "data": data.state_dict() if hasattr(data, "state_dict") else None,
        "ema": ema.state_dict() if ema is not None else None,
        "train_config": dataclasses.asdict(cfg) if cfg is not None else None,
        "extra": extra or {},
    }
    return atomic_torch_save(state, path)


def load_checkpoint(path: Union[str, os.PathLike], model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    scheduler: Any = None, data: Any = None, restore_rng: bool = True,
                    map_location: Union[str, torch.device] = "cpu", ema: Optional[ParamEMA] = None) -> dict:
    """Restore the objects given from a `save_checkpoint` file; returns the raw state (``state['step']``).

    An `ema` given for a checkpoint written without one restarts from the loaded
    weights (with a warning): turning the EMA on mid-run is allowed, but that
    run is then not the one an EMA-from-the-start run would have been.
    """
    state = torch.load(path, map_location=map_location, weights_only=False)
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if data is not None and state["data"] is not None:
        if not hasattr(data, "load_state_dict"):
            raise TypeError("the checkpoint holds a data position but the data stream has no load_state_dict()")
        data.load_state_dict(state["data"])
    if ema is not None:
        if state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        else:
            ema.reset(model)
            warnings.warn(f"{path} holds no EMA state: the EMA starts from the resumed weights at step {state['step']}")
    if restore_rng:
        set_rng_state(state["rng"])
    return state


# --------------------------------------------------------------------------- throughput


class StepTimer:
    """Training throughput from the wall time of optimizer steps that did nothing else.

    Pass it as `train`'s ``on_step``; it is called after every step. A step's
    time counts unless it is the first of this session (warm-up) or it also
    validated or wrote a checkpoint. `train` reads the loss of every
    micro-batch (.item()), so the wall clock is synchronised with the GPU at
    each step.
    """

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.t_start = self.last = time.perf_counter()
        self.first = True
        self.n, self.seconds = 0, 0.0

    def __call__(self, step: int, record: dict) -> None:
        now = time.perf_counter()
        c = self.cfg
        busy = (c.eval_every and step % c.eval_every == 0) or (c.ckpt_every and step % c.ckpt_every == 0) \
            or step == c.max_steps
        if not self.first and not busy:
            self.n += 1
            self.seconds += now - self.last
        self.first, self.last = False, now

    def tokens_per_s(self, tokens_per_step: int):
        """Tokens per second over the timed steps (None if no step was timed)."""
        return round(self.n * tokens_per_step / self.seconds, 1) if self.n else None

    def wall(self) -> float:
        """Seconds since the timer was made."""
        return time.perf_counter() - self.t_start


# --------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    step: int  # optimizer steps done in total
    finished: bool = True  # False when time_limit_s stopped the run before max_steps
    history: list[dict] = field(default_factory=list)  # the JSON records of this call
    resumed_from: Optional[int] = None  # step of the checkpoint resumed from, if any
    ema: Optional[ParamEMA] = None  # the weight EMA (cfg.ema_decay > 0); ema.swapped_in(model) to use it


LossFn = Callable[[nn.Module, Any], Union[Tensor, tuple[Tensor, dict]]]


def _split(out) -> tuple[Tensor, dict]:
    return out if isinstance(out, tuple) else (out, {})


def _scalar(v: Any) -> Any:
    return v.item() if isinstance(v, Tensor) else v


def train(model: nn.Module, loss_fn: LossFn, data: Any, cfg: TrainConfig,
          eval_fn: Optional[Callable[[nn.Module], dict]] = None,
          on_step: Optional[Callable[[int, dict], None]] = None, ema: Optional[ParamEMA] = None,
          on_eval: Optional[Callable[[int, dict, nn.Module], None]] = None, extra_state: Any = None) -> TrainResult:
    """Run the recipe until ``cfg.max_steps`` optimizer steps are done.

    loss_fn(model, batch) -> loss or (loss, metrics dict), batch already on the device.
    eval_fn(model) -> dict of metrics (run under no_grad, eval mode, autocast); with an
    EMA it runs on the live weights, then on the EMA weights (see the module docstring).
    on_step(step, record) is called after each optimizer step (step counts from 1).
    ema: the weight EMA to update, made by ``make_ema(model, cfg)`` on the model already
    on cfg.device; by default `train` makes it. Pass one to keep hold of it when an
    exception ends `train` (`train_distributed` stops a timed-out run that way).
    on_eval(step, metrics, model) is called after each validation with the metrics just
    logged, under no_grad, the model holding the weights that the plain names describe
    (the EMA weights swapped in when the EMA is on). It runs before the checkpoint of its
    step, so that checkpoint already holds whatever it changed in `extra_state`.
    extra_state: an object with state_dict() and load_state_dict(), saved in every checkpoint
    and restored on resume; a checkpoint without it leaves it as given (with a warning).
    """
    device = torch.device(cfg.device)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else None
    ckpt_path = out_dir / CHECKPOINT_NAME if out_dir else None
    model.to(device)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    if ema is None:
        ema = make_ema(model, cfg)
    elif ema.decay != cfg.ema_decay or ema.start_step != cfg.ema_start_step:
        raise ValueError(f"the EMA passed (decay {ema.decay}, start {ema.start_step}) is not the one cfg asks for "
                         f"(ema_decay {cfg.ema_decay}, ema_start_step {cfg.ema_start_step})")
    step, resumed_from = 0, None
    if ckpt_path is not None and cfg.resume and ckpt_path.exists():
        # Loaded on the CPU: RNG states must stay CPU byte tensors, and load_state_dict
        # moves model, optimizer and EMA tensors to their parameters' device anyway.
        state = load_checkpoint(ckpt_path, model, optimizer, scheduler, data, ema=ema)
        step = resumed_from = state["step"]
        if extra_state is not None:
            if EXTRA_STATE_KEY in (state.get("extra") or {}):
                extra_state.load_state_dict(state["extra"][EXTRA_STATE_KEY])
            else:
                warnings.warn(f"{ckpt_path} holds no extra_state: it stays as given, from step {step} on")
    else:
        seed_everything(cfg.seed)
    amp = cfg.autocast_dtype()
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else contextlib.nullcontext
    log_file = None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        log_file = open(out_dir / LOG_NAME, "a", encoding="utf-8")
    history: list[dict] = []

    def emit(record: dict) -> None:
        history.append(record)
        if log_file is not None:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

    def evaluate() -> dict:
        model.eval()
        with torch.no_grad(), autocast():
            metrics = {k: _scalar(v) for k, v in eval_fn(model).items()}
            if ema is not None:
                live = {k + LIVE_SUFFIX: v for k, v in metrics.items()}
                with ema.swapped_in(model):
                    metrics = {k: _scalar(v) for k, v in eval_fn(model).items()}
                metrics.update(live)
        model.train()
        return metrics

    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=step, desc="train", dynamic_ncols=True)
    model.train()
    t0, last_eval = time.perf_counter(), None
    try:
        while step < cfg.max_steps:
            lr = optimizer.param_groups[0]["lr"]
            loss_sum, metrics_sum = 0.0, {}
            for _ in range(cfg.grad_accum):
                batch = to_device(next(data), device)
                with autocast():
                    loss, metrics = _split(loss_fn(model, batch))
                (loss / cfg.grad_accum).backward()
                loss_sum += loss.item() / cfg.grad_accum
                for k, v in metrics.items():
                    metrics_sum[k] = metrics_sum.get(k, 0.0) + _scalar(v) / cfg.grad_accum
            clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if ema is not None:
                ema.update(model)
            step += 1
            record = {"step": step, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm, **metrics_sum}
            if step % max(cfg.log_every, 1) == 0 or step == cfg.max_steps:
                emit({"kind": "train", **record, "time_s": round(time.perf_counter() - t0, 3)})
            if eval_fn is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps):
                last_eval = evaluate()
                emit({"kind": "eval", "step": step, **last_eval})
                if on_eval is not None:
                    # Swapped in again rather than called inside evaluate(): the hook then runs
                    # outside autocast, and a swap (two parameter copies) is cheap next to a validation.
                    with torch.no_grad(), ema.swapped_in(model) if ema is not None else contextlib.nullcontext():
                        on_eval(step, dict(last_eval), model)
            out_of_time = cfg.time_limit_s > 0 and time.perf_counter() - t0 >= cfg.time_limit_s
            periodic = cfg.ckpt_every and step % cfg.ckpt_every == 0
            if ckpt_path is not None and (periodic or step == cfg.max_steps or out_of_time):
                extra = {EXTRA_STATE_KEY: extra_state.state_dict()} if extra_state is not None else None
                save_checkpoint(ckpt_path, model, optimizer, scheduler, step, data, cfg, extra=extra, ema=ema)
            if bar is not None:
                bar.update(1)
                post = {"loss": f"{loss_sum:.4f}", "lr": f"{lr:.2e}"}
                if last_eval:
                    post.update({k: f"{v:.4g}" for k, v in last_eval.items() if isinstance(v, (int, float))})
                bar.set_postfix(post)
            if on_step is not None:
                on_step(step, record)
            if out_of_time and step < cfg.max_steps:
                emit({"kind": "stopped", "step": step, "reason": "time_limit_s", "time_s": round(time.perf_counter() - t0, 3)})
                break
    finally:
        if bar is not None:
            bar.close()
        if log_file is not None:
            log_file.close()
    return TrainResult(step=step, finished=step >= cfg.max_steps, history=history, resumed_from=resumed_from,
                       ema=ema)


__all__ = [
    "CHECKPOINT_NAME", "CurriculumBatches", "EXTRA_STATE_KEY", "LIVE_SUFFIX", "LOG_NAME", "EpochBatches", "GeneratedBatches", "StepTimer",
    "TrainConfig", "TrainResult", "WarmupCosine", "load_checkpoint", "lr_factor", "make_ema", "make_optimizer",
    "make_scheduler", "no_decay", "param_groups", "rng_state", "save_checkpoint", "seed_everything", "set_rng_state",
    "to_device", "train",
]
