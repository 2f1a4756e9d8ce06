"""One cache, four threads: the way the server will use it.

A server answers lookups on one thread while another receives an upload
and a third streams a download, all on the same :class:`Cache`. Each
backend is hammered here by four threads doing mixed saves (the same calls
from every thread, so they race on identical keys, plus calls of their
own, small and large), loads, batch loads and lookups. Every thread starts
at a barrier, so the work really overlaps; every wait has a deadline.
"""

from __future__ import annotations

import threading
import traceback
from pathlib import Path
from typing import Any, Iterator, List

import numpy as np
import pytest

from fleche_remote import Cache, Call
from fleche_remote.storage.base import INLINE_MAX
from fleche_remote.storage.file import FileCallStore, FileValueStore
from fleche_remote.storage.memory import MemoryCallStore, MemoryValueStore

THREADS = 4
ROUNDS = 40
DEADLINE_S = 120.0


def result_for(i: int) -> Any:
    """Small values mostly; every seventh is past INLINE_MAX (a file or dataset)."""
    if i % 7 == 0:
        return np.arange(INLINE_MAX // 8 + 16, dtype=np.float64) * i
    if i % 2:
        return b"bytes %d" % i
    return {"i": i, "square": i * i}


def same(got: Any, want: Any) -> bool:
    if isinstance(want, np.ndarray):
        return isinstance(got, np.ndarray) and np.array_equal(got, want)
    return bool(got == want)


@pytest.fixture(params=["memory", "file", "file+sqlite", "sqlite-in-memory", "file+postgres", "hdf5"])
def cache(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cache]:
    kind = request.param
    if kind == "memory":
        made = Cache(MemoryValueStore(), MemoryCallStore())
    elif kind == "file":
        made = Cache(FileValueStore(tmp_path / "values"), FileCallStore(tmp_path / "calls"))
    elif kind in ("file+sqlite", "sqlite-in-memory", "file+postgres"):
        from fleche_remote.storage.sql.stores import SqlCallStore

        url = {
            "file+sqlite": f"sqlite:///{tmp_path}/calls.db",
            "sqlite-in-memory": "sqlite://",
        }.get(kind) or request.getfixturevalue("postgres_url")
        made = Cache(FileValueStore(tmp_path / "values"), SqlCallStore(url))
    else:
        from fleche_remote.storage.hdf5 import Hdf5CallStore, Hdf5ValueStore

        # values and calls in one file: both stores must take turns on it
        made = Cache(Hdf5ValueStore(tmp_path / "cache.h5"), Hdf5CallStore(tmp_path / "cache.h5"))
    yield made
    made.close()


def test_four_threads_share_one_cache(cache: Cache) -> None:
    barrier = threading.Barrier(THREADS, timeout=DEADLINE_S)
    errors: List[str] = []

    def work(t: int) -> None:
        try:
            barrier.wait()
            for i in range(ROUNDS):
                shared = Call("threads.shared", {"i": i}, result_for(i))
                own = Call("threads.own", {"t": t, "i": i}, result_for(i + t))
                key = cache.save(shared)
                own_key, again = cache.save_many([own, shared])
                assert again == key
                assert cache.contains(key) and own_key in cache
                assert same(cache.load_value(key), shared.result)
                loaded = cache.load_many([own_key, key, "f" * 64], results=True)
                assert loaded[2] is None
                assert loaded[0] is not None and same(loaded[0].result, own.result)
                assert loaded[1] is not None and loaded[1].arguments == {"i": i}
                assert cache.contains_many([key, own_key]) == [True, True]
                if i % 10 == 0:
                    assert cache.expand(key[:16]) == key
                    assert any(c.key == key for c in cache.query("threads.shared", i=i))
        except BaseException:
            errors.append(f"thread {t}:\n{traceback.format_exc()}")

    threads = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(DEADLINE_S)
    assert not any(th.is_alive() for th in threads), f"a thread did not finish within {DEADLINE_S:g} s"
    assert not errors, "\n".join(errors)

    # everything every thread saved is there, once, and loads back
    assert len(list(cache.query("threads.shared"))) == ROUNDS
    assert len(list(cache.query("threads.own"))) == ROUNDS * THREADS
    for i in range(ROUNDS):
        assert same(cache.load_value(Call("threads.shared", {"i": i}).key()), result_for(i))
    assert cache.collect_garbage() == 0
