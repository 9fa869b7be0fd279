"""Load Hugging Face ``transformers`` Mamba checkpoints (``MambaForCausalLM``) into `MambaLMHeadModel`.

The two layouts hold the same tensors; only these differ:

    HF name / field                      ours
    backbone.embeddings.weight           backbone.embedding.weight
    hidden_size, num_hidden_layers       d_model, n_layer
    state_size, conv_kernel              d_state, d_conv
    time_step_rank / _min / _max         dt_rank, dt_min, dt_max
    time_step_floor / _scale             dt_init_floor, dt_scale
    use_bias, use_conv_bias              bias, conv_bias
    layer_norm_epsilon                   norm_eps
    tie_word_embeddings                  tie_embeddings

HF keeps the vocabulary unpadded (``vocab_size`` is whatever the checkpoint
says); we pad it to a multiple of ``pad_vocab_size_multiple`` with zero rows,
so the first ``vocab_size`` logits agree and the padded ones are 0 (never
sampled: generation cuts logits to ``vocab_size``).

`transformers` is not needed to convert a checkpoint folder (config.json +
safetensors); it is needed only to pass a live HF model object.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Union

import torch
from torch import Tensor

from ssmlab.core.mamba import MambaConfig, MambaLMHeadModel

# HF config field -> MambaConfig field
_FIELDS = {
    "hidden_size": "d_model",
    "num_hidden_layers": "n_layer",
    "vocab_size": "vocab_size",
    "state_size": "d_state",
    "expand": "expand",
    "conv_kernel": "d_conv",
    "time_step_rank": "dt_rank",
    "time_step_min": "dt_min",
    "time_step_max": "dt_max",
    "time_step_floor": "dt_init_floor",
    "time_step_scale": "dt_scale",
    "use_bias": "bias",
    "use_conv_bias": "conv_bias",
    "layer_norm_epsilon": "norm_eps",
    "residual_in_fp32": "residual_in_fp32",
    "tie_word_embeddings": "tie_embeddings",
}


def config_from_hf(hf_config: Union[Mapping[str, Any], Any], pad_vocab_size_multiple: int = 8) -> MambaConfig:
    """MambaConfig from a transformers ``MambaConfig`` object or its config.json dict."""
    d = dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"only hidden_act='silu' is supported, got {d['hidden_act']!r}")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "vocab_size") if k not in d]
    if missing:
        raise ValueError(f"not a Mamba config: missing {missing}")
    kw = {ours: d[hf] for hf, ours in _FIELDS.items() if hf in d}
    if d.get("time_step_init_scheme", "random") in ("random", "constant"):
        kw["dt_init"] = d.get("time_step_init_scheme", "random")
    return MambaConfig(pad_vocab_size_multiple=pad_vocab_size_multiple, **kw)


def _pad_rows(w: Tensor, rows: int) -> Tensor:
    if w.shape[0] == rows:
        return w
    return torch.cat([w, w.new_zeros(rows - w.shape[0], *w.shape[1:])], dim=0)


def convert_hf_state_dict(hf_state: Mapping[str, Tensor], cfg: MambaConfig) -> dict[str, Tensor]:
    """Rename and pad an HF ``MambaForCausalLM`` state dict into ours (a new dict; tensors shared where possible)."""
    out: dict[str, Tensor] = {}
    for name, t in hf_state.items():
        if name.startswith("backbone.embeddings."):
            name = "backbone.embedding." + name[len("backbone.embeddings."):]
        if name in ("backbone.embedding.weight", "lm_head.weight"):
            t = _pad_rows(t, cfg.vocab_size_padded)
        out[name] = t
    if cfg.tie_embeddings:
        out.setdefault("lm_head.weight", out["backbone.embedding.weight"])
    return out


def load_hf(source: Union[str, Path, Any], device=None, dtype=None) -> MambaLMHeadModel:
    """Our model from an HF ``MambaForCausalLM`` object or a folder holding its config.json + weights."""
    if isinstance(source, (str, Path)):
        folder = Path(source)
        cfg = config_from_hf(json.loads((folder / "config.json").read_text(encoding="utf-8")))
        state = _read_weights(folder)
    else:
        cfg = config_from_hf(source.config)
        state = source.state_dict()
    model = MambaLMHeadModel(cfg, device=device, dtype=dtype, init=False)
    converted = convert_hf_state_dict(state, cfg)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise KeyError(f"HF checkpoint does not match: missing {missing}, unexpected {unexpected}")
    if cfg.tie_embeddings:  # loading copied into the shared tensor; make sure it is still shared
        assert model.lm_head.weight is model.backbone.embedding.weight
    return model


def _read_weights(folder: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if files:
        state: dict[str, Tensor] = {}
        for f in files:
            state.update(load_file(str(f)))
        return state
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin in {folder}")
    state = {}
    for f in bins:
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state


__all__ = ["config_from_hf", "convert_hf_state_dict", "load_hf"]
