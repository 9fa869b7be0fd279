"""Helpers shared by the test suites of every stage.

Tolerances are relative errors ||x - ref|| / ||ref|| against a float64
reference, chosen per input dtype: float32 arithmetic lands far under 1e-4,
bfloat16 inputs carry about 3 significant digits.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch

from ssmlab.core import native

# Relative-error bounds by input dtype (forward and gradients).
REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2,
           torch.complex128: 1e-10, torch.complex64: 1e-4}

requires_cuda = pytest.mark.skipif(
    not native.backends()["cuda"], reason="needs a CUDA GPU and a native module built with nvcc"
)
requires_native = pytest.mark.skipif(
    not native.backends()["cpu"], reason="native module not built (pip install -e .)"
)


def _real64(t: torch.Tensor) -> torch.Tensor:
    """float64 on the CPU; a complex tensor as (real, imaginary) pairs."""
    t = t.detach().cpu()
    return torch.view_as_real(t.resolve_conj()).to(torch.float64) if t.is_complex() else t.to(torch.float64)


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64; NaN anywhere in x gives inf, never a pass."""
    x64, r64 = _real64(x), _real64(ref)
    if not torch.isfinite(x64).all():
        return float("inf")
    denom = r64.norm().item()
    return (x64 - r64).norm().item() / (denom if denom > 0 else 1.0)


def assert_close_rel(x: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "", factor: float = 1.0) -> None:
    """Assert the relative error of x against ref is within REL_TOL[dtype] * factor."""
    assert x.shape == ref.shape, f"{what}: shape {tuple(x.shape)} != {tuple(ref.shape)}"
    err, tol = rel_error(x, ref), REL_TOL[dtype] * factor
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e} ({dtype})"


def devices() -> list[str]:
    """'cpu', plus 'cuda' where the CUDA backend can run."""
    return ["cpu"] + (["cuda"] if native.backends()["cuda"] else [])


def load_script(path: Path) -> ModuleType:
    """A stage script as a module, so tests can call its main() in-process
    (stage folders start with digits and are not importable packages)."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"_script_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
