"""An exponential moving average (EMA) of a model's parameters.

After every optimizer step t, each parameter θ has a shadow θ̄:

    θ̄_t = β θ̄_{t-1} + (1 − β) θ_t          (β = ``decay``)

so θ̄ weighs the iterates of roughly the last 1 / (1 − β) steps (1000 steps
for β = 0.999). Late in training the iterates jitter around a minimum with the
noise of the mini-batches and the learning rate; their average sits closer to
it, which usually gives a lower validation loss than the last iterate
(Polyak–Juditsky averaging, in its exponential form).

Choices, and why:

* **Parameters only.** Buffers (masks, rotary tables, running statistics) are
  not averaged: the EMA weights are always used with the live model's
  buffers, as if those were copied into the averaged model at every step.
  Averaging a count or a mask would be meaningless, and our models keep no
  running statistics.
* **Shadows in at least float32**, on the parameters' device. In bfloat16
  (8 significant bits, steps of 2^-8 relative) the increment
  (1 − β)(θ − θ̄) = 0.001 (θ − θ̄) rounds away and the average would stop
  moving.
* **Warm start** (``start_step``): until ``start_step`` updates have been
  made, the shadow copies the weights instead of averaging them. Averaging
  from the first step keeps a weight β^t on the random initialisation: 0.74
  after 300 steps with β = 0.999, so a short run would be validated mostly at
  its initial weights. Starting after the warmup averages only iterates that
  already model the data. 0 averages from the first step.
* **Names of the bare model.** A `DistributedDataParallel` wrapper is looked
  through, so the state dict matches ``model.state_dict()`` names and moves
  between DDP and single-process runs, like the training checkpoints. Every
  DDP rank holds the same parameters after each step, hence the same EMA: no
  communication is needed.
* **Evaluation by swapping** (`swapped_in`): the EMA weights are copied into
  the model for the duration of a ``with`` block and the live ones copied
  back afterwards, even when the block raises; no second model is kept.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel


def _bare(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def averaged_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters an EMA tracks: every floating (or complex) one, by name; tied ones once."""
    return {n: p for n, p in _bare(model).named_parameters() if p.is_floating_point() or p.is_complex()}


class ParamEMA:
    """θ̄ ← β θ̄ + (1 − β) θ for the floating parameters of a model (see the module docstring).

    The shadows start as copies of the model's current parameters.
    """

    def __init__(self, model: nn.Module, decay: float, start_step: int = 0):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        if start_step < 0:
            raise ValueError(f"EMA start_step must be >= 0, got {start_step}")
        self.decay, self.start_step = float(decay), int(start_step)
        self.num_updates = 0  # optimizer steps seen (the warm start counts them)
        self.shadow: dict[str, Tensor] = {}
        self.reset(model)

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Restart from the model's current weights, as if no update had been made."""
        self.shadow = {n: p.detach().to(torch.promote_types(p.dtype, torch.float32), copy=True)
                       for n, p in averaged_parameters(model).items()}
        self.num_updates = 0

    def _pairs(self, model: nn.Module) -> list[tuple[Tensor, nn.Parameter]]:
        params = averaged_parameters(model)
        if params.keys() != self.shadow.keys():
            missing, extra = sorted(self.shadow.keys() - params.keys()), sorted(params.keys() - self.shadow.keys())
            raise KeyError(f"the model's parameters do not match the EMA's: missing {missing}, unexpected {extra}")
        return [(self.shadow[n], p) for n, p in params.items()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average; call it after each optimizer step."""
        pairs = self._pairs(model)
        self.num_updates += 1
        shadows = [s for s, _ in pairs]
        params = [p.detach().to(s.dtype) for s, p in pairs]  # a copy only for bf16 / fp16 parameters
        # _foreach_*: a few fused kernels for the whole model instead of two per tensor.
        if self.num_updates <= self.start_step:
            torch._foreach_copy_(shadows, params)
        else:
            torch._foreach_mul_(shadows, self.decay)
            torch._foreach_add_(shadows, params, alpha=1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[nn.Module]:
        """Run the ``with`` block with the EMA weights in `model`; the live weights come back bit for bit."""
        pairs = self._pairs(model)
        with torch.no_grad():
            live = [p.detach().clone() for _, p in pairs]
        try:
            with torch.no_grad():
                for s, p in pairs:
                    p.copy_(s)
            yield model
        finally:
            with torch.no_grad():
                for (_, p), saved in zip(pairs, live):
                    p.copy_(saved)

    def state_dict(self) -> dict:
        """Shadows (by parameter name), update count, and the decay / start step for the record."""
        return {"decay": self.decay, "start_step": self.start_step, "num_updates": self.num_updates,
                "shadow": dict(self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore shadows and update count. decay and start_step stay as constructed (they are configuration)."""
        saved = state["shadow"]
        if saved.keys() != self.shadow.keys():
            missing, extra = sorted(self.shadow.keys() - saved.keys()), sorted(saved.keys() - self.shadow.keys())
            raise KeyError(f"the EMA state does not match the model: missing {missing}, unexpected {extra}")
        for n, s in self.shadow.items():
            s.copy_(saved[n])
        self.num_updates = int(state["num_updates"])


__all__ = ["ParamEMA", "averaged_parameters"]
