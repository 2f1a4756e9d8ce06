"""Rows of the SQL stores: how records, metadata and blobs become column
values and back. Plain functions, no database; :mod:`.sql` runs them.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Callable, Optional, Sequence, Tuple

from ...call import CallRecord, check_record
from ...codec.values import Blob, BytesBlob
from ...errors import CorruptEntryError

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


#: One encoder for every row: ``json.dumps`` with arguments builds a new one
#: per call, which cost more than the insert it feeds.
_compact = json.JSONEncoder(separators=(",", ":")).encode


def dumps_json(obj: Any) -> str:
    """Plain data as JSON text, bytes and tuples tagged (see above)."""
    if not obj and type(obj) is dict:
        return "{}"
    return _compact(_to_json(obj))


def loads_json(data: str) -> Any:
    """Inverse of :func:`dumps_json`."""
    if data == "{}":
        return {}
    return _from_json(json.loads(data))


# -- rows ------------------------------------------------------------------------

CALL_COLUMNS = (
    "key", "name", "version", "arguments", "arg_digests", "metadata",
    "value", "value_kind", "value_size", "digest_scheme", "created",
)  # fmt: skip
READ_CALL = ", ".join(f"c.{c}" for c in CALL_COLUMNS[:-1])
BLOB_COLUMNS = ("digest", "kind", "meta", "size", "body")

# PostgreSQL: a record, its argument rows and its inline value in one
# statement (data-modifying CTEs run as one atomic statement)
PG_PUT_ONE = (
    f"WITH c AS (INSERT INTO fr_calls ({', '.join(CALL_COLUMNS)}) "
    f"VALUES ({', '.join(['%s'] * len(CALL_COLUMNS))}) ON CONFLICT DO NOTHING RETURNING key), "
    "a AS (INSERT INTO fr_call_args (arg, digest, key) SELECT x.arg, x.digest, c.key "
    "FROM c CROSS JOIN unnest(%s::text[], %s::text[]) AS x(arg, digest) ON CONFLICT DO NOTHING), "
    "b AS (INSERT INTO fr_blobs (digest, kind, meta, size, body) SELECT v.* FROM c CROSS JOIN "
    "(VALUES (%s::text, %s::text, %s::text, %s::bigint, %s::bytea)) AS v(digest, kind, meta, size, body) "
    "WHERE %s ON CONFLICT DO NOTHING) "
    "SELECT count(*) FROM c"
)


def call_row(r: CallRecord, now: float, param: Callable[[str], Any]) -> Tuple[Any, ...]:
    """The ``fr_calls`` row of ``r``, its key and value bound by ``param``
    (the database's ``key_param``)."""
    return (
        param(r.key), r.name, r.version, bytes(r.arguments), _compact(r.arg_digests), dumps_json(r.metadata),
        param(r.value), r.value_kind, r.value_size, getattr(r, "digest_scheme", None), now,
    )  # fmt: skip


def insert_rows(cur: Any, sql: str, rows: Sequence[Tuple[Any, ...]]) -> None:
    """All ``rows`` in one driver call; a lone row skips executemany's set-up."""
    if len(rows) == 1:
        cur.execute(sql, rows[0])
    elif rows:
        cur.executemany(sql, rows)


def blob_row(digest: str, blob: Blob, param: Callable[[str], Any]) -> Tuple[Any, ...]:
    body = blob.read_all()
    if len(body) != blob.size:
        raise CorruptEntryError(f"value {digest[:16]}: got {len(body)} bytes, expected {blob.size}")
    meta = "{}" if not blob.meta else _compact(blob.meta)
    return (param(digest), blob.kind, meta, blob.size, body)


class Place:
    """Where an entry is, for an error message: formatted only when one is
    raised (a repr of the store on every read cost ~1 us a load)."""

    __slots__ = ("ident", "store", "what")

    def __init__(self, what: str, ident: Any, store: Any) -> None:
        self.what = what
        self.ident = ident
        self.store = store

    def __str__(self) -> str:
        return f"{self.what} {str(self.ident)[:16]} in {self.store!r}"


def row_blob(store: Any, digest: str, kind: str, meta_text: str, size: int, body: Any) -> BytesBlob:
    where = Place("value", digest, store)
    try:
        meta = {} if meta_text == "{}" else json.loads(meta_text)
    except (TypeError, ValueError) as exc:
        raise CorruptEntryError(f"{where}: meta is not JSON ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(body, (bytes, bytearray, memoryview)):
        raise CorruptEntryError(
            f"{where}: expected a JSON object and a binary body, "
            f"got {type(meta).__name__} and {type(body).__name__}"
        )
    if len(body) != size:
        raise CorruptEntryError(f"{where}: {len(body)} body bytes, expected {size}")
    return BytesBlob(kind, meta, body)


def record_from_row(
    where: object, row: Sequence[Any], scheme: Optional[str], with_scheme: bool
) -> CallRecord:
    """The :class:`CallRecord` of a ``calls`` row (``READ_CALL``'s columns).

    Every column is checked as a store written by someone else would need:
    JSON that nests past the recursion limit or holds a 5,000-digit number,
    metadata that is a list, a size that is text: each is a
    :class:`~fleche_remote.errors.CorruptEntryError` naming the record,
    never a stray ``RecursionError`` in the middle of a listing.
    """
    key, name, version, arguments, arg_digests, metadata, value, kind, size = row[:9]
    try:
        meta = loads_json(metadata)
        digests = json.loads(arg_digests)
    except (TypeError, ValueError, RecursionError) as exc:
        raise CorruptEntryError(f"{where}: metadata is not JSON ({type(exc).__name__}: {exc})") from None
    if (
        not isinstance(meta, dict)
        or not isinstance(digests, dict)
        or not isinstance(arguments, (bytes, bytearray, memoryview))
    ):
        raise CorruptEntryError(
            f"{where}: expected a JSON object and binary arguments, "
            f"got {type(meta).__name__} and {type(arguments).__name__}"
        )
    if type(size) is not int:
        raise CorruptEntryError(f"{where}: expected an integer value_size, got {type(size).__name__}")
    fields = (key, name, version, bytes(arguments), digests, meta, value, kind, size)
    if with_scheme and scheme is not None:
        record = CallRecord(*fields, scheme)  # type: ignore[call-arg]
    else:
        record = CallRecord(*fields)
    return check_record(record, where)  # type: ignore[arg-type]  # a Place formats itself on error
