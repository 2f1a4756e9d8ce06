"""The cached server code is run only when nobody else could have written
it, through the real sshd on a bare Python 3.9.

Whoever can write ``$XDG_CACHE_HOME/fleche-remote/code/<sha256>/`` runs
code as the user at the next start. Each test plants or edits something
that would create a canary file if it ran, and checks that the canary never
appears, that the stub said why on stderr, and that the server still
started (from code sent again).
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from typing import Any, List, Optional, Tuple

import pytest

from fleche_remote import Call
from fleche_remote.remote.bootstrap import code_bundle
from fleche_remote.remote.client import SshCache

from .bare import bare_python
from .helpers import remote_dir, ssh_cache

PEER = "fleche-peer"


@pytest.fixture(scope="module")
def bare39() -> str:
    return bare_python()


def _cache(sshd: Any, tmp_path: Path, xdg: Path, python: str, *setup: str) -> SshCache:
    steps = ["unset PYTHONPATH", f"export XDG_CACHE_HOME={xdg}", *setup]
    return ssh_cache(sshd, remote_dir(tmp_path), python=python, setup_commands=steps)


def _code_dir(xdg: Path) -> Path:
    return xdg / "fleche-remote" / "code" / code_bundle().sha256


def _evil(canary: Path) -> str:
    return f"open({str(canary)!r}, 'w').write('ran')\n"


def _start(cache: SshCache) -> Tuple[Optional[str], List[str]]:
    """Save and load one entry (the server really runs); how the code got
    there (``bootstrap_status``) and the remote's stderr."""
    try:
        key = cache.save(Call("f", {}, "ok"))
        assert cache.load_value(key) == "ok"
        return cache.bootstrap_status, cache._conn.transport.diagnose()[1]
    finally:
        cache.close()


def _first_start(sshd: Any, tmp_path: Path, xdg: Path, python: str) -> None:
    assert _start(_cache(sshd, tmp_path, xdg, python))[0] == "sent"


def _warned(log: List[str], path: Path, reason: str) -> bool:
    return any(
        line.startswith("fleche-remote bootstrap") and str(path) in line and reason in line for line in log
    )


def test_code_planted_under_the_hash_before_the_first_start_is_not_run(sshd, tmp_path, bare39):
    xdg, canary = tmp_path / "xdg", tmp_path / "canary"
    planted = _code_dir(xdg)
    # owned by us and private, as ours would be: only its content gives it away
    (planted / "fleche_remote" / "remote").mkdir(parents=True, mode=0o700)
    (planted / "fleche_remote" / "__init__.py").write_text(_evil(canary))
    (planted / "fleche_remote" / "remote" / "server.py").write_text(_evil(canary))
    for path in [planted, *planted.rglob("*")]:
        path.chmod(0o700 if path.is_dir() else 0o600)

    status, log = _start(_cache(sshd, tmp_path, xdg, bare39))
    assert not canary.exists()
    assert status == "sent"
    assert _warned(log, planted, "does not hash to"), log
    assert (planted / "fleche_remote" / "remote" / "server.py").read_bytes() == dict(code_bundle().sources)[
        "fleche_remote/remote/server.py"
    ]
    assert [p.name for p in planted.parent.iterdir()] == [planted.name]  # nothing left aside


@pytest.mark.parametrize("how", ["edited in place", "group-writable", "owned by another user"])
def test_an_edited_cached_copy_is_sent_again_and_not_run(sshd, tmp_path, bare39, how):
    xdg, canary = tmp_path / "xdg", tmp_path / "canary"
    _first_start(sshd, tmp_path, xdg, bare39)
    server = _code_dir(xdg) / "fleche_remote" / "remote" / "server.py"
    if how == "edited in place":
        with server.open("a") as fh:
            fh.write(_evil(canary))
        path, reason = _code_dir(xdg), "does not hash to"
    elif how == "group-writable":
        server.chmod(0o660)  # what an older version wrote under umask 007
        path, reason = server, "writable by group or others (mode 660)"
    else:
        shutil.chown(server, user=PEER)
        path, reason = server, f"owned by uid {os.stat(server).st_uid}"

    status, log = _start(_cache(sshd, tmp_path, xdg, bare39))
    assert not canary.exists()
    assert status == "sent"
    assert _warned(log, path, reason), log

    # sent again into place, and trusted from then on
    status, log = _start(_cache(sshd, tmp_path, xdg, bare39))
    assert status == "cached" and not _warned(log, path, reason)


def test_under_umask_000_nothing_cached_is_writable_by_others(sshd, tmp_path, bare39):
    xdg = tmp_path / "xdg"
    statuses = [_start(_cache(sshd, tmp_path, xdg, bare39, "umask 000"))[0] for _ in range(2)]
    assert statuses == ["sent", "cached"]  # what the first server wrote did not spoil it
    top = xdg / "fleche-remote"
    paths = [top, *top.rglob("*")]
    assert any(p.suffix == ".pyc" for p in paths)
    modes = {str(p.relative_to(top)): stat.S_IMODE(p.lstat().st_mode) for p in paths}
    assert {k: oct(m) for k, m in modes.items() if m & 0o077} == {}


def test_a_code_dir_writable_by_others_is_refused_with_a_warning(sshd, tmp_path, bare39):
    xdg, canary = tmp_path / "xdg", tmp_path / "canary"
    _first_start(sshd, tmp_path, xdg, bare39)
    code = _code_dir(xdg).parent
    code.chmod(0o777)  # anyone could have swapped the entry in it
    with (_code_dir(xdg) / "fleche_remote" / "__init__.py").open("a") as fh:
        fh.write(_evil(canary))

    status, log = _start(_cache(sshd, tmp_path, xdg, bare39))
    assert not canary.exists()
    assert status == "sent"
    assert _warned(log, code, "is writable by group or others (mode 777)"), log
    assert _warned(log, code, "running it from a temp directory"), log
    assert stat.S_IMODE(code.stat().st_mode) == 0o777  # not ours to fix silently
    assert os.path.exists(_code_dir(xdg))  # and nothing removed from it


def _stub_functions(final: Path) -> dict:
    """The stub's functions, defined as the remote runs them (without its
    last part, which starts the server), with this bundle's names."""
    from fleche_remote.remote.bootstrap import stub_source

    source = stub_source(code_bundle(), "always")
    namespace: dict = {"__name__": "stub"}
    exec(source[: source.index('if MODE == "auto"')], namespace)
    return namespace


class _RacingOs:
    """``os`` for the stub, except that the first ``lstat`` of ``doomed``
    finds it gone: a server running from the copy renamed its temp .pyc
    into place between the directory listing and the look at the file."""

    def __init__(self, doomed: Path) -> None:
        self._doomed = str(doomed)

    def lstat(self, path: str) -> os.stat_result:
        if path == self._doomed and os.path.lexists(path):
            os.unlink(path)
        return os.lstat(path)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def test_a_compiled_file_renamed_while_the_copy_is_checked_is_no_reason_to_resend(sshd, tmp_path, bare39):
    xdg = tmp_path / "xdg"
    _first_start(sshd, tmp_path, xdg, bare39)
    final = _code_dir(xdg)
    cache_dir = final / "fleche_remote" / "caches" / "__pycache__"
    doomed = cache_dir / "journal.cpython-39.pyc.140234"
    doomed.write_bytes(b"half a compiled file")
    doomed.chmod(0o600)
    stub = _stub_functions(final)
    stub["os"] = _RacingOs(doomed)
    assert stub["trusted"](str(final)) is None
    # the same file, still there, owned by us and private: not hashed, and fine
    doomed.write_bytes(b"x")
    doomed.chmod(0o600)
    stub["os"] = os
    assert stub["trusted"](str(final)) is None
    # but a source file that goes missing is still a reason
    (final / "fleche_remote" / "caches" / "journal.py").unlink()
    assert stub["trusted"](str(final)) == (
        str(final),
        f"does not hash to {code_bundle().sha256} (edited, or planted there)",
    )
