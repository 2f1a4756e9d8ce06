"""Claims held by an ssh server, through the real sshd: two laptops whose
stacks share one cluster layer compute a call once, and a server that
takes no claims leaves computing as it was."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import pytest
from claims_world import World

from fleche_remote import cached
from fleche_remote.claiming import me

from .helpers import remote_dir, ssh_cache, ssh_table


def laptop(tmp_path: Path, name: str, sshd: Any, workdir: Path) -> List[Dict[str, Any]]:
    return [
        {"template": "cloudpickle", "root": str(tmp_path / name)},
        ssh_table(sshd, workdir, write_behind=True),
    ]


def test_two_laptops_sharing_a_cluster_layer_compute_once(
    sshd: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    workdir = remote_dir(tmp_path)
    world = World(tmp_path, None)
    try:
        a = world.start(block=True, cache=laptop(tmp_path, "laptop1", sshd, workdir))
        b = world.start(block=True, cache=laptop(tmp_path, "laptop2", sshd, workdir))
        world.go()
        world.wait_for(
            lambda: len(world.computed()) == 1 and world.calling(a) and world.calling(b) and world.waiting(),
            "one laptop computing while the other waits on the cluster's claim",
        )
        world.finish()
        assert [world.result(a), world.result(b)] == [42, 42]
        assert len(world.computed()) == 1, world.computed()
        # the holder released its claim on its way out, after its push (not
        # left to expire, which would have kept the other waiting a lease)
        for proc in (a, b):
            assert "could not release" not in world.stderr(proc), world.stderr(proc)
    finally:
        world.close()


def test_a_read_only_server_means_computing_without_claims(sshd: Any, tmp_path: Path) -> None:
    workdir = remote_dir(tmp_path)
    remote = ssh_cache(sshd, workdir, cache_name="ro")
    try:
        runs: List[int] = []

        @cached(cache=remote)
        def f(x: int) -> int:
            runs.append(x)
            return x

        assert f(1) == 1 and f.map([2, 3]) == [2, 3] and runs == [1, 2, 3]
        assert remote.claim_keeper() is None  # known now: no more asking
    finally:
        remote.close()


def test_the_server_answers_claims_in_one_round_trip_per_batch(sshd: Any, tmp_path: Path) -> None:
    workdir = remote_dir(tmp_path)
    remote = ssh_cache(sshd, workdir)
    try:
        keeper = remote.claim_keeper()
        assert keeper is not None
        keys = [f"{i:064x}" for i in range(400)]
        remote.ping()
        before = remote.request_count
        assert keeper.claim(keys, me(), 30) == [None] * 400
        assert keeper.renew(keys, me(), 30) == [True] * 400
        assert keeper.claimed(keys) == [True] * 400
        keeper.release(keys, me())
        assert keeper.claimed(keys) == [False] * 400
        assert remote.request_count - before == 5
    finally:
        remote.close()
