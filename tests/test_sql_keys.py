"""Keys stored as bytes in SQLite, and the databases written before that.

``tests/data/sql_text_keys.db`` was written by fleche-remote when keys were
64-character text (``tests/data/make_sql_text_keys.py`` shows how): 43
calls, their values inline, argument rows, a live claim and two use times.
Every one of them must read back the same after the one-time rewrite, and a
process that may not rewrite the file must be told how to, not misled.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import threading
from pathlib import Path
from typing import Any, List, Tuple

import pytest

from fleche_remote.caches import Cache
from fleche_remote.call import Call
from fleche_remote.errors import StorageError
from fleche_remote.storage.claims import Holder
from fleche_remote.storage.sql.stores import SqlCallStore, SqlValueStore

FIXTURE = Path(__file__).parent / "data" / "sql_text_keys.db"
KEY_TABLES = {
    "fr_calls": ("key", "value"),
    "fr_call_args": ("digest", "key"),
    "fr_blobs": ("digest",),
    "fr_claims": ("key",),
    "fr_uses": ("key",),
}


def expected() -> List[Tuple[Call, Any]]:
    """The calls the fixture holds, made again (their keys do not depend on
    the code that made them), each with its result."""
    calls = [
        Call("old.f", {"i": i, "tag": "x" * (i % 3)}, [float(i)] * (i % 7), metadata={"n": i})
        for i in range(40)
    ]
    calls += [
        Call("old.big", {"n": 1}, b"z" * 5000),
        Call("old.same", {"a": 1}, 7),
        Call("old.same", {"a": 2}, 7),
    ]
    return [(c, c.result) for c in calls]


def old_copy(tmp_path: Path) -> Path:
    path = tmp_path / "calls.db"
    shutil.copyfile(FIXTURE, path)
    conn = sqlite3.connect(path)  # in WAL mode, as fleche-remote leaves its databases
    conn.execute("PRAGMA journal_mode = WAL")
    conn.close()
    return path


def open_cache(url: str) -> Cache:
    return Cache(SqlValueStore(url), SqlCallStore(url))


def storage_classes(path: Path) -> List[Tuple[str, str, str, str]]:
    """(table, column, declared type, storage class of its values) for every key column."""
    conn = sqlite3.connect(path)
    try:
        out = []
        for table, columns in KEY_TABLES.items():
            declared = {r[1]: r[2] for r in conn.execute(f"PRAGMA table_info({table})")}
            for column in columns:
                kinds = {r[0] for r in conn.execute(f"SELECT DISTINCT typeof({column}) FROM {table}")}
                out.append((table, column, declared[column], ",".join(sorted(kinds))))
        return out
    finally:
        conn.close()


def migrations(caplog: pytest.LogCaptureFixture) -> List[str]:
    return [r.getMessage() for r in caplog.records if "from text keys" in r.getMessage()]


def test_a_text_keyed_database_is_rewritten_once_and_every_entry_survives(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = old_copy(tmp_path)
    assert {kind for *_, kind in storage_classes(path)} == {"text"}
    caplog.set_level(logging.INFO, logger="fleche_remote.storage.sql")
    url = f"sqlite:///{path}"
    cache = open_cache(url)
    try:
        entries = expected()
        keys = [str(call.key()) for call, _ in entries]
        for key, (call, result) in zip(keys, entries):
            loaded = cache.load(key)
            assert (loaded.name, loaded.arguments, loaded.metadata, loaded.result) == (
                call.name, call.arguments, call.metadata or {}, result,
            )  # fmt: skip
        assert sorted(cache.calls.keys()) == sorted(keys)
        # the argument rows: found by the database, not by a scan
        assert [c.key for c in cache.query("old.f", i=7)] == [keys[7]]
        assert cache.expand(keys[5][:7]) == keys[5]
        # the use times and the claim came along
        calls = cache.calls
        assert isinstance(calls, SqlCallStore)
        assert calls.last_used() == {keys[0]: 2e9, keys[1]: 2e9}
        keeper = calls._make_keeper()
        assert keeper.claimed([keys[2], keys[3]]) == [True, False]
        assert keeper.claim([keys[2]], Holder("owner-2", "host", 2), 60.0)[0] is not None  # still held
        # one value, two records: evicting one keeps the value for the other
        cache.evict(keys[41])
        assert cache.load_value(keys[42]) == 7
        cache.save(Call("new.g", {"x": 1}, "after"))
        assert cache.load_value(Call("new.g", {"x": 1}).key()) == "after"
    finally:
        cache.close()
    assert len(migrations(caplog)) == 1, caplog.text
    assert "migrated 43 calls" in migrations(caplog)[0]
    for table, column, declared, kind in storage_classes(path):
        assert (declared, kind) == ("BLOB", "blob"), (table, column)
    caplog.clear()
    again = open_cache(url)
    try:
        assert again.load_value(keys[10]) == [10.0, 10.0, 10.0]
    finally:
        again.close()
    assert migrations(caplog) == []  # once only


def test_concurrent_openers_of_an_old_database_rewrite_it_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = old_copy(tmp_path)
    caplog.set_level(logging.INFO, logger="fleche_remote.storage.sql")
    key = str(expected()[40][0].key())
    found: List[object] = []
    start = threading.Barrier(4)

    def open_and_load() -> None:
        start.wait(timeout=60)
        cache = open_cache(f"sqlite:///{path}")
        try:
            found.append(cache.load_value(key))
        except Exception as exc:  # reported below, with the others' results
            found.append(exc)
        finally:
            cache.close()

    threads = [threading.Thread(target=open_and_load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert found == [b"z" * 5000] * 4
    assert len(migrations(caplog)) == 1, caplog.text


def test_a_read_only_opener_of_an_old_database_is_told_how_to_migrate_it(tmp_path: Path) -> None:
    path = old_copy(tmp_path)
    key = str(expected()[3][0].key())
    read_only = f"sqlite:///file:{path}?mode=ro&uri=true"
    with pytest.raises(StorageError) as err:
        SqlCallStore(read_only).contains(key)
    message = str(err.value)
    assert "keys stored as text" in message and "fleche-remote ls" in message and str(path) in message, (
        message
    )
    assert {kind for *_, kind in storage_classes(path)} == {"text"}  # untouched
    writer = open_cache(f"sqlite:///{path}")
    assert writer.contains(key)  # its first use rewrites it
    writer.close()
    reader = open_cache(read_only)
    try:
        assert reader.load_value(key) == [3.0, 3.0, 3.0]
    finally:
        reader.close()


KEYS = ["00" * 32, "0f" + "1" * 62, "10" + "0" * 62, "ab" + "c" * 62, "abd" + "0" * 61, "fe" * 32, "f" * 64]


@pytest.mark.parametrize(
    "prefix", ["0", "00", "0f", "1", "a", "ab", "abc", "abd", "abd0", "f", "fe", "ff", "fff", "e"]
)
def test_a_prefix_finds_exactly_the_keys_it_starts(tmp_path: Path, prefix: str) -> None:
    cache = open_cache(f"sqlite:///{tmp_path / 'calls.db'}")
    calls = cache.calls
    try:
        for i, key in enumerate(KEYS):
            # records under chosen keys, as a store written by another tool would hold
            record = Call("p.f", {"i": i}, i)
            cache.save(record)
            stored = calls.get(str(record.key()))
            calls.put(stored.__class__(**{**stored.__dict__, "key": key}))
        every = list(calls.keys())  # a scan of the whole table, to compare with
        assert set(KEYS) <= set(every)
        assert calls.keys_with_prefix(prefix, 20) == sorted(k for k in every if k.startswith(prefix))
    finally:
        cache.close()


def test_a_key_that_is_not_lowercase_hex_finds_nothing(tmp_path: Path) -> None:
    cache = open_cache(f"sqlite:///{tmp_path / 'calls.db'}")
    try:
        key = str(cache.save(Call("p.f", {"x": 1}, 1)))
        assert cache.contains(key)
        assert not cache.contains(key.upper())
        assert not cache.contains(key[:-1])
        assert cache.calls.contains_many([key, key.upper(), "zz", key]) == [True, False, False, True]
    finally:
        cache.close()


def test_a_text_key_written_by_older_code_is_refused_not_hidden(tmp_path: Path) -> None:
    # an older client's shipped server, on a database that newer code has
    # rewritten, would write text keys no reader of bytes ever finds
    path = old_copy(tmp_path)
    entry, _ = expected()[0]
    cache = open_cache(f"sqlite:///{path}")
    try:
        assert cache.contains(str(entry.key()))  # rewritten to byte keys on first use
    finally:
        cache.close()
    text_key = str(entry.key()).replace(str(entry.key())[:2], "ff", 1)
    conn = sqlite3.connect(path)
    try:
        for sql, params in [
            (
                "INSERT INTO fr_blobs (digest, kind, meta, size, body) VALUES (?, 'pickle', '{}', 1, x'00')",
                (text_key,),
            ),
            (
                "INSERT INTO fr_calls (key, name, arguments, arg_digests, metadata, value, value_kind,"
                " value_size, created) VALUES (?, 'old.f', x'00', '{}', '{}', ?, 'pickle', 1, 0)",
                (text_key, bytes(32)),
            ),
        ]:
            with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed"):
                conn.execute(sql, params)
        assert conn.execute("SELECT count(*) FROM fr_calls WHERE typeof(key) != 'blob'").fetchone() == (0,)
    finally:
        conn.close()
