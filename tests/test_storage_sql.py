"""The SQL stores against a real SQLite file and a real PostgreSQL server.

Every PostgreSQL test gets a database of its own: conftest.py's
``postgres_url`` creates a fresh, empty one per test on the session's
private server, so tests never see each other's rows.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
from pathlib import Path
from typing import Any, Iterator, List

import numpy as np
import pytest

from fleche_remote.caches import Cache
from fleche_remote.call import Call, CallRecord, make_record
from fleche_remote.codec.plain import dumps_plain, loads_plain
from fleche_remote.codec.values import BytesBlob, StreamBlob, blob_digest, decode_value, encode_value
from fleche_remote.errors import AmbiguousDigestError, ConfigError, CorruptEntryError, StorageError
from fleche_remote.storage.base import build_store
from fleche_remote.storage.sql import stores as sqlmod
from fleche_remote.storage.sql.stores import SqlCallStore, SqlValueStore


@pytest.fixture
def pg_url(postgres_url: str) -> str:
    """conftest's ``postgres_url``: a fresh, empty database for this test alone."""
    return postgres_url


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/cache.db"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def values(url: str) -> Iterator[SqlValueStore]:
    store = SqlValueStore(url)
    yield store
    store.close()


@pytest.fixture
def calls(url: str) -> Iterator[SqlCallStore]:
    store = SqlCallStore(url)
    yield store
    store.close()


def record(key: str, name: str = "mod.f", **kw: Any) -> CallRecord:
    fields: dict[str, Any] = dict(
        key=key,
        name=name,
        version=None,
        arguments=b"\x80\x04N.",
        arg_digests={"x": "1" * 64},
        metadata={},
        value="f" * 64,
        value_kind="pickle",
        value_size=3,
    )
    fields.update(kw)
    return CallRecord(**fields)


def saved_call(store: SqlCallStore, name: str, arguments: dict[str, Any], **meta: Any) -> CallRecord:
    blob = encode_value(sum(arguments.values()))
    rec = make_record(Call(name, arguments, metadata=meta), blob, blob_digest(blob))
    store.put(rec)
    return rec


# -- values -----------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        b"raw bytes \x00\xff",
        b"",
        {"a": [1, 2.5, None], "b": (1, "x")},
        np.arange(12, dtype=">i4").reshape(3, 4),
        np.zeros((0, 5)),
        np.array(2.5),
    ],
    ids=["bytes", "empty-bytes", "pickle", "ndarray", "ndarray-empty", "ndarray-0d"],
)
def test_value_round_trip_every_kind(values: SqlValueStore, value: Any) -> None:
    blob = encode_value(value)
    digest = blob_digest(blob)
    values.put(digest, blob)
    got = values.get(digest)
    assert (got.kind, got.meta, got.size) == (blob.kind, blob.meta, blob.size)
    assert got.read_all() == blob.read_all()
    assert blob_digest(got) == digest
    back = decode_value(got)
    if isinstance(value, np.ndarray):
        assert back.dtype == value.dtype and back.shape == value.shape
        np.testing.assert_array_equal(back, value)
    else:
        assert back == value


def test_value_put_is_idempotent_and_delete_forgets(values: SqlValueStore) -> None:
    blob = encode_value(b"same")
    digest = blob_digest(blob)
    values.put(digest, blob)
    values.put(digest, blob)
    # a second put may skip reading a stream it already has
    values.put(digest, StreamBlob("bytes", {}, 4, iter([b"same"])))
    assert list(values.digests()) == [digest]
    values.delete(digest)
    values.delete(digest)
    assert not values.contains(digest)
    assert list(values.digests()) == []


def test_value_missing_is_a_key_error(values: SqlValueStore) -> None:
    with pytest.raises(KeyError):
        values.get("0" * 64)
    assert not values.contains("0" * 64)


def test_value_short_stream_is_refused_and_not_stored(values: SqlValueStore) -> None:
    short = StreamBlob("bytes", {}, 10, iter([b"12345"]))
    with pytest.raises(CorruptEntryError, match="got 5 bytes, expected 10"):
        values.put("ab" * 32, short)
    assert not values.contains("ab" * 32)


def test_value_too_big_for_a_row_is_refused(values: SqlValueStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlmod, "MAX_BODY", 4)
    with pytest.raises(StorageError, match="too big"):
        values.put("ab" * 32, BytesBlob("bytes", {}, b"12345"))


def tamper(store: Any, sql: str, *params: Any) -> None:
    """Change rows behind the store's back, as another program could."""
    with store._db.transaction() as cur:
        cur.execute(store._db.sql(sql), params)


def test_value_garbage_row_is_a_corrupt_entry(values: SqlValueStore) -> None:
    blob = encode_value(b"x")
    digest = blob_digest(blob)
    values.put(digest, blob)
    tamper(values, "UPDATE fr_blobs SET meta = ?", "{not json")
    with pytest.raises(CorruptEntryError, match="meta is not JSON"):
        values.get(digest)
    tamper(values, "UPDATE fr_blobs SET meta = ?, size = 99", "{}")
    with pytest.raises(CorruptEntryError, match="1 body bytes, expected 99"):
        values.get(digest)


# -- calls ----------------------------------------------------------------------


def test_call_round_trip_keeps_every_field(calls: SqlCallStore) -> None:
    meta = {
        "host": "node1",
        "blob": b"\x00\x01",
        "pair": (1, (2, "3")),
        "nested": {"$bytes": "not a tag", "list": [1.5, None, True]},
        "big": 2**70,
    }
    rec = record("ab" * 32, version="2", metadata=meta, arg_digests={"x": "1" * 64, "y": "2" * 64})
    calls.put(rec)
    got = calls.get(rec.key)
    assert got == rec
    assert type(got.metadata["pair"]) is tuple and type(got.metadata["blob"]) is bytes
    no_args = record("cd" * 32, arg_digests={})
    calls.put(no_args)
    assert calls.get(no_args.key) == no_args


def test_a_record_read_back_is_a_frozen_call_record_like_any_other(calls: SqlCallStore) -> None:
    # the store builds records without the dataclass's __init__ (it has
    # checked every field already); to a user they are the same
    rec = record("ab" * 32, metadata={"host": "node1"}, arg_digests={"x": "1" * 64})
    calls.put(rec)
    got = calls.get_many([rec.key])[0]
    assert got == rec and repr(got) == repr(rec) and type(got) is CallRecord
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.name = "other"  # type: ignore[misc]
    assert dataclasses.replace(got, name="other").name == "other" and got.name == rec.name
    assert loads_plain(dumps_plain(got)) == rec


def test_call_put_is_idempotent(calls: SqlCallStore) -> None:
    first = record("ab" * 32, metadata={"n": 1})
    calls.put(first)
    calls.put(first)
    calls.put(record("ab" * 32, metadata={"n": 2}))  # same key: the stored one stays
    assert list(calls.keys()) == [first.key]
    assert calls.get(first.key) == first


def test_call_missing_and_batches(calls: SqlCallStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlmod, "BATCH", 2)  # force several IN (...) chunks
    recs = [record(f"{i:02x}" * 32) for i in range(5)]
    for r in recs:
        calls.put(r)
    missing = "ee" * 32
    keys = [recs[3].key, missing, recs[0].key, recs[4].key, recs[0].key, recs[1].key, recs[2].key]
    assert calls.get_many(keys) == [recs[3], None, recs[0], recs[4], recs[0], recs[1], recs[2]]
    assert calls.contains_many(keys) == [True, False, True, True, True, True, True]
    with pytest.raises(KeyError):
        calls.get(missing)
    assert not calls.contains(missing)


def test_call_delete_removes_record_and_index_rows(calls: SqlCallStore) -> None:
    rec = saved_call(calls, "mod.f", {"x": 1})
    calls.delete(rec.key)
    calls.delete(rec.key)
    assert not calls.contains(rec.key)
    assert list(calls.query(arg_digests=rec.arg_digests)) == []


def test_call_garbage_row_is_a_corrupt_entry(calls: SqlCallStore) -> None:
    rec = record("ab" * 32)
    calls.put(rec)
    tamper(calls, "UPDATE fr_calls SET metadata = ?", "[1, 2")
    with pytest.raises(CorruptEntryError, match="metadata is not JSON"):
        calls.get(rec.key)
    tamper(calls, "UPDATE fr_calls SET metadata = ?", "[1, 2]")
    with pytest.raises(CorruptEntryError, match="expected a JSON object"):
        calls.get(rec.key)


def test_prefix_expansion(calls: SqlCallStore) -> None:
    for key in ("ab01" + "0" * 60, "ab02" + "0" * 60, "ac00" + "0" * 60, "f" * 64):
        calls.put(record(key))
    assert calls.keys_with_prefix("ab", 5) == ["ab01" + "0" * 60, "ab02" + "0" * 60]
    assert calls.keys_with_prefix("ab", 1) == ["ab01" + "0" * 60]
    assert calls.keys_with_prefix("ac") == ["ac00" + "0" * 60]
    assert calls.keys_with_prefix("f" * 64) == ["f" * 64]
    assert calls.keys_with_prefix("ad") == []
    assert calls.keys_with_prefix("zz") == []
    cache = Cache(SqlValueStore(calls.url), calls)
    assert cache.expand("AC") == "ac00" + "0" * 60
    with pytest.raises(AmbiguousDigestError):
        cache.expand("ab")
    with pytest.raises(KeyError):
        cache.expand("ad")


def test_sqlite_prefix_expansion_is_an_index_search(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SqlCallStore(f"sqlite:///{tmp_path}/calls.db")
    store.put(record("ab" * 32))
    seen: List[Any] = []
    real = store._db.rows
    monkeypatch.setattr(
        store._db, "rows", lambda sql, params=(): seen.append((sql, params)) or real(sql, params)
    )
    assert store.keys_with_prefix("aba") == ["ab" * 32]
    (statement, params) = seen[-1]
    plan = " ".join(str(r[-1]) for r in real("EXPLAIN QUERY PLAN " + statement, params))
    assert "SEARCH fr_calls USING" in plan and "SCAN" not in plan, plan
    store.close()


def test_query_by_name_arguments_and_metadata(calls: SqlCallStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlmod, "PAGE", 3)  # results span several pages
    recs = [saved_call(calls, "mod.f", {"x": i % 3, "y": i}, parity=i % 2) for i in range(10)]
    other = saved_call(calls, "mod.g", {"x": 0}, parity=0)
    x0 = recs[0].arg_digests["x"]

    def keys(**kw: Any) -> List[str]:
        return sorted(r.key for r in calls.query(**kw))

    assert keys() == sorted([r.key for r in recs] + [other.key])
    assert keys(name="mod.f") == sorted(r.key for r in recs)
    assert keys(name="mod.f", arg_digests={"x": x0}) == sorted(r.key for r in recs[0::3])
    assert keys(arg_digests={"x": x0}) == sorted([r.key for r in recs[0::3]] + [other.key])
    assert keys(arg_digests={"x": x0, "y": recs[3].arg_digests["y"]}) == [recs[3].key]
    assert keys(name="mod.f", metadata={"parity": 1}) == sorted(r.key for r in recs[1::2])
    assert keys(name="mod.f", arg_digests={"x": x0}, metadata={"parity": 0}) == sorted(
        r.key for r in (recs[0], recs[6])
    )
    assert keys(name="mod.h") == []
    assert keys(metadata={"missing": None}) == []
    assert keys(arg_digests={"z": x0}) == []


def test_cache_on_sql_saves_and_queries(url: str) -> None:
    cache = Cache(SqlValueStore(url), SqlCallStore(url))
    key = cache.save(Call("mod.f", {"x": 2}, result=np.arange(4), metadata={"host": "a"}))
    np.testing.assert_array_equal(cache.load_value(key), np.arange(4))
    assert [c.key for c in cache.query("mod.f", x=2)] == [key]
    assert list(cache.query("mod.f", x=2.0)) == []
    assert [c.key for c in cache.query(metadata={"host": "a"})] == [key]
    cache.close()
    # closed stores reopen on use
    assert cache.load(key).arguments == {"x": 2}
    cache.close()


def test_threads_share_one_store(url: str) -> None:
    store = SqlCallStore(url)
    errors: List[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(25):
                store.put(record(f"{t:02x}{i:02x}" + "0" * 60))
                assert store.contains(f"{t:02x}{i:02x}" + "0" * 60)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert not errors, errors
    assert len(list(store.keys())) == 150
    store.close()


def test_in_memory_sqlite_is_shared_by_threads() -> None:
    store = SqlCallStore("sqlite://")
    threads = [threading.Thread(target=store.put, args=(record(f"{i:02x}" * 32),)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert len(list(store.keys())) == 8


def test_sqlite_uses_wal_and_a_busy_timeout(tmp_path: Path) -> None:
    store = SqlCallStore(f"sqlite:///{tmp_path}/calls.db")
    assert store._db.first("PRAGMA journal_mode") == ("wal",)
    assert store._db.first("PRAGMA busy_timeout") == (60000,)
    assert store._db.first("PRAGMA synchronous") == (1,)  # NORMAL
    store.close()


def test_unreachable_server_is_a_storage_error_naming_it() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = SqlCallStore(f"postgresql://fleche:secret@127.0.0.1:{port}/nothing")
    with pytest.raises(
        StorageError, match=rf"sql calls store at .*:\*\*\*@127.0.0.1:{port}/nothing: creating tables"
    ):
        store.contains("ab" * 32)
    with pytest.raises(StorageError) as info:
        store.put(record("ab" * 32))
    assert "secret" not in str(info.value)


# -- config -----------------------------------------------------------------------


def test_config_relative_sqlite_path_resolves_against_base_dir(tmp_path: Path) -> None:
    base = tmp_path / "project"
    store = build_store("calls", {"type": "sql", "url": "sqlite:///db/nested/calls.db"}, base)
    assert isinstance(store, SqlCallStore)
    assert store.to_config() == {"type": "sql", "url": f"sqlite:///{base}/db/nested/calls.db"}
    store.put(record("ab" * 32))  # creates the parent directories
    assert (base / "db" / "nested" / "calls.db").is_file()
    store.close()
    values = SqlValueStore.from_config({"type": "sql", "url": "sqlite:///v.db", "echo": True}, base)
    assert values.to_config() == {"type": "sql", "url": f"sqlite:///{base}/v.db", "echo": True}


def test_config_expands_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    store = SqlCallStore.from_config({"type": "sql", "url": "sqlite:///~/c.db"})
    assert store.url == f"sqlite:///{tmp_path}/c.db"


def test_config_postgres_url_without_driver_uses_psycopg(pg_url: str) -> None:
    plain = pg_url.replace("postgresql+psycopg://", "postgresql://")
    store = SqlCallStore.from_config({"type": "sql", "url": plain})
    assert store.to_config() == {"type": "sql", "url": plain}  # as given
    assert store._db.url.drivername == "postgresql+psycopg"
    store.put(record("ab" * 32))
    assert store.contains("ab" * 32)
    store.close()


@pytest.mark.parametrize(
    "table, message",
    [
        ({"type": "sql"}, r"calls.type = 'sql' needs url = 'sqlite:///path/calls.db' or 'postgresql"),
        ({"type": "sql", "url": ""}, "got an empty string"),
        ({"type": "sql", "url": 5}, "'url' must be str, got int 5"),
        ({"type": "sql", "url": "sqlite://", "echo": "yes"}, "'echo' must be bool, got str"),
        ({"type": "sql", "url": "sqlite://", "path": "x"}, "unknown key 'path' for calls.type = 'sql'"),
        ({"type": "sql", "url": "mysql://u@h/db"}, "names backend 'mysql'; expected 'sqlite"),
        ({"type": "sql", "url": "not a url"}, "is not a database URL"),
    ],
)
def test_config_errors(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_store("calls", table)
    with pytest.raises(ConfigError, match=message.replace("calls.type", "values.type")):
        build_store("values", table)


def test_a_record_without_a_digest_scheme_reads_as_legacy(calls: SqlCallStore) -> None:
    from fleche_remote import call as callmod

    if "digest_scheme" not in CallRecord.__dataclass_fields__:
        pytest.skip("CallRecord has no digest_scheme field")
    rec = record("ab" * 32)
    calls.put(rec)
    assert calls.get(rec.key) == rec
    tamper(calls, "UPDATE fr_calls SET digest_scheme = NULL")  # as written before the field existed
    assert calls.get(rec.key).digest_scheme == callmod.LEGACY_DIGEST_SCHEME  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "kw",
    [
        {"name": "mod.f"},
        {"arg_digests": {"x": "1" * 64}},
        {"name": "mod.f", "arg_digests": {"x": "1" * 64, "y": "2" * 64}},
    ],
    ids=["name", "argument", "name-and-two-arguments"],
)
def test_sqlite_queries_are_index_searches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kw: dict[str, Any]
) -> None:
    """A query must not read the whole table: at a million calls that is seconds."""
    store = SqlCallStore(f"sqlite:///{tmp_path}/calls.db")
    store.put(record("ab" * 32, arg_digests={"x": "1" * 64, "y": "2" * 64}))
    seen: List[Any] = []
    real = store._db.rows
    monkeypatch.setattr(
        store._db, "rows", lambda sql, params=(): seen.append((sql, params)) or real(sql, params)
    )
    assert [r.key for r in store.query(**kw)] == ["ab" * 32]
    (statement, params) = seen[-1]
    plan = " | ".join(str(r[-1]) for r in real("EXPLAIN QUERY PLAN " + statement, params))
    assert "SCAN" not in plan and "TEMP B-TREE" not in plan, plan
    store.close()
