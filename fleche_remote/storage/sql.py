"""Stores in a SQL database through SQLAlchemy Core: SQLite or PostgreSQL.

SQLite (the default: one file, nothing to run) suits the processes of
one machine: its WAL mode coordinates them through shared memory, which
does not reach across the nodes of a network file system. PostgreSQL
suits many machines. SQLAlchemy and the driver are imported here only,
when ``type = "sql"`` is used.

Design rules:

* Every write is one transaction, and every insert is ``INSERT ... ON
  CONFLICT DO NOTHING``: a call and its argument-index rows appear
  together or not at all, and two processes saving the same call both
  succeed (the ``fleche`` package lets "UNIQUE constraint failed" escape
  to its callers in exactly that race; we must not).
* SQLite runs in WAL mode (readers never block the writer) with a 60 s
  busy timeout, and write transactions start with ``BEGIN IMMEDIATE``.
  A deferred ``BEGIN`` would take the write lock only at the first
  insert, and SQLite fails such an upgrade at once ("database is
  locked") instead of waiting, so under concurrent writers the lock must
  be taken up front, where the busy timeout applies. This is the recipe
  of the SQLAlchemy pysqlite docs ("Serializable isolation / Savepoints /
  Transactional DDL"): switch off pysqlite's own BEGIN and emit ours.
* Reads are short transactions, and iterators (``keys``, ``query``) page
  through the primary key (``WHERE key > last ORDER BY key LIMIT n``) so
  no connection or snapshot is held while a caller works on the results.
* Tables are created on first use, serialized against other processes
  (SQLite: inside ``BEGIN IMMEDIATE``; PostgreSQL: under an advisory
  lock), with a retry for a server that still reports the race.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ContextManager, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from ..call import CallRecord
from ..errors import ConfigError, CorruptEntryError, StorageError
from ..values import Blob, BytesBlob
from ._config import check_keys, resolve_path, typed
from .base import CallStore, ValueStore, record_matches

#: Keys per ``IN (...)`` query: far below SQLite's 32766-parameter limit and
#: PostgreSQL's 65535, while 500 keys still amortise the round trip.
BATCH = 500

#: Rows per page when iterating keys or query results.
PAGE = 1000

#: How long a SQLite writer waits for the lock before failing. Cluster
#: jobs that all finish at once can queue for a while; a minute of waiting
#: beats losing a result.
BUSY_TIMEOUT_S = 60.0

#: PostgreSQL's bytea (and SQLite's default SQLITE_MAX_LENGTH) stop at
#: 1 GB per value; refuse earlier with a message rather than a driver error.
MAX_BODY = 1_000_000_000

#: Arbitrary constant naming the advisory lock that serializes CREATE TABLE.
_DDL_LOCK_ID = 0x666C6563686531

_HEX = frozenset("0123456789abcdef")

_EXAMPLE = "'sqlite:///path/calls.db' or 'postgresql+psycopg://user@host/dbname'"


# -- config and URLs ----------------------------------------------------------


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not key or len(key) > 64 or not set(key) <= _HEX:
        raise KeyError(key)
    return key


def _resolve_url(url: str, base_dir: Optional[Path], where: str) -> tuple[str, URL]:
    """The url to keep in config, and the URL to connect to.

    A relative SQLite path resolves against ``base_dir`` (else the current
    directory) and ``~`` expands, so the stored url is absolute and means
    the same file from anywhere. A PostgreSQL url without a driver gets
    psycopg 3, the driver we test.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise ConfigError(
            f"{where}: url {url!r} is not a database URL ({exc}); expected {_EXAMPLE}", key="url"
        )
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        db = parsed.database
        if db and db != ":memory:" and not db.startswith("file:"):
            parsed = parsed.set(database=str(resolve_path(db, base_dir)))
            return parsed.render_as_string(hide_password=False), parsed
        return url, parsed
    if backend in ("postgresql", "postgres"):
        if parsed.drivername in ("postgresql", "postgres"):
            parsed = parsed.set(drivername="postgresql+psycopg")
        return url, parsed
    raise ConfigError(f"{where}: url {url!r} names backend {backend!r}; expected {_EXAMPLE}", key="url")


def _options(table: Dict[str, Any], base_dir: Optional[Path], kind: str) -> Dict[str, Any]:
    where = f"{kind}.type = 'sql'"
    check_keys(table, ("url", "echo"), where)
    if "url" not in table:
        raise ConfigError(f"{where} needs url = {_EXAMPLE}; no url was given", key="url")
    url = typed(table, "url", str)
    if not url.strip():
        raise ConfigError(f"{where} needs url = {_EXAMPLE}; got an empty string", key="url")
    return {"url": _resolve_url(url, base_dir, where)[0], "echo": typed(table, "echo", bool, False)}


# -- metadata as JSON ----------------------------------------------------------
#
# Call metadata is plain data, which includes bytes and tuples; JSON has
# neither. They are tagged ({"$bytes": base64}, {"$tuple": [...]}), and a
# user dict that happens to look like a tag is wrapped in {"$dict": ...},
# so every plain value round-trips exactly and the column stays readable.

_TAGS = ("$bytes", "$tuple", "$dict")


def _to_json(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return {"$bytes": base64.b64encode(obj).decode("ascii")}
    if isinstance(obj, tuple):
        return {"$tuple": [_to_json(x) for x in obj]}
    if isinstance(obj, list):
        return [_to_json(x) for x in obj]
    if isinstance(obj, dict):
        out = {k: _to_json(v) for k, v in obj.items()}
        return {"$dict": out} if len(out) == 1 and next(iter(out)) in _TAGS else out
    return obj


def _from_json(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_from_json(x) for x in obj]
    if isinstance(obj, dict):
        if len(obj) == 1:
            ((tag, inner),) = obj.items()
            if tag == "$bytes":
                return base64.b64decode(inner)
            if tag == "$tuple":
                return tuple(_from_json(x) for x in inner)
            if tag == "$dict":
                return {k: _from_json(v) for k, v in inner.items()}
        return {k: _from_json(v) for k, v in obj.items()}
    return obj


def dumps_json(obj: Any) -> str:
    """Plain data as JSON text, bytes and tuples tagged (see above)."""
    return json.dumps(_to_json(obj), separators=(",", ":"))


def loads_json(data: str) -> Any:
    """Inverse of :func:`dumps_json`."""
    return _from_json(json.loads(data))


# -- the database -------------------------------------------------------------


class _Database:
    """One engine (and its pool) per store, created on first use.

    The engine is thread-safe. After a ``fork`` the child must not reuse
    the parent's pooled connections, so a change of pid builds a new
    engine (the parent's is dropped without closing its sockets, as the
    SQLAlchemy docs advise).
    """

    def __init__(self, url: str, echo: bool, metadata: sa.MetaData, what: str) -> None:
        self.url = url
        self.echo = echo
        self.metadata = metadata
        self.what = what
        self.connect_url = _resolve_url(url, None, what)[1]
        self.shown = self.connect_url.render_as_string(hide_password=True)
        self.backend = self.connect_url.get_backend_name()
        self.memory = self.backend == "sqlite" and self.connect_url.database in (None, "", ":memory:")
        self._lock = threading.Lock()
        # one in-memory SQLite connection is shared by all threads, so its
        # transactions must not interleave
        self._serial: ContextManager[Any] = threading.RLock() if self.memory else nullcontext()
        self._engine: Optional[Engine] = None
        self._writer: Optional[Engine] = None
        self._pid = 0

    def _engines(self) -> tuple[Engine, Engine]:
        with self._lock:
            if self._engine is not None and self._pid != os.getpid():
                self._engine.dispose(close=False)
                self._engine = None
            if self._engine is None:
                engine = self._create_engine()
                writer = engine.execution_options(fleche_write=True)
                try:
                    self._create_tables(writer)
                except BaseException:
                    engine.dispose()
                    raise
                self._engine, self._writer, self._pid = engine, writer, os.getpid()
            assert self._writer is not None
            return self._engine, self._writer

    def _create_engine(self) -> Engine:
        if self.backend != "sqlite":
            return sa.create_engine(self.connect_url, echo=self.echo, pool_pre_ping=True)
        if self.memory:
            engine = sa.create_engine(
                self.connect_url,
                echo=self.echo,
                poolclass=StaticPool,
                connect_args={"check_same_thread": False},
            )
        else:
            assert self.connect_url.database is not None
            Path(self.connect_url.database).parent.mkdir(parents=True, exist_ok=True)
            engine = sa.create_engine(
                self.connect_url, echo=self.echo, connect_args={"timeout": BUSY_TIMEOUT_S}
            )

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (below)
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            cur.execute("PRAGMA journal_mode = WAL")
            # NORMAL in WAL mode: a power cut may lose the last commits, never
            # corrupt the file; FULL would fsync on every saved call.
            cur.execute("PRAGMA synchronous = NORMAL")
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            immediate = conn.get_execution_options().get("fleche_write")
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine

    def _create_tables(self, writer: Engine) -> None:
        for attempt in range(4):
            try:
                with self._serial, writer.begin() as conn:
                    if self.backend == "postgresql":
                        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": _DDL_LOCK_ID})
                    self.metadata.create_all(conn, checkfirst=True)
                return
            except SQLAlchemyError as exc:
                # another process created the tables between our check and our
                # CREATE; the next attempt's check sees them
                if attempt == 3:
                    raise self._error("creating tables", exc)
                time.sleep(0.05 * (attempt + 1))

    def _error(self, doing: str, exc: SQLAlchemyError) -> StorageError:
        detail = getattr(exc, "orig", None) or exc
        return StorageError(f"{self.what} at {self.shown}: {doing} failed: {type(detail).__name__}: {detail}")

    @contextmanager
    def transaction(self, write: bool = False) -> Iterator[Connection]:
        """A connection inside one transaction, committed on success."""
        try:
            engine, writer = self._engines()
            with self._serial, (writer if write else engine).begin() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise self._error("writing" if write else "reading", exc) from exc

    @contextmanager
    def write_unless_present(
        self, column: Any, key: str, check_first: bool
    ) -> Iterator[Optional[Connection]]:
        """A write transaction on one pooled connection, or ``None`` if ``key`` is stored.

        With ``check_first`` a plain read decides first, on the same
        connection, so a duplicate costs no write lock (SQLite has one for
        the whole file) and a caller can skip reading a body it won't need.
        """
        try:
            engine, _ = self._engines()
            with self._serial, engine.connect() as conn:
                if check_first:
                    present = conn.execute(sa.select(column).where(column == key)).first() is not None
                    conn.commit()
                    if present:
                        yield None
                        return
                conn.execution_options(fleche_write=True)
                with conn.begin():
                    yield conn
        except SQLAlchemyError as exc:
            raise self._error("writing", exc) from exc

    def insert_ignore(self, table: sa.Table, keys: Sequence[str]) -> Any:
        """``INSERT ... ON CONFLICT (keys) DO NOTHING`` in this dialect."""
        dialect = sqlite_dialect if self.backend == "sqlite" else pg_dialect
        return dialect.insert(table).on_conflict_do_nothing(index_elements=list(keys))

    def dispose(self) -> None:
        with self._lock:
            if self._engine is not None:
                self._engine.dispose(close=self._pid == os.getpid())
            self._engine = self._writer = None


def _chunks(items: Sequence[str], size: int = BATCH) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _prefix_range(column: Any, prefix: str) -> Any:
    # keys are lowercase hex, and "g" sorts after every hex digit in every
    # collation, so this is an index range scan, never a full scan
    return (column >= prefix) & (column < prefix + "g")


class _SqlStore:
    """Construction, config and closing, shared by both SQL stores."""

    _kind = ""  # "values" or "calls": names the table in messages

    def __init__(self, url: str, echo: bool = False) -> None:
        self.url, _ = _resolve_url(url, None, f"{self._kind}.type = 'sql'")
        self.echo = echo
        md = sa.MetaData()
        self._define_tables(md)
        self._db = _Database(self.url, echo, md, f"sql {self._kind} store")

    def _define_tables(self, md: sa.MetaData) -> None:
        raise NotImplementedError

    @classmethod
    def from_config(cls, table: Dict[str, Any], base_dir: Optional[Path] = None) -> Any:
        return cls(**_options(table, base_dir, cls._kind))

    def to_config(self) -> Dict[str, Any]:
        cfg: Dict[str, Any] = {"type": "sql", "url": self.url}
        if self.echo:
            cfg["echo"] = True
        return cfg

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._db.shown!r})"

    def close(self) -> None:
        """Dispose of the engine and its pooled connections (reopened on use)."""
        self._db.dispose()


# -- value store ----------------------------------------------------------------


class SqlValueStore(_SqlStore, ValueStore):
    """Result blobs as rows of a ``values`` table.

    A body is read into memory whole on ``put`` and ``get``: databases
    take a bytea/BLOB as one parameter. Values are therefore limited to
    about 1 GB each (PostgreSQL's bytea limit); keep bigger results in a
    file or HDF5 value store, with calls in SQL if you like.

    Args:
        url: a SQLAlchemy URL, e.g. ``sqlite:///path/values.db`` (a
            relative path resolves against the current directory) or
            ``postgresql+psycopg://user@host/dbname``.
        echo: log every SQL statement (SQLAlchemy's ``echo``).

    Raises:
        ConfigError: the url is not a SQLite or PostgreSQL URL.
    """

    type_name = "sql"
    _kind = "values"

    def _define_tables(self, md: sa.MetaData) -> None:
        self._values = sa.Table(
            "values",
            md,
            sa.Column("digest", sa.String(64), primary_key=True),
            sa.Column("kind", sa.String(16), nullable=False),
            sa.Column("meta", sa.Text, nullable=False),
            sa.Column("size", sa.BigInteger, nullable=False),
            sa.Column("body", sa.LargeBinary, nullable=False),
        )

    def put(self, digest: str, blob: Blob) -> None:
        _check_key(digest)
        if blob.size > MAX_BODY:
            raise StorageError(
                f"a value of {blob.size} bytes is too big for {self!r}: at most {MAX_BODY} bytes "
                f"fit in one row; use a file or hdf5 value store for large results"
            )
        with self._db.write_unless_present(self._values.c.digest, digest, check_first=True) as conn:
            if conn is None:
                return
            body = blob.read_all()
            if len(body) != blob.size:
                raise CorruptEntryError(f"value {digest[:16]}: got {len(body)} bytes, expected {blob.size}")
            row = {
                "digest": digest,
                "kind": blob.kind,
                "meta": json.dumps(blob.meta, separators=(",", ":")),
                "size": blob.size,
                "body": body,
            }
            conn.execute(self._db.insert_ignore(self._values, ["digest"]), row)

    def get(self, digest: str) -> Blob:
        t = self._values
        with self._db.transaction() as conn:
            row = conn.execute(sa.select(t).where(t.c.digest == digest)).first()
        if row is None:
            raise KeyError(digest)
        try:
            meta = json.loads(row.meta)
        except (TypeError, ValueError) as exc:
            raise CorruptEntryError(f"value {digest[:16]} in {self!r}: meta is not JSON ({exc})") from None
        body = row.body
        if not isinstance(meta, dict) or not isinstance(body, (bytes, bytearray, memoryview)):
            raise CorruptEntryError(
                f"value {digest[:16]} in {self!r}: expected a JSON object and a binary body, "
                f"got {type(meta).__name__} and {type(body).__name__}"
            )
        if len(body) != row.size:
            raise CorruptEntryError(
                f"value {digest[:16]} in {self!r}: {len(body)} body bytes, expected {row.size}"
            )
        return BytesBlob(row.kind, meta, body)

    def contains(self, digest: str) -> bool:
        t = self._values
        with self._db.transaction() as conn:
            return conn.execute(sa.select(t.c.digest).where(t.c.digest == digest)).first() is not None

    def delete(self, digest: str) -> None:
        with self._db.transaction(write=True) as conn:
            conn.execute(sa.delete(self._values).where(self._values.c.digest == digest))

    def digests(self) -> Iterator[str]:
        return _page_keys(self._db, self._values.c.digest)


def _page_keys(db: _Database, column: Any) -> Iterator[str]:
    last = ""
    while True:
        with db.transaction() as conn:
            page = list(conn.scalars(sa.select(column).where(column > last).order_by(column).limit(PAGE)))
        yield from page
        if len(page) < PAGE:
            return
        last = page[-1]


# -- call store -----------------------------------------------------------------


class SqlCallStore(_SqlStore, CallStore):
    """Call records as rows of ``calls``, indexed by name and argument digest.

    ``call_args`` holds one row per (call, argument) with the argument's
    digest, indexed on (argument, digest), so ``query(name, x=...)`` is
    answered by the database; metadata filters run in Python on the rows
    it returns.

    Args:
        url: a SQLAlchemy URL, e.g. ``sqlite:///path/calls.db`` (a relative
            path resolves against the current directory) or
            ``postgresql+psycopg://user@host/dbname``.
        echo: log every SQL statement (SQLAlchemy's ``echo``).

    Raises:
        ConfigError: the url is not a SQLite or PostgreSQL URL.
    """

    type_name = "sql"
    _kind = "calls"

    def _define_tables(self, md: sa.MetaData) -> None:
        self._calls = sa.Table(
            "calls",
            md,
            sa.Column("key", sa.String(64), primary_key=True),
            sa.Column("name", sa.Text, nullable=False, index=True),
            sa.Column("version", sa.Text, nullable=True),
            sa.Column("arguments", sa.LargeBinary, nullable=False),
            sa.Column("metadata", sa.Text, nullable=False),
            sa.Column("value", sa.String(64), nullable=False, index=True),
            sa.Column("value_kind", sa.String(16), nullable=False),
            sa.Column("value_size", sa.BigInteger, nullable=False),
            sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        )
        self._args = sa.Table(
            "call_args",
            md,
            sa.Column("key", sa.String(64), primary_key=True),
            sa.Column("arg", sa.Text, primary_key=True),
            sa.Column("digest", sa.String(64), nullable=False),
            sa.Index("ix_call_args_arg_digest", "arg", "digest"),
        )

    def put(self, record: CallRecord) -> None:
        key = _check_key(record.key)
        row = {
            "key": key,
            "name": record.name,
            "version": record.version,
            "arguments": bytes(record.arguments),
            "metadata": dumps_json(record.metadata),
            "value": record.value,
            "value_kind": record.value_kind,
            "value_size": record.value_size,
            "created": datetime.now(timezone.utc),
        }
        args = [{"key": key, "arg": a, "digest": d} for a, d in record.arg_digests.items()]
        # SQLite: check first, as re-saves and back-fills are common and the
        # write lock is global; PostgreSQL: the conflict-ignoring insert is as
        # cheap as the check and locks one row only
        check = self._db.backend == "sqlite"
        with self._db.write_unless_present(self._calls.c.key, key, check_first=check) as conn:
            if conn is None:
                return
            conn.execute(self._db.insert_ignore(self._calls, ["key"]), row)
            if args:
                conn.execute(self._db.insert_ignore(self._args, ["key", "arg"]), args)

    def get(self, key: str) -> CallRecord:
        record = self.get_many([key])[0]
        if record is None:
            raise KeyError(key)
        return record

    def get_many(self, keys: Iterable[str]) -> List[Optional[CallRecord]]:
        keys = [str(k) for k in keys]
        found: Dict[str, CallRecord] = {}
        for chunk in _chunks(sorted(set(keys))):
            with self._db.transaction() as conn:
                found.update((r.key, r) for r in self._fetch(conn, self._calls.c.key.in_(chunk)))
        return [found.get(k) for k in keys]

    def _fetch(self, conn: Connection, where: Any, limit: Optional[int] = None) -> List[CallRecord]:
        """Records for rows of ``calls`` matching ``where``, in key order."""
        c, a = self._calls, self._args
        stmt = sa.select(c).where(where).order_by(c.c.key)
        if limit is not None:
            stmt = stmt.limit(limit)
        rows = conn.execute(stmt).all()
        digests: Dict[str, Dict[str, str]] = {r.key: {} for r in rows}
        for chunk in _chunks(list(digests)):
            for key, arg, digest in conn.execute(
                sa.select(a.c.key, a.c.arg, a.c.digest).where(a.c.key.in_(chunk))
            ):
                digests[key][arg] = digest
        return [self._record(r, digests[r.key]) for r in rows]

    def _record(self, row: Any, arg_digests: Dict[str, str]) -> CallRecord:
        try:
            metadata = loads_json(row.metadata)
        except (TypeError, ValueError) as exc:
            raise CorruptEntryError(
                f"call {row.key[:16]} in {self!r}: metadata is not JSON ({exc})"
            ) from None
        if not isinstance(metadata, dict) or not isinstance(row.arguments, (bytes, bytearray, memoryview)):
            raise CorruptEntryError(
                f"call {row.key[:16]} in {self!r}: expected a JSON object and binary arguments, "
                f"got {type(metadata).__name__} and {type(row.arguments).__name__}"
            )
        return CallRecord(
            key=row.key,
            name=row.name,
            version=row.version,
            arguments=bytes(row.arguments),
            arg_digests=arg_digests,
            metadata=metadata,
            value=row.value,
            value_kind=row.value_kind,
            value_size=int(row.value_size),
        )

    def contains(self, key: str) -> bool:
        return self.contains_many([key])[0]

    def contains_many(self, keys: Iterable[str]) -> List[bool]:
        keys = [str(k) for k in keys]
        present: set[str] = set()
        col = self._calls.c.key
        for chunk in _chunks(sorted(set(keys))):
            with self._db.transaction() as conn:
                present.update(conn.scalars(sa.select(col).where(col.in_(chunk))))
        return [k in present for k in keys]

    def delete(self, key: str) -> None:
        with self._db.transaction(write=True) as conn:
            conn.execute(sa.delete(self._args).where(self._args.c.key == key))
            conn.execute(sa.delete(self._calls).where(self._calls.c.key == key))

    def keys(self) -> Iterator[str]:
        return _page_keys(self._db, self._calls.c.key)

    def keys_with_prefix(self, prefix: str, limit: int = 2) -> List[str]:
        if not prefix or not set(prefix) <= _HEX:
            return []
        col = self._calls.c.key
        stmt = sa.select(col).where(_prefix_range(col, prefix)).order_by(col).limit(limit)
        with self._db.transaction() as conn:
            return list(conn.scalars(stmt))

    def query(
        self,
        name: Optional[str] = None,
        arg_digests: Optional[Mapping[str, str]] = None,
        metadata: Optional[Mapping[str, Any]] = None,
    ) -> Iterator[CallRecord]:
        c, a = self._calls, self._args
        where = c.c.key > ""
        if name is not None:
            where = where & (c.c.name == name)
        for arg, digest in (arg_digests or {}).items():
            where = where & c.c.key.in_(sa.select(a.c.key).where((a.c.arg == arg) & (a.c.digest == digest)))
        last = ""
        while True:
            with self._db.transaction() as conn:
                page = self._fetch(conn, where & (c.c.key > last), PAGE)
            for record in page:
                if record_matches(record, name, arg_digests, metadata):
                    yield record
            if len(page) < PAGE:
                return
            last = page[-1].key
