"""Fixtures shared by the whole suite: real servers and other Pythons.

Nothing here is faked: ``sshd`` is a real OpenSSH daemon and
``postgres_url`` a database on a real PostgreSQL, both private to this test
run and on 127.0.0.1 only (see :mod:`fleche_remote.testing`).
``other_pythons`` are real interpreters of other versions, for the promise
that a 3.13 client talks to a 3.9 server.

A fixture that cannot provide what it promises fails the tests that use
it, loudly; nothing is skipped, so a green run means every part was
exercised.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

from fleche_remote.testing import PostgresServer, SshServer, postgres_server, sshd_server  # noqa: F401

REPO = Path(__file__).resolve().parent.parent

#: Where on-demand virtualenvs live (``scripts/test.sh`` uses the same paths,
#: so whichever runs first builds them and the other reuses them).
STATE = REPO / ".test-state"

#: The interpreters ``other_pythons`` provides, with the variable that may
#: name one that is already prepared.
OTHER_PYTHONS = {"3.9": "FLECHE_REMOTE_PY39", "3.13": "FLECHE_REMOTE_PY313"}

#: pip install from scratch of numpy plus this checkout; generous for CI.
VENV_BUILD_TIMEOUT = 900


@pytest.fixture(scope="session")
def sshd(sshd_server: SshServer) -> SshServer:  # noqa: F811 (the imported fixture)
    """The session's private sshd (see ``fleche_remote.testing.private_sshd``)."""
    return sshd_server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:  # noqa: F811
    """SQLAlchemy URL of a fresh, empty database for this test alone, on the
    session's private PostgreSQL."""
    return postgres_server.new_database()


@pytest.fixture(scope="module")
def shared_remotes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The ssh connections a module's conformance factories share, one per
    remote backend (see ``conformance.factories.SharedRemotes``)."""
    from conformance.factories import SharedRemotes

    shared = SharedRemotes(tmp_path_factory.mktemp("shared-remotes"), request)
    try:
        yield shared
    finally:
        shared.close()


def _probe(python: Path, version: str) -> Optional[str]:
    """Why ``python`` is not usable as the ``version`` interpreter, or None."""
    code = (
        "import sys, fleche_remote, cloudpickle, numpy; "
        "print('%d.%d' % sys.version_info[:2]); print(fleche_remote.__file__)"
    )
    try:
        out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{python} does not run: {exc}"
    if out.returncode != 0:
        return f"{python} cannot import fleche_remote, cloudpickle and numpy:\n{out.stderr.strip()}"
    got, location = out.stdout.split()[:2]
    if got != version:
        return f"{python} is Python {got}, not {version}"
    if not Path(location).resolve().is_relative_to(REPO):
        return f"{python} imports fleche_remote from {location}, not from this checkout {REPO}"
    return None


def _pyenv_interpreters(version: str) -> List[Path]:
    root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")

    def patch_level(path: Path) -> int:
        match = re.fullmatch(rf"{re.escape(version)}\.(\d+)", path.parent.parent.name)
        return int(match.group(1)) if match else -1

    found = [p for p in root.glob(f"versions/{version}.*/bin/python{version}") if patch_level(p) >= 0]
    return sorted(found, key=patch_level, reverse=True)


def _build_venv(version: str) -> Path:
    """``.test-state/py<version>`` with this checkout (editable) and numpy."""
    venv = STATE / f"py{version}"
    python = venv / "bin" / "python"
    if python.exists() and _probe(python, version) is None:
        return python
    bases = _pyenv_interpreters(version) + [
        Path(p) for p in [f"/usr/bin/python{version}"] if Path(p).exists()
    ]
    if not bases:
        pytest.fail(
            f"no Python {version} to build a test virtualenv from: none under pyenv "
            f"({os.environ.get('PYENV_ROOT') or '~/.pyenv'}/versions/{version}.*) or /usr/bin; "
            f"install one or set {OTHER_PYTHONS[version]}",
            pytrace=False,
        )
    steps = [
        [str(bases[0]), "-m", "venv", "--clear", str(venv)],
        [str(python), "-m", "pip", "install", "-q", "-e", str(REPO), "numpy"],
    ]
    for argv in steps:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=VENV_BUILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`{' '.join(argv)}` took more than {VENV_BUILD_TIMEOUT} s", pytrace=False)
        if out.returncode != 0:
            pytest.fail(f"`{' '.join(argv)}` failed:\n{out.stdout}{out.stderr}", pytrace=False)
    return python


@pytest.fixture(scope="session")
def other_pythons() -> Dict[str, str]:
    """``{"3.9": path, "3.13": path}``: interpreters that import this checkout
    of fleche_remote, cloudpickle and numpy (a bare cluster's Python).

    ``$FLECHE_REMOTE_PY39`` / ``$FLECHE_REMOTE_PY313`` name prepared ones
    (``scripts/test.sh`` sets them); otherwise virtualenvs are built from
    pyenv under ``.test-state/`` and reused by later runs.
    """
    found: Dict[str, str] = {}
    for version, variable in OTHER_PYTHONS.items():
        given = os.environ.get(variable)
        python = Path(given) if given else _build_venv(version)
        problem = _probe(python, version)
        if problem is not None:
            source = f"${variable}" if given else "the test virtualenv"
            pytest.fail(f"{source}: {problem}", pytrace=False)
        found[version] = str(python)
    return found


@pytest.fixture(scope="session")
def slurm_cluster():
    """A private single-node Slurm (munged, slurmctld, slurmd) for the whole
    session; ``SLURM_CONF`` is exported so that ``sbatch`` (ours and the
    compute servers' behind the test sshd) reaches it and nothing else."""
    from fleche_remote.testing.slurm import private_slurm

    with private_slurm() as cluster:
        old = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(cluster.conf)
        try:
            yield cluster
        finally:
            if old is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = old
