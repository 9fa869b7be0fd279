"""A small toolkit for character-level language models (the ladder of stages 01, 03, 05, 06).

Any backbone works: an ``nn.Module`` mapping token ids (B, L) int64 to logits
(B, L, V). The toolkit supplies the rest, identically for every stage, so
their validation bits per character are comparable:

* `random_windows` / `window_batches`: training batches, windows of L + 1
  characters at uniformly random offsets of the training ids; the input is
  the first L, the target the last L (next-character prediction);
* `lm_loss`: mean cross-entropy in nats, plus bits per character;
* `bits_per_char`: the evaluation protocol: the first ``max_chars`` validation
  characters cut into consecutive, non-overlapping windows of L + 1 (each
  window starts from an empty context), every target scored once;
* `train_char_lm`: the shared recipe of `ssmlab.core.training` (AdamW,
  warmup + cosine, clipping, tqdm) with a bits-per-character evaluation;
* `TrimVocab`: keeps the first V logits of a backbone whose vocabulary is
  padded (stage 06's Mamba and Transformer round V up to a multiple of 8);
* `generate`: greedy (temperature 0) or temperature sampling;
* `write_json`: results files.

    from ssmlab.core.charlm import CharLMConfig, train_char_lm, generate
    from ssmlab.core.training import TrainConfig
    from ssmlab.datasets.text import load_corpus

    corpus = load_corpus()
    model = MyLM(V=corpus.V)                  # (B, L) -> (B, L, V)
    out = train_char_lm(model, corpus, TrainConfig(lr=3e-3, max_steps=500), CharLMConfig(seq_len=256))
    out["val_bpc"], generate(model, corpus.encode("ROMEO:"), 200, temperature=0.8)

Bits per character = cross-entropy in nats / ln 2.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssmlab.core.training import GeneratedBatches, TrainConfig, train

LN2 = math.log(2.0)


@dataclass
class CharLMConfig:
    """Data and evaluation settings of a char-LM run (optimizer settings live in TrainConfig)."""

    seq_len: int = 256  # L: characters of context per training window
    batch_size: int = 32  # B: windows per training step
    eval_seq_len: int = 256  # L of the evaluation windows (keep equal across models to compare)
    eval_chars: int = 65536  # validation characters scored (0: the whole split)
    eval_batch_size: int = 32  # windows per evaluation forward pass

    def __post_init__(self):
        for name in ("seq_len", "batch_size", "eval_seq_len", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_chars < 0:
            raise ValueError(f"eval_chars must be >= 0, got {self.eval_chars}")


# ----------------------------------------------------------------------------- batches


def random_windows(ids: Tensor, batch_size: int, seq_len: int, generator: Optional[torch.Generator] = None
                   ) -> tuple[Tensor, Tensor]:
    """(x, y), each (B, L): B windows of L + 1 ids at random offsets; y is x shifted by one."""
    if ids.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
    if len(ids) < seq_len + 1:
        raise ValueError(f"need at least seq_len + 1 = {seq_len + 1} ids, got {len(ids)}")
    starts = torch.randint(0, len(ids) - seq_len, (batch_size,), generator=generator)
    win = ids[starts[:, None] + torch.arange(seq_len + 1)]  # (B, L+1)
    return win[:, :-1], win[:, 1:]


def window_batches(ids: Tensor, batch_size: int, seq_len: int, seed: int = 0) -> GeneratedBatches:
    """An endless, resumable stream of `random_windows` batches."""
    return GeneratedBatches(lambda g: random_windows(ids, batch_size, seq_len, g), seed=seed)


def eval_windows(ids: Tensor, seq_len: int, max_chars: int = 0) -> tuple[Tensor, Tensor]:
    """(x, y), each (W, L): the first `max_chars` ids (0: all) as consecutive windows of L + 1.

    Windows overlap by one id, so each id after the first is a target exactly once.
    """
    ids = ids[:max_chars] if max_chars else ids
    W = (len(ids) - 1) // seq_len
    if W < 1:
        raise ValueError(f"need at least seq_len + 1 = {seq_len + 1} ids to evaluate, got {len(ids)}")
    x = ids[: W * seq_len].view(W, seq_len)
    y = ids[1 : W * seq_len + 1].view(W, seq_len)
    return x, y


# ----------------------------------------------------------------------------- loss and evaluation


def lm_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict]:
    """Mean next-character cross-entropy (nats) and {"bpc": bits per character}."""
    x, y = batch
    logits = model(x)  # (B, L, V)
    if logits.shape[:2] != x.shape:
        raise ValueError(f"the model must map (B, L) ids to (B, L, V) logits, got {tuple(logits.shape)} for {tuple(x.shape)}")
    loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    return loss, {"bpc": loss.detach() / LN2}


@torch.no_grad()
def bits_per_char(model: nn.Module, ids: Tensor, seq_len: int = 256, batch_size: int = 32, max_chars: int = 0,
                  device: Union[str, torch.device, None] = None) -> float:
    """Mean bits per character of `model` on `ids` by the protocol of `eval_windows`."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    x, y = eval_windows(ids, seq_len, max_chars)
    total = 0.0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        logits = model(xb).float()
        total += F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="sum").item()
    model.train(was_training)
    return total / y.numel() / LN2


class TrimVocab(nn.Module):
    """`model` with its logits cut to the first V: (B, L) ids -> (B, L, V).

    For backbones whose vocabulary is padded (Mamba and the Transformer round V
    up to a multiple of 8 for tensor cores): the padding ids are never targets,
    and left in the softmax they would take probability mass from real ones.
    """

    def __init__(self, model: nn.Module, V: int):
        super().__init__()
        self.model, self.V = model, V

    def forward(self, ids: Tensor) -> Tensor:
        return self.model(ids)[..., : self.V]


# ----------------------------------------------------------------------------- training


def train_char_lm(model: nn.Module, corpus: Any, cfg: TrainConfig, lm: CharLMConfig = CharLMConfig(),
                  on_step: Optional[Callable[[int, dict], None]] = None) -> dict:
    """Train `model` on ``corpus.train_ids`` with the shared recipe; evaluate on ``corpus.val_ids``.

    `corpus` is a `ssmlab.datasets.text.CharCorpus` (anything with train_ids and
    val_ids). `on_step` is passed to `train` (e.g. a `StepTimer`). Returns a
    JSON-ready dict: val_bpc (final), the first and last training losses, and
    the history of train/eval records.
    """
    data = window_batches(corpus.train_ids, lm.batch_size, lm.seq_len, seed=cfg.seed)

    def eval_fn(m: nn.Module) -> dict:
        return {"val_bpc": bits_per_char(m, corpus.val_ids, lm.eval_seq_len, lm.eval_batch_size, lm.eval_chars,
                                         device=cfg.device)}

    result = train(model, lm_loss, data, cfg, eval_fn=eval_fn, on_step=on_step)
    train_recs = [r for r in result.history if r["kind"] == "train"]
    evals = [r for r in result.history if r["kind"] == "eval"]
    if not evals or evals[-1]["step"] != result.step:  # stopped early by cfg.time_limit_s: score the model we have
        evals.append({"kind": "eval", "step": result.step, **eval_fn(model)})
        result.history.append(evals[-1])
    return {
        "val_bpc": evals[-1]["val_bpc"] if evals else None,
        "first_loss": train_recs[0]["loss"] if train_recs else None,
        "last_loss": train_recs[-1]["loss"] if train_recs else None,
        "steps": result.step,
        "finished": result.finished,  # False if cfg.time_limit_s stopped it before cfg.max_steps
        "train_config": {k: v for k, v in asdict(cfg).items()},
        "lm_config": asdict(lm),
        "history": result.history,
    }


# ----------------------------------------------------------------------------- sampling


@torch.no_grad()
def generate(model: nn.Module, prompt: Tensor, n: int, temperature: float = 1.0, context: int = 256,
             generator: Optional[torch.Generator] = None) -> Tensor:
    """Append `n` ids to the 1-D `prompt`: greedy if temperature == 0, else sample softmax(logits / T).

    Generic (any backbone): each step reruns the model on the last `context`
    ids, O(n · context). Models with a recurrent step mode can do O(n).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if prompt.ndim != 1 or len(prompt) < 1:
        raise ValueError(f"prompt must be a non-empty 1-D id tensor, got shape {tuple(prompt.shape)}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids = prompt.to(device)
    for _ in range(n):
        logits = model(ids[-context:][None])[0, -1].float()  # (V,)
        if temperature == 0:
            nxt = logits.argmax()
        else:
            probs = torch.softmax(logits / temperature, dim=-1).cpu()
            nxt = torch.multinomial(probs, 1, generator=generator)[0].to(device)
        ids = torch.cat([ids, nxt.view(1)])
    model.train(was_training)
    return ids.cpu()


def write_json(path: Union[str, os.PathLike], obj: Any) -> Path:
    """Write `obj` as indented JSON, creating parent folders; returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
    return p
