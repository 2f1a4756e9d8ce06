"""Many requests in flight on one ssh connection, through the real sshd.

What a user relies on: threads that share an ``SshCache`` each get their
own answers (never another thread's), nothing they save is lost, a large
value does not hold small requests up, a long query streams without the
server running away, and a server that dies fails every waiting request
at once instead of leaving one hanging.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from typing import List

import numpy as np
import pytest

from fleche_remote import Call, RemoteConnectionError
from fleche_remote.config import load_cache, load_config
from fleche_remote.remote import client as client_module

from .helpers import remote_dir, ssh_cache


def _big(tag: int) -> np.ndarray:
    # 3 MiB: streamed as DATA frames (well above the inline limit)
    return np.full(3 << 18, tag, dtype=np.float32)


#: Operations per thread. Eight threads interleave their requests on the one
#: connection from the first operation on; more of them repeat the same
#: interleavings, while each query (one in ten) lists a store that keeps
#: growing, so the cost grows with the square of this.
OPERATIONS = 200


def test_eight_threads_of_mixed_operations_get_their_own_answers(sshd, tmp_path):
    cache = ssh_cache(sshd, remote_dir(tmp_path), timeout=60)
    errors: List[BaseException] = []
    saved: List[List[str]] = [[] for _ in range(8)]

    def work(t: int) -> None:
        rng = random.Random(t)
        try:
            for i in range(OPERATIONS):
                roll = rng.random()
                if roll < 0.35 or not saved[t]:
                    big = i % 20 == 7  # a few large values per thread, as with 500 operations
                    result = _big(t * 1000 + i) if big else {"t": t, "i": i}
                    key = cache.save(Call("mixed", {"t": t, "i": i}, result))
                    saved[t].append(key)
                elif roll < 0.65:
                    key = rng.choice(saved[t])
                    value = cache.load_value(key)
                    i0 = cache.load(key).arguments["i"]
                    if isinstance(value, np.ndarray):
                        assert value[0] == t * 1000 + i0 and value.shape == (3 << 18,)
                    else:
                        assert value == {"t": t, "i": i0}
                elif roll < 0.9:
                    keys = rng.sample(saved[t], min(5, len(saved[t])))
                    missing = "f" * 63 + str(t % 10)
                    assert cache.contains_many([*keys, missing]) == [True] * len(keys) + [False]
                else:
                    mine = [c.arguments["i"] for c in cache.query("mixed", t=t)]
                    assert len(mine) >= len(saved[t]) and all(isinstance(x, int) for x in mine)
        except BaseException as exc:  # reported below, with the thread's number
            exc.add_note(f"in thread {t}") if hasattr(exc, "add_note") else None
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(600)
    try:
        assert not any(th.is_alive() for th in threads), "a thread hung"
        assert not errors, errors[0]
        every = [k for keys in saved for k in keys]
        assert all(cache.contains_many(every))
        found = {c.key for c in cache.query("mixed")}
        assert found == set(every)  # nothing lost, nothing extra
    finally:
        cache.close()


def test_a_large_download_does_not_hold_small_requests_up(sshd, tmp_path):
    workdir = remote_dir(tmp_path)
    # put the large value on the "cluster" directly, so that only the
    # download crosses the slow link
    local = load_cache("main", config=load_config(workdir / "fleche.toml"))
    big = local.save(Call("big", {}, np.ones(32 << 20, dtype=np.uint8)))
    small = local.save(Call("small", {}, "quick"))
    local.close()
    # 40 Mbit/s each way: the 32 MiB value takes >= 6.7 s to come down
    options = sshd.slow_ssh_options(delay_ms=5, rate_mbps=40)
    cache = ssh_cache(sshd, workdir, ssh_options=options, fast_cipher=False, timeout=120)
    try:
        assert cache.contains(small)  # connected, before the clock starts
        started = threading.Event()
        finished = threading.Event()

        def download() -> None:
            started.set()
            assert cache.load_value(big).nbytes == 32 << 20
            finished.set()

        th = threading.Thread(target=download)
        th.start()
        assert started.wait(30)
        time.sleep(0.3)  # let the value start flowing (not needed for correctness)
        assert cache.load_value(small) == "quick"
        assert cache.contains(small)
        # the small requests were answered between the value's chunks, not after it
        assert not finished.is_set(), "small requests waited for the whole large value"
        th.join(120)
        assert finished.is_set()
    finally:
        cache.close()


def test_a_long_query_streams_in_pages_and_can_be_abandoned(sshd, tmp_path, monkeypatch):
    monkeypatch.setattr(client_module, "QUERY_PAGE", 50)
    cache = ssh_cache(sshd, remote_dir(tmp_path))
    try:
        keys = cache.save_many([Call("many", {"i": i}, i) for i in range(1200)])
        sent = cache.request_count
        it = cache.query("many")
        first = [next(it) for _ in range(10)]
        assert len({c.key for c in first}) == 10
        # abandoning the iterator cancels the stream; the connection goes on
        it.close()
        assert cache.load_value(keys[5]) == 5
        everything = list(cache.query("many"))
        assert sorted(c.arguments["i"] for c in everything) == list(range(1200))
        # each query was one request; credits are one-way messages, not round trips
        assert cache.request_count - sent < 1200 // 50 * 2 + 10
    finally:
        cache.close()


def test_killed_server_fails_every_request_in_flight(sshd, tmp_path):
    options = sshd.slow_ssh_options(delay_ms=20)
    cache = ssh_cache(sshd, remote_dir(tmp_path), ssh_options=options, timeout=30)
    key = cache.save(Call("f", {}, 1))
    pid = cache.info()["pid"]
    outcomes: List[object] = []
    lock = threading.Lock()
    go = threading.Barrier(9)

    def hammer() -> None:
        go.wait(30)
        try:
            while True:
                cache.contains(key)
        except BaseException as exc:
            with lock:
                outcomes.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for th in threads:
        th.start()
    go.wait(30)
    time.sleep(0.2)  # requests are in flight on the slow link
    start = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    for th in threads:
        th.join(30)
    try:
        assert not any(th.is_alive() for th in threads), "a request hung after the server died"
        assert len(outcomes) == 8
        assert all(isinstance(exc, RemoteConnectionError) for exc in outcomes), outcomes
        assert time.monotonic() - start < 20
        with pytest.raises(RemoteConnectionError, match="call reconnect"):
            cache.contains(key)
        cache.reconnect()
        assert cache.contains(key)
    finally:
        cache.close()


def test_threads_overlap_their_round_trips(sshd, tmp_path):
    """On a 40 ms link, 8 threads x 10 lookups take far less than 80 round trips."""
    options = sshd.slow_ssh_options(delay_ms=20)
    cache = ssh_cache(sshd, remote_dir(tmp_path), ssh_options=options)
    try:
        key = cache.save(Call("f", {}, 1))
        start = time.monotonic()
        cache.contains(key)
        rtt = time.monotonic() - start
        assert rtt >= 0.04  # the link really is slow

        def lookups() -> None:
            for _ in range(10):
                assert cache.contains(key)

        threads = [threading.Thread(target=lookups) for _ in range(8)]
        start = time.monotonic()
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        elapsed = time.monotonic() - start
        # serial would be 80 round trips; pipelined, about 10 (allow a loaded machine 4x)
        assert elapsed < 40 * rtt, f"{elapsed:.2f} s for 80 lookups at {rtt * 1000:.0f} ms RTT"
    finally:
        cache.close()


def test_first_request_does_not_wait_for_the_banner(sshd, tmp_path):
    """Cold start: the request is on its way while ssh logs in, so the
    first answer costs the login plus one round trip, not two."""
    options = sshd.slow_ssh_options(delay_ms=50)
    workdir = remote_dir(tmp_path)
    cache = ssh_cache(sshd, workdir, ssh_options=options)
    try:
        cache.save(Call("f", {}, 1))
    finally:
        cache.close()
    cache = ssh_cache(sshd, workdir, ssh_options=options)
    try:
        assert cache.contains(Call("f", {}, 1).key())
        assert cache.request_count == 1
        assert cache._connection().hello_received
    finally:
        cache.close()
