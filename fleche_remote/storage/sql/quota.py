"""What the SQL call store adds for quotas (see :mod:`..quota`).

Last-used times live in a table of their own, ``fr_uses`` (key, used), written
only when a :class:`~fleche_remote.storage.quota.UseRecorder` flushes, as
one upsert per batch: a load never writes. An entry with no ``fr_uses`` row
was last used when it was stored (``fr_calls.created``). A database made
before the table existed gets it on the first write that needs it; a
reader that may not write it reads every entry as unused since stored.

Sizes come from the rows themselves (``value_size``, ``length(arguments)``:
SQLite and PostgreSQL both answer ``length`` of a blob from its header),
so ``usage`` is one aggregate query, with no walk of anything.
"""

from __future__ import annotations

import json
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from ...errors import StorageError
from ..quota import RECORD_OVERHEAD, Entry, Usage
from .db import BATCH, Database

#: The ``uses`` table, per backend (the rest of the schema is in :mod:`.db`).
USES_DDL = {
    "sqlite": "CREATE TABLE IF NOT EXISTS fr_uses (key BLOB PRIMARY KEY, used REAL NOT NULL) WITHOUT ROWID",
    "postgresql": 'CREATE TABLE IF NOT EXISTS fr_uses (key TEXT COLLATE "C" PRIMARY KEY, '
    "used DOUBLE PRECISION NOT NULL)",
}
_UPSERT = {
    "sqlite": "INSERT INTO fr_uses (key, used) VALUES (?, ?) "
    "ON CONFLICT (key) DO UPDATE SET used = max(used, excluded.used)",
    "postgresql": "INSERT INTO fr_uses (key, used) VALUES (?, ?) "
    "ON CONFLICT (key) DO UPDATE SET used = GREATEST(fr_uses.used, excluded.used)",
}
_SIZE = f"c.value_size + length(c.arguments) + {RECORD_OVERHEAD}"


class SqlQuota:
    """The quota methods of :class:`~.stores.SqlCallStore` (a mixin over its database)."""

    _db: Database
    _uses_ready: Optional[bool] = None

    def _uses(self, create: bool) -> bool:
        """Whether the ``uses`` table exists; made first when ``create``."""
        if self._uses_ready:
            return True
        try:
            self._db.first("SELECT 1 FROM fr_uses LIMIT 1")
            self._uses_ready = True
        except StorageError:
            if not create:
                return False
            with self._db.transaction() as cur:
                cur.execute(USES_DDL[self._db.backend])
            self._uses_ready = True
        return True

    def touch(self, uses: Mapping[str, float]) -> None:
        if not uses:
            return
        self._uses(create=True)
        with self._db.transaction() as cur:
            param = self._db.key_param
            rows = [(param(k), t) for k, t in sorted(uses.items())]
            cur.executemany(self._db.sql(_UPSERT[self._db.backend]), rows)

    def last_used(self) -> Dict[str, float]:
        if not self._uses(create=False):
            return {}
        text = self._db.key_text
        return {text(k): float(t) for k, t in self._db.rows("SELECT key, used FROM fr_uses")}

    def stored_times(self, keys: Sequence[str]) -> List[Optional[float]]:
        found: Dict[str, float] = {}
        param, text = self._db.key_param, self._db.key_text
        for start in range(0, len(keys), BATCH):
            cond, params = self._db.in_list("key", [param(k) for k in keys[start : start + BATCH]])
            sql = self._db.sql(f"SELECT key, created FROM fr_calls WHERE {cond}")
            found.update((text(k), t) for k, t in self._db.rows(sql, params))
        return [found.get(k) for k in keys]

    def entries(self) -> Iterator[Entry]:
        if self._uses(create=False):
            used, join = "COALESCE(u.used, c.created)", " LEFT JOIN fr_uses u ON u.key = c.key"
        else:
            used, join = "c.created", ""
        walk = self._db.walk_column
        sql = self._db.sql(
            f"SELECT c.{walk}, c.key, c.name, c.value, {_SIZE}, c.created, {used} FROM fr_calls c{join} "
            f"WHERE c.{walk} > ? ORDER BY c.{walk} LIMIT ?"
        )
        last = self._db.walk_start
        text = self._db.key_text
        while True:  # paged: no connection held while the caller works
            page = self._db.rows(sql, (last, 10_000))
            for _, key, name, value, size, created, when in page:
                yield Entry(
                    text(key), name, text(value), int(size), float(created), max(float(when), float(created))
                )
            if len(page) < 10_000:
                return
            last = page[-1][0]

    def usage(self) -> Usage:
        usage = Usage()
        # SQLite would walk the name index in order and fetch every row
        # through it; one scan of the table and a small sort is 4x faster
        hint = " NOT INDEXED" if self._db.backend == "sqlite" else ""
        sql = f"SELECT c.name, count(*), sum({_SIZE}) FROM fr_calls c{hint} GROUP BY c.name"
        for name, calls, nbytes in self._db.rows(sql):
            usage.add(name, int(calls), int(nbytes or 0))
        return usage

    def delete_entries(self, keys: Sequence[str]) -> List[str]:
        """Records, their argument rows, use times and the inline values no
        remaining record refers to, in one transaction per batch: a
        concurrent save of the same value either committed before (its
        record keeps the value) or inserts the value again after."""
        sql = self._db.sql
        param, text = self._db.key_param, self._db.key_text
        values: List[str] = []
        for start in range(0, len(keys), BATCH):
            chunk = [param(k) for k in keys[start : start + BATCH]]
            with self._db.transaction() as cur:
                cond, params = self._db.in_list("key", chunk)
                rows = cur.execute(
                    sql(f"SELECT key, value, arg_digests FROM fr_calls WHERE {cond}"), params
                ).fetchall()
                if not rows:
                    continue
                # by primary key (arg, digest, key): there is no index on key alone
                args: List[Tuple[str, str, str]] = []
                for key, _, arg_digests in rows:
                    try:
                        digests = json.loads(arg_digests)
                    except (TypeError, ValueError):
                        digests = {}
                    if isinstance(digests, dict):
                        args.extend((a, param(d), key) for a, d in digests.items())
                if args:
                    cur.executemany(
                        sql("DELETE FROM fr_call_args WHERE arg = ? AND digest = ? AND key = ?"), args
                    )
                cur.execute(sql(f"DELETE FROM fr_calls WHERE {cond}"), params)
                if self._uses(create=False):
                    cur.execute(sql(f"DELETE FROM fr_uses WHERE {cond}"), params)
                digests = sorted({row[1] for row in rows})
                dcond, dparams = self._db.in_list("digest", digests)
                vcond, vparams = self._db.in_list("value", digests)
                cur.execute(
                    sql(
                        f"DELETE FROM fr_blobs WHERE {dcond} AND digest NOT IN "
                        f"(SELECT value FROM fr_calls WHERE {vcond})"
                    ),
                    [*dparams, *vparams],
                )
                values.extend(text(row[1]) for row in rows)
        return values

    def forget_uses(self, keys: Sequence[str]) -> None:
        """Done by :meth:`delete_entries`, in its transaction."""
