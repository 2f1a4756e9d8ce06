"""Computing runs code: a key restricted by a forced command refuses it,
unless the command opts in with ``serve --allow-compute``."""

from __future__ import annotations

from pathlib import Path

import pytest
from faults.support import restricted_key

from fleche_remote import Rejected, cached
from fleche_remote.caches import Cache, CacheStack
from fleche_remote.remote.client import SshCache
from fleche_remote.storage.memory import MemoryCallStore, MemoryValueStore

from . import sweeps
from .support import host_cache, host_dir


@pytest.mark.parametrize(
    "mode, refusal",
    [
        ("read-only", "computing is not allowed for this key: this server is read-only"),
        ("append-only", "computing is not allowed for this key: its authorized_keys forced command"),
        ("allow-compute --read-only", "computing is not allowed for this key: this server is read-only"),
    ],
)
def test_forced_commands_refuse_computing(sshd, tmp_path: Path, mode: str, refusal: str) -> None:
    host = host_dir(tmp_path, 'executor = "local"')
    options = restricted_key(sshd, tmp_path, host, mode)
    remote = SshCache(sshd.host, ssh_options=options, timeout=30)
    f = cached(cache=CacheStack([Cache(MemoryValueStore(), MemoryCallStore()), remote]))(sweeps.square)
    try:
        with pytest.raises(Rejected, match=refusal):
            f.map([1, 2], on=remote, progress=False)
        assert not list((tmp_path / "jobs").glob("run/*"))  # nothing was started
    finally:
        remote.close()


def test_a_forced_command_that_opts_in_computes(sshd, tmp_path: Path) -> None:
    host = host_dir(tmp_path, 'executor = "local"')
    options = restricted_key(sshd, tmp_path, host, "allow-compute")
    remote = SshCache(sshd.host, ssh_options=options, timeout=30)
    f = cached(cache=CacheStack([Cache(MemoryValueStore(), MemoryCallStore()), remote]))(sweeps.square)
    try:
        assert [r["square"] for r in f.map([3, 4], on=remote, progress=False)] == [9, 16]
        assert host_cache(host).contains(f.key(3))
    finally:
        remote.close()
