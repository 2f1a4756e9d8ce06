"""Stores in a SQL database: SQLite (the default) or PostgreSQL.

SQLite (one file, nothing to run) suits the processes of one machine;
PostgreSQL suits many machines. Both run the same statements through the
small DB-API interface of :mod:`.db`: SQLite through the standard
library's ``sqlite3`` alone (:mod:`.sqlite`; no SQLAlchemy is imported for
a ``sqlite://`` url, so a server starts fast and needs nothing installed),
PostgreSQL through a SQLAlchemy engine and psycopg 3 (:mod:`.postgres`).
Which of the two a url names, and how it opens, is :mod:`.urls`.

Design rules:

* Every write is one transaction, and every insert leaves an existing
  key as it is (``INSERT OR IGNORE`` / ``ON CONFLICT DO NOTHING``): a call,
  its argument-index rows and its inline value appear together or not at
  all, and two processes saving the same call both succeed (the ``fleche``
  package lets "UNIQUE constraint failed" escape to its callers in exactly
  that race; we must not). A batch is one transaction, each table filled
  by one ``executemany``.
* Lookups by key are fixed statement strings on a raw cursor, so the
  driver's statement cache (SQLite) or server-side prepared statements
  (psycopg) apply, and nothing is compiled per call.
* The call store holds small values inline (:class:`InlineValues`), in the
  ``blobs`` table, written in the transaction of the record that refers to
  them; a ``values.type = "sql"`` store uses the same table.
* Iterators (``keys``, ``query``, ``digests``) page through the primary
  key (``WHERE key > last ORDER BY key LIMIT n``), so no connection or
  snapshot is held while a caller works on the results.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

from ...call import LEGACY_DIGEST_SCHEME, CallRecord, UnreadableRecord
from ...codec.values import Blob
from ...errors import CorruptEntryError, StorageError
from ..base import CallStore, InlineValues, ValueStore, record_matches
from ..claims import Claims, KeptClaims
from ..fs import DEFAULT_FS, FsPolicy
from .db import BATCH, BUSY_TIMEOUT_S, blob_range, same
from .quota import SqlQuota
from .rows import (
    BLOB_COLUMNS,
    CALL_COLUMNS,
    PG_PUT_ONE,
    READ_CALL,
    READ_ENTRY,
    blob_row,
    call_row,
    insert_rows,
    record_from_row,
    row_blob,
)
from .urls import open_database, resolve_url, sql_options

__all__ = ["BATCH", "BUSY_TIMEOUT_S", "MAX_BODY", "PAGE", "SqlCallStore", "SqlValueStore"]

#: Rows per page when iterating keys or query results.
PAGE = 1000

#: PostgreSQL's bytea (and SQLite's default SQLITE_MAX_LENGTH) stop at
#: 1 GB per value; refuse earlier with a message rather than a driver error.
MAX_BODY = 1_000_000_000

_HEX = frozenset("0123456789abcdef")

# -- keys ----------------------------------------------------------------------


def _check_key(key: str) -> str:
    if not isinstance(key, str) or _KEY.fullmatch(key) is None:
        raise KeyError(key)
    return key


#: A key as the stores take it: 1 to 64 lowercase hex digits (one match
#: is ~0.3 us, a set of the key's characters ~0.8).
_KEY = re.compile(r"[0-9a-f]{1,64}")


def _chunks(keys: Sequence[str], param: Callable[[str], Any]) -> Iterator[Sequence[Any]]:
    """``keys`` bound by ``param`` (a database's ``key_param``), in batches."""
    size = BATCH  # read at call time: tests shrink it to force several batches
    for start in range(0, len(keys), size):
        yield [param(k) for k in keys[start : start + size]]


class _SqlStore:
    """Construction, config and closing, shared by both SQL stores."""

    _kind = ""  # "values" or "calls": names the store in messages

    def __init__(self, url: str, echo: bool = False, fs: FsPolicy = DEFAULT_FS) -> None:
        where = f"{self._kind}.type = 'sql'"
        self.url, self.backend = resolve_url(url, None, where)
        self.echo = echo
        self.fs = fs
        self._db = open_database(self.url, f"sql {self._kind} store", echo, fs)
        db = self._db
        self._insert_blob = db.insert_ignore("fr_blobs", BLOB_COLUMNS)
        self._get_blob = db.sql("SELECT digest, kind, meta, size, body FROM fr_blobs WHERE digest = ?")
        self._has_blob = db.sql("SELECT 1 FROM fr_blobs WHERE digest = ?")

    @classmethod
    def from_config(cls, table: Dict[str, Any], base_dir: Optional[Path] = None) -> Any:
        return cls(**sql_options(table, base_dir, cls._kind))

    def to_config(self) -> Dict[str, Any]:
        cfg: Dict[str, Any] = {"type": "sql", "url": self.url}
        if self.echo:
            cfg["echo"] = True
        cfg.update(self.fs.to_config())
        return cfg

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._db.shown!r})"

    def close(self) -> None:
        """Close the connections (new ones open on the next use)."""
        self._db.close()

    def open_read_only(self) -> None:
        """Open the database as a reader only (see :class:`~.db.Database`):
        a read-only cache calls this, so that its first use neither creates
        nor migrates tables. Connections already open are closed; the next
        use opens read-only ones. Every user of this store reads only after."""
        if not self._db.read_only:
            self._db.read_only = True
            self._db.close()

    def _page(self, table: str, column: str) -> Iterator[str]:
        sql = self._db.sql(f"SELECT {column} FROM {table} WHERE {column} > ? ORDER BY {column} LIMIT ?")
        text = self._db.key_text
        last: object = ""  # below every key, text or bytes
        while True:
            page = [r[0] for r in self._db.rows(sql, (last, PAGE))]
            yield from map(text, page)
            if len(page) < PAGE:
                return
            last = page[-1]

    def _blobs(self, digests: Sequence[str]) -> List[Optional[Blob]]:
        if len(digests) == 1:  # the common case, as one fixed statement
            row = self._db.first(self._get_blob, (self._db.key_param(digests[0]),))
            return [None if row is None else row_blob(self, digests[0], *row[1:])]
        found: Dict[str, Blob] = {}
        text = self._db.key_text
        for chunk in _chunks(sorted(set(digests)), self._db.key_param):
            cond, params = self._db.in_list("digest", chunk)
            sql = self._db.sql(f"SELECT digest, kind, meta, size, body FROM fr_blobs WHERE {cond}")
            for row in self._db.rows(sql, params):
                digest = text(row[0])
                found[digest] = row_blob(self, digest, *row[1:])
        return [found.get(d) for d in digests]


# -- value store ----------------------------------------------------------------


class SqlValueStore(_SqlStore, ValueStore):
    """Result blobs as rows of the ``fr_blobs`` table.

    A body is read into memory whole on ``put`` and ``get``: databases
    take a bytea/BLOB as one parameter. Values are therefore limited to
    about 1 GB each (PostgreSQL's bytea limit); keep bigger results in a
    file or HDF5 value store, with calls in SQL if you like (small values
    then live in the call store's database anyway).

    Args:
        url: ``sqlite:///path/values.db`` (a relative path resolves against
            the current directory) or ``postgresql+psycopg://user@host/dbname``.
        echo: log every SQL statement (logger ``fleche_remote.storage.sql``).

    Raises:
        ConfigError: the url is not a SQLite or PostgreSQL URL.
    """

    type_name = "sql"
    _kind = "values"

    def put(self, digest: str, blob: Blob) -> None:
        _check_key(digest)
        if blob.size > MAX_BODY:
            raise StorageError(
                f"a value of {blob.size} bytes is too big for {self!r}: at most {MAX_BODY} bytes "
                f"fit in one row; use a file or hdf5 value store for large results"
            )
        # a plain read first: a duplicate costs no write lock, and its body is not read
        if self._db.first(self._has_blob, (self._db.key_param(digest),)) is not None:
            return
        row = blob_row(digest, blob, self._db.key_param)  # read before the write lock is taken
        with self._db.transaction() as cur:
            cur.execute(self._insert_blob, row)

    def get(self, digest: str) -> Blob:
        blob = self._blobs([digest])[0]
        if blob is None:
            raise KeyError(digest)
        return blob

    def contains(self, digest: str) -> bool:
        return self._db.first(self._has_blob, (self._db.key_param(digest),)) is not None

    def delete(self, digest: str) -> None:
        with self._db.transaction() as cur:
            cur.execute(self._db.sql("DELETE FROM fr_blobs WHERE digest = ?"), (self._db.key_param(digest),))

    def digests(self) -> Iterator[str]:
        return self._page("fr_blobs", "digest")


# -- call store -----------------------------------------------------------------


class _LastEntry(threading.local):
    """The inline value read with this thread's last record (see ``get_many``).

    Values are filed under their digest, so a value read a moment ago is
    the value now, whatever happened in between."""

    entry: Optional[Tuple[str, Sequence[Any]]] = None


class SqlCallStore(SqlQuota, _SqlStore, CallStore, InlineValues, KeptClaims):
    """Call records as rows of ``fr_calls``, indexed by name and argument
    digest, with small values inline in ``fr_blobs``.

    ``fr_call_args`` holds one row per (call, argument) with the argument's
    digest, indexed on (argument, digest), so ``query(name, x=...)`` is
    answered by the database; metadata filters run in Python on the rows
    it returns.

    Args:
        url: ``sqlite:///path/calls.db`` (a relative path resolves against
            the current directory) or ``postgresql+psycopg://user@host/dbname``.
        echo: log every SQL statement (logger ``fleche_remote.storage.sql``).

    Raises:
        ConfigError: the url is not a SQLite or PostgreSQL URL.
    """

    type_name = "sql"
    _kind = "calls"

    def __init__(self, url: str, echo: bool = False, fs: FsPolicy = DEFAULT_FS) -> None:
        super().__init__(url, echo, fs)
        self._last = _LastEntry()
        db = self._db
        self._insert_call = db.insert_ignore("fr_calls", CALL_COLUMNS)
        self._insert_arg = db.insert_ignore("fr_call_args", ("arg", "digest", "key"))
        self._has_call = db.sql("SELECT 1 FROM fr_calls WHERE key = ?")
        self._get_call = db.sql(f"SELECT {READ_CALL} FROM fr_calls c WHERE c.key = ?")
        self._get_entry = db.sql(
            f"SELECT {READ_ENTRY} FROM fr_calls c LEFT JOIN fr_blobs b ON b.digest = c.value WHERE c.key = ?"
        )

    # -- writing ------------------------------------------------------------------

    def put(self, record: CallRecord) -> None:
        self.put_entries([record], {})

    def put_many(self, records: Sequence[CallRecord]) -> None:
        self.put_entries(records, {})

    def put_entries(self, records: Sequence[CallRecord], blobs: Mapping[str, Blob]) -> None:
        """Records, their argument rows and their small values, in one transaction.

        A record already stored is left as it is, and so are its argument
        rows, and the value given with it is not written (it may differ:
        a re-run of a function that is not deterministic), so no unreferenced
        value is left behind. One record: its insert reports whether it was
        new. A batch: one lookup of the keys, inside the transaction.
        """
        for record in records:
            _check_key(record.key)
        if not records:
            return
        now = time.time()
        param = self._db.key_param
        rows = [call_row(r, now, param) for r in records]
        if len(records) == 1:
            if self._db.backend == "postgresql":
                self._put_one_postgres(records[0], rows[0], blobs)
            else:
                self._put_one(records[0], rows[0], blobs)
            return
        new: List[CallRecord] = []
        with self._db.transaction() as cur:
            seen: set[str] = set()
            text = self._db.key_text
            for chunk in _chunks(sorted({r.key for r in records}), param):
                cond, params = self._db.in_list("key", chunk)
                found = cur.execute(self._db.sql(f"SELECT key FROM fr_calls WHERE {cond}"), params)
                seen.update(text(k) for (k,) in found)
            fresh: List[Tuple[Any, ...]] = []
            for r, row in zip(records, rows):
                if r.key not in seen:
                    seen.add(r.key)
                    new.append(r)
                    fresh.append(row)
            if not new:
                return
            insert_rows(cur, self._insert_call, fresh)
            insert_rows(
                cur,
                self._insert_arg,
                [(a, param(d), param(r.key)) for r in new for a, d in r.arg_digests.items()],
            )
            wanted = {r.value for r in new}
            insert_rows(
                cur, self._insert_blob, [blob_row(d, b, param) for d, b in blobs.items() if d in wanted]
            )

    def _put_one(self, r: CallRecord, row: Tuple[Any, ...], blobs: Mapping[str, Blob]) -> None:
        """One save: its insert reports whether the record was new; the key
        and value digest are bound once (``row`` holds them)."""
        key = row[0]
        param = self._db.key_param
        blob = blobs.get(r.value)
        with self._db.transaction() as cur:
            if cur.execute(self._insert_call, row).rowcount == 0:
                return  # stored already: an empty commit, no page written
            digests = r.arg_digests
            if len(digests) == 1:
                ((arg, digest),) = digests.items()
                cur.execute(self._insert_arg, (arg, param(digest), key))
            elif digests:
                cur.executemany(self._insert_arg, [(a, param(d), key) for a, d in digests.items()])
            if blob is not None:
                cur.execute(self._insert_blob, blob_row(r.value, blob, param, row[6]))

    def _put_one_postgres(self, r: CallRecord, row: Tuple[Any, ...], blobs: Mapping[str, Blob]) -> None:
        """One save as one statement: each round trip to the server costs
        more than the work (BEGIN, three inserts and COMMIT would be five).
        The argument rows and the value are inserted only if the record
        was (``FROM c``), as in the general path."""
        blob = blobs.get(r.value)
        body: Tuple[Any, ...] = (
            blob_row(r.value, blob, self._db.key_param) if blob is not None else (None,) * 5
        )
        params = (*row, list(r.arg_digests), list(r.arg_digests.values()), *body, blob is not None)
        self._db.write_one(PG_PUT_ONE, params)  # type: ignore[attr-defined]

    def delete(self, key: str) -> None:
        sql, param = self._db.sql, self._db.key_param
        raw = param(key)
        with self._db.transaction() as cur:
            row = cur.execute(sql("SELECT arg_digests FROM fr_calls WHERE key = ?"), (raw,)).fetchone()
            if row is None:
                return
            try:
                digests = json.loads(row[0])
            except (TypeError, ValueError):
                digests = {}
            if isinstance(digests, dict) and digests:
                cur.executemany(
                    sql("DELETE FROM fr_call_args WHERE arg = ? AND digest = ? AND key = ?"),
                    [(a, param(d), raw) for a, d in digests.items()],
                )
            cur.execute(sql("DELETE FROM fr_calls WHERE key = ?"), (raw,))

    # -- reading --------------------------------------------------------------------

    def _record(self, row: Sequence[Any]) -> CallRecord:
        return record_from_row(self, row, self._db.key_text, LEGACY_DIGEST_SCHEME)

    def _record_or_unreadable(self, row: Sequence[Any]) -> Any:
        # a listing shows a bad row as such and goes on to the next
        try:
            return self._record(row)
        except CorruptEntryError as exc:
            return UnreadableRecord(str(self._db.key_text(row[0])), str(exc))

    def get(self, key: str) -> CallRecord:
        row = self._db.first(self._get_call, (self._db.key_param(key),))
        if row is None:
            raise KeyError(key)
        return self._record(row)

    def _select(self, keys: Sequence[str], columns: str, joined: bool = False) -> Iterator[Any]:
        """Rows for ``keys`` (deduplicated, in batches of :data:`BATCH`)."""
        join = " LEFT JOIN fr_blobs b ON b.digest = c.value" if joined else ""
        for chunk in _chunks(sorted(set(keys)), self._db.key_param):
            cond, params = self._db.in_list("c.key", chunk)
            yield from self._db.rows(
                self._db.sql(f"SELECT {columns} FROM fr_calls c{join} WHERE {cond}"), params
            )

    def get_many(self, keys: Iterable[str]) -> List[Optional[CallRecord]]:
        keys = [str(k) for k in keys]
        if len(keys) == 1:
            # with its inline value, kept for the get_blobs that usually follows
            # (``cache.load(key).result``): one statement instead of two
            row = self._db.first(self._get_entry, (self._db.key_param(keys[0]),))
            if row is None:
                return [None]
            record = self._record(row)
            self._last.entry = (record.value, row[10:14]) if row[10] is not None else None
            return [record]
        found = {r.key: r for r in map(self._record, self._select(keys, READ_CALL))}
        return [found.get(k) for k in keys]

    def _present(self, keys: Sequence[str]) -> List[str]:
        return [self._db.key_text(row[0]) for row in self._select(keys, "c.key")]

    def contains(self, key: str) -> bool:
        return self._db.first(self._has_call, (self._db.key_param(key),)) is not None

    def contains_many(self, keys: Iterable[str]) -> List[bool]:
        if type(keys) is list and len(keys) == 1:  # a server's contains: no set, no copy
            return [self.contains(str(keys[0]))]
        keys = [str(k) for k in keys]
        present = set(self._present(keys))
        return [k in present for k in keys]

    def keys(self) -> Iterator[str]:
        return self._page("fr_calls", "key")

    def keys_with_prefix(self, prefix: str, limit: int = 2) -> List[str]:
        if not prefix or not set(prefix) <= _HEX:
            return []
        # an index range scan, never a full scan: on bytes, from the prefix
        # to the next one (see db.blob_range); on text, "g" sorts after
        # every hex digit in every collation
        if self._db.key_param is same:
            params: Tuple[Any, ...] = (prefix, prefix + "g", limit)
        else:
            low, high = blob_range(prefix)
            if high is None:
                sql = self._db.sql("SELECT key FROM fr_calls WHERE key >= ? ORDER BY key LIMIT ?")
                return [self._db.key_text(r[0]) for r in self._db.rows(sql, (low, limit))]
            params = (low, high, limit)
        sql = self._db.sql("SELECT key FROM fr_calls WHERE key >= ? AND key < ? ORDER BY key LIMIT ?")
        return [self._db.key_text(r[0]) for r in self._db.rows(sql, params)]

    def refers_to(self, value_digests: Sequence[str]) -> List[bool]:
        # one paged scan: there is no index on calls.value (see db.SCHEMA)
        text, walk = self._db.key_text, self._db.walk_column
        wanted = set(value_digests)
        found: set[str] = set()
        sql = self._db.sql(f"SELECT {walk}, value FROM fr_calls WHERE {walk} > ? ORDER BY {walk} LIMIT ?")
        last = self._db.walk_start
        while wanted - found:
            page = self._db.rows(sql, (last, PAGE))
            found.update(d for d in (text(v) for _, v in page) if d in wanted)
            if len(page) < PAGE:
                break
            last = page[-1][0]
        return [d in found for d in value_digests]

    def query(
        self,
        name: Optional[str] = None,
        arg_digests: Optional[Mapping[str, str]] = None,
        metadata: Optional[Mapping[str, Any]] = None,
    ) -> Iterator[CallRecord]:
        args = list((arg_digests or {}).items())
        if args:
            # drive the search from the (arg, digest, key) index, in key
            # order; CROSS JOIN keeps SQLite's planner from starting at calls
            (arg, digest), args = args[0], args[1:]
            tables, order = "fr_call_args a CROSS JOIN fr_calls c", "a.key"
            where = ["a.arg = ?", "a.digest = ?", "a.key > ?", "c.key = a.key"]
            before: List[Any] = [arg, self._db.key_param(digest)]
        else:
            tables, order, where, before = "fr_calls c", "c.key", ["c.key > ?"], []
        after: List[Any] = []
        if name is not None:
            where.append("c.name = ?")
            after.append(name)
        for arg, digest in args:
            where.append(
                "EXISTS (SELECT 1 FROM fr_call_args x WHERE x.arg = ? AND x.digest = ? AND x.key = c.key)"
            )
            after += [arg, self._db.key_param(digest)]
        sql = self._db.sql(
            f"SELECT {READ_CALL} FROM {tables} WHERE {' AND '.join(where)} ORDER BY {order} LIMIT ?"
        )
        last: object = ""  # below every key, text or bytes
        while True:
            page = [self._record_or_unreadable(r) for r in self._db.rows(sql, [*before, last, *after, PAGE])]
            for record in page:
                if isinstance(record, UnreadableRecord) or record_matches(
                    record, name, arg_digests, metadata
                ):
                    yield record
            if len(page) < PAGE:
                return
            last = self._db.key_param(page[-1].key)

    # -- inline values ------------------------------------------------------------------

    def get_blobs(self, digests: Sequence[str]) -> List[Optional[Blob]]:
        last = self._last.entry
        if last is not None and len(digests) == 1 and last[0] == digests[0]:
            self._last.entry = None
            return [row_blob(self, last[0], *last[1])]
        return self._blobs(list(digests))

    def get_entries(self, keys: Sequence[str]) -> List[Optional[Tuple[CallRecord, Optional[Blob]]]]:
        keys = [str(k) for k in keys]
        if len(keys) == 1:
            row = self._db.first(self._get_entry, (self._db.key_param(keys[0]),))
            return [None if row is None else self._entry(row)]
        found = {}
        for row in self._select(keys, READ_ENTRY, joined=True):
            entry = self._entry(row)
            found[entry[0].key] = entry
        return [found.get(k) for k in keys]

    def get_rows(self, keys: Sequence[str]) -> List[Optional[Tuple[Any, ...]]]:
        """The rows :meth:`get_entries` reads, as stored and unchecked:
        ``READ_ENTRY``'s columns. For a reader that checks
        each with :func:`~.rows.record_from_row` and :func:`~.rows.row_blob`
        when it first needs it: a server passes them on to its client
        (remote/rows.py), which reads most listings' results only."""
        keys = [str(k) for k in keys]
        found: Dict[Any, Tuple[Any, ...]] = {}
        plain = self._db.backend == "sqlite"  # PostgreSQL's bytea comes as memoryview
        for row in self._select(keys, READ_ENTRY, joined=True):
            if not plain:
                row = tuple(bytes(v) if type(v) is memoryview else v for v in row)
            found[self._db.key_text(row[0])] = tuple(row)
        return [found.get(k) for k in keys]

    def _entry(self, row: Sequence[Any]) -> Tuple[CallRecord, Optional[Blob]]:
        record = record_from_row(self, row, self._db.key_text, LEGACY_DIGEST_SCHEME)
        if row[10] is None:  # no inline blob for this value
            return record, None
        return record, row_blob(self, record.value, *row[10:14])

    def blob_digests(self) -> Iterator[str]:
        return self._page("fr_blobs", "digest")

    def collect_blobs(self) -> int:
        # one statement in one transaction: a value and its record are
        # written together, so a concurrent save can never lose its value.
        # SQLite builds a temporary index of the subquery once for NOT IN;
        # PostgreSQL plans NOT EXISTS as one hashed anti-join.
        if self._db.backend == "sqlite":
            sql = "DELETE FROM fr_blobs WHERE digest NOT IN (SELECT value FROM fr_calls)"
        else:
            sql = (
                "DELETE FROM fr_blobs WHERE NOT EXISTS "
                "(SELECT 1 FROM fr_calls WHERE fr_calls.value = fr_blobs.digest)"
            )
        with self._db.transaction() as cur:
            return int(cur.execute(sql).rowcount)

    # -- claims: a table of their own (see storage/sql/claims.py) --------------

    def _make_keeper(self) -> Claims:
        from .claims import SqlClaims

        return SqlClaims(self._db)
