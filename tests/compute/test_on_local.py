"""``f.map(points, on=LAYER)`` through the real sshd, computed by the host's
local process pool: only the misses run, there, under the laptop's keys,
and come back in order, back-filled into the first layer."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from fleche_remote import ConfigError, Rejected, cached
from fleche_remote.caches import CacheStack

from . import sweeps
from .support import host_cache, host_dir, laptop


def test_local_pool_computes_only_the_misses_on_the_host(sshd, tmp_path: Path) -> None:
    host = host_dir(tmp_path, 'executor = "local"\nworkers = 2')
    stack = laptop(sshd, tmp_path, host)
    f = cached(cache=stack)(sweeps.square)
    try:
        # three points are on the cluster already
        for x in (1, 2, 3):
            cached(cache=stack.layers[1])(sweeps.square)(x)
        assert not any(stack.layers[0].contains(f.key(x)) for x in range(8))

        results = f.map(range(8), on=stack.layers[1], progress=False)

        assert [r["square"] for r in results] == [x * x for x in range(8)]
        computed = [r for x, r in zip(range(8), results) if x not in (1, 2, 3)]
        assert all(r["pid"] != os.getpid() for r in computed)
        assert {r["host_cwd"] for r in computed} == {str(host)}
        on_host = host_cache(host)
        assert all(on_host.contains(f.key(x)) for x in range(8))  # saved there, under our keys
        assert all(stack.layers[0].contains(f.key(x)) for x in range(8))  # and back-filled here
        jobs = list((tmp_path / "jobs" / "run").iterdir())
        assert len(jobs) == 1  # one submission for the five misses
    finally:
        stack.close()


def test_a_failing_point_raises_its_own_error_and_the_rest_are_kept(sshd, tmp_path: Path) -> None:
    host = host_dir(tmp_path, 'executor = "local"\nworkers = 2')
    stack = laptop(sshd, tmp_path, host)
    f = cached(cache=stack)(sweeps.square)
    try:
        with pytest.raises(sweeps.BadPoint, match="13 is unlucky") as info:
            f.map([12, 13, 14], on=stack.layers[1], progress=False)
        assert "in square" in info.value.remote_traceback
        assert stack.layers[0].contains(f.key(12)) and stack.layers[0].contains(f.key(14))
        assert not host_cache(host).contains(f.key(13))
    finally:
        stack.close()


def test_a_host_without_a_compute_table_says_how_to_add_one(sshd, tmp_path: Path) -> None:
    host = host_dir(tmp_path, None)
    stack = laptop(sshd, tmp_path, host)
    f = cached(cache=stack)(sweeps.square)
    try:
        with pytest.raises(Rejected, match=r"(?s)no \[compute\] table.*executor = \"local\""):
            f.map([1], on=stack.layers[1], progress=False)
    finally:
        stack.close()


def test_on_needs_an_ssh_layer(tmp_path: Path) -> None:
    from fleche_remote.caches import Cache
    from fleche_remote.storage.memory import MemoryCallStore, MemoryValueStore

    stack = CacheStack([Cache(MemoryValueStore(), MemoryCallStore())])
    f = cached(cache=stack)(sweeps.square)
    with pytest.raises(TypeError, match="ssh layer"):
        f.map([1], on=stack.layers[0])


def test_a_signing_layer_refuses_to_compute_on_its_host_before_submitting(sshd, tmp_path: Path) -> None:
    from fleche_remote.caches import Cache
    from fleche_remote.remote.client import SshCache
    from fleche_remote.storage.memory import MemoryCallStore, MemoryValueStore

    host = host_dir(tmp_path, 'executor = "local"\nworkers = 2')
    signed = SshCache(
        sshd.host,
        workdir=str(host),
        python=sys.executable,
        ssh_options=sshd.ssh_options,
        secret_key="6b" * 32,
    )
    stack = CacheStack([Cache(MemoryValueStore(), MemoryCallStore()), signed])
    f = cached(cache=stack)(sweeps.square)
    try:
        with pytest.raises(ConfigError, match=r"signs its entries \(secret_key\).*compute here"):
            f.map([1, 2], on=signed, progress=False)
        assert not (tmp_path / "jobs").exists()  # nothing was submitted
        assert [r["square"] for r in f.map([1, 2], progress=False)] == [1, 4]  # computed here
    finally:
        stack.close()
