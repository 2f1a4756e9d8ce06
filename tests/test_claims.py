"""A ``@cached`` call is computed once across processes, and a dead or
failing holder never leaves its waiters hanging.

Real processes (:mod:`claims_world`), each a fresh interpreter, race for
one slow call on a shared store; every run of the function appends a line
to a file, which is what the tests count.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest
from claims_world import World, wait_for

from fleche_remote import Cache, ClaimWaitTimeout, RecursiveCallError, cached
from fleche_remote.config import cache_from_config
from fleche_remote.storage.claims import FileClaims, Holder, MemoryClaims
from fleche_remote.storage.memory import MemoryCallStore, MemoryValueStore


def store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Dict[str, Any]:
    if kind == "file":
        return {"template": "cloudpickle", "root": str(tmp_path / "store")}
    if kind == "sql":
        return {"template": "sql", "root": str(tmp_path / "store")}
    if kind == "hdf5":
        return {"template": "hdf5", "root": str(tmp_path / "store")}
    url = request.getfixturevalue("postgres_url")
    return {
        "values": {"type": "cloudpickle", "root": str(tmp_path / "values")},
        "calls": {"type": "sql", "url": url},
    }


@pytest.mark.parametrize("kind", ["file", "sql", "postgres", "hdf5"])
def test_four_processes_compute_one_slow_call_once(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    world = World(tmp_path, store(kind, tmp_path, request))
    try:
        workers = [world.start(block=True) for _ in range(4)]
        world.go()
        # the holder stays in the function until all four have called it
        world.wait_for(
            lambda: len(world.computed()) == 1 and all(world.calling(w) for w in workers), "4 calls"
        )
        world.finish()
        assert [world.result(w) for w in workers] == [42] * 4
        assert len(world.computed()) == 1, world.computed()
    finally:
        world.close()


@pytest.mark.parametrize("kind", ["file", "sql", "postgres", "hdf5"])
def test_a_holder_killed_mid_computation_is_taken_over(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    world = World(tmp_path, store(kind, tmp_path, request), lease=1.0)
    try:
        holder = world.start(block=True)  # never finishes: it is killed
        world.go()
        wait_for(lambda: world.computed() == [str(holder.pid)], "the holder computing")
        waiter = world.start()
        wait_for(lambda: "waiting for 1 calls" in world.stderr(waiter), "the second process waiting")
        assert f"pid {holder.pid}" in world.stderr(waiter)  # it names whom it waits for
        os.kill(holder.pid, signal.SIGKILL)
        started = time.monotonic()
        assert world.result(waiter) == 42
        waited = time.monotonic() - started
        assert world.computed() == [str(holder.pid), str(waiter.pid)]
        print(f"taken over {waited:.2f} s after the kill (lease 1 s)")
        assert waited < 60
    finally:
        world.close()


def test_waiters_compute_themselves_when_the_holder_raises(tmp_path: Path) -> None:
    world = World(tmp_path, {"template": "cloudpickle", "root": str(tmp_path / "store")})
    try:
        holder = world.start(block=True, **{"raise": True})
        world.go()
        wait_for(lambda: len(world.computed()) == 1, "the holder computing")
        waiter = world.start()
        wait_for(lambda: "waiting for 1 calls" in world.stderr(waiter), "the second process waiting")
        world.finish()
        holder.communicate(timeout=120)
        assert holder.returncode != 0 and "ValueError: the holder failed" in world.stderr(holder)
        assert world.result(waiter) == 42  # it took the released claim and computed
        assert world.computed() == [str(holder.pid), str(waiter.pid)]
    finally:
        world.close()


# -- in one process ----------------------------------------------------------------


def memory_cache() -> Cache:
    return Cache(MemoryValueStore(), MemoryCallStore())


def test_threads_compute_one_call_once() -> None:
    runs: List[int] = []
    inside = threading.Event()
    finish = threading.Event()

    @cached(cache=memory_cache())
    def slow(x: int) -> int:
        runs.append(x)
        inside.set()
        assert finish.wait(60)
        return x + 1

    results: List[int] = []
    threads = [threading.Thread(target=lambda: results.append(slow(1))) for _ in range(4)]
    threads[0].start()
    assert inside.wait(60)
    for t in threads[1:]:
        t.start()
    finish.set()
    for t in threads:
        t.join(60)
    assert results == [2] * 4 and runs == [1]


def test_calling_itself_with_other_arguments_or_another_cached_function_works() -> None:
    cache = memory_cache()

    @cached(cache=cache)
    def double(x: int) -> int:
        return 2 * x

    @cached(cache=cache)
    def fib(n: int) -> int:
        return n if n < 2 else fib(n - 1) + fib(n - 2) + double(0)

    assert fib(15) == 610
    assert fib.map([16, 17]) == [987, 1597]


def test_calling_itself_with_the_same_arguments_is_an_error_not_a_hang() -> None:
    @cached(cache=memory_cache())
    def loop(x: int) -> int:
        return loop(x)

    with pytest.raises(RecursiveCallError, match="called itself with the same arguments"):
        loop(1)

    @cached(cache=memory_cache())
    def sweep(x: int) -> int:
        return sweep.map([x])[0]

    with pytest.raises(RecursiveCallError):
        sweep.map([1, 2])


def test_a_waiter_gives_up_after_claim_timeout_naming_the_holder(tmp_path: Path) -> None:
    cache = cache_from_config({"template": "cloudpickle", "root": str(tmp_path)})
    other = Holder("someone-else", "node17", 4242)

    @cached(cache=cache, claim_timeout=0.3)
    def f(x: int) -> int:
        return x

    keeper = cache.claim_keeper()
    assert keeper is not None
    assert keeper.claim([f.key(1)], other, 60) == [None]
    with pytest.raises(ClaimWaitTimeout, match="pid 4242 on node17"):
        f(1)
    keeper.release([f.key(1)], other)
    assert f(1) == 1


def test_map_claims_its_misses_and_waits_for_those_held_elsewhere(tmp_path: Path) -> None:
    cache = cache_from_config({"template": "sql", "root": str(tmp_path)})
    other = Holder("someone-else", "node17", 4242)
    runs: List[int] = []

    @cached(cache=cache)
    def f(x: int) -> int:
        runs.append(x)
        return x * 10

    keeper = cache.claim_keeper()
    assert keeper is not None
    keeper.claim([f.key(2)], other, 60)
    done: List[Any] = []
    sweep = threading.Thread(target=lambda: done.append(f.map([1, 2, 3])))
    sweep.start()
    wait_for(lambda: sorted(runs) == [1, 3], "the free points computed")
    cache.save(cache_call(f, 2, "from elsewhere"))  # the other holder finishes...
    keeper.release([f.key(2)], other)  # ...and releases
    sweep.join(60)
    assert done == [[10, "from elsewhere", 30]] and sorted(runs) == [1, 3]


def cache_call(f: Any, x: int, result: Any) -> Any:
    from fleche_remote import Call

    return Call(f.name, f.arguments(x), result, {}, f.version)


def test_a_read_only_cache_takes_no_claims(tmp_path: Path) -> None:
    cache_from_config({"template": "sql", "root": str(tmp_path)})
    ro = cache_from_config({"template": "sql", "root": str(tmp_path), "read_only": True})
    assert ro.claim_keeper() is None

    @cached(cache=ro)
    def f(x: int) -> int:
        return x

    assert f(3) == 3


@pytest.mark.parametrize("make", [lambda p: FileClaims(p), lambda p: MemoryClaims()], ids=["file", "memory"])
def test_a_claim_is_a_lease(make: Any, tmp_path: Path) -> None:
    claims = make(tmp_path)
    a, b = Holder("a", "h", 1), Holder("b", "h", 2)
    key = "ab" * 32
    assert claims.claim([key], a, 60) == [None]
    assert claims.claim([key], b, 60)[0].owner == "a"
    assert claims.claimed([key]) == [True]
    assert claims.renew([key], a, 0.01) == [True]
    wait_for(lambda: claims.claimed([key]) == [False], "the lease to run out")
    assert claims.claim([key], b, 60) == [None]  # taken over
    assert claims.renew([key], a, 60) == [False]  # a lost it, and says so
    claims.release([key], a)  # not a's: left alone
    assert claims.claim([key], a, 60)[0].owner == "b"
    claims.release([key], b)
    assert claims.claimed([key]) == [False]
