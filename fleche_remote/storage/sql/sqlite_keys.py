"""The tables of a SQLite database, and the one-time rewrite of an old
one's text keys as bytes (see :mod:`.sqlite`, "Keys are stored as the 32
bytes they spell"). :meth:`.sqlite.SqliteDatabase._create_tables` runs
the rewrite, under the write lock, for an opener that may write; a
read-only opener only asks :func:`text_key_tables` whether it would be
needed.
"""

from __future__ import annotations

import sqlite3
from typing import List, Set

from .db import KEY_COLUMNS, key_blob


def table_names(conn: sqlite3.Connection) -> Set[str]:
    """Every table in the database."""
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def text_key_tables(conn: sqlite3.Connection, have: Set[str]) -> List[str]:
    """Our tables whose key columns are declared TEXT: written before keys
    were stored as bytes."""
    old = []
    for table, columns in KEY_COLUMNS.items():
        if table in have:
            types = {r[1]: str(r[2]).upper() for r in conn.execute(f"PRAGMA table_info({table})")}
            if any(types.get(c) == "TEXT" for c in columns):
                old.append(table)
    return old


def keys_to_blobs(conn: sqlite3.Connection, tables: List[str]) -> None:
    """Rewrite ``tables`` with their keys as bytes, inside the caller's
    write transaction: each is renamed aside, made anew by the schema
    (which the caller runs between the two halves), copied over in key
    order by :func:`copy_keys` (hex order is byte order, so the new B-tree
    grows at its end) and dropped."""
    conn.create_function("fr_key", 1, key_blob, deterministic=True)
    for table in tables:
        if table == "fr_calls":  # its index would keep its name on the renamed table
            conn.execute("DROP INDEX IF EXISTS fr_ix_calls_name")
        conn.execute(f"ALTER TABLE {table} RENAME TO {table}_text")


def copy_keys(conn: sqlite3.Connection, tables: List[str]) -> int:
    """The second half of :func:`keys_to_blobs`; returns the calls copied."""
    calls = 0
    for table in tables:
        columns = [r[1] for r in conn.execute(f"PRAGMA table_info({table}_text)")]
        select = ", ".join(f"fr_key({c})" if c in KEY_COLUMNS[table] else c for c in columns)
        copied = conn.execute(
            f"INSERT INTO {table} ({', '.join(columns)}) SELECT {select} FROM {table}_text"
        ).rowcount
        if table == "fr_calls":
            calls = copied
        conn.execute(f"DROP TABLE {table}_text")
    return calls
