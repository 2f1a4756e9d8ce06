"""``fleche-remote import-fleche``: a cache made by the real fleche package
(0.22, in a side virtualenv with this checkout) is imported there, as a
subprocess, and the entries are then read back here with fleche-remote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator

import numpy as np
import pytest

from fleche_remote import cached
from fleche_remote.config import cache_from_config

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".test-state" / "fleche"
FLECHE_SPEC = "fleche==0.22.2"
BUILD_TIMEOUT = 900

SUBJECT = "fleche_import_subject"

#: The functions, plain: fleche wraps them in make.py, fleche-remote here.
SUBJECT_SOURCE = """
import numpy as np

def square(x, scale=1):
    return x * x * scale

def arange(n):
    return np.arange(n, dtype="<i8")

def table(rows):
    return {"rows": rows, "total": sum(rows)}

def lost(tag):
    return "the value of this result is deleted before the import: " + tag
"""

MAKE_SOURCE = f"""
import json
from fleche import fleche
from fleche.config import load_cache_config
import {SUBJECT} as m

square = fleche(m.square)
arange = fleche(version=2)(m.arange)
table = fleche(m.table)
lost = fleche(m.lost)
square(2); square(3, scale=10); arange(5); table([1, 2, 3]); lost("zz")
old = load_cache_config("old")
(gone,) = [c for c in old.query() if c.name == "lost"]
print(json.dumps({{"lost_value": gone._result}}))
"""

TOML = """
[default]
cache = "old"
root = true

[old]
template = "pickle"
root = "old-store"

[new]
template = "cloudpickle"
root = "new-store"
"""


def _probe(python: Path) -> str:
    code = "import fleche, fleche_remote; print(fleche.__version__); print(fleche_remote.__file__)"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        return f"{python} cannot import fleche and fleche_remote:\n{out.stderr.strip()}"
    version, location = out.stdout.split()[:2]
    if not version.startswith("0.22."):
        return f"{python} has fleche {version}, not 0.22"
    if not Path(location).resolve().is_relative_to(REPO):
        return f"{python} imports fleche_remote from {location}, not from {REPO}"
    return ""


@pytest.fixture(scope="session")
def fleche_python() -> str:
    """An interpreter with fleche 0.22 and this checkout: ``$FLECHE_REMOTE_FLECHE_PY``
    (scripts/test.sh builds it), else ``.test-state/fleche``, built here if need be."""
    given = os.environ.get("FLECHE_REMOTE_FLECHE_PY")
    python = Path(given) if given else VENV / "bin" / "python"
    if not given and (not python.exists() or _probe(python)):
        bases = sorted(Path.home().glob(".pyenv/versions/3.1[1-3].*/bin/python3.1[1-3]"))
        base = str(bases[-1]) if bases else sys.executable
        for argv in (
            [base, "-m", "venv", "--clear", str(VENV)],
            [str(python), "-m", "pip", "install", "-q", "-e", f"{REPO}[fleche]", FLECHE_SPEC],
        ):
            done = subprocess.run(argv, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
            if done.returncode != 0:
                pytest.fail(f"`{' '.join(argv)}` failed:\n{done.stdout}{done.stderr}", pytrace=False)
    problem = _probe(python)
    if problem:
        pytest.fail(problem, pytrace=False)
    return str(python)


@pytest.fixture
def subject(tmp_path: Path) -> Iterator[Any]:
    (tmp_path / f"{SUBJECT}.py").write_text(SUBJECT_SOURCE)
    sys.path.insert(0, str(tmp_path))
    try:
        import importlib

        yield importlib.import_module(SUBJECT)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(SUBJECT, None)


def _run(python: str, cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(cwd), "XDG_CONFIG_HOME": str(cwd / ".config"), "PYTHONPATH": str(cwd)}
    return subprocess.run([python, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_import_fleche_brings_entries_over_and_reports_what_it_cannot(
    fleche_python: str, tmp_path: Path, subject: Any
) -> None:
    (tmp_path / "fleche.toml").write_text(TOML)
    (tmp_path / "make.py").write_text(MAKE_SOURCE)
    made = _run(fleche_python, tmp_path, "make.py")
    assert made.returncode == 0, made.stderr
    lost_value = json.loads(made.stdout.splitlines()[-1])["lost_value"]
    (tmp_path / "old-store" / "values" / lost_value).unlink()

    first = _run(fleche_python, tmp_path, "-m", "fleche_remote", "import-fleche", "old", "--into", "new")
    assert first.returncode == 1, first.stdout + first.stderr  # one entry left behind
    assert "imported 4 of 5 calls from fleche cache old into new" in first.stdout
    assert f"not imported: {SUBJECT}.lost: its result value is missing" in first.stdout
    assert "import-fleche old" in first.stderr  # the progress bar (or plain counts)

    ours = cache_from_config({"template": "cloudpickle", "root": str(tmp_path / "new-store")})
    found: Dict[Any, Any] = {}
    for lazy in ours.query():
        found[(lazy.name, json.dumps(lazy.arguments, sort_keys=True), lazy.version)] = lazy
        assert set(lazy.metadata["runtime"]) >= {"timestart", "timestop"}
    assert {k: v.result for k, v in found.items() if k[0] != f"{SUBJECT}.arange"} == {
        (f"{SUBJECT}.square", '{"scale": 1, "x": 2}', None): 4,
        (f"{SUBJECT}.square", '{"scale": 10, "x": 3}', None): 90,
        (f"{SUBJECT}.table", '{"rows": [1, 2, 3]}', None): {"rows": [1, 2, 3], "total": 6},
    }
    (arange_call,) = [v for k, v in found.items() if k == (f"{SUBJECT}.arange", '{"n": 5}', "2")]
    np.testing.assert_array_equal(arange_call.result, np.arange(5))

    # @cached finds the imported results under fleche-remote's own keys; fleche
    # kept no code in them (its hash_code is off by default), so neither may we
    square = cached(cache=ours, hash_code=False)(subject.square)
    arange = cached(cache=ours, version=2)(subject.arange)
    assert square.contains(3, scale=10) and square.contains(x=2)
    assert arange.contains(5) and not arange.contains(6)

    again = _run(
        fleche_python, tmp_path, "-m", "fleche_remote", "import-fleche", "old", "--into", "new", "--json"
    )
    summary = json.loads(again.stdout)
    assert (summary["imported"], summary["already_there"], summary["not_imported"]) == (0, 4, 1)


def test_import_fleche_without_fleche_names_the_extra(tmp_path: Path) -> None:
    # this environment (.venv) has no fleche: the error says what to install
    (tmp_path / "fleche.toml").write_text(TOML)
    env = {**os.environ, "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "fleche_remote", "import-fleche", "old", "--into", "new"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "fleche-remote[fleche]" in done.stderr
