"""SQLite through the standard library's ``sqlite3``: nothing else imported.

The server must start fast, and a server with nothing installed has only
the standard library, so this module imports no SQLAlchemy.

Connections. A ``sqlite3`` connection must not be used by two threads at
once, nor carried across ``fork``. Each thread gets a connection of its
own (``threading.local``), opened on first use and reused after; a fork
child opens new ones. The parent's connections are left unclosed in the
child on purpose: closing them there could run SQLite's last-connection
clean-up (a checkpoint, removing the WAL) under the parent's feet. An
in-memory database exists only inside its one connection, so that one is
shared by all threads, behind a lock.

Tuning, per connection, and why:

* ``journal_mode = WAL``: readers never block the writer, nor it them,
  across the processes of one machine (WAL coordinates through shared
  memory, which does not reach across the nodes of a network file system;
  use PostgreSQL there).
* ``synchronous = NORMAL``: in WAL mode a power cut may lose the last
  commits, never corrupt the file; ``FULL`` would fsync on every save.
* ``busy_timeout`` of :data:`BUSY_TIMEOUT_S`: a writer waits for another.
* ``mmap_size`` of :data:`MMAP_SIZE`: reads of a large database are
  memory reads instead of a ``pread`` per page.
* Write transactions start with ``BEGIN IMMEDIATE``. A deferred ``BEGIN``
  takes the write lock only at the first insert, and SQLite fails such an
  upgrade at once ("database is locked") instead of waiting, so under
  concurrent writers the lock must be taken up front, where the busy
  timeout applies. ``isolation_level=None`` stops ``sqlite3`` from
  issuing BEGINs of its own; reads run in autocommit, one statement each.

Keys are stored as the 32 bytes they spell, not 64 hex characters (see
:func:`.db.key_blob`): every B-tree that holds them is denser. A database
written before that, with text keys, is rewritten once, in one
transaction, by the first process that opens it and may write it (an INFO
line on logger ``fleche_remote.storage.sql`` says so); a process that may
not write it gets a :class:`StorageError` saying how to migrate it, never
wrong answers. So does a read-only cache, which leaves every file as it
found it: it creates no database and no table, renames and rewrites
nothing, does not switch the journal to WAL (that rewrites the header),
and its connections are ``query_only``.

Sharing (see :mod:`._fs`). The database file is created by this module,
mode 0666 under the umask plus the ``shared`` bits, before SQLite opens it:
SQLite itself would make it 0644 whatever the umask, and it gives the -wal
and -shm files the database's mode. A database on a network or parallel
file system is refused unless ``allow_network_fs`` says otherwise.

Reading another user's database. A WAL database can be read only where
its -wal and -shm exist or can be created; when its writers have all
closed (SQLite then deletes both) a colleague who may read the file but
not write its directory gets "attempt to write a readonly database". Such
a reader falls back to a *snapshot*: the file opened ``immutable``, which
is consistent as long as nothing writes it, so every read checks before
and after that the file is unchanged and no -wal has appeared (a writer
has started); otherwise it reopens, in the ordinary way if it now can.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar
from urllib.parse import quote, unquote

from ...errors import StorageError
from ..fs import DEFAULT_FS, FsPolicy, permission_error
from .db import (
    BUSY_TIMEOUT_S,
    SCHEMA,
    TABLES,
    Database,
    blob_key,
    key_blob,
    log,
    migration,
    upgrade_error,
    warn_foreign,
)
from .sqlite_keys import copy_keys, keys_to_blobs, table_names, text_key_tables

_T = TypeVar("_T")

#: What SQLite tells someone who can read a database but not create its
#: -wal and -shm beside it (see "Reading another user's database").
_READ_ONLY_SIGNS = ("readonly database", "unable to open database file")

#: What to use instead of SQLite on a network file system, for the refusal.
_NETWORK_FIX = (
    'Keep the calls in PostgreSQL (calls = { type = "sql", url = "postgresql+psycopg://..." }), '
    "or give each writer its own database on a local disk (a per-writer layout), or use file "
    'stores (template = "cloudpickle"), which are safe there.'
)

#: Bytes of the database file each connection maps into memory. Reads then
#: cost no system call per page; the mapping uses address space, and pages
#: only as the OS page cache would anyway. 256 MiB covers the hot part of a
#: cache of a million small results (SQLite maps at most the file's size).
MMAP_SIZE = 256 * 1024 * 1024

#: Page cache per connection, in KiB (a negative ``cache_size``): 16 MiB
#: holds the upper levels of every index of a million-entry cache.
CACHE_KIB = 16 * 1024

# WITHOUT ROWID (one B-tree per table, searched once) needs SQLite 3.8.2
_WITHOUT_ROWID = " WITHOUT ROWID" if sqlite3.sqlite_version_info >= (3, 8, 2) else ""
# A BLOB column takes text too (SQLite types values, not columns). The
# server code an older client ships (see remote/bootstrap.py) would write
# its keys as text into these tables and leave rows no reader finds; the
# check makes its save fail, whole, with "CHECK constraint failed" instead.
_DDL = [
    s.format(
        key="BLOB",
        blob="BLOB",
        int="INTEGER",
        real="REAL",
        without_rowid=_WITHOUT_ROWID,
        bytes_only_key=" CHECK (typeof(key) = 'blob')",
        bytes_only_digest=" CHECK (typeof(digest) = 'blob')",
    )
    for s in SCHEMA
]


#: Connections a fork child inherited: kept referenced, so that the child
#: never closes (and finalises) what the parent still uses.
_INHERITED: List[sqlite3.Connection] = []
_DATABASES: weakref.WeakSet[SqliteDatabase] = weakref.WeakSet()


class _Local(threading.local):
    conn: Optional[sqlite3.Connection] = None
    token: Optional[object] = None


class SqliteDatabase(Database):
    """One SQLite file (or an in-memory database) used from many threads.

    Args:
        target: the file path, a ``file:`` URI (with ``uri``), or ``""`` /
            ``":memory:"`` for a private in-memory database.
        uri: ``target`` is a ``file:`` URI.
        what, shown, echo: see :class:`~.db.Database`.
        fs: the ``shared`` and ``allow_network_fs`` options.

    Raises:
        ConfigError: the file is on a network or parallel file system and
            ``fs`` does not allow it.
    """

    backend = "sqlite"
    key_param = staticmethod(key_blob)
    key_text = staticmethod(blob_key)
    walk_column = "rowid"
    walk_start = -(2**63)

    def __init__(
        self, target: str, uri: bool, what: str, shown: str, echo: bool = False, fs: FsPolicy = DEFAULT_FS
    ) -> None:
        super().__init__(what, shown, echo)
        self.target = target
        self.uri = uri
        self.memory = target in ("", ":memory:")
        self.fs = fs.check()
        self.path = None if self.memory else _file_path(target, uri)
        if self.path is not None and not (uri and "immutable=1" in target):
            fs.check_local(self.path, f"the SQLite database of the {what}", _NETWORK_FIX)
        self._local = _Local()
        self._reset()
        _DATABASES.add(self)

    def _reset(self) -> None:
        """Forget every connection: at start, on close, and in a fork child."""
        self._lock = threading.Lock()
        self._serial = threading.RLock()  # only the shared in-memory connection needs it
        self._token = object()  # thread-local connections made under another token are stale
        self._pid = os.getpid()
        self._conns: List[sqlite3.Connection] = []
        self._schema_ready = False
        # snapshot connections (see the module docstring), by id: the file's stamp when opened
        self._snapshots: Dict[int, Tuple[Any, ...]] = {}

    def _forked(self) -> None:
        _INHERITED.extend(self._conns)
        self._reset()

    # -- connections ------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        local = self._local
        # a fork child gets a new token from the at-fork hook, so the token
        # alone tells a connection made in this process; where there is no
        # hook, the pid is compared (a syscall per statement: 1 of the 5 a
        # server makes per lookup)
        if local.token is self._token and (_FORK_HOOK or self._pid == os.getpid()):
            return local.conn  # type: ignore[return-value]
        return self._connect()

    def _connect(self) -> sqlite3.Connection:
        with self._lock:
            if self._pid != os.getpid():  # forked without the at-fork hook (should not happen)
                self._forked()
            if self.memory and self._conns:
                conn = self._conns[0]
            else:
                try:
                    conn = self._open()
                except sqlite3.Error as exc:
                    conn = self._open_snapshot(exc)
                self._conns.append(conn)
            if not self._schema_ready:
                try:
                    self._create_tables(conn)
                except BaseException:
                    # not kept open: a read-only opener's refusal leaves no
                    # -wal or -shm behind, and a retry opens afresh
                    if not self.memory:
                        self._conns.remove(conn)
                        self._snapshots.pop(id(conn), None)
                        conn.close()
                    raise
                self._schema_ready = True
            self._local.conn, self._local.token = conn, self._token
            return conn

    def _open(self) -> sqlite3.Connection:
        if self.read_only and self.path is not None:
            return self._open_read_only(self.path)
        if not self.memory and not self.uri:
            try:
                self.fs.create(self.target)
            except PermissionError:
                raise permission_error(self.target, f"the SQLite database of the {self.what}") from None
        conn = sqlite3.connect(
            self.target or ":memory:",
            timeout=BUSY_TIMEOUT_S,
            isolation_level=None,
            check_same_thread=False,  # we keep each to one thread; close() may run on another
            cached_statements=256,
            uri=self.uri,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            if not self.memory:
                _enter_wal(conn)
                conn.execute(f"PRAGMA mmap_size = {MMAP_SIZE}")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        except BaseException:
            conn.close()
            raise
        if self.path is not None:
            # SQLite copies the database's mode to these; a database made
            # before ``shared`` was set needs them widened too
            self.fs.fix_path(self.path + "-wal")
            self.fs.fix_path(self.path + "-shm")
        return conn

    def _open_read_only(self, path: str) -> sqlite3.Connection:
        """A connection of a read-only cache: it creates no file, leaves the
        journal mode as it is (switching to WAL rewrites the header), and
        refuses every write (``query_only``). It is an ordinary connection
        otherwise, so that a WAL database is read beside its writers, and
        the -wal and -shm it may have made are gone when the last closes."""
        try:
            os.stat(path)
        except FileNotFoundError:
            return self._empty((None,))
        except PermissionError:
            raise permission_error(path, f"the SQLite database of the {self.what}") from None
        stamp = self._stamp()
        # mode=rw: never create the file, should it vanish after the check
        target = self.target if self.uri else f"file:{quote(path)}?mode=rw"
        conn = sqlite3.connect(
            target,
            timeout=BUSY_TIMEOUT_S,
            isolation_level=None,
            check_same_thread=False,
            cached_statements=256,
            uri=True,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            conn.execute("PRAGMA query_only = ON")
            # the first read of the file: a reader that may not make its -wal
            # and -shm fails here, and reads a snapshot instead (see below)
            conn.execute("PRAGMA journal_mode").fetchone()
            conn.execute(f"PRAGMA mmap_size = {MMAP_SIZE}")
            conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
            have = table_names(conn)
        except BaseException:
            conn.close()
            raise
        if not set(TABLES) & have and not migration(sorted(have)):
            conn.close()  # none of our tables yet: an empty cache, until a writer makes them
            return self._empty(stamp)
        return conn

    def _empty(self, stamp: Tuple[Any, ...]) -> sqlite3.Connection:
        """An empty cache for a read-only opener of a file that does not
        exist yet, or holds none of our tables: a private in-memory database
        with them, read like a snapshot (see :meth:`_read`), so that the
        first change to the file (``stamp`` no longer matches) opens it."""
        conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        for statement in _DDL:
            conn.execute(statement)
        conn.execute("PRAGMA query_only = ON")
        self._snapshots[id(conn)] = stamp
        return conn

    # -- reading a database one may not write (see the module docstring) ----------------

    def _stamp(self) -> Tuple[Any, ...]:
        """What changes when anyone writes the file: its -wal's mtime and
        size (None without one: a commit in WAL mode writes only there),
        and the file's own mtime, size and inode; ``(None,)`` with no file."""
        assert self.path is not None
        try:
            st = os.stat(self.path)
        except OSError:
            return (None,)
        try:
            wal = os.stat(self.path + "-wal")
            log_stamp: Any = (wal.st_mtime_ns, wal.st_size)
        except OSError:
            log_stamp = None
        return (log_stamp, st.st_mtime_ns, st.st_size, st.st_ino)

    def _open_snapshot(self, cause: sqlite3.Error) -> sqlite3.Connection:
        """The immutable fallback for a reader that cannot create -wal/-shm,
        or a clear error (a PermissionError when the file is out of reach)."""
        path = self.path
        if path is None or not any(sign in str(cause) for sign in _READ_ONLY_SIGNS):
            raise self.error("opening", cause) from cause
        if not os.access(path, os.R_OK):
            raise permission_error(path, f"the SQLite database of the {self.what}") from cause
        stamp = self._stamp()
        if len(stamp) == 1 or stamp[0] is not None or os.access(os.path.dirname(path) or ".", os.W_OK):
            # a writer is active, or we could have created the files: not our case
            raise self.error("opening", cause) from cause
        try:
            conn = sqlite3.connect(
                f"file:{quote(path)}?mode=ro&immutable=1",
                uri=True,
                isolation_level=None,
                check_same_thread=False,
                cached_statements=256,
            )
            conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        except sqlite3.Error as exc:
            raise self.error("opening (read-only, immutable)", exc) from exc
        self._snapshots[id(conn)] = stamp
        return conn

    def _drop(self, conn: sqlite3.Connection) -> None:
        """Forget this thread's (snapshot) connection; the next use reopens,
        and looks at the file's tables again (a writer may have made or
        migrated them meanwhile)."""
        with self._lock:
            self._schema_ready = False
            self._snapshots.pop(id(conn), None)
            if conn in self._conns:
                self._conns.remove(conn)
            self._local.conn, self._local.token = None, None
        conn.close()

    def _read(self, run: Callable[[sqlite3.Connection], _T]) -> _T:
        """``run(conn)`` on a snapshot connection, retried until the file
        was unchanged from before it opened until after the read."""
        for _ in range(100):
            conn = self._connection()
            stamp = self._snapshots.get(id(conn))
            if stamp is None:  # an ordinary connection now: the writer left its files
                return run(conn)
            if self._stamp() == stamp:
                result = run(conn)
                if self._stamp() == stamp:
                    return result
            self._drop(conn)
            time.sleep(0.01)
        raise StorageError(
            f"{self.what} at {self.shown}: could not read it: it changed during every read of 100, "
            f"and this user may not create its -wal and -shm files to read it while it is written"
        )

    def _create_tables(self, conn: sqlite3.Connection) -> None:
        try:
            have = table_names(conn)
            if set(TABLES) <= have and not text_key_tables(conn, have):
                warn_foreign(sorted(have), self.shown)
                return  # no write lock needed (and none possible on a read-only share)
            # ours, with keys as text or under the names before the prefix
            rewriting = set(TABLES) <= have or bool(migration(sorted(have)))
        except sqlite3.Error as exc:
            raise self.error("reading its tables", exc) from exc
        if self.read_only and not self.memory:
            if rewriting:
                raise upgrade_error(self.what, self.shown, "this cache is read-only, so it was left as it is")
            raise StorageError(
                f"{self.what} at {self.shown}: the file holds no fleche-remote tables "
                f"({', '.join(TABLES)}), and a read-only cache creates none. Check the url, or save "
                f"into it once from a cache that is not read-only"
            )
        # under the write lock, so two processes never race to create, nor
        # to rename or rewrite an old database's tables: the second finds
        # the work done
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                have = table_names(conn)
                for statement in migration(sorted(have)):
                    conn.execute(statement)
                old = text_key_tables(conn, table_names(conn))
                keys_to_blobs(conn, old)
                for statement in _DDL:
                    conn.execute(statement)
                calls = copy_keys(conn, old)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            if rewriting:
                why = f"this process could not bring it up to date ({type(exc).__name__}: {exc})"
                raise upgrade_error(self.what, self.shown, why) from exc
            raise self.error("creating tables", exc) from exc
        if old:
            log.info(
                "%s at %s: migrated %d calls from text keys to 32-byte keys (tables %s), once",
                self.what, self.shown, calls, ", ".join(old),
            )  # fmt: skip
        warn_foreign(sorted(have), self.shown)

    # -- statements -----------------------------------------------------------------

    def rows(self, sql: str, params: Sequence[Any] = ()) -> List[Tuple[Any, ...]]:
        conn = self._connection()
        if self.echo:
            self.trace(sql, params)
        try:
            if self._snapshots:
                return self._read(lambda c: c.execute(sql, params).fetchall())
            if self.memory:
                with self._serial:
                    return conn.execute(sql, params).fetchall()
            return conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise self.error("reading", exc) from exc

    def first(self, sql: str, params: Sequence[Any] = ()) -> Optional[Tuple[Any, ...]]:
        conn = self._connection()
        if self.echo:
            self.trace(sql, params)
        try:
            if self._snapshots:
                return self._read(lambda c: c.execute(sql, params).fetchone())  # type: ignore[no-any-return]
            if self.memory:
                with self._serial:
                    return conn.execute(sql, params).fetchone()  # type: ignore[no-any-return]
            return conn.execute(sql, params).fetchone()  # type: ignore[no-any-return]
        except sqlite3.Error as exc:
            raise self.error("reading", exc) from exc

    def transaction(self) -> _Write:
        return _Write(self)

    def sql(self, text: str) -> str:
        return text

    def in_list(self, column: str, values: Sequence[Any]) -> Tuple[str, List[Any]]:
        return f"{column} IN ({','.join('?' * len(values))})", list(values)

    def insert_ignore(self, table: str, columns: Sequence[str]) -> str:
        marks = ", ".join("?" * len(columns))
        return f"INSERT OR IGNORE INTO {table} ({', '.join(columns)}) VALUES ({marks})"

    def close(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                for conn in self._conns:
                    conn.close()
            self._conns = []
            self._snapshots = {}
            self._token = object()


def _enter_wal(conn: sqlite3.Connection) -> None:
    """Switch the file to WAL mode, unless it is already (the usual case).

    Switching needs an exclusive lock, and SQLite reports "database is
    locked" at once, without its busy handler, when another process holds
    the file at that moment (two jobs creating one cache together), so
    this retries for up to :data:`BUSY_TIMEOUT_S`.
    """
    if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
        return
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    delay = 0.001
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


class _Write:
    """One write transaction (``with db.transaction() as cur``): ``BEGIN
    IMMEDIATE``, then ``COMMIT`` when the block ends, ``ROLLBACK`` if it
    raises; a driver error either way is a :class:`StorageError`. A class,
    not a generator under ``@contextmanager``, which cost ~1 us a save."""

    __slots__ = ("conn", "db", "lock")

    def __init__(self, db: SqliteDatabase) -> None:
        self.db = db
        self.lock: Any = db._serial if db.memory else None

    def __enter__(self) -> Any:
        db = self.db
        if self.lock is not None:
            self.lock.acquire()
        try:
            conn = self.conn = db._connection()
            conn.execute("BEGIN IMMEDIATE")
        except BaseException as exc:
            if self.lock is not None:
                self.lock.release()
            if isinstance(exc, sqlite3.Error):
                raise db.error("writing", exc) from exc
            raise
        return _Cursor(conn, db) if db.echo else conn

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        conn = self.conn
        try:
            if kind is None:
                try:
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            elif conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error as error:
            raise self.db.error("writing", error) from error
        finally:
            if self.lock is not None:
                self.lock.release()
        if isinstance(exc, sqlite3.Error):
            raise self.db.error("writing", exc) from exc


class _Cursor:
    """A connection that logs what it runs (``echo = true``)."""

    def __init__(self, conn: sqlite3.Connection, db: SqliteDatabase) -> None:
        self._conn = conn
        self._db = db

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        self._db.trace(sql, params)
        return self._conn.execute(sql, params)

    def executemany(self, sql: str, params: Any) -> sqlite3.Cursor:
        params = list(params)
        self._db.trace(sql, params)
        return self._conn.executemany(sql, params)


def _after_fork_in_child() -> None:
    for db in list(_DATABASES):
        db._forked()


#: Whether a fork child forgets its connections through the at-fork hook
#: (every POSIX Python; without ``register_at_fork`` there is no ``os.fork``).
_FORK_HOOK = hasattr(os, "register_at_fork")
if _FORK_HOOK:
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _file_path(target: str, uri: bool) -> Optional[str]:
    """The file a ``sqlite3.connect`` target names (a ``file:`` URI's path)."""
    if not uri:
        return os.path.abspath(target)
    path, _, query = (target[len("file:") :] if target.startswith("file:") else target).partition("?")
    path = unquote(path.partition("#")[0])
    if path == ":memory:" or "mode=memory" in query:
        return None
    if path.startswith("//"):  # file://host/path: SQLite accepts only an empty host or localhost
        path = "/" + path[2:].partition("/")[2]
    return os.path.abspath(path)


def connect_target(database: str, query: Dict[str, str]) -> Tuple[str, bool]:
    """``sqlite3.connect`` arguments for a URL's database part and query.

    ``sqlite:///file:path?mode=ro&uri=true`` is SQLAlchemy's spelling of
    a SQLite URI filename; it is kept, so that such urls mean the same here.
    """
    if query.pop("uri", "").lower() in ("true", "1") or database.startswith("file:"):
        if query:
            database += ("&" if "?" in database else "?") + "&".join(f"{k}={v}" for k, v in query.items())
        return database, True
    return database, False
