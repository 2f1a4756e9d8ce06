"""A read-only cache leaves its SQL database as it found it.

Someone who says ``read_only`` may be reading a colleague's results, or a
database an older client still uses: opening it must not migrate it (the
text keys of ``tests/data/sql_text_keys.db``, the table names before the
``fr_`` prefix), create a table, nor switch its journal to WAL. Where the
old form cannot be read as it is, the reader is told how to upgrade it;
once a writer has, the reader reads. Real SQLite files and a real
PostgreSQL server throughout.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any, Iterator, List, Tuple

import pytest

from fleche_remote.caches import Cache
from fleche_remote.call import Call
from fleche_remote.config import cache_from_config
from fleche_remote.errors import Rejected, StorageError
from fleche_remote.storage.sql.stores import SqlCallStore, SqlValueStore

FIXTURE = Path(__file__).parent / "data" / "sql_text_keys.db"
#: A call the fixture holds (see tests/test_sql_keys.py), and its result.
OLD_CALL = Call("old.f", {"i": 3, "tag": "x" * 0}, metadata={"n": 3})
OLD_RESULT = [3.0] * 3


def cache_at(url: str, read_only: bool = False, **limits: Any) -> Cache:
    return Cache(SqlValueStore(url), SqlCallStore(url), read_only=read_only, **limits)


def state(path: Path) -> Tuple[str, int, int, List[str]]:
    """What a user would compare: the file's bytes, its mtime and size, and
    the files beside it (a -wal or -shm left behind, a journal)."""
    st = path.stat()
    beside = sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name))
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mtime_ns, st.st_size, beside


def tables(path: Path) -> List[str]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return sorted(r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
    finally:
        conn.close()


def text_keyed(path: Path) -> Path:
    """The fixture, in WAL mode as fleche-remote leaves its databases."""
    shutil.copyfile(FIXTURE, path)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.close()
    return path


def old_named(path: Path) -> str:
    """A database under the table names before the fr_ prefix (as
    tests/test_first_hour.py makes one); returns the key of its one call."""
    writer = cache_at(f"sqlite:///{path}")
    key = str(writer.save(Call("m.f", {"x": 1}, 42)))
    writer.close()
    conn = sqlite3.connect(path)
    conn.executescript(
        "DROP INDEX fr_ix_calls_name;"
        "ALTER TABLE fr_calls RENAME TO calls; ALTER TABLE fr_call_args RENAME TO call_args;"
        "ALTER TABLE fr_blobs RENAME TO blobs; CREATE INDEX ix_calls_name ON calls (name);"
        "DROP TABLE IF EXISTS fr_claims; DROP TABLE IF EXISTS fr_uses;"
    )
    conn.close()
    return key


def refused(cache: Any, key: str) -> str:
    with pytest.raises(StorageError) as err:
        cache.contains(key)
    return str(err.value)


def test_a_read_only_cache_leaves_a_text_keyed_database_as_it_is_and_says_how_to_upgrade(
    tmp_path: Path,
) -> None:
    path = text_keyed(tmp_path / "calls.db")
    key = str(OLD_CALL.key())
    before = state(path)
    reader = cache_at(f"sqlite:///{path}", read_only=True)
    try:
        message = refused(reader, key)
        with pytest.raises(StorageError):  # and again: no half-done open is kept
            reader.load_value(key)
    finally:
        reader.close()
    assert "keys stored as text" in message and "read-only" in message, message
    assert str(path) in message and "fleche-remote ls" in message and "read_only = true" in message, message
    assert state(path) == before  # same bytes and mtime, no -wal or -shm left behind
    writer = cache_at(f"sqlite:///{path}")
    try:
        assert writer.load_value(key) == OLD_RESULT  # the writer's first use migrates it
    finally:
        writer.close()
    migrated = state(path)
    assert migrated[0] != before[0]
    reader = cache_at(f"sqlite:///{path}", read_only=True)
    try:
        assert reader.load_value(key) == OLD_RESULT
        assert [c.key for c in reader.query("old.f", i=3)] == [key]
        assert reader.expand(key[:8]) == key
    finally:
        reader.close()
    assert state(path) == migrated


def test_a_read_only_cache_does_not_rename_the_tables_of_an_old_database(tmp_path: Path) -> None:
    path = tmp_path / "calls.db"
    key = old_named(path)
    before = state(path)
    reader = cache_at(f"sqlite:///{path}", read_only=True)
    try:
        message = refused(reader, key)
    finally:
        reader.close()
    assert "without the fr_ prefix" in message and str(path) in message and "fleche-remote ls" in message
    assert state(path) == before
    assert tables(path) == ["blobs", "call_args", "calls"]
    writer = cache_at(f"sqlite:///{path}")
    try:
        assert writer.load_value(key) == 42
    finally:
        writer.close()
    reader = cache_at(f"sqlite:///{path}", read_only=True)
    try:
        assert reader.load_value(key) == 42
    finally:
        reader.close()


def test_read_only_in_fleche_toml_leaves_an_old_database_as_it_is(tmp_path: Path) -> None:
    path = text_keyed(tmp_path / "calls.db")
    key = str(OLD_CALL.key())
    before = state(path)
    table = {"template": "sql", "root": str(tmp_path), "read_only": True}
    reader = cache_from_config(table)
    try:
        message = refused(reader, key)
    finally:
        reader.close()
    assert "keys stored as text" in message and str(path) in message, message
    assert state(path) == before
    writer = cache_from_config({"template": "sql", "root": str(tmp_path)})
    try:
        assert writer.load_value(key) == OLD_RESULT
    finally:
        writer.close()
    reader = cache_from_config(table)
    try:
        assert reader.load_value(key) == OLD_RESULT
    finally:
        reader.close()


@pytest.fixture
def current_without_new_tables(tmp_path: Path) -> Iterator[Tuple[Path, str]]:
    """A current database made before fr_claims and fr_uses, in rollback
    journal mode (as another tool, or a copy, may leave it)."""
    path = tmp_path / "calls.db"
    writer = cache_at(f"sqlite:///{path}")
    key = str(writer.save(Call("m.f", {"x": 1}, 42)))
    writer.close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode = DELETE")
    conn.executescript("DROP TABLE fr_claims; DROP TABLE fr_uses;")
    conn.close()
    yield path, key


def test_reading_a_current_database_writes_nothing_and_creates_no_table(
    current_without_new_tables: Tuple[Path, str],
) -> None:
    path, key = current_without_new_tables
    before = state(path)
    reader = cache_at(f"sqlite:///{path}", read_only=True, max_calls=10)
    try:
        assert reader.load_value(key) == 42
        assert reader.contains_many([key, "0" * 64]) == [True, False]
        assert [c.key for c in reader.query("m.f", x=1)] == [key]
        assert reader.expand(key[:6]) == key
        assert reader.claim_keeper() is None
        calls = reader.calls
        assert isinstance(calls, SqlCallStore)
        assert calls.last_used() == {}
        assert calls._make_keeper().claimed([key]) == [False]
        with pytest.raises(Rejected):
            reader.save(Call("m.f", {"x": 2}, 43))
        # the store itself refuses too: its connections are read-only
        with pytest.raises(StorageError, match="readonly"):
            calls.touch({key: 1.0})
    finally:
        reader.close()
    assert state(path) == before
    assert tables(path) == ["fr_blobs", "fr_call_args", "fr_calls"]
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)  # not switched to WAL
    finally:
        conn.close()


@pytest.mark.parametrize("before", ["missing", "empty file"])
def test_a_read_only_cache_of_no_database_yet_is_empty_and_creates_nothing(
    tmp_path: Path, before: str
) -> None:
    path = tmp_path / "calls.db"
    if before == "empty file":
        path.touch()
    url = f"sqlite:///{path}"
    reader = cache_at(url, read_only=True)
    try:
        assert not reader.contains("ab" * 32)
        assert list(reader.query()) == []
        assert sorted(os.listdir(tmp_path)) == ([] if before == "missing" else ["calls.db"])
        if before == "empty file":
            assert path.stat().st_size == 0
        # a writer makes it meanwhile: the reader, still open, sees what it saves
        writer = cache_at(url)
        try:
            key = str(writer.save(Call("m.f", {"x": 1}, 42)))
            assert reader.load_value(key) == 42
            assert [c.key for c in reader.query("m.f")] == [key]
            second = str(writer.save(Call("m.f", {"x": 2}, 43)))
            assert reader.load_value(second) == 43
        finally:
            writer.close()
    finally:
        reader.close()


# -- PostgreSQL: no keys to migrate there, but the old table names -------------------


def _pg_tables(url: str) -> List[str]:
    import sqlalchemy as sa

    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
            )
            return sorted(r[0] for r in rows)
    finally:
        engine.dispose()


def test_postgres_read_only_does_not_rename_old_tables_nor_create_new_ones(postgres_url: str) -> None:
    writer = cache_at(postgres_url)
    key = str(writer.save(Call("m.f", {"x": 1}, 42)))
    writer.close()
    import sqlalchemy as sa

    engine = sa.create_engine(postgres_url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.begin() as conn:
        for statement in (
            "DROP INDEX fr_ix_calls_name",
            "ALTER TABLE fr_calls RENAME TO calls",
            "ALTER TABLE fr_call_args RENAME TO call_args",
            "ALTER TABLE fr_blobs RENAME TO blobs",
            "DROP TABLE fr_claims",
            "DROP TABLE fr_uses",
        ):
            conn.execute(sa.text(statement))
    engine.dispose()
    old = ["blobs", "call_args", "calls"]
    assert _pg_tables(postgres_url) == old
    reader = cache_at(postgres_url, read_only=True)
    try:
        message = refused(reader, key)
    finally:
        reader.close()
    assert "without the fr_ prefix" in message and "read-only" in message, message
    assert _pg_tables(postgres_url) == old
    writer = cache_at(postgres_url)
    try:
        assert writer.load_value(key) == 42
    finally:
        writer.close()
    current = _pg_tables(postgres_url)
    reader = cache_at(postgres_url, read_only=True)
    try:
        assert reader.load_value(key) == 42
        calls = reader.calls
        assert isinstance(calls, SqlCallStore)
        with pytest.raises(StorageError, match="read-only transaction"):
            calls.touch({key: 1.0})  # the server refuses the session's writes too
    finally:
        reader.close()
    assert _pg_tables(postgres_url) == current
