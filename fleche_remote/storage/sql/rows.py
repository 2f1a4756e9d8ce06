"""Rows of the SQL stores: how records, metadata and blobs become column
values and back. Plain functions, no database; :mod:`.sql` runs them.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Callable, Optional, Sequence, Tuple

from ...call import HEX_DIGEST, MAX_FIELD_CHARS, CallRecord, checked_record
from ...codec.plain import check_plain
from ...codec.values import Blob, BytesBlob
from ...errors import CorruptEntryError

# -- metadata as JSON ----------------------------------------------------------
#
# Call metadata is plain data, which includes bytes and tuples; JSON has
# neither. They are tagged ({"$bytes": base64}, {"$tuple": [...]}), and a
# user dict that happens to look like a tag is wrapped in {"$dict": ...},
# so every plain value round-trips exactly and the column stays readable.

_TAGS = ("$bytes", "$tuple", "$dict")
_TEXT_COLUMNS = ("name", "value_kind", "digest_scheme")
_BINARY = (bytes, bytearray, memoryview)


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
    problem = None
    try:
        meta = {} if meta_text == "{}" else json.loads(meta_text)
    except (TypeError, ValueError) as exc:
        problem = f"meta is not JSON ({exc})"
    else:
        if type(meta) is not dict or not isinstance(body, _BINARY):
            got = f"{type(meta).__name__} and {type(body).__name__}"
            problem = f"expected a JSON object and a binary body, got {got}"
        elif len(body) != size:
            problem = f"{len(body)} body bytes, expected {size}"
    if problem is not None:
        raise CorruptEntryError(f"{Place('value', digest, store)}: {problem}")
    return BytesBlob(kind, meta, body)


def _is_digest(raw: Any, text: Any) -> bool:
    """Whether ``text``, a key or value digest read back from its column
    (``raw``), is one: 1 to 64 bytes spell hex of 2 to 128 characters, so
    only a text column (PostgreSQL, or a key that is no hex) needs the
    pattern."""
    if type(text) is not str:
        return False
    return (type(raw) is bytes and 0 < len(raw) <= 64) or HEX_DIGEST.fullmatch(text) is not None


def _short_text(value: Any) -> bool:
    return type(value) is str and len(value) <= MAX_FIELD_CHARS


def _json(text: Any) -> Any:
    return _decode(text) if type(text) is str else json.loads(text)


_decode = json.JSONDecoder().decode


def record_from_row(
    store: Any, row: Sequence[Any], text_of: Callable[[Any], Any], legacy_scheme: str
) -> CallRecord:
    """The :class:`CallRecord` of a ``calls`` row (``READ_CALL``'s columns).

    Every column is checked once, as it is converted, for what
    :func:`~fleche_remote.call.record_problem` checks of a record, since a
    store written by someone else may hold anything: JSON that nests past
    the recursion limit or holds a 5,000-digit number, metadata that is a
    list, a size that is text, a key that is no digest. Each is a
    :class:`~fleche_remote.errors.CorruptEntryError` naming the record,
    never a stray ``RecursionError`` in the middle of a listing. ``text_of``
    is the database's ``key_text``; a NULL scheme is ``legacy_scheme``.
    (record_problem on the record built, as before, cost 2.3 of the 9 ms a
    read of 1000 entries took, repeating what these checks already knew.)
    """
    raw_key, name, version, arguments, arg_digests, metadata, raw_value, kind, size, scheme = row[:10]
    if scheme is None:
        scheme = legacy_scheme
    key = text_of(raw_key)
    value = text_of(raw_value)
    try:
        meta = {} if metadata == "{}" else loads_json(metadata)
        digests = {} if arg_digests == "{}" else _json(arg_digests)
    except (TypeError, ValueError, RecursionError) as exc:
        where = Place("call", key, store)
        raise CorruptEntryError(f"{where}: metadata is not JSON ({type(exc).__name__}: {exc})") from None
    if (
        type(meta) is dict
        and type(digests) is dict
        and isinstance(arguments, _BINARY)
        and type(size) is int
        and size >= 0
        and _is_digest(raw_key, key)
        and _is_digest(raw_value, value)
        and type(name) is str
        and len(name) <= MAX_FIELD_CHARS
        and type(kind) is str
        and len(kind) <= MAX_FIELD_CHARS
        and type(scheme) is str
        and len(scheme) <= MAX_FIELD_CHARS
        and (version is None or _short_text(version))
        and all(type(d) is str and len(d) <= MAX_FIELD_CHARS >= len(a) for a, d in digests.items())
        and (not meta or _plain_problem(meta) is None)
    ):
        return checked_record(key, name, version, bytes(arguments), digests, meta, value, kind, size, scheme)
    problem = _row_problem(
        meta, digests, arguments, size, (key, raw_key), (value, raw_value), name, kind, scheme, version
    )
    raise CorruptEntryError(f"{Place('call', key, store)}: {problem}")


def _plain_problem(meta: Any) -> Optional[str]:
    try:
        check_plain(meta, "its metadata")
    except TypeError as exc:
        return str(exc)
    return None


def _row_problem(
    meta: Any,
    digests: Any,
    arguments: Any,
    size: Any,
    key: Tuple[Any, Any],
    value: Tuple[Any, Any],
    name: Any,
    kind: Any,
    scheme: Any,
    version: Any,
) -> str:
    """What :func:`record_from_row` refused a row for, said once it has."""
    if type(meta) is not dict or type(digests) is not dict or not isinstance(arguments, _BINARY):
        return (
            f"expected a JSON object and binary arguments, "
            f"got {type(meta).__name__} and {type(arguments).__name__}"
        )
    if type(size) is not int or size < 0:
        return f"expected an integer value_size >= 0, got {size!r:.80}"
    for field, (text, raw) in (("key", key), ("value", value)):
        if not _is_digest(raw, text):
            return f"its {field} {str(text)[:80]!r} is not a hex digest"
    for field, bad in (("name", name), ("value_kind", kind), ("digest_scheme", scheme)):
        if not _short_text(bad):
            length = f" of {len(bad)} characters" if isinstance(bad, str) else ""
            return (
                f"its {field} is a {type(bad).__name__}{length}, expected a str of at most {MAX_FIELD_CHARS}"
            )
    if version is not None and not _short_text(version):
        return f"its version is a {type(version).__name__}, expected str or None"
    if not all(type(d) is str and len(d) <= MAX_FIELD_CHARS >= len(a) for a, d in digests.items()):
        return f"its arg_digests are not a dict of str to str (each at most {MAX_FIELD_CHARS} characters)"
    return _plain_problem(meta) or "unreadable"
