"""nox sessions: one per stage, all tests, the standalone CMake build, benchmarks.

    nox                   # what CI runs: every test, then the standalone CMake build
    nox -s stage-04       # one stage's tests and quick checks
    nox -s tests          # every test
    nox -s cmake          # plain `cmake -S . -B build && cmake --build build`, then load that build
    nox -s bench -- ARGS  # every stage's bench_*.py

Every session shares one environment, .nox/shared, built once and rebuilt only
when pyproject.toml, CMakeLists.txt or the native sources change, so reruns
start in a fraction of a second. On a machine without an NVIDIA GPU it gets the
CPU build of PyTorch (torch==2.13.0), never the multi-GB CUDA build; set
SSMLAB_TORCH to choose another requirement.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).parent
SHARED = ROOT / ".nox" / "shared"
CPU_TORCH = "torch==2.13.0"
BUILD_REQUIREMENTS = ["scikit-build-core>=0.10", "pybind11>=2.12", "ninja", "cmake>=3.24"]
STAGES = sorted(p.name for p in (ROOT / "stages").glob("[0-9][0-9]_*") if p.is_dir())

nox.options.sessions = ["tests", "cmake"]


def _fingerprint() -> str:
    h = hashlib.sha256()
    files = [ROOT / "pyproject.toml", ROOT / "CMakeLists.txt", *sorted((ROOT / "cuda").rglob("*"))]
    for f in files:
        if f.is_file():
            h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _torch_requirement() -> str:
    if os.environ.get("SSMLAB_TORCH"):
        return os.environ["SSMLAB_TORCH"]
    return "torch" if shutil.which("nvidia-smi") else CPU_TORCH


def shared_python(session: nox.Session) -> str:
    """The shared environment's interpreter, (re)building the environment if stale."""
    python = SHARED / "bin" / "python"
    stamp = SHARED / ".ssmlab-fingerprint"
    fingerprint = _fingerprint()
    if python.exists() and stamp.exists() and stamp.read_text() == fingerprint:
        return str(python)
    if not python.exists():
        session.run(sys.executable, "-m", "venv", str(SHARED), external=True)
    pip = [str(python), "-m", "pip", "install", "--progress-bar", "off"]
    # torch first and pinned, so that no later requirement can pull another build.
    session.run(*pip, _torch_requirement(), *BUILD_REQUIREMENTS, external=True)
    session.run(*pip, "--no-build-isolation", "-e", ".[test,hf]", external=True)
    stamp.write_text(fingerprint)
    return str(python)


def _pytest(session: nox.Session, python: str, *paths: str) -> None:
    session.run(python, "-m", "pytest", *paths, *session.posargs, external=True)


def _check_help(session: nox.Session, python: str, stage: str) -> None:
    """Quick check: every script of the stage parses `--help`."""
    for script in sorted((ROOT / "stages" / stage).glob("*.py")):
        session.run(python, str(script.relative_to(ROOT)), "--help", external=True, silent=True)


def _stage_session(stage: str) -> None:
    @nox.session(name=f"stage-{stage[:2]}", venv_backend="none")
    def run_stage(session: nox.Session) -> None:
        python = shared_python(session)
        paths = [f"stages/{stage}/tests"]
        if stage.startswith("04"):
            paths.append("tests")  # the foundation's backend and data tests live beside the scan
        _pytest(session, python, *paths)
        _check_help(session, python, stage)

    run_stage.__doc__ = f"Tests and quick checks of stages/{stage}."


for _stage in STAGES:
    _stage_session(_stage)


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """Every test of the project, then every script's --help."""
    python = shared_python(session)
    _pytest(session, python, "tests", *(f"stages/{s}/tests" for s in STAGES if (ROOT / "stages" / s / "tests").is_dir()))
    for stage in STAGES:
        _check_help(session, python, stage)


@nox.session(venv_backend="none")
def cmake(session: nox.Session) -> None:
    """The standalone build a user runs by hand, then a check that Python loads it."""
    python = shared_python(session)
    build = ROOT / "build"
    session.run("cmake", "-S", ".", "-B", str(build), f"-DPython_EXECUTABLE={python}", external=True)
    session.run("cmake", "--build", str(build), "--parallel", external=True)
    session.run(
        python, "-m", "pytest", "tests/test_native.py", external=True,
        env={"SSMLAB_STANDALONE_BUILD": str(build)},
    )


@nox.session(venv_backend="none")
def bench(session: nox.Session) -> None:
    """Every stage's bench_*.py (arguments after -- are passed to each)."""
    python = shared_python(session)
    for script in sorted(ROOT.glob("stages/*/bench_*.py")):
        session.run(python, str(script.relative_to(ROOT)), *session.posargs, external=True)
