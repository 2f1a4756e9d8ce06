"""``fleche-remote install HOST`` as a subprocess, through the real sshd.

The wheel is built by the test from this checkout (copied aside, so the
build leaves nothing in the working tree); pip on the "remote" takes it
through ``--find-links`` and the dependencies from the package index, as
on a fresh machine.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fleche_remote import Call, __version__

from .bare import REPO, pyenv_python
from .helpers import remote_dir, ssh_cache

#: pip wheel (with its isolated build of setuptools) and pip install of
#: the dependencies; generous for a loaded machine and a slow index.
PIP_TIMEOUT = 600


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(
        REPO / "fleche_remote", src / "fleche_remote", ignore=shutil.ignore_patterns("__pycache__")
    )
    out = tmp_path_factory.mktemp("wheels")
    argv = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=PIP_TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [p.name for p in out.glob("fleche_remote-*.whl")] == [
        f"fleche_remote-{__version__}-py3-none-any.whl"
    ]
    return out


def _install(sshd, *args: str, timeout: float = PIP_TIMEOUT) -> subprocess.CompletedProcess:
    options = " ".join(shlex.quote(o) for o in sshd.ssh_options)
    argv = [sys.executable, "-m", "fleche_remote", "install", sshd.host, "--ssh-options", options, *args]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def test_install_makes_a_virtualenv_that_serves_without_bootstrap(sshd, tmp_path, wheel_dir):
    venv = tmp_path / "remote-venv"
    base = pyenv_python("3.9")
    done = _install(sshd, "--python", str(base), "--venv", str(venv), "--find-links", str(wheel_dir))
    assert done.returncode == 0, done.stdout + done.stderr
    python = venv / "bin" / "python"
    assert f'python = "{python}"' in done.stdout.splitlines()
    assert f"installed fleche-remote {__version__} for Python 3.9." in done.stdout

    # the printed interpreter serves with bootstrap = "never", from the venv alone
    cache = ssh_cache(
        sshd, remote_dir(tmp_path), python=str(python), setup_commands=["unset PYTHONPATH"], bootstrap="never"
    )
    try:
        big = os.urandom((1 << 20) + 1)  # needs xxhash on the server: a dependency was installed
        key = cache.save(Call("f", {"n": 1}, big))
        assert cache.load_value(key) == big
        info = cache.info()
        assert info["python"] == str(python)
        assert info["versions"]["library"] == __version__
    finally:
        cache.close()
    site = subprocess.run(
        [str(python), "-c", "import fleche_remote, xxhash; print(fleche_remote.__file__)"],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        cwd=tmp_path,  # not the checkout, which `-c` would put first on sys.path
    )
    assert site.returncode == 0, site.stderr
    assert site.stdout.strip().startswith(str(venv))  # installed there, not this checkout


def test_install_with_a_missing_interpreter_fails_clearly(sshd, tmp_path):
    venv = tmp_path / "never-made"
    done = _install(sshd, "--python", "/no/such/python3", "--venv", str(venv), timeout=120)
    assert done.returncode == 1
    assert "no interpreter /no/such/python3 on the remote" in done.stderr
    assert "cannot make the virtualenv" in done.stderr
    assert not venv.exists()
    assert "python =" not in done.stdout


def test_install_dry_run_prints_the_script_and_bad_extras_are_refused():
    argv = [sys.executable, "-m", "fleche_remote", "install", "somewhere", "--dry-run", "--extras", "hdf5"]
    argv += ["--index-url", "https://mirror.example/simple", "--no-deps"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"'fleche-remote[hdf5]=={__version__}'" in done.stdout
    assert "--index-url https://mirror.example/simple --no-deps" in done.stdout
    assert "venv=~/.fleche-remote/venv" in done.stdout

    bad = subprocess.run([*argv[:5], "--extras", "gpu"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert "unknown extras ['gpu']" in bad.stderr
