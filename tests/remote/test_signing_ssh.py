"""Signed caches through the real ssh and sshd.

The client holds the key; the server's fleche.toml has none and its
environment never sees it. Entries are planted straight into the server's
files, as anyone with write access there could, with a canary that any
unpickling would create.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, Tuple

import cloudpickle
import numpy as np
import pytest

from fleche_remote import Cache, CacheStack, Call
from fleche_remote.call import SIGNATURE_KEY
from fleche_remote.codec.values import BytesBlob
from fleche_remote.config import cache_from_config
from fleche_remote.remote.client import SshCache
from fleche_remote.signing import ENV_VAR, SignatureError, Signer
from fleche_remote.storage.file import FileCallStore, FileValueStore
from fleche_remote.storage.memory import MemoryCallStore, MemoryValueStore

from .helpers import remote_dir

pytestmark = pytest.mark.filterwarnings("ignore::fleche_remote.codec.digest.UnstableDigestWarning")

KEY = "6b" * 32
OTHER = "e4" * 32
NAME = "signing.ssh"


class Canary:
    """Unpickling this creates ``path``: proof that something was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> Tuple[Any, Tuple[str, str]]:
        return (open, (self.path, "a"))


def ssh_table(sshd: Any, workdir: Path, **extra: Any) -> Dict[str, Any]:
    """A ``type = "ssh"`` table as a user's fleche.toml would hold it."""
    return {
        "type": "ssh",
        "host": sshd.host,
        "python": sys.executable,
        "ssh_options": list(sshd.ssh_options),
        "workdir": str(workdir),
        "timeout": 30,
        "connect_timeout": 30,
        **extra,
    }


def ssh_cache(sshd: Any, workdir: Path, secret_key: str) -> SshCache:
    table = ssh_table(sshd, workdir)
    del table["type"]
    return SshCache(**table, secret_key=secret_key)


def server_files(workdir: Path) -> Cache:
    """The server's storage, read and written directly (no key, no server)."""
    store = workdir / "store"
    return Cache(FileValueStore(store / "values"), FileCallStore(store / "calls"))


def test_signed_on_the_client_stored_as_is_on_the_server(sshd: Any, tmp_path: Path) -> None:
    workdir = remote_dir(tmp_path)
    cache = cache_from_config(ssh_table(sshd, workdir, secret_key=KEY), name="cluster")
    assert isinstance(cache, SshCache) and cache.signer is not None
    try:
        big = np.arange(400_000, dtype=np.float64)  # streams, not inline
        k_big = cache.save(Call(NAME, {"x": 1}, big, metadata={"host": "laptop"}))
        k_small = cache.save(Call(NAME, {"x": 2}, {"small": True}))
        np.testing.assert_array_equal(cache.load_value(k_big), big)
        np.testing.assert_array_equal(cache.load(k_big).result, big)
        assert cache.load_value(k_small[:12]) == {"small": True}
        assert dict(cache.load(k_big).metadata) == {"host": "laptop"}
        assert sorted(c.key for c in cache.query(NAME)) == sorted([k_big, k_small])
        assert [c.result for c in cache.load_many([k_small], results=True)] == [{"small": True}]
        # the server holds the signatures, written by the client ...
        stored = server_files(workdir)
        record = stored.calls.get(k_big)
        assert record.metadata[SIGNATURE_KEY].split(":")[1] == Signer.of(KEY).key_id
        assert SIGNATURE_KEY in stored.values.get(record.value).meta
        # ... and never saw the key: not on its command line, not in what it describes
        assert KEY not in " ".join(cache.argv())
        assert "secret_key" not in str(cache.info()) and KEY not in str(cache.info())
        assert KEY not in repr(cache)
    finally:
        cache.close()


def test_unsigned_forged_and_foreign_entries_are_refused_over_ssh(sshd: Any, tmp_path: Path) -> None:
    workdir = remote_dir(tmp_path)
    canary = tmp_path / "canary"
    cache = ssh_cache(sshd, workdir, KEY)
    stored = server_files(workdir)
    try:
        # an entry written without the key, canaries in arguments and result
        unsigned = stored.save(Call(NAME, {"x": Canary(canary)}, Canary(canary)))
        # a signed entry whose (streamed) value was then replaced
        forged = cache.save(Call(NAME, {"x": 3}, np.arange(300_000)))
        digest = cache.load(forged).value_digest
        meta = dict(stored.values.get(digest).meta)  # the honest signature stays
        stored.values.delete(digest)
        stored.values.put(digest, BytesBlob("pickle", meta, cloudpickle.dumps(Canary(canary))))
        attempts = [
            lambda: cache.load(unsigned),
            lambda: cache.load_value(unsigned),
            lambda: list(cache.query(NAME)),
            lambda: cache.load_many([unsigned], results=True),
            lambda: cache.load_value(forged),
            lambda: cache.load(forged).result,
            lambda: cache.load_many([forged], results=True),
            lambda: cache.load_blob(digest).read_all(),
        ]
        for attempt in attempts:
            with pytest.raises(SignatureError) as info:
                attempt()
            assert sshd.host in str(info.value)  # says where the entry is
        assert not canary.exists()
        # a client with another key refuses what this one signed
        honest = cache.save(Call(NAME, {"x": 4}, "honest"))
        assert cache.load_value(honest) == "honest"
        stranger = SshCache(
            **{k: v for k, v in ssh_table(sshd, workdir).items() if k != "type"}, secret_key=OTHER
        )
        try:
            with pytest.raises(SignatureError, match=Signer.of(KEY).key_id):
                stranger.load_value(honest)
        finally:
            stranger.close()
    finally:
        cache.close()
    # the planted bytes were live: an unsigned reader runs them
    stored.load_value(unsigned)
    assert canary.exists()


def test_a_stack_of_differently_keyed_layers_over_ssh(
    sshd: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workdir = remote_dir(tmp_path)
    monkeypatch.setenv(ENV_VAR, OTHER)  # the ssh layer's key comes from the environment
    remote = cache_from_config(ssh_table(sshd, workdir), name="cluster")
    assert isinstance(remote, SshCache) and remote.signer is not None and remote.signer.source == ENV_VAR
    local = Cache(MemoryValueStore(), MemoryCallStore(), secret_key=KEY)
    stack = CacheStack([local, remote])
    try:
        key = remote.save(Call(NAME, {"x": 1}, np.arange(200_000)))
        np.testing.assert_array_equal(stack.load_value(key), np.arange(200_000))
        # back-filled, checked with the remote's key and signed again with the local one
        np.testing.assert_array_equal(local.load_value(key), np.arange(200_000))
        assert local.calls.get(key).metadata[SIGNATURE_KEY].split(":")[1] == Signer.of(KEY).key_id
    finally:
        stack.close()


def test_a_key_in_the_servers_own_table_is_not_used(sshd: Any, tmp_path: Path) -> None:
    """The served table has another key: the server still keeps and serves
    the client's signed bytes as they came, and says it dropped its key."""
    toml = (
        '[default]\ncache = "main"\nroot = true\n\n'
        f'[main]\ntemplate = "cloudpickle"\nroot = "store"\nsecret_key = "{OTHER}"\n'
    )
    workdir = remote_dir(tmp_path, toml)
    cache = ssh_cache(sshd, workdir, KEY)
    try:
        key = cache.save(Call(NAME, {"x": 1}, np.arange(300_000)))
        np.testing.assert_array_equal(cache.load_value(key), np.arange(300_000))
        record = server_files(workdir).calls.get(key)
        assert record.metadata[SIGNATURE_KEY].split(":")[1] == Signer.of(KEY).key_id
    finally:
        cache.close()
