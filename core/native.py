"""Loading the compiled module and reporting which backends exist.

The compiled module `_native` is built from `cuda/` by CMake. It is normally
installed next to this file by `pip install -e .`; a standalone CMake build
can be used instead by pointing ``SSMLAB_NATIVE_DIR`` at its build folder.

Backends:
    ``ref``   pure PyTorch, always available (readable, float64 capable)
    ``cpu``   the C++ kernels of the native module
    ``cuda``  the CUDA kernels, when the module was built with nvcc and a GPU is visible
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

ENV_NATIVE_DIR = "SSMLAB_NATIVE_DIR"
BUILD_HINT = (
    "build it with `pip install -e .` from the repository root "
    f"(or `cmake -S . -B build && cmake --build build` and set {ENV_NATIVE_DIR}=build)"
)

# The dtype codes of cuda/include/ssmlab/dtype.h.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for explicitly but is not available here."""


def _load_from_dir(folder: str) -> ModuleType:
    candidates = sorted(Path(folder).glob("_native*.so")) + sorted(Path(folder).glob("_native*.pyd"))
    if not candidates:
        raise ImportError(f"{ENV_NATIVE_DIR}={folder!r} holds no _native*.so; {BUILD_HINT}")
    spec = importlib.util.spec_from_file_location("ssmlab.core._native", candidates[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load() -> tuple[ModuleType | None, str | None]:
    """Returns (module, None) or (None, why it could not be loaded)."""
    try:
        folder = os.environ.get(ENV_NATIVE_DIR)
        module = _load_from_dir(folder) if folder else importlib.import_module("ssmlab.core._native")
    except ImportError as err:
        log.info("native module unavailable (%s); only the PyTorch reference backend is usable", err)
        return None, str(err)
    return module, None


# Loaded once at import (loading the library touches no device): the
# dispatchers read plain globals, which torch.compile traces without breaks.
_MODULE, _WHY = _load()


def native_module() -> ModuleType:
    """The compiled module, or a BackendUnavailableError that names the fix."""
    module, why = _MODULE, _WHY
    if module is None:
        raise BackendUnavailableError(f"the native module ssmlab.core._native could not be loaded ({why}); {BUILD_HINT}")
    return module


def _probe() -> dict[str, bool]:
    cuda = bool(
        _MODULE is not None
        and _MODULE.built_with_cuda
        and _MODULE.cuda_device_count() > 0
        and torch.cuda.is_available()
    )
    return {"ref": True, "cpu": _MODULE is not None, "cuda": cuda}


# Probed on first use, not at import: asking the CUDA runtime for devices
# initialises the driver, and a process that forks workers afterwards (DDP
# tests, data loaders) would leave them unable to use CUDA.
_BACKENDS: dict[str, bool] | None = None


def _backends() -> dict[str, bool]:
    global _BACKENDS
    if _BACKENDS is None:
        _BACKENDS = _probe()
    return _BACKENDS


def backends() -> dict[str, bool]:
    """Which backends can run in this process: {'ref': True, 'cpu': ..., 'cuda': ...}."""
    return dict(_backends())


def available_backends() -> list[str]:
    """Names of the backends that can run here, best last: e.g. ['ref', 'cpu']."""
    return [name for name, ok in backends().items() if ok]


def describe() -> str:
    """One line for logs and `python -c` checks."""
    module, why = _MODULE, _WHY
    if module is None:
        return f"ssmlab backends: ref (native module missing: {why})"
    extra = []
    if module.built_with_cuda and not backends()["cuda"]:
        extra.append("CUDA kernels built, but no GPU is visible")
    if not module.built_with_cuda:
        extra.append("built without CUDA")
    extra.append("OpenMP" if module.built_with_openmp else "no OpenMP")
    return f"ssmlab backends: {', '.join(available_backends())} ({'; '.join(extra)})"


def backend_for(device: torch.device, requested: str = "auto") -> str:
    """Resolve 'auto' to the fastest backend for a device, or check an explicit request."""
    have = _backends()
    if requested == "auto":
        if device.type == "cuda":
            return "cuda" if have["cuda"] else "ref"
        return "cpu" if have["cpu"] and device.type == "cpu" else "ref"
    if requested not in have:
        raise ValueError(f"unknown backend {requested!r}; choose from 'auto', {', '.join(map(repr, have))}")
    if not have[requested]:
        native_module()  # raises with the build hint when the module itself is missing
        raise BackendUnavailableError(f"backend {requested!r} is not available here: {describe()}")
    if requested in ("cpu", "cuda") and device.type != requested:
        raise ValueError(f"backend {requested!r} cannot run on tensors on {device}")
    return requested


def run_kernel(fn, device: torch.device, p) -> None:
    """Call the native kernel `fn` with its parameter struct `p` for tensors on `device`.

    CUDA kernels are enqueued on PyTorch's current stream of that device (the
    capture stream inside a CUDA graph), with that device current; switching
    devices only when needed keeps this cheap enough for one-token decoding.
    """
    if device.type != "cuda":
        fn(p)
        return
    p.stream = torch.cuda.current_stream(device).cuda_stream
    if device.index is None or device.index == torch.cuda.current_device():
        fn(p)
    else:
        with torch.cuda.device(device):
            fn(p)
