"""Resource errors on the server, through the real sshd: a full disk and a
read-only store directory.

Both are real file systems, not injected errors: a 4 MiB tmpfs (the
tests run as root, and ``scripts/test.sh`` runs them as root) that a
value fills, and the same tmpfs remounted read-only. The client must get
an error that names the path and the errno, nothing partial may be left
on the server's disk, and the server must go on answering on the same
connection.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from fleche_remote import Call, StorageError
from fleche_remote.remote.client import SshCache

from .support import remote_with_stores, stray_files

SMALL_FS = "4m"


@contextlib.contextmanager
def small_tmpfs(where: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted at ``where`` for the test's duration."""
    where.mkdir(parents=True)
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SMALL_FS},mode=0755", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if out.returncode != 0:
        pytest.fail(f"these tests need to mount a tmpfs (run them as root): {out.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def _remount(where: Path, mode: str) -> None:
    subprocess.run(
        ["mount", "-o", f"remount,{mode}", str(where)], check=True, capture_output=True, timeout=30
    )


def _connect(sshd: Any, remote: Path, store: str) -> SshCache:
    return SshCache(
        sshd.host,
        cache_name=store,
        workdir=str(remote),
        python=sys.executable,
        ssh_options=sshd.ssh_options,
        timeout=15,
    )


@pytest.mark.parametrize("store", ["files", "sqlite"])
def test_full_disk_is_a_clear_error_and_the_server_goes_on(sshd, tmp_path: Path, store: str) -> None:
    mount = tmp_path / "small"
    with small_tmpfs(mount):
        remote = remote_with_stores(mount)
        cache = _connect(sshd, remote, store)
        try:
            first = cache.save(Call("disk.f", {"x": 0}, b"fits"))
            too_big = Call("disk.f", {"x": 1}, os.urandom(6 << 20))
            with pytest.raises(StorageError) as info:
                cache.save(too_big)
            error = info.value
            assert error.errno == errno.ENOSPC
            assert str(remote / store / "values") in str(error), str(error)
            assert "no space left" in str(error)
            # nothing partial: no temp file, no value, no record
            assert stray_files(remote / store) == []
            assert not cache.contains(too_big.key())
            # the same connection goes on: reads, and a save that fits
            assert cache.load_value(first) == b"fits"
            second = cache.save(Call("disk.f", {"x": 2}, os.urandom(1 << 20)))
            assert len(cache.load_value(second)) == 1 << 20
        finally:
            cache.close()


@pytest.mark.parametrize("store", ["files", "sqlite"])
def test_read_only_store_is_a_clear_error_and_reads_go_on(sshd, tmp_path: Path, store: str) -> None:
    """As root, chmod cannot stop a write; a read-only mount does. The
    store is remounted between two connections (a mount with files open
    for writing cannot become read-only)."""
    mount = tmp_path / "ro"
    with small_tmpfs(mount):
        remote = remote_with_stores(mount)
        cache = _connect(sshd, remote, store)
        try:
            first = cache.save(Call("ro.f", {"x": 0}, os.urandom(100_000)))  # a value file
            small = cache.save(Call("ro.f", {"x": 1}, "small"))
        finally:
            cache.close()
        before = sorted(p.relative_to(mount).as_posix() for p in mount.rglob("*"))
        _remount(mount, "ro")
        cache = _connect(sshd, remote, store)
        try:
            assert cache.load_value(small) == "small"
            for blocked in [Call("ro.f", {"x": 2}, os.urandom(200_000)), Call("ro.f", {"x": 3}, "small too")]:
                with pytest.raises(OSError) as info:
                    cache.save(blocked)
                error = info.value
                assert str(remote / store) in str(error), str(error)
                if store == "sqlite" and blocked.arguments["x"] == 3:
                    # a small value goes into the database: SQLite says why, but gives no errno
                    assert isinstance(error, StorageError) and "readonly database" in str(error)
                else:
                    assert error.errno == errno.EROFS, repr(error)
                # the same connection goes on answering
                assert len(cache.load_value(first)) == 100_000
                assert cache.load_value(small) == "small"
                assert not cache.contains(blocked.key())
            assert sorted(p.relative_to(mount).as_posix() for p in mount.rglob("*")) == before
        finally:
            cache.close()
            _remount(mount, "rw")
