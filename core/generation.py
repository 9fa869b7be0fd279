"""Recurrent generation for Mamba: parallel prefill, then O(1) time and memory per token.

Why this is cheap: a Mamba block's whole past is summarised by a fixed-size
cache per layer (`MambaLayerCache`): the last K inputs of the causal conv,
(B, ED, K), and the SSM state h, (B, ED, N). A Transformer's KV cache grows
with every token; this one never does.

    caches = model.allocate_cache(B)
    logits = model(prompt, caches)[:, -1]         # prefill: the parallel scan, state left in caches
    for each new token:
        token = sample_next(logits, ...)
        logits = model.step(token, caches)        # one recurrent step per layer

`generate` wraps this loop with greedy, temperature, top-k and top-p
(nucleus) sampling. Logits beyond ``config.vocab_size`` (the padding of the
vocabulary) are never sampled.

A step is four small matrix products and two fused kernels per layer
(`ssmlab.core.decode_step`: the conv-window update with SiLU, and the
selective state update; C++ on CPU, CUDA on GPU, the plain PyTorch twins
where neither is built). At small batch the cost is kernel launches, so on
GPU the step pays to be replayed from a CUDA graph (as `stages/06_mamba_lm/
bench_speed.py` does) or compiled (``compile_step=True``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from ssmlab.core.mamba import MambaLMHeadModel


@dataclass
class SamplingConfig:
    """How the next token is chosen from the logits."""

    greedy: bool = False  # argmax (ignores temperature / top-k / top-p)
    temperature: float = 1.0  # logits / temperature; must be > 0 unless greedy
    top_k: int = 0  # keep only the k largest logits (0: all)
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p (1: all)

    def __post_init__(self) -> None:
        if not self.greedy and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (or use greedy=True), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus: (B, V) -> (B, V)."""
    logits = logits.clone()
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits[logits < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits[drop] = float("-inf")
    return logits


def sample_next(logits: Tensor, sampling: SamplingConfig, generator: Optional[torch.Generator] = None) -> Tensor:
    """Pick one token per row from logits (B, V): (B,) int64."""
    if sampling.greedy:
        return logits.argmax(-1)
    logits = filter_logits(logits.float() / sampling.temperature, sampling.top_k, sampling.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: MambaLMHeadModel, input_ids: Tensor, max_new_tokens: int,
             sampling: Optional[SamplingConfig] = None, generator: Optional[torch.Generator] = None,
             eos_token_id: Optional[int] = None, compile_step: bool = False,
             return_logits: bool = False):
    """Continue `input_ids` (B, L) by `max_new_tokens` tokens: returns (B, L + T) ids (and (B, T, V) logits).

    Sequences that emitted `eos_token_id` keep emitting it.
    """
    if input_ids.ndim != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be (B, L) with L >= 1, got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    sampling = sampling or SamplingConfig(greedy=True)
    V = model.config.vocab_size
    step: Callable = torch.compile(model.step) if compile_step else model.step
    caches = model.allocate_cache(input_ids.shape[0])
    logits = model(input_ids, caches)[:, -1, :V]  # prefill
    out, all_logits = [input_ids], []
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for t in range(max_new_tokens):
        all_logits.append(logits)
        token = sample_next(logits, sampling, generator)
        if eos_token_id is not None:
            token = torch.where(done, torch.full_like(token, eos_token_id), token)
            done |= token == eos_token_id
        out.append(token[:, None])
        if t + 1 < max_new_tokens:
            logits = step(token, caches)[:, :V]
    ids = torch.cat(out, dim=1)
    if return_logits:
        return ids, (torch.stack(all_logits, 1) if all_logits else logits.new_zeros(ids.shape[0], 0, V))
    return ids


def cache_nbytes(caches) -> int:
    """Total bytes held by a list of layer caches (constant during generation)."""
    return sum(c.nbytes() for c in caches)


__all__ = ["SamplingConfig", "cache_nbytes", "filter_logits", "generate", "sample_next"]
