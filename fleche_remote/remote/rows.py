"""A listing's calls straight from the server's rows, checked when read.

``[c.result for c in cache.load_many(keys)]`` reads results only. When the
server keeps calls in SQL with small values inline, it can hand on each
row as stored (:meth:`~fleche_remote.caches.cache.Cache.load_rows`)
instead of building, checking and pickling a
:class:`~fleche_remote.call.CallRecord` that the client unpickles and
rebuilds: for 1000 small calls that was most of the server's time and
half of the client's. Here each row becomes a :class:`RowCall`, whose
record is built (with every check :func:`~fleche_remote.storage.sql.rows.record_from_row`
makes of a row a store reads) when something other than the result is
first read, and whose result is checked (:func:`~fleche_remote.storage.sql.rows.row_blob`)
and decoded when read. A damaged row is then a
:class:`~fleche_remote.errors.CorruptEntryError` naming its call when that
call is read, not an error for the whole listing.

Only an unsigned client asks for rows (a signed one checks every record's
signature first), and only when every row of a part carries its value: a
listing with values kept elsewhere goes the way of records, whose lazy
calls fetch those values in batches.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

from ..call import LEGACY_DIGEST_SCHEME, CallRecord, LazyCall
from ..codec.values import decode_value
from ..errors import CorruptEntryError, ProtocolError
from ..storage.sql.db import blob_key
from ..storage.sql.rows import ENTRY_COLUMNS, record_from_row, row_blob
from .packing import unpack_small_entries
from .pipeline import pipelined
from .receive import Unsigned

#: A row as the server sends it: the columns of ``READ_ENTRY``.
Row = Tuple[Any, ...]


class RowCall(LazyCall):
    """A :class:`~fleche_remote.call.LazyCall` over a stored row, its record
    built and checked on first use."""

    __slots__ = ("_rec", "_row", "_where")
    _rec: Optional[CallRecord]

    def __init__(self, row: Row, where: Any) -> None:
        self._row = row
        self._where = where
        super().__init__(None, self._value)  # type: ignore[arg-type]

    @property  # type: ignore[override]
    def record(self) -> CallRecord:
        record = self._rec
        if record is None:
            record = self._rec = record_from_row(self._where, self._row, blob_key, LEGACY_DIGEST_SCHEME)
        return record

    @record.setter
    def record(self, value: Optional[CallRecord]) -> None:
        self._rec = value

    def __repr__(self) -> str:
        try:
            return super().__repr__()
        except CorruptEntryError:  # a repr never raises: say what it is instead
            raw = self._row[0]
            key = raw.hex() if type(raw) is bytes else str(raw)
            return f"<LazyCall key={key[:12]} damaged record (read .name for why)>"

    def _value(self) -> Any:
        row = self._row
        value = row[6]
        digest = value.hex() if type(value) is bytes else str(value)
        return decode_value(row_blob(self._where, digest, *row[10:14]))


def checked_rows(rows: Any, n: int, where: Any) -> List[Optional[Row]]:
    """``rows`` if it is a list of ``n`` rows (or ``None``), each of the ``ENTRY_COLUMNS``
    columns; the contents are checked when read."""
    if type(rows) is not list or len(rows) != n:
        raise ProtocolError(f"{where!r} answered {n} keys with {type(rows).__name__} rows, not a list of {n}")
    for row in rows:
        if row is not None and (type(row) is not tuple or len(row) != ENTRY_COLUMNS):
            raise ProtocolError(f"{where!r} sent a row that is not one: {type(row).__name__}")
    return rows


def all_inline(rows: Sequence[Optional[Row]]) -> bool:
    """Whether every present row carries its value."""
    return all(row is None or row[10] is not None for row in rows)


def row_calls(rows: Sequence[Optional[Row]], where: Any) -> List[Optional[LazyCall]]:
    """:class:`RowCall` per row (``None`` kept), for rows that :func:`all_inline` accepted."""
    return [None if row is None else RowCall(row, where) for row in rows]


def row_entries(rows: Sequence[Optional[Row]], where: Any) -> List[Optional[Tuple[CallRecord, Any]]]:
    """Records (checked now) and any inline values, for rows of which some
    keep their value elsewhere: the records' way, as before."""
    out: List[Optional[Tuple[CallRecord, Any]]] = []
    for row in rows:
        if row is None:
            out.append(None)
            continue
        record = record_from_row(where, row, blob_key, LEGACY_DIGEST_SCHEME)
        blob = None if row[10] is None else row_blob(where, record.value, *row[10:14])
        out.append((record, blob))
    return out


def _gather(cache: Any, conn: Any, parts: Sequence[List[str]]) -> List[Tuple[bool, Any]]:
    """Per part: ``(True, rows)``, or ``(False, small entries)`` from a
    cache that keeps no rows; the parts go back to back."""
    got: List[Tuple[bool, Any]] = []
    answers = pipelined(
        conn, "load_entries", [{"keys": part, "small_only": True, "rows": True} for part in parts]
    )
    try:
        for part, found in zip(parts, answers):
            rows = found.get("rows") if type(found) is dict else None
            if rows is not None:
                got.append((True, checked_rows(rows, len(part), cache)))
            else:
                listed = [None if f is None else f[0] for f in found]
                got.append((False, unpack_small_entries(found, listed, Unsigned(), cache)))
    finally:
        answers.close()
    return got


def entries(cache: Any, conn: Any, parts: Sequence[List[str]]) -> List[Optional[Tuple[CallRecord, Any]]]:
    """Records (checked now) with the values that travel in the rows (None
    for those kept elsewhere) of ``parts``, asked as :func:`listing` asks:
    what a stack back-fills from, without the server building records."""
    out: List[Optional[Tuple[CallRecord, Any]]] = []
    for is_rows, found in _gather(cache, conn, parts):
        out.extend(row_entries(found, cache) if is_rows else found)
    return out


def listing(cache: Any, conn: Any, parts: Sequence[List[str]], results: bool) -> List[Optional[LazyCall]]:
    """``cache.load_many`` of ``parts`` (the keys, split as
    :func:`~fleche_remote.remote.packing.pipeline_parts` splits them) on
    ``conn``, asking for rows: the parts go back to back, and each answer
    is rows or, from a cache that keeps none, records with small values."""
    got = _gather(cache, conn, parts)
    if all(is_rows and all_inline(rows) for is_rows, rows in got):
        return [call for _, rows in got for call in row_calls(rows, cache)]
    # some values stay on the server: one batch over the whole listing
    # fetches them together when the first is read
    entries: List[Any] = []
    for is_rows, found in got:
        entries.extend(row_entries(found, cache) if is_rows else found)
    calls: List[Optional[LazyCall]] = cache.lazy_calls_of(entries)
    if results:  # asked for: the values not inline come now, in batches
        for call in calls:
            if call is not None:
                call.result  # noqa: B018
    return calls
