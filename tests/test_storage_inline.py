"""Small values inline in the SQL call store, batches as single transactions.

What a user can check from outside: how many files a cache of small
results makes, that garbage collection reaches inline values, how many
transactions and statements a batch costs (SQLite's trace callback;
PostgreSQL's transaction ids), and that nothing of SQLAlchemy is loaded
for SQLite.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, List

import numpy as np
import pytest

from fleche_remote import Cache, Call, cache_from_config
from fleche_remote.call import CallRecord, make_record
from fleche_remote.codec.values import StreamBlob, blob_digest, encode_value
from fleche_remote.storage.base import INLINE_MAX
from fleche_remote.storage.file import FileValueStore
from fleche_remote.storage.sql.stores import SqlCallStore


def files_under(root: Path) -> List[Path]:
    return [Path(d) / f for d, _, names in os.walk(root) for f in names]


@pytest.fixture(params=["sqlite", "postgresql"])
def cache(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cache]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/calls.db"
    else:
        url = request.getfixturevalue("postgres_url")
    made = Cache(FileValueStore(tmp_path / "values"), SqlCallStore(url))
    yield made
    made.close()


def big() -> np.ndarray:
    return np.arange(INLINE_MAX // 8 + 1, dtype=np.float64)  # one float past INLINE_MAX


# -- files ------------------------------------------------------------------------


def test_small_results_make_no_files(tmp_path: Path) -> None:
    # the "sql" template: values as files, calls in SQLite
    cache = cache_from_config({"template": "sql", "root": str(tmp_path / "store")})
    assert isinstance(cache, Cache)
    calls = [Call("inline.f", {"i": i}, [i, float(i), str(i)]) for i in range(2000)]
    for call in calls[:500]:
        cache.save(call)  # one at a time
    for start in range(500, 2000, 250):
        cache.save_many(calls[start : start + 250])  # and in batches
    files = files_under(tmp_path)
    # calls.db and, in WAL mode, its -wal and -shm files: at most 1 per 1000
    assert len(files) <= 3, files
    assert all(f.name.startswith("calls.db") for f in files), files
    assert [cache.load_value(c.key()) for c in calls[::97]] == [c.result for c in calls[::97]]

    key = cache.save(Call("inline.f", {"big": True}, big()))  # past the threshold: a file
    assert len(files_under(tmp_path / "store" / "values")) == 1
    np.testing.assert_array_equal(cache.load_value(key), big())
    cache.close()


def test_values_at_the_threshold_stay_inline_and_past_it_become_files(cache: Cache) -> None:
    sizes = {INLINE_MAX - 1: True, INLINE_MAX: True, INLINE_MAX + 1: False}
    for size, inline in sizes.items():
        body = bytes([size % 251]) * size
        key = cache.save(Call("inline.size", {"n": size}, body))
        digest = cache.load(key).value_digest
        assert (digest in set(cache.calls.blob_digests())) is inline  # type: ignore[attr-defined]
        assert cache.values.contains(digest) is not inline
        assert cache.load_value(key) == body
        assert cache.load_blobs([digest])[0] is not None


# -- garbage collection -----------------------------------------------------------


def test_gc_removes_unreferenced_inline_and_file_values(cache: Cache) -> None:
    shared = {"shared": list(range(10))}
    keep1 = cache.save(Call("gc.f", {"x": 1}, shared))
    drop_shared = cache.save(Call("gc.f", {"x": 2}, shared))
    drop_small = cache.save(Call("gc.f", {"x": 3}, "only mine"))
    drop_big = cache.save(Call("gc.f", {"x": 4}, big()))
    inline = cache.calls
    assert len(set(inline.blob_digests())) == 2  # type: ignore[attr-defined]
    assert len(list(cache.values.digests())) == 1
    for key in (drop_shared, drop_small, drop_big):
        cache.evict(key)
    # a value file younger than the grace period may be a save in progress
    assert cache.collect_garbage() == 1  # "only mine" (inline, in one transaction)
    assert len(list(cache.values.digests())) == 1
    old = time.time() - 2 * Cache.GC_GRACE_SECONDS
    for path in Path(cache.values.root).rglob("*"):  # type: ignore[attr-defined]
        if path.is_file():
            os.utime(path, (old, old))
    assert cache.collect_garbage() == 1  # the array (a file), now old
    assert len(set(inline.blob_digests())) == 1  # type: ignore[attr-defined]
    assert list(cache.values.digests()) == []
    assert cache.collect_garbage() == 0
    assert cache.load_value(keep1) == shared


# -- one transaction, one query per batch ----------------------------------------------


class Statements:
    """Every statement SQLite runs on this thread's connection of ``store``."""

    def __init__(self, store: SqlCallStore) -> None:
        self.seen: List[str] = []
        store._db._connection().set_trace_callback(self.seen.append)  # type: ignore[attr-defined]

    def count(self, prefix: str) -> int:
        return sum(s.lstrip().upper().startswith(prefix) for s in self.seen)

    def clear(self) -> None:
        self.seen.clear()


def test_sqlite_batches_are_one_transaction_and_one_query(tmp_path: Path) -> None:
    store = SqlCallStore(f"sqlite:///{tmp_path}/calls.db")
    cache = Cache(FileValueStore(tmp_path / "values"), store)
    calls = [Call("batch.f", {"i": i}, {"i": i}) for i in range(300)]
    cache.contains("0" * 64)  # open this thread's connection
    trace = Statements(store)
    keys = cache.save_many(calls)
    assert trace.count("BEGIN") == 1 and trace.count("COMMIT") == 1, trace.seen
    trace.clear()
    assert cache.contains_many(keys) == [True] * 300
    assert [c.key for c in cache.load_many(keys) if c] == keys
    loaded = cache.load_many(keys, results=True)
    assert [c.result for c in loaded if c] == [c.result for c in calls]
    assert trace.count("SELECT") == 3 and trace.count("BEGIN") == 0, trace.seen
    trace.clear()
    cache.save_many(calls)  # all present: one lookup, nothing written
    assert trace.count("BEGIN") == 1 and trace.count("SELECT") == 1, trace.seen
    assert trace.count("INSERT") == 0, trace.seen
    cache.close()


def test_postgres_batches_are_one_transaction(postgres_url: str, tmp_path: Path) -> None:
    store = SqlCallStore(postgres_url)
    cache = Cache(FileValueStore(tmp_path / "values"), store)

    def txid() -> int:
        # every call takes a transaction id, as does every write transaction
        row = store._db.first("SELECT txid_current()")
        assert row is not None
        return int(row[0])

    calls = [Call("batch.f", {"i": i}, {"i": i}) for i in range(300)]
    before = txid()
    keys = cache.save_many(calls)
    assert txid() - before == 2  # the batch, and our second txid_current()
    before = txid()
    loaded = cache.load_many(keys, results=True)
    assert cache.contains_many(keys) == [True] * 300
    assert txid() - before == 1  # reads take none
    assert [c.result for c in loaded if c] == [c.result for c in calls]
    cache.close()


def test_a_resaved_call_keeps_its_value_and_leaves_no_orphan(cache: Cache) -> None:
    first = Call("resave.f", {"x": 1}, "first result")
    key = cache.save(first)
    for batch in (
        [Call("resave.f", {"x": 1}, "second result")],
        [first, Call("resave.f", {"x": 1}, "third")],
    ):
        assert cache.save_many(batch)[0] == key
    assert cache.load_value(key) == "first result"
    assert len(set(cache.calls.blob_digests())) == 1  # type: ignore[attr-defined]
    assert cache.collect_garbage() == 0


def test_a_streamed_batch_is_read_in_order_and_drained(cache: Cache) -> None:
    """What the server hands over: one-shot streams, a duplicate among them."""
    values = [b"first", b"second", b"first", big().tobytes()]
    records, blobs = [], []
    for i, value in enumerate(values):
        blob = encode_value(value)
        records.append(make_record(Call("stream.f", {"i": i}, value), blob, blob_digest(blob)))
        blobs.append(StreamBlob(blob.kind, blob.meta, blob.size, iter([value[:3], value[3:]])))
    cache.save_records(list(zip(records, blobs)))
    for blob in blobs:  # every stream was read to its end, the duplicate too
        assert list(blob._source) == []
    assert [cache.load_value(r.key) for r in records] == values


# -- records ------------------------------------------------------------------------


def test_records_round_trip_with_their_digest_scheme(cache: Cache) -> None:
    blob = encode_value(3)
    record = make_record(Call("scheme.f", {"x": 1}, 3), blob, blob_digest(blob))
    if "digest_scheme" in CallRecord.__dataclass_fields__:
        record = dataclasses.replace(record, digest_scheme="test-scheme/9")  # type: ignore[call-arg]
    cache.save_records([(record, blob)])
    assert cache.load_records([record.key]) == [record]
    entry = cache.load_entries([record.key])[0]
    assert entry is not None and entry[0] == record
    assert entry[1].read_all() == blob.read_all()


def test_sqlite_needs_no_sqlalchemy(tmp_path: Path) -> None:
    code = f"""
import sys
import time
from fleche_remote import Cache, Call
from fleche_remote.storage.file import FileValueStore
from fleche_remote.storage.sql.stores import SqlCallStore, SqlValueStore
cache = Cache(SqlValueStore("sqlite:///{tmp_path}/v.db"), SqlCallStore("sqlite:///{tmp_path}/c.db"))
key = cache.save(Call("f", {{"x": 1}}, 2))
assert cache.load_value(key) == 2
assert "sqlalchemy" not in sys.modules, "sqlalchemy was imported"
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_sqlite_store_works_in_a_fork_child(tmp_path: Path) -> None:
    store = SqlCallStore(f"sqlite:///{tmp_path}/calls.db")
    cache = Cache(FileValueStore(tmp_path / "values"), store)
    parent_key = cache.save(Call("fork.f", {"who": "parent"}, 1))
    pid = os.fork()
    if pid == 0:  # the child: its own connection, the parent's left alone
        code = 1
        try:
            child_key = cache.save(Call("fork.f", {"who": "child"}, 2))
            code = 0 if cache.load_value(parent_key) == 1 and cache.contains(child_key) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert cache.load_value(Call("fork.f", {"who": "child"}).key()) == 2
    assert cache.load_value(parent_key) == 1
    cache.close()


def test_gc_spares_a_value_whose_record_is_still_on_its_way(tmp_path: Path) -> None:
    """A save writes its value file, then its record: a collection that runs
    in between must not take the value (the record would point at nothing)."""
    cache = cache_from_config({"template": "sql", "root": str(tmp_path)})
    call = Call("gc.g", {"x": 1}, big())
    record_less = call.key()
    blob = encode_value(call.result)
    digest = blob_digest(blob)
    cache.values.put(digest, blob)  # the first half of a save
    assert cache.collect_garbage() == 0
    assert cache.save(call) == record_less  # the second half finds its value
    np.testing.assert_array_equal(cache.load_value(record_less), call.result)

    # an old orphan whose value is stored again is fresh again
    cache.evict(record_less)
    old = time.time() - 2 * Cache.GC_GRACE_SECONDS
    (path,) = [p for p in tmp_path.rglob(digest)]
    os.utime(path, (old, old))
    cache.values.put(digest, blob)  # a concurrent save of the same result
    assert cache.collect_garbage() == 0
    os.utime(path, (old, old))
    assert cache.collect_garbage() == 1  # a real orphan goes
    cache.close()
