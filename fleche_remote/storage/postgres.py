"""PostgreSQL: SQLAlchemy reaches the URL, psycopg 3 runs the statements.

SQLAlchemy turns the URL into a psycopg connection and keeps a pool of
them (thread-safe, and rebuilt after a fork). The statements themselves
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
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Type

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import SQLAlchemyError

from ._sqldb import SCHEMA, Database

#: Arbitrary constant naming the advisory lock that serializes CREATE TABLE.
_DDL_LOCK_ID = 0x666C6563686531

_DDL = [
    s.format(key='TEXT COLLATE "C"', blob="BYTEA", int="BIGINT", real="DOUBLE PRECISION", without_rowid="")
    for s in SCHEMA
]


def _driver_errors() -> Tuple[Type[BaseException], ...]:
    import psycopg

    return (psycopg.Error, SQLAlchemyError)


class PostgresDatabase(Database):
    """A PostgreSQL database reached through a SQLAlchemy engine and its pool."""

    backend = "postgresql"

    def __init__(self, url: URL, what: str, shown: str, echo: bool = False) -> None:
        super().__init__(what, shown, echo)
        self.url = url
        self._lock = threading.Lock()
        self._engine: Optional[Engine] = None
        self._pid = 0
        self._errors = _driver_errors()
        self._statements: Dict[str, str] = {}

    def _get_engine(self) -> Engine:
        engine = self._engine
        if engine is not None and self._pid == os.getpid():
            return engine
        with self._lock:
            if self._engine is not None and self._pid != os.getpid():
                # a fork child must not touch the parent's sockets (SQLAlchemy docs)
                self._engine.dispose(close=False)
                self._engine = None
            if self._engine is None:
                engine = sa.create_engine(
                    self.url,
                    isolation_level="AUTOCOMMIT",
                    pool_pre_ping=True,
                    # a connection goes back to the pool idle (we commit or roll
                    # back ourselves): no ROLLBACK round trip per checkin
                    pool_reset_on_return=None,
                )
                try:
                    self._create_tables(engine)
                except BaseException:
                    engine.dispose()
                    raise
                self._engine, self._pid = engine, os.getpid()
            return self._engine

    def _create_tables(self, engine: Engine) -> None:
        for attempt in range(4):
            try:
                with self._raw(engine) as conn, conn.transaction(), conn.cursor() as cur:
                    cur.execute("SELECT pg_advisory_xact_lock(%s)", (_DDL_LOCK_ID,))
                    for statement in _DDL:
                        cur.execute(statement)
                return
            except self._errors as exc:
                # a server that still reports the CREATE race: the next try sees the tables
                if attempt == 3 or isinstance(exc, SQLAlchemyError):
                    raise self.error("creating tables", exc) from exc
                time.sleep(0.05 * (attempt + 1))

    @contextmanager
    def _raw(self, engine: Engine) -> Iterator[Any]:
        """A pooled psycopg connection, returned to the pool afterwards."""
        fairy = engine.raw_connection()
        conn: Any = fairy.driver_connection
        try:
            yield conn
        except BaseException:
            # a connection left in a failed transaction is no use to the next borrower
            try:
                if conn.info.transaction_status != 0:  # not IDLE
                    fairy.invalidate()
            except Exception:
                pass
            raise
        finally:
            fairy.close()

    # -- statements -------------------------------------------------------------

    def rows(self, sql: str, params: Sequence[Any] = ()) -> List[Tuple[Any, ...]]:
        if self.echo:
            self.trace(sql, params)
        try:
            with self._raw(self._get_engine()) as conn:
                return conn.execute(sql, params).fetchall()  # type: ignore[no-any-return]
        except self._errors as exc:
            raise self.error("reading", exc) from exc

    def first(self, sql: str, params: Sequence[Any] = ()) -> Optional[Tuple[Any, ...]]:
        if self.echo:
            self.trace(sql, params)
        try:
            with self._raw(self._get_engine()) as conn:
                return conn.execute(sql, params).fetchone()  # type: ignore[no-any-return]
        except self._errors as exc:
            raise self.error("reading", exc) from exc

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        try:
            with self._raw(self._get_engine()) as conn, conn.transaction(), conn.cursor() as cur:
                yield _Cursor(cur, self) if self.echo else cur
        except self._errors as exc:
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
            if self._engine is not None:
                self._engine.dispose(close=self._pid == os.getpid())
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
