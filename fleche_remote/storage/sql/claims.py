"""Claims in a SQL table of their own (see :mod:`..claims` for what they are).

One row per claimed key: ``fr_claims(key, owner, host, pid, expires)``. Taking
claims is one upsert per key, run as one ``executemany`` in one
transaction, whose ``WHERE`` overwrites a row only when it has expired or
is already the claimer's::

    INSERT INTO fr_claims VALUES (...) ON CONFLICT (key) DO UPDATE SET ...
    WHERE fr_claims.expires < :now OR fr_claims.owner = excluded.owner

so two processes can never both take a live key (SQLite serialises the
write transactions of a WAL database; PostgreSQL locks the conflicting
row), followed by one read of who holds each key now, in the same
transaction. Needs SQLite 3.24 (2018) or PostgreSQL 9.5.

The table is created with the others (:data:`.db.SCHEMA`); a SQLite
database written by an earlier version gains it when a claim is first
taken, and a read-only share, which takes no claims, never needs it.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from ..claims import Claims, Holder
from .db import BATCH, Database

#: The table as a SQLite database made before claims gets it (keys as
#: bytes, see :func:`.db.key_blob`); PostgreSQL has it from :data:`.db.SCHEMA`.
CLAIMS_TABLE = (
    "CREATE TABLE IF NOT EXISTS fr_claims ("
    " key BLOB PRIMARY KEY, owner TEXT NOT NULL, host TEXT NOT NULL, pid BIGINT NOT NULL,"
    " expires DOUBLE PRECISION NOT NULL)"
)

#: Whether a table exists, per backend (a read-only opener creates none).
_HAS_TABLE = {
    "sqlite": "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
    "postgresql": "SELECT 1 FROM information_schema.tables WHERE table_schema = current_schema() "
    "AND table_name = ?",
}

_UPSERT = (
    "INSERT INTO fr_claims (key, owner, host, pid, expires) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, host = excluded.host, "
    "pid = excluded.pid, expires = excluded.expires "
    "WHERE fr_claims.expires < ? OR fr_claims.owner = excluded.owner"
)


class SqlClaims(Claims):
    """Claims in the ``fr_claims`` table of ``db`` (the call store's database)."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._ready = False

    def _table(self, cur: Any) -> None:
        # PostgreSQL creates it with the others, under its DDL lock: two
        # concurrent CREATE TABLE IF NOT EXISTS race there. SQLite writes
        # one transaction at a time, so creating it here is safe
        if not self._ready:
            if self._db.backend == "sqlite":
                cur.execute(CLAIMS_TABLE)
            self._ready = True

    def _holders(self, cur: Any, keys: Sequence[str]) -> Dict[str, Holder]:
        found: Dict[str, Holder] = {}
        text = self._db.key_text
        for chunk in _chunks(keys, self._db.key_param):
            cond, params = self._db.in_list("key", chunk)
            sql = self._db.sql(f"SELECT key, owner, host, pid, expires FROM fr_claims WHERE {cond}")
            for row in cur.execute(sql, params).fetchall():
                found[text(row[0])] = Holder(row[1], row[2], int(row[3]), float(row[4]))
        return found

    def claim(self, keys: Sequence[str], holder: Holder, lease: float) -> List[Optional[Holder]]:
        if not keys:
            return []
        now = time.time()
        param = self._db.key_param
        rows = [(param(str(k)), holder.owner, holder.host, holder.pid, now + lease, now) for k in keys]
        with self._db.transaction() as cur:
            self._table(cur)
            cur.executemany(self._db.sql(_UPSERT), rows)
            held = self._holders(cur, keys)
        out: List[Optional[Holder]] = []
        for key in keys:
            current = held.get(str(key))
            out.append(None if current is None or current.owner == holder.owner else current)
        return out

    def renew(self, keys: Sequence[str], holder: Holder, lease: float) -> List[bool]:
        if not keys:
            return []
        with self._db.transaction() as cur:
            self._table(cur)
            for chunk in _chunks(keys, self._db.key_param):
                cond, params = self._db.in_list("key", chunk)
                sql = self._db.sql(f"UPDATE fr_claims SET expires = ? WHERE owner = ? AND {cond}")
                cur.execute(sql, [time.time() + lease, holder.owner, *params])
            held = self._holders(cur, keys)
        return [(h := held.get(str(k))) is not None and h.owner == holder.owner for k in keys]

    def release(self, keys: Sequence[str], holder: Holder) -> None:
        if not keys:
            return
        with self._db.transaction() as cur:
            self._table(cur)
            for chunk in _chunks(keys, self._db.key_param):
                cond, params = self._db.in_list("key", chunk)
                sql = self._db.sql(f"DELETE FROM fr_claims WHERE owner = ? AND {cond}")
                cur.execute(sql, [holder.owner, *params])

    def claimed(self, keys: Sequence[str]) -> List[bool]:
        if not keys:
            return []
        now = time.time()
        if self._db.read_only:
            return self._claimed_reading(keys, now)
        with self._db.transaction() as cur:
            self._table(cur)
            held = self._holders(cur, keys)
        return [(h := held.get(str(k))) is not None and h.expires >= now for k in keys]

    def _claimed_reading(self, keys: Sequence[str], now: float) -> List[bool]:
        """``claimed`` on a database opened read-only: plain reads, and no
        claims at all where the table was never made (it is not made here)."""
        if self._db.first(self._db.sql(_HAS_TABLE[self._db.backend]), ("fr_claims",)) is None:
            return [False] * len(keys)
        held: Dict[str, Holder] = {}
        text = self._db.key_text
        for chunk in _chunks(keys, self._db.key_param):
            cond, params = self._db.in_list("key", chunk)
            sql = self._db.sql(f"SELECT key, owner, host, pid, expires FROM fr_claims WHERE {cond}")
            for row in self._db.rows(sql, params):
                held[text(row[0])] = Holder(row[1], row[2], int(row[3]), float(row[4]))
        return [(h := held.get(str(k))) is not None and h.expires >= now for k in keys]


def _chunks(keys: Sequence[str], param: Callable[[str], Any]) -> Iterator[List[Any]]:
    """``keys`` as parameters, in batches of :data:`.db.BATCH`."""
    params = [param(str(k)) for k in keys]
    for start in range(0, len(params), BATCH):
        yield params[start : start + BATCH]


__all__ = ["CLAIMS_TABLE", "SqlClaims"]
