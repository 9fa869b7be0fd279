"""Backend reporting and the error a missing native module gives."""

import os
import subprocess
import sys
import textwrap

import pytest

from ssmlab.core import native


def run_python(code, **env):
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, env={**os.environ, **env}, timeout=120,
    )
    return proc


def test_reference_backend_always_listed():
    assert native.backends()["ref"] is True
    assert native.available_backends()[0] == "ref"
    assert "ssmlab backends:" in native.describe()


def test_native_cpu_backend_is_built():
    """The C++ CPU kernels always build; `pip install -e .` must have produced them."""
    assert native.backends()["cpu"], native.describe()


def test_missing_native_module_names_the_fix(tmp_path):
    proc = run_python(
        """
        import torch
        from ssmlab.core import native, scan
        print(native.describe())
        a = torch.rand(1, 1, 4)
        assert torch.equal(scan.linear_scan(a, a), scan.linear_scan_ref(a, a))  # falls back to ref
        try:
            scan.linear_scan(a, a, backend="cpu")
        except native.BackendUnavailableError as err:
            print("ERROR:", err)
        """,
        SSMLAB_NATIVE_DIR=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    assert "ssmlab backends: ref (native module missing" in proc.stdout
    assert "ERROR:" in proc.stdout and "pip install -e ." in proc.stdout


@pytest.mark.skipif(not os.environ.get("SSMLAB_STANDALONE_BUILD"), reason="set SSMLAB_STANDALONE_BUILD to a CMake build folder (nox -s cmake does)")
def test_standalone_cmake_build_loads():
    proc = run_python(
        """
        import torch
        from ssmlab.core import native, scan
        print(native.native_module().__file__)
        a, b = torch.rand(2, 3, 50), torch.randn(2, 3, 50)
        assert torch.allclose(scan.linear_scan(a, b, backend="cpu"), scan.linear_scan_ref(a, b))
        """,
        SSMLAB_NATIVE_DIR=os.environ["SSMLAB_STANDALONE_BUILD"],
    )
    assert proc.returncode == 0, proc.stderr
    assert os.environ["SSMLAB_STANDALONE_BUILD"] in proc.stdout
