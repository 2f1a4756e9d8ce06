"""Sweeps and write-behind through real ssh to a real sshd.

A laptop feels round trips, not bytes: ``f.map`` over 400 calls the
cluster already has costs a handful of requests, and a compute loop that
saves through a write-behind ssh layer never waits on the link, and loses
nothing when the link dies.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, List, Optional

import pytest
from layers import Gate

from fleche_remote import CacheStack, Call, WriteBehind, cached
from fleche_remote.caches.journal import Journal
from fleche_remote.config import cache_from_config
from fleche_remote.remote.packing import pipeline_parts
from fleche_remote.testing import wait_until

from .helpers import remote_dir, ssh_cache, ssh_table

REPO = Path(__file__).resolve().parents[2]

#: What ``f.map`` of 400 calls the cluster has may cost in requests.
MAX_REQUESTS_FOR_400 = 10

RUNS: List[int] = []


def simulate(x: int) -> dict:
    """The sweep's function; the same name on the 'cluster' and the 'laptop'."""
    RUNS.append(x)
    return {"x": x, "y": [x] * 8}


def file_cache(path: Path) -> Any:
    return cache_from_config({"template": "cloudpickle", "root": str(path)})


def requests(cache: Any) -> Optional[int]:
    """Requests the SshCache has sent so far (None until it counts them)."""
    return getattr(cache, "request_count", None)


def test_map_of_400_cluster_results_is_a_few_round_trips(sshd: Any, tmp_path: Path) -> None:
    workdir = remote_dir(tmp_path)
    cluster = cached(cache=file_cache(workdir / "store"))(simulate)
    cluster.map(range(400))  # computed on the cluster, into the store its server serves
    RUNS.clear()

    local = file_cache(tmp_path / "laptop")
    remote = ssh_cache(sshd, workdir)
    stack = CacheStack([local, remote])
    laptop = cached(cache=stack)(simulate)
    try:
        remote.ping()  # the handshake is not part of the sweep
        before = requests(remote)
        started = time.perf_counter()
        got = laptop.map(range(400))
        elapsed = time.perf_counter() - started
        after = requests(remote)
        assert got == [{"x": x, "y": [x] * 8} for x in range(400)]
        assert RUNS == []  # nothing recomputed
        assert local.contains_many([laptop.key(x) for x in range(400)]) == [True] * 400  # back-filled
        print(f"f.map of 400 cluster results: {elapsed:.2f} s, requests: {before} -> {after}")
        if after is not None and before is not None:
            assert after - before <= MAX_REQUESTS_FOR_400

        # again: all local, the link is not used at all
        before = requests(remote)
        assert laptop.map(range(400)) == got
        assert requests(remote) == before

        # a sweep that extends the old one computes only the new points
        before = requests(remote)
        assert laptop.map(range(350, 450)) == [{"x": x, "y": [x] * 8} for x in range(350, 450)]
        assert sorted(RUNS) == list(range(400, 450))
        after = requests(remote)
        if after is not None and before is not None:
            assert after - before <= 2  # one lookup for the 50 the laptop lacks; the save is local
    finally:
        stack.close()


def test_write_behind_survives_the_remote_dying_with_a_full_queue(sshd: Any, tmp_path: Path) -> None:
    workdir = remote_dir(tmp_path)
    remote = ssh_cache(sshd, workdir)
    gate = Gate(remote)
    writer = WriteBehind(gate, queue_size=4, batch_size=2, journal=tmp_path / "wb.journal")
    local = file_cache(tmp_path / "laptop")
    stack = CacheStack([local, gate], write_behind=[writer])

    def make(start: int, n: int) -> List[Call]:
        return [Call("sweep.f", {"i": i}, i * i) for i in range(start, start + n)]

    try:
        arrived = stack.save_many(make(0, 3))
        assert stack.flush(60)

        gate.open.clear()
        gate.entered.clear()
        held = stack.save_many(make(10, 1))  # taken by the pusher, held at the gate
        assert gate.entered.wait(60)
        queued = stack.save_many(make(20, 4))  # fills the queue
        more: List[str] = []
        saver = threading.Thread(target=lambda: more.extend(stack.save_many(make(30, 3))), daemon=True)
        saver.start()  # blocks: the queue is full
        wait_until(lambda: len(writer._queue) == 4, "a full queue", 60.0)
        assert saver.is_alive()

        os.killpg(remote._connection().transport.proc.pid, signal.SIGKILL)  # type: ignore[attr-defined]
        gate.open.set()  # the held batch now meets a dead link
        saver.join(60)
        assert not saver.is_alive()  # the failure released the blocked save
        assert not stack.flush(60)
        assert writer.failure is not None

        lost = held + queued + more
        assert stack.pending() == lost  # exactly what did not arrive, oldest first
        assert local.contains_many(lost) == [True] * len(lost)  # and all of it is local

        remote.reconnect()
        assert remote.contains_many(arrived + lost) == [True] * 3 + [False] * len(lost)
        assert Journal(tmp_path / "wb.journal").live() == lost  # what a later process would see
        assert stack.push_pending() == len(lost)
        assert stack.pending() == []
        assert remote.contains_many(lost) == [True] * len(lost)
        assert remote.load_value(lost[-1]) == 32 * 32
    finally:
        stack.close()


EXIT_SCRIPT = """
import atexit, json, sys
sys.path.insert(0, {tests!r})
from layers import Gate
from fleche_remote import CacheStack, Call, SshCache, WriteBehind
from fleche_remote.config import cache_from_config

opts = json.loads({opts!r})
remote = SshCache(opts["host"], python=sys.executable, ssh_options=opts["ssh_options"],
                  workdir=opts["workdir"], timeout=30, connect_timeout=30)
remote.ping()  # the connection (and its exit-time finalizer) exists before the stack saves
gate = Gate(remote)
gate.open.clear()
local = cache_from_config({{"template": "cloudpickle", "root": opts["local"]}})
stack = CacheStack([local, gate], write_behind=[WriteBehind(gate, journal=opts["journal"])])
stack.save_many([Call("exit.f", {{"i": i}}, i) for i in range(20)])
print("pending", len(stack.pending()), flush=True)
atexit.register(gate.open.set)  # runs before the write-behind's exit flush
"""


def test_write_behind_flushes_to_the_remote_at_interpreter_exit(sshd: Any, tmp_path: Path) -> None:
    workdir = remote_dir(tmp_path)
    opts = {
        "host": sshd.host,
        "ssh_options": list(sshd.ssh_options),
        "workdir": str(workdir),
        "local": str(tmp_path / "laptop"),
        "journal": str(tmp_path / "exit.journal"),
    }
    (tmp_path / "job.py").write_text(EXIT_SCRIPT.format(tests=str(REPO / "tests"), opts=json.dumps(opts)))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "job.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "pending 20\n"
    keys = [Call("exit.f", {"i": i}, i).key() for i in range(20)]
    assert file_cache(workdir / "store").contains_many(keys) == [True] * 20  # the server stored them
    assert Journal(tmp_path / "exit.journal").live() == []
    assert "failed" not in out.stderr


def test_write_behind_from_fleche_toml_pushes_over_ssh(
    sshd: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    workdir = remote_dir(tmp_path)
    stack = cache_from_config(
        [
            {"template": "cloudpickle", "root": str(tmp_path / "laptop")},
            ssh_table(sshd, workdir, write_behind=True),
        ]
    )
    assert isinstance(stack, CacheStack) and len(stack.write_behind) == 1
    try:
        f = cached(cache=stack)(simulate)
        f.map(range(50))
        assert stack.flush(60)
        assert file_cache(workdir / "store").contains_many([f.key(x) for x in range(50)]) == [True] * 50
        journal = stack.write_behind[0].journal.path
        assert journal is not None and journal.is_relative_to(tmp_path / "state")
    finally:
        stack.close()


def test_query_through_a_stack_backfills_while_the_remote_streams_pages(sshd: Any, tmp_path: Path) -> None:
    from fleche_remote.caches.stack import QUERY_BACKFILL_PAGE

    workdir = remote_dir(tmp_path)
    n = 3 * QUERY_BACKFILL_PAGE + 7  # back-fills run while the remote's query stream is still open
    keys = file_cache(workdir / "store").save_many([Call("q.f", {"i": i}, i) for i in range(n)])
    remote = ssh_cache(sshd, workdir)
    local = file_cache(tmp_path / "laptop")
    stack = CacheStack([local, remote])
    try:
        remote.ping()
        before = requests(remote)
        found = [c.key for c in stack.query("q.f")]
        after = requests(remote)
        assert sorted(found) == sorted(keys)
        assert local.contains_many(keys) == [True] * n
        print(f"query of {n} records with back-fill: requests {before} -> {after}")
        if after is not None and before is not None:
            # one load_blobs per back-fill page, plus the query and its page credits (one-way)
            assert after - before <= 2 * (1 + math.ceil(n / QUERY_BACKFILL_PAGE))
        assert stack.load_value(keys[5]) == 5
        assert requests(remote) == after  # local now
    finally:
        stack.close()


def test_the_obvious_loop_over_load_many_and_query_is_a_few_round_trips(sshd: Any, tmp_path: Path) -> None:
    # [c.result for c in cache.load_many(keys)] used to cost one round trip
    # per result (1,098 for 1000 keys); the lazy calls of one batch now
    # fetch their values together when the first is read
    workdir = remote_dir(tmp_path)
    file_cache(workdir / "store").save_many([Call("loop.f", {"i": i}, [float(i)] * 10) for i in range(1000)])
    big = Call("loop.f", {"i": "big"}, b"x" * (6 << 20))  # over the batch's per-value bound: fetched alone
    file_cache(workdir / "store").save(big)
    remote = ssh_cache(sshd, workdir)
    try:
        keys = [Call("loop.f", {"i": i}).key() for i in range(1000)] + [big.key()]
        remote.ping()
        before = requests(remote)
        calls = remote.load_many(keys)
        assert [c.result for c in calls[:-1]] == [[float(i)] * 10 for i in range(1000)]
        assert calls[-1].result == big.result
        after = requests(remote)
        # the listing's parts leave back to back: one round trip between them
        round_trips = after - before - (len(pipeline_parts(keys)) - 1)
        assert before is not None and after is not None and round_trips <= 4, (before, after)

        before = requests(remote)
        results = sorted(c.result[0] for c in remote.query("loop.f") if isinstance(c.result, list))
        assert results == [float(i) for i in range(1000)]
        after = requests(remote)
        assert before is not None and after is not None and after - before <= 10, (before, after)
    finally:
        remote.close()
