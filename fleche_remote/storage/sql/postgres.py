"""PostgreSQL: SQLAlchemy reaches the URL, psycopg 3 runs the statements.

SQLAlchemy turns the URL into psycopg connections and pools them. Each
thread checks one out on first use and keeps it (checking a connection
out costs a ping round trip, as ``pool_pre_ping`` asks, which would double
the cost of every lookup); it goes back to the pool when the thread ends
or the store is closed, and a connection that breaks is invalidated and
replaced, a read retried once on the new one. A fork child takes new
connections and never touches (nor closes) the parent's. The statements
run on the raw psycopg connection: a lookup is one ``execute`` of a fixed
string, which psycopg prepares on the server after a few uses, with no
SQLAlchemy compilation in between; a batch is one ``executemany``
(pipelined by psycopg) inside one transaction.

Connections are in autocommit mode, so a read is one round trip with no
BEGIN/COMMIT around it, and a write is an explicit transaction
(``conn.transaction()``). ``key = ANY(%s)`` with an array parameter keeps
the text of a batch lookup the same whatever the batch size, so it too is
prepared once.

Tables are created on first use under an advisory lock, so two processes
starting at once do not race on CREATE.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Type

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import SQLAlchemyError

from ...errors import StorageError
from .db import SCHEMA, TABLES, Database, migration, upgrade_error, warn_foreign

#: Arbitrary constant naming the advisory lock that serializes CREATE TABLE.
_DDL_LOCK_ID = 0x666C6563686531

_DDL = [
    s.format(
        key='TEXT COLLATE "C"',
        blob="BYTEA",
        int="BIGINT",
        real="DOUBLE PRECISION",
        without_rowid="",
        bytes_only_key="",
        bytes_only_digest="",
    )
    for s in SCHEMA
]


def _driver_errors() -> Tuple[Type[BaseException], ...]:
    import psycopg

    return (psycopg.Error, SQLAlchemyError)


def _broken_errors() -> Tuple[Type[BaseException], ...]:
    """What a connection that died raises (and is worth one retry of a read)."""
    import psycopg

    return (psycopg.OperationalError, psycopg.InterfaceError)


class _Held:
    """A pooled connection one thread keeps; back to the pool when dropped."""

    __slots__ = ("__weakref__", "conn", "cur", "fairy")

    def __init__(self, fairy: Any) -> None:
        self.fairy = fairy
        self.conn: Any = fairy.driver_connection
        # one cursor for the thread's reads: making one per statement (what
        # conn.execute does) cost as much client time as the round trip
        self.cur: Any = self.conn.cursor()

    def release(self, invalidate: bool = False) -> None:
        fairy, self.fairy = self.fairy, None
        if fairy is not None:
            try:
                if invalidate:
                    fairy.invalidate()
                fairy.close()
            except Exception:  # the pool or the socket is already gone
                pass

    def __del__(self) -> None:  # the thread that held it has ended
        self.release()


class _Local(threading.local):
    held: Optional[_Held] = None
    token: Optional[object] = None


#: Connections a fork child inherited: kept referenced, never closed there
#: (closing would send the server a goodbye on the parent's socket).
_INHERITED: List[Any] = []


class PostgresDatabase(Database):
    """A PostgreSQL database reached through a SQLAlchemy engine and its pool."""

    backend = "postgresql"

    def __init__(self, url: URL, what: str, shown: str, echo: bool = False) -> None:
        super().__init__(what, shown, echo)
        self.url = url
        self._lock = threading.Lock()
        self._engine: Optional[Engine] = None
        self._pid = os.getpid()
        self._errors = _driver_errors()
        self._broken = _broken_errors()
        self._local = _Local()
        self._token = object()
        self._held: weakref.WeakSet[_Held] = weakref.WeakSet()
        self._statements: Dict[str, str] = {}

    # -- connections ------------------------------------------------------------

    def _conn(self) -> _Held:
        local = self._local
        if local.token is self._token and self._pid == os.getpid():
            return local.held  # type: ignore[return-value]
        with self._lock:
            if self._pid != os.getpid():
                # a fork child must not touch the parent's sockets (SQLAlchemy docs)
                _INHERITED.extend([self._engine, *self._held, local.held])
                if self._engine is not None:
                    self._engine.dispose(close=False)
                self._engine, self._held, self._pid = None, weakref.WeakSet(), os.getpid()
                self._token = object()
            engine = self._get_engine()
            token = self._token
        try:
            held = _Held(engine.raw_connection())
        except self._errors as exc:
            raise self.error("connecting", exc) from exc
        with self._lock:
            self._held.add(held)
        local.held, local.token = held, token
        return held

    def _drop(self, held: _Held) -> None:
        """Invalidate a connection that failed; this thread takes a new one next time."""
        held.release(invalidate=True)
        if self._local.held is held:
            self._local.held = self._local.token = None

    def _get_engine(self) -> Engine:  # under self._lock
        if self._engine is None:
            engine = sa.create_engine(
                self.url,
                connect_args=self._read_only_options(),
                isolation_level="AUTOCOMMIT",
                pool_pre_ping=True,
                # each thread holds one; never make a thread wait for another's
                max_overflow=-1,
                # a connection goes back to the pool idle (we commit or roll
                # back ourselves): no ROLLBACK round trip per checkin
                pool_reset_on_return=None,
            )
            try:
                self._create_tables(engine)
            except BaseException:
                engine.dispose()
                raise
            self._engine = engine
        return self._engine

    def _read_only_options(self) -> Dict[str, Any]:
        """A read-only database's sessions refuse writes on the server's
        side too (``default_transaction_read_only``), beside the url's own
        ``options``, which a bare ``connect_args`` would replace."""
        if not self.read_only:
            return {}
        given = self.url.query.get("options")
        given = " ".join(given) if isinstance(given, tuple) else given
        return {"options": " ".join(filter(None, [given, "-c default_transaction_read_only=on"]))}

    def _check_tables(self, engine: Engine) -> None:
        """A read-only opener's look at the tables: it creates and renames
        none, and says so when they are missing or need renaming."""
        try:
            fairy = engine.raw_connection()
            try:
                conn = fairy.driver_connection
                assert conn is not None
                with conn.cursor() as cur:
                    cur.execute(
                        "SELECT table_name FROM information_schema.tables "
                        "WHERE table_schema = current_schema()"
                    )
                    have = sorted(r[0] for r in cur.fetchall())
            finally:
                fairy.close()
        except self._errors as exc:
            raise self.error("reading its tables", exc) from exc
        if migration(have):
            raise upgrade_error(self.what, self.shown, "this cache is read-only, so it was left as it is")
        if not set(TABLES) <= set(have):
            raise StorageError(
                f"{self.what} at {self.shown}: the database holds no fleche-remote tables "
                f"({', '.join(TABLES)}) in its current schema, and a read-only cache creates none. "
                f"Check the url, or save into it once from a cache that is not read-only"
            )
        warn_foreign(have, self.shown)

    def _create_tables(self, engine: Engine) -> None:
        if self.read_only:
            self._check_tables(engine)
            return
        for attempt in range(4):
            try:
                fairy = engine.raw_connection()
                try:
                    conn = fairy.driver_connection
                    assert conn is not None
                    with conn.transaction(), conn.cursor() as cur:
                        cur.execute("SELECT pg_advisory_xact_lock(%s)", (_DDL_LOCK_ID,))
                        # read under the lock: a concurrent opener's rename is seen
                        cur.execute(
                            "SELECT table_name FROM information_schema.tables "
                            "WHERE table_schema = current_schema()"
                        )
                        have = sorted(r[0] for r in cur.fetchall())
                        for statement in migration(have) + _DDL:
                            cur.execute(statement)
                finally:
                    fairy.close()
                warn_foreign(have, self.shown)
                return
            except self._errors as exc:
                # a server that still reports the CREATE race: the next try sees the tables
                if attempt == 3 or isinstance(exc, SQLAlchemyError):
                    raise self.error("creating tables", exc) from exc
                time.sleep(0.05 * (attempt + 1))

    # -- statements -------------------------------------------------------------

    def _read(self, sql: str, params: Sequence[Any], one: bool) -> Any:
        if self.echo:
            self.trace(sql, params)
        for attempt in (0, 1):
            held = self._conn()
            try:
                cur = held.cur.execute(sql, params)
                return cur.fetchone() if one else cur.fetchall()
            except self._broken as exc:
                # the server went away (restart, idle timeout): a read is
                # safe to repeat once on a fresh connection
                self._drop(held)
                if attempt:
                    raise self.error("reading", exc) from exc
            except self._errors as exc:
                raise self.error("reading", exc) from exc
        raise AssertionError("unreachable")

    def write_one(self, sql: str, params: Sequence[Any]) -> Optional[Tuple[Any, ...]]:
        """One statement that writes, in its own (implicit) transaction: one
        round trip, where BEGIN ... COMMIT would cost two more."""
        if self.echo:
            self.trace(sql, params)
        held = self._conn()
        try:
            return held.cur.execute(sql, params).fetchone()  # type: ignore[no-any-return]
        except self._errors as exc:
            if held.conn.closed or getattr(held.conn, "broken", False):
                self._drop(held)
            raise self.error("writing", exc) from exc

    def rows(self, sql: str, params: Sequence[Any] = ()) -> List[Tuple[Any, ...]]:
        return self._read(sql, params, one=False)  # type: ignore[no-any-return]

    def first(self, sql: str, params: Sequence[Any] = ()) -> Optional[Tuple[Any, ...]]:
        return self._read(sql, params, one=True)  # type: ignore[no-any-return]

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        held = self._conn()
        try:
            with held.conn.transaction(), held.conn.cursor() as cur:
                yield _Cursor(cur, self) if self.echo else cur
        except self._errors as exc:
            if held.conn.closed or getattr(held.conn, "broken", False):
                self._drop(held)
            raise self.error("writing", exc) from exc

    def sql(self, text: str) -> str:
        out = self._statements.get(text)
        if out is None:
            out = self._statements[text] = text.replace("?", "%s")
        return out

    def in_list(self, column: str, values: Sequence[Any]) -> Tuple[str, List[Any]]:
        return f"{column} = ANY(%s)", [list(values)]

    def insert_ignore(self, table: str, columns: Sequence[str]) -> str:
        marks = ", ".join(["%s"] * len(columns))
        return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks}) ON CONFLICT DO NOTHING"

    def close(self) -> None:
        with self._lock:
            self._token = object()  # every thread checks out afresh
            mine = self._pid == os.getpid()
            if mine:
                for held in list(self._held):
                    held.release()
            self._held = weakref.WeakSet()
            if self._engine is not None:
                self._engine.dispose(close=mine)
            self._engine = None


class _Cursor:
    """A cursor that logs what it runs (``echo = true``)."""

    def __init__(self, cur: Any, db: PostgresDatabase) -> None:
        self._cur = cur
        self._db = db

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        self._db.trace(sql, params)
        return self._cur.execute(sql, params)

    def executemany(self, sql: str, params: Any) -> Any:
        params = list(params)
        self._db.trace(sql, params)
        return self._cur.executemany(sql, params)
