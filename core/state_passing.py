"""State passing: train a recurrent model from states it would reach on longer inputs.

A Mamba model trained only on sequences of length T starts every training
sequence from the zero state, so it never sees the states that a longer test
sequence drives it into; Buitrago Ruiz & Gu (2025, "Understanding and
Improving Length Generalization in Recurrent Models") call this the
*unexplored states* hypothesis and show that starting some training sequences
from the final state of *another* sequence fixes much of the failure to
length-generalize.

`passed_states` builds such initial states for a batch without changing the
training data or its length: the batch is run once without gradients, and
sequence i then starts from the final state (conv window and SSM state) of
sequence i - 1 of the same batch, for the rows that `rows` selects; the other
rows start from zero as usual. Starting from sequence i - 1's final state is
exactly what running on the concatenation [sequence i - 1, sequence i] would
give for the second half, which is what the tests check. The states depend
only on the batch and the weights, so a resumed run computes the same ones.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ssmlab.core.mamba import MambaLayerCache, MambaLMHeadModel


def even_rows(batch: int, device=None) -> Tensor:
    """The default selection: rows 0, 2, 4, ... get a passed state, the others start from zero. (B,) bool."""
    return torch.arange(batch, device=device) % 2 == 0


@torch.no_grad()
def passed_states(model: MambaLMHeadModel, input_ids: Tensor, rows: Tensor | None = None) -> list[MambaLayerCache]:
    """Per-layer caches to start `input_ids` (B, L) from: row i holds row i-1's final state where `rows[i]`, else zeros.

    Row 0 takes the last row's state (a roll by one). Pass the result as ``model(input_ids, caches)``.
    """
    if not isinstance(model, MambaLMHeadModel) or model.config.mixer != "mamba":
        raise ValueError("state passing needs a MambaLMHeadModel with the selective ('mamba') mixer")
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}")
    batch = input_ids.shape[0]
    rows = even_rows(batch, input_ids.device) if rows is None else rows.to(input_ids.device)
    if rows.shape != (batch,) or rows.dtype != torch.bool:
        raise ValueError(f"rows must be a bool tensor of shape ({batch},), got {rows.dtype} {tuple(rows.shape)}")
    caches = model.allocate_cache(batch, device=input_ids.device)
    model.backbone(input_ids, caches)  # fills every layer's final conv window and SSM state
    keep = rows[:, None, None]
    for c in caches:
        c.conv_state = torch.where(keep, c.conv_state.roll(1, 0), torch.zeros_like(c.conv_state))
        c.ssm_state = torch.where(keep, c.ssm_state.roll(1, 0), torch.zeros_like(c.ssm_state))
        c.seqlen_offset = 1  # > 0: the layers read the state instead of starting from zero
    return caches
