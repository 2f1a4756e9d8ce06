"""A bare Python 3.9 for the zero-install tests: a virtualenv made from
pyenv's 3.9 with no packages at all (not even pip), standing for a
cluster's Python with nothing but the standard library."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import List

import pytest

REPO = Path(__file__).resolve().parent.parent.parent
BARE_VENV = REPO / ".test-state" / "bare3.9"

#: What must not be importable there, or the tests prove nothing.
ABSENT = ("cloudpickle", "numpy", "xxhash", "sqlalchemy", "h5py", "tomli", "fleche_remote")


def pyenv_python(version: str) -> Path:
    """The newest pyenv interpreter of ``version`` (e.g. "3.9"); the test
    fails, loudly, when there is none."""
    root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")

    def patch_level(path: Path) -> int:
        match = re.fullmatch(rf"{re.escape(version)}\.(\d+)", path.parent.parent.name)
        return int(match.group(1)) if match else -1

    found: List[Path] = [
        p for p in root.glob(f"versions/{version}.*/bin/python{version}") if patch_level(p) >= 0
    ]
    if not found:
        pytest.fail(f"no Python {version} under {root}/versions (pyenv install {version})", pytrace=False)
    return max(found, key=patch_level)


def _check_bare(python: Path) -> str:
    code = (
        "import importlib.util, sys\n"
        f"present = [m for m in {ABSENT!r} if importlib.util.find_spec(m) is not None]\n"
        "print(' '.join(present) or '-', '%d.%d' % sys.version_info[:2])\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    out = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, timeout=60, env=env, cwd="/"
    )
    if out.returncode != 0:
        return f"{python} does not run: {out.stderr.strip()}"
    present, version = out.stdout.split()
    if version != "3.9":
        return f"{python} is Python {version}, not 3.9"
    if present != "-":
        return f"{python} is not bare: it can import {present}"
    return ""


def bare_python() -> str:
    """``.test-state/bare3.9/bin/python``, made on first use and reused."""
    python = BARE_VENV / "bin" / "python"
    if not python.exists() or _check_bare(python):
        base = pyenv_python("3.9")
        argv = [str(base), "-m", "venv", "--clear", "--without-pip", str(BARE_VENV)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            pytest.fail(f"`{' '.join(argv)}` failed:\n{done.stdout}{done.stderr}", pytrace=False)
    problem = _check_bare(python)
    if problem:
        pytest.fail(problem, pytrace=False)
    return str(python)
