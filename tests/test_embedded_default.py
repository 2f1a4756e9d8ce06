"""With no fleche.toml anywhere, ``@cached`` caches in the user cache
directory, says so once at INFO level, and ``fleche-remote config`` shows
it; a fleche.toml always wins.

Each case runs a real script in a fresh process, with HOME (and
XDG_CACHE_HOME) pointed at a temporary directory and the working
directory inside HOME, so that the walk stops there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, Optional

import pytest

from fleche_remote.config.default import user_cache_dir

SCRIPT = textwrap.dedent(
    """
    import logging, sys
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    from fleche_remote import cached

    runs = []

    @cached
    def square(x):
        runs.append(x)
        return x * x

    @cached
    def cube(x):
        runs.append(x)
        return x ** 3

    print(square(3), cube(2), square(3), len(runs))
    """
)
ANNOUNCEMENT = "fleche_remote.config INFO no fleche.toml found"


def run(home: Path, xdg_cache: Optional[str], *args: str) -> subprocess.CompletedProcess:
    env: Dict[str, str] = dict(os.environ)
    env["HOME"] = str(home)
    env.pop("XDG_CONFIG_HOME", None)
    env.pop("XDG_CACHE_HOME", None)
    if xdg_cache is not None:
        env["XDG_CACHE_HOME"] = xdg_cache
    done = subprocess.run(
        [sys.executable, *args], cwd=home / "work", env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    (home / "work").mkdir(parents=True)
    (home / "work" / "script.py").write_text(SCRIPT)
    return home


def test_cached_without_config_uses_xdg_cache_home_and_says_so_once(home: Path, tmp_path: Path) -> None:
    xdg = tmp_path / "xdg-cache"
    first = run(home, str(xdg), "script.py")
    assert first.stdout.split() == ["9", "8", "9", "2"]  # square once, cube once
    assert first.stderr.count(ANNOUNCEMENT) == 1, first.stderr
    assert str(xdg / "fleche-remote") in first.stderr
    assert (xdg / "fleche-remote" / "calls.db").is_file()
    assert not (home / ".cache").exists()

    second = run(home, str(xdg), "script.py")
    assert second.stdout.split() == ["9", "8", "9", "0"]  # both hits, in a new process


@pytest.mark.parametrize("xdg_cache", [None, "", "relative/cache"], ids=["unset", "empty", "relative"])
def test_without_xdg_cache_home_it_is_dot_cache(home: Path, xdg_cache: Optional[str]) -> None:
    """An unset, empty or relative XDG_CACHE_HOME means ~/.cache (the XDG
    spec ignores a relative one)."""
    done = run(home, xdg_cache, "script.py")
    assert done.stdout.split() == ["9", "8", "9", "2"]
    assert (home / ".cache" / "fleche-remote" / "calls.db").is_file()
    assert not (home / "work" / "relative").exists()


def test_a_fleche_toml_wins(home: Path, tmp_path: Path) -> None:
    (home / "fleche.toml").write_text(
        '[default]\ncache = "mine"\n[mine]\ntemplate = "cloudpickle"\nroot = "mine"\n'
    )
    xdg = tmp_path / "xdg-cache"
    done = run(home, str(xdg), "script.py")
    assert done.stdout.split() == ["9", "8", "9", "2"]
    assert ANNOUNCEMENT not in done.stderr
    assert (home / "mine" / "calls").is_dir() and not xdg.exists()


def test_cli_config_shows_the_builtin_cache(home: Path, tmp_path: Path) -> None:
    xdg = tmp_path / "xdg-cache"
    done = run(home, str(xdg), "-m", "fleche_remote", "config")
    out = done.stdout
    assert "# no fleche.toml found; looked at:" in out and str(home / "work" / "fleche.toml") in out
    assert "# so @cached uses the built-in cache:" in out
    assert '[local]\ntemplate = "sql"\nroot = "' + str(xdg / "fleche-remote") + '"' in out
    assert not xdg.exists()  # showing it creates nothing


def test_platform_cache_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert user_cache_dir(tmp_path) == tmp_path / "Library" / "Caches" / "fleche-remote"
    monkeypatch.setattr(sys, "platform", "linux")
    assert user_cache_dir(tmp_path) == tmp_path / ".cache" / "fleche-remote"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert user_cache_dir(tmp_path) == tmp_path / "x" / "fleche-remote"


def test_on_a_network_file_system_the_builtin_cache_is_plain_files(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite is not safe on NFS (and its store refuses it): a cluster's NFS
    home gets the file template, which is."""
    from fleche_remote.config import builtin_config, cache_to_config, load_cache
    from fleche_remote.storage.fs import ENV_MOUNT_TABLE

    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/sda1 / ext4 rw 0 0\nfiler:/home {home} nfs4 rw 0 0\n")
    monkeypatch.setenv(ENV_MOUNT_TABLE, str(mounts))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    config = builtin_config()
    assert config["local"] == {"template": "cloudpickle", "root": str(home / ".cache" / "fleche-remote")}
    cache = load_cache(config=config)
    assert cache_to_config(cache)["calls"] == {
        "type": "cloudpickle",
        "root": str(home / ".cache" / "fleche-remote" / "calls"),
    }
    cache.close()
    monkeypatch.setenv(ENV_MOUNT_TABLE, str(tmp_path / "no-such-table"))
    assert builtin_config()["local"]["template"] == "sql"


def test_cli_lists_shows_and_evicts_in_the_builtin_cache(home: Path, tmp_path: Path) -> None:
    xdg = str(tmp_path / "xdg-cache")
    run(home, xdg, "script.py")
    listed = run(home, xdg, "-m", "fleche_remote", "ls", "--name", "square").stdout
    rows = [line for line in listed.splitlines()[1:] if line.strip()]
    assert len(rows) == 1 and "__main__.square" in rows[0] and "x=3" in rows[0], listed
    key = rows[0].split()[0]
    assert "result" in run(home, xdg, "-m", "fleche_remote", "show", key).stdout
    run(home, xdg, "-m", "fleche_remote", "evict", key)
    assert "__main__.square" not in run(home, xdg, "-m", "fleche_remote", "ls").stdout
    assert "__main__.cube" in run(home, xdg, "-m", "fleche_remote", "ls", "local").stdout  # by its name too
