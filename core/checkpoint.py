"""Saving and loading, always atomically.

Two kinds of files:

* **model files** (`save_model` / `load_model_state`): the weights as
  safetensors (``model.safetensors``) plus the model's config as JSON
  (``config.json``) in one folder. This is what you publish and reload.
* **training checkpoints** (`atomic_torch_save`, used by `ssmlab.core.training`):
  one ``torch.save`` pickle with the model, optimizer, scheduler, step, RNG
  states and data position, for exact resume.

Every write goes to a temporary file in the destination folder and is then
moved over the target with `os.replace`, which is atomic on POSIX and Windows:
a run killed mid-write leaves the previous file intact, never a torn one.

Tied weights (the LM head sharing the embedding matrix) are stored once;
safetensors refuses aliased tensors, and storing them twice would untie them
on load. The aliases are recorded in the file's metadata.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Union

import torch
from torch import nn

PathLike = Union[str, os.PathLike]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def atomic_write(path: PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to `path`, then rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_torch_save(obj: Any, path: PathLike) -> Path:
    """`torch.save` made atomic."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(text: str, path: PathLike) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def _config_dict(config: Any) -> dict:
    if dataclasses.is_dataclass(config):
        return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    if isinstance(config, dict):
        return dict(config)
    raise TypeError(f"config must be a dataclass or a dict, got {type(config).__name__}")


def dedupe_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that alias an earlier one; returns (unique state, {alias: kept name})."""
    seen: dict[tuple, str] = {}
    unique, aliases = {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        unique[name] = t
    return unique, aliases


def save_model(folder: PathLike, model: nn.Module, config: Any) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into `folder` (both atomically)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    unique, aliases = dedupe_tied(model.state_dict())
    tensors = {k: v.detach().contiguous().cpu() for k, v in unique.items()}
    metadata = {"format": "pt", "tied": json.dumps(aliases)}
    atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    atomic_write_text(json.dumps(_config_dict(config), indent=2) + "\n", folder / CONFIG_NAME)
    return folder


def load_config_dict(folder: PathLike) -> dict:
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}")
    return json.loads(path.read_text(encoding="utf-8"))


def load_model_state(folder: PathLike, model: nn.Module) -> nn.Module:
    """Load ``model.safetensors`` from `folder` into `model` (strict, tied weights restored by aliasing)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder}")
    with safe_open(str(path), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("tied", "{}"))
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad_missing = [k for k in missing if k not in aliases]
    if bad_missing or unexpected:
        raise KeyError(f"checkpoint {path} does not match the model: missing {bad_missing}, unexpected {unexpected}")
    return model
