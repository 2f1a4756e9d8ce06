"""The small database interface the SQL stores are written against.

:mod:`.sql` holds the stores and their statements; it talks to the
database only through :class:`Database`, which :mod:`.sqlite` (the
standard library's ``sqlite3``, nothing else imported) and
:mod:`.postgres` (SQLAlchemy to reach the URL, psycopg 3 to run the
statements) implement. The interface is DB-API shaped on purpose: the hot
statements are plain strings run on a raw cursor, so a lookup costs one
``execute`` and no ORM or statement compilation.

Statements are written once, with ``?`` placeholders; a backend with
another paramstyle rewrites them (:meth:`Database.sql`), once per text.
"""

from __future__ import annotations

import logging
import warnings
from abc import ABC, abstractmethod
from typing import Any, Callable, ContextManager, List, Optional, Sequence, Tuple

from ...errors import StorageError

log = logging.getLogger("fleche_remote.storage.sql")

#: Keys per ``IN (...)`` query: below SQLite's 999-parameter limit (before
#: 3.32) and PostgreSQL's 65535, while 500 keys still amortise the query.
BATCH = 500

#: How long a writer waits for a lock before failing. Cluster jobs that all
#: finish at once can queue for a while; a minute of waiting beats losing a
#: result.
BUSY_TIMEOUT_S = 60.0

#: The tables, in a dialect-neutral form; each backend fills in its types.
#:
#: Every B-tree a save touches costs one dirty page written to the WAL at
#: commit (~30 us each on the machine of benchmarks/README.md), so there
#: are four, each earning its place: ``calls`` (by key; the argument
#: digests ride along as JSON, so a record is one row), its index on
#: ``name`` (``query(name)``), ``call_args`` keyed (arg, digest, key), which
#: is at once the table and the index ``query(x=...)`` searches, and
#: ``blobs``, values by digest: the small ones a cache keeps inline next to
#: their records, and every value of a ``values.type = "sql"`` store (the
#: same table when the two share a database, so a value is stored once).
#: There is deliberately no index on ``calls.value``: only garbage
#: collection asks "who refers to this value?", and one scan answers it.
#:
#: On SQLite, ``call_args``, ``claims`` and ``uses`` are WITHOUT ROWID
#: tables (one B-tree each, searched once): their rows are little more
#: than their key. ``calls`` and ``blobs`` are not. A WITHOUT ROWID table
#: is an index B-tree, whose interior pages hold whole rows: a call row
#: (~260 bytes: arguments, argument digests, metadata) left 16 per
#: interior page, six levels at a million calls, and ``contains`` there
#: took 1.5x its time at a thousand. As rowid tables, each key has an index
#: of its own (32-byte keys, ~90 per page), which alone answers
#: ``contains`` and ``expand``, and the rows append to a B-tree of
#: integers. Two B-trees more per save, both appending at their end: a
#: save measured the same (benchmarks/README.md, "Scale").
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS fr_calls ("
    " key {key} NOT NULL PRIMARY KEY{bytes_only_key},"
    " name TEXT NOT NULL, version TEXT, arguments {blob} NOT NULL,"
    " arg_digests TEXT NOT NULL, metadata TEXT NOT NULL, value {key} NOT NULL,"
    " value_kind TEXT NOT NULL, value_size {int} NOT NULL, digest_scheme TEXT,"
    " created {real} NOT NULL)",
    # (name, key): query(name) pages through one name's calls in key order
    "CREATE INDEX IF NOT EXISTS fr_ix_calls_name ON fr_calls (name, key)",
    "CREATE TABLE IF NOT EXISTS fr_call_args ("
    " arg TEXT NOT NULL, digest {key} NOT NULL, key {key} NOT NULL,"
    " PRIMARY KEY (arg, digest, key)){without_rowid}",
    "CREATE TABLE IF NOT EXISTS fr_blobs ("
    " digest {key} NOT NULL PRIMARY KEY{bytes_only_digest},"
    " kind TEXT NOT NULL, meta TEXT NOT NULL, size {int} NOT NULL,"
    " body {blob} NOT NULL)",
    # claims (see .claims): not in TABLES, so that a read-only share of a
    # database from before them opens; SqlClaims creates it there on first use
    "CREATE TABLE IF NOT EXISTS fr_claims ("
    " key {key} PRIMARY KEY, owner TEXT NOT NULL, host TEXT NOT NULL, pid {int} NOT NULL,"
    " expires {real} NOT NULL){without_rowid}",
    # last-used times for quotas (see .quota); not in TABLES, so that a
    # database made before it is opened as it was, and gets it on demand
    "CREATE TABLE IF NOT EXISTS fr_uses (key {key} PRIMARY KEY, used {real} NOT NULL){without_rowid}",
)
TABLES = ("fr_calls", "fr_call_args", "fr_blobs")

#: The columns of each table that hold keys or digests (``{key}`` above).
KEY_COLUMNS = {
    "fr_calls": ("key", "value"),
    "fr_call_args": ("digest", "key"),
    "fr_blobs": ("digest",),
    "fr_claims": ("key",),
    "fr_uses": ("key",),
}

#: The names our tables had before they took the ``fr_`` prefix. fleche
#: names its own table ``calls`` too, with other columns, so one SQLite
#: file used by both libraries broke each on the other's table. A
#: database with the old names is renamed when first opened (see
#: :func:`migration`).
LEGACY_TABLES = {"calls": "fr_calls", "call_args": "fr_call_args", "blobs": "fr_blobs"}
#: fleche's tables (``fleche.storage.sql``): found beside ours, they are
#: named in a :class:`ForeignTablesWarning`.
FLECHE_TABLES = ("calls", "arguments", "metadata")


# -- keys as bytes ---------------------------------------------------------------
#
# A key (a SHA-256 in hex) is 64 characters as text and 32 bytes as a blob.
# On SQLite every B-tree that holds keys (fr_calls, fr_call_args, fr_blobs,
# fr_claims, fr_uses) is then about twice as dense, which at a million
# entries is one level less to descend per lookup. The stores speak hex
# ``str`` everywhere; a backend's ``key_param`` / ``key_text`` translate at
# the boundary. Lowercase hex of even length becomes the bytes it spells;
# anything else (an odd-length key, or a string that is not a key at all)
# stays text, so the mapping is one-to-one and a text value never equals
# a blob one: a lookup of a malformed key simply finds nothing.
#
# PostgreSQL keeps text keys (``key_param`` and ``key_text`` are the
# identity there). There every operation is a round trip of 0.1-0.5 ms and
# the table's size does not show in it (benchmarks/README.md, "Scale"),
# while its databases are shared by many machines, whose older clients a
# rewrite of the keys would cut off mid-run. The statements are the same
# for both; only the parameters differ.


def key_blob(key: str) -> Any:
    """``key`` as the bytes it spells, or as itself when it is not lowercase
    hex of even length (see above)."""
    try:
        raw = bytes.fromhex(key)
    except (TypeError, ValueError):
        return key
    return raw if raw.hex() == key else key


def blob_key(value: Any) -> str:
    """Inverse of :func:`key_blob`: a key read back from a row."""
    return value.hex() if type(value) is bytes else value  # type: ignore[no-any-return]


def same(value: Any) -> Any:
    """The identity, for a backend that keeps keys as text."""
    return value


def blob_range(prefix: str) -> Tuple[bytes, Optional[bytes]]:
    """The blobs ``[low, high)`` of every key starting with the hex ``prefix``
    (``high`` is None when the prefix is all ``f``: no upper bound).

    An odd-length prefix covers a half byte: ``abc`` is ``ab c0`` up to
    ``ab d0``.
    """
    pad = "0" * (len(prefix) % 2)
    low = bytes.fromhex(prefix + pad)
    following = int(prefix, 16) + 1
    if following >> (4 * len(prefix)):
        return low, None
    return low, bytes.fromhex(f"{following:0{len(prefix)}x}" + pad)


class ForeignTablesWarning(UserWarning):
    """The database also holds the tables of a fleche (not fleche-remote) cache."""


def migration(have: Sequence[str]) -> List[str]:
    """Statements that rename a database's tables of the old names to ours.

    ``have`` is every table name in the database, read inside the write
    transaction (or under the lock) the statements will run in, so two
    processes opening an old database at once rename it once: the second
    finds the new names and gets no statements. The old tables are ours
    when all three are there (fleche has no ``call_args``); anything less
    is left alone.
    """
    present = set(have)
    if not set(LEGACY_TABLES) <= present or set(TABLES) & present:
        return []
    return ["DROP INDEX IF EXISTS ix_calls_name"] + [
        f"ALTER TABLE {old} RENAME TO {new}" for old, new in LEGACY_TABLES.items()
    ]


def warn_foreign(have: Sequence[str], shown: str) -> None:
    """Warn when a fleche cache's tables share this database (once ours are
    in place, so the old names are not mistaken for fleche's)."""
    if "calls" not in have or "call_args" in have:
        return
    from ...errors import user_stacklevel

    warnings.warn(
        f"the database at {shown} also holds a fleche cache (its table 'calls'); fleche-remote keeps "
        f"its own tables (fr_calls, ...) beside it and does not read it. To bring fleche's entries "
        f"over, run: fleche-remote import-fleche",
        ForeignTablesWarning,
        stacklevel=user_stacklevel(),
    )


def upgrade_error(what: str, shown: str, why: str) -> StorageError:
    """The refusal of an opener that may not bring an old database up to
    date (see :func:`migration` and the text keys of :mod:`.sqlite`): it
    names the database and says how to upgrade it, rather than reading it
    wrong or not at all. ``why`` says why this opener did not."""
    return StorageError(
        f"{what} at {shown}: an earlier fleche-remote wrote it (its tables without the fr_ prefix, "
        f"or keys stored as text), and {why}. Open it once from a process that may write the file "
        f"(for example, as its owner: fleche-remote ls, with a cache table for it that does not say "
        f"read_only = true), which migrates it in place"
    )


class Database(ABC):
    """One database, used from any thread and, after a fork, from the child.

    ``rows`` and ``first`` run one read statement in its own short
    transaction; ``transaction()`` yields a cursor inside one write
    transaction, committed when the block ends and rolled back if it
    raises. Driver errors come out as :class:`StorageError` naming the
    database (credentials hidden).

    A database opened ``read_only`` (the stores of a read-only cache, see
    :meth:`~.stores._SqlStore.open_read_only`) is never written by opening
    it: no table is created, an old one is not migrated (that is
    :func:`upgrade_error` instead), and the connections themselves refuse
    writes, so a colleague's results, or a database an older client
    shares, stay byte for byte as they were.
    """

    backend = ""

    #: Set before the first use (see above); connections open afterwards honour it.
    read_only = False

    #: How a hex key is bound as a parameter, and read back from a row
    #: (see :func:`key_blob`); a backend that keeps text keys leaves both.
    key_param: Callable[[str], Any] = staticmethod(same)
    key_text: Callable[[Any], str] = staticmethod(same)

    #: The column a walk over every row of ``fr_calls`` pages by, and a
    #: value below all of it. By key here; SQLite walks its rowid, which is
    #: the table's own order, so that a walk reads pages in sequence rather
    #: than one row per key-index entry (3x faster at a million calls).
    walk_column = "key"
    walk_start: Any = ""

    def __init__(self, what: str, shown: str, echo: bool) -> None:
        self.what = what
        self.shown = shown
        self.echo = echo

    @abstractmethod
    def rows(self, sql: str, params: Sequence[Any] = ()) -> List[Tuple[Any, ...]]:
        """All rows of one read statement."""

    @abstractmethod
    def first(self, sql: str, params: Sequence[Any] = ()) -> Optional[Tuple[Any, ...]]:
        """The first row of one read statement, or ``None``."""

    @abstractmethod
    def transaction(self) -> ContextManager[Any]:
        """A DB-API cursor inside one write transaction."""

    @abstractmethod
    def sql(self, text: str) -> str:
        """``text`` (with ``?`` placeholders) in this driver's paramstyle."""

    @abstractmethod
    def in_list(self, column: str, values: Sequence[Any]) -> Tuple[str, List[Any]]:
        """A condition ``column`` in ``values``, and its parameters."""

    @abstractmethod
    def insert_ignore(self, table: str, columns: Sequence[str]) -> str:
        """An INSERT of one row that leaves an existing key as it is."""

    @abstractmethod
    def close(self) -> None:
        """Close every connection (a later use opens new ones)."""

    def error(self, doing: str, exc: BaseException) -> StorageError:
        detail = getattr(exc, "orig", None) or exc
        return StorageError(f"{self.what} at {self.shown}: {doing} failed: {type(detail).__name__}: {detail}")

    def trace(self, sql: str, params: Any) -> None:
        """Log a statement when the store was made with ``echo = true``."""
        log.info("%s  %r", sql, params)
