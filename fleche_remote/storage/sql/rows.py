"""Rows of the SQL stores: how records, metadata and blobs become column
values and back. Plain functions, no database; :mod:`.sql` runs them.
"""

from __future__ import annotations

import base64
import json
import sys
from json.scanner import make_scanner
from typing import Any, Callable, List, Sequence, Tuple

from ...call import HEX_DIGEST, MAX_FIELD_CHARS, CallRecord, checked_record
from ...codec.plain import PLAIN_MAX_DEPTH, PLAIN_MAX_INT_BITS, PLAIN_MAX_NODES
from ...codec.values import Blob, BytesBlob
from ...errors import CorruptEntryError
from .db import blob_key

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


class NotPlain(ValueError):
    """Metadata that decoded from its JSON but breaks a rule of
    :func:`~fleche_remote.codec.plain.check_plain` (too deep, too large, an
    integer too long)."""


def _from_json(obj: Any, depth: int, seen: List[int]) -> Any:
    """``obj`` as JSON decoded it, tags undone, and checked in the same walk
    as :func:`~fleche_remote.codec.plain.check_plain` would check the
    result (JSON holds nothing but plain types, so what is left to check is
    size, depth and integer length): one walk of a record's metadata, not
    two (6 fields and a ``code`` table: 3.6 -> 1.9 us)."""
    seen[0] += 1
    if seen[0] > PLAIN_MAX_NODES:
        raise NotPlain(f"its metadata is too large: more than {PLAIN_MAX_NODES:,} items")
    if depth > PLAIN_MAX_DEPTH:
        raise NotPlain(f"its metadata is nested too deeply (more than {PLAIN_MAX_DEPTH} levels)")
    kind = type(obj)
    if kind is dict:
        depth += 1
        if len(obj) == 1:
            ((tag, inner),) = obj.items()
            if tag in _TAGS:
                if tag == "$bytes" and type(inner) is str:
                    return base64.b64decode(inner)
                if tag == "$tuple" and type(inner) is list:
                    return tuple([_from_json(x, depth, seen) for x in inner])
                if tag == "$dict" and type(inner) is dict:
                    return {_intern(k): _from_json(v, depth, seen) for k, v in inner.items()}
                raise ValueError(f"a {tag} tag holds a {type(inner).__name__}")
        if depth > PLAIN_MAX_DEPTH:  # the first child says so
            return {_intern(k): _from_json(v, depth, seen) for k, v in obj.items()}
        # scalars (most of metadata) without a call each; counted the same
        out = {}
        for k, v in obj.items():
            vkind = type(v)
            if vkind is str:
                out[_intern(k)] = _intern(v)
            elif vkind is float or vkind is bool or v is None:
                out[_intern(k)] = v
            else:
                out[_intern(k)] = _from_json(v, depth, seen)
                continue
            seen[0] += 1
        if seen[0] > PLAIN_MAX_NODES:
            raise NotPlain(f"its metadata is too large: more than {PLAIN_MAX_NODES:,} items")
        return out
    if kind is list:
        depth += 1
        return [_from_json(x, depth, seen) for x in obj]
    if kind is str:
        return _intern(obj)
    if kind is int and obj.bit_length() > PLAIN_MAX_INT_BITS:
        raise NotPlain(
            f"its metadata holds an integer of {obj.bit_length()} bits; at most {PLAIN_MAX_INT_BITS}"
        )
    return obj


#: Text that recurs from record to record (a function's name, metadata keys,
#: a host name, a code digest) is one object, not one per row: a reply's
#: pickle then sends it once and refers back to it (BINGET): the reply to a
#: load_many of 1000 small calls is 537 -> 493 KB, 775 -> 553 KB with
#: @cached's metadata, whose client-side decoding took 7.4-8.0 ms and now
#: 3.6-3.9. Interned strings are freed when nothing refers to them.
_intern = sys.intern

#: One encoder for every row: ``json.dumps`` with arguments builds a new one
#: per call, which cost more than the insert it feeds.
_compact = json.JSONEncoder(separators=(",", ":")).encode


def dumps_json(obj: Any) -> str:
    """Plain data as JSON text, bytes and tuples tagged (see above)."""
    if not obj and type(obj) is dict:
        return "{}"
    return _compact(_to_json(obj))


def loads_json(data: str) -> Any:
    """Inverse of :func:`dumps_json`, for data that must be plain.

    Raises:
        ValueError: not JSON, or a malformed tag.
        NotPlain: plain data beyond check_plain's bounds.
    """
    if data == "{}":
        return {}
    return _from_json(_json(data), 0, [0])


# -- rows ------------------------------------------------------------------------

CALL_COLUMNS = (
    "key", "name", "version", "arguments", "arg_digests", "metadata",
    "value", "value_kind", "value_size", "digest_scheme", "created",
)  # fmt: skip
READ_CALL = ", ".join(f"c.{c}" for c in CALL_COLUMNS[:-1])
#: A call row joined with its inline value (kind, meta, size, body; NULL
#: when the value is not inline): what a record and its small value are read
#: from, and what a server hands on as a row (remote/rows.py).
READ_ENTRY = READ_CALL + ", b.kind, b.meta, b.size, b.body"
ENTRY_COLUMNS = len(CALL_COLUMNS) - 1 + 4
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
        param(r.key), r.name, r.version, bytes(r.arguments), _digests_json(r.arg_digests),
        dumps_json(r.metadata), param(r.value), r.value_kind, r.value_size,
        getattr(r, "digest_scheme", None), now,
    )  # fmt: skip


def _digests_json(digests: Any) -> str:
    """``_compact(digests)``, for a dict of str to str written out with the
    encoder's own C string quoting (one argument: 1.5 -> 0.4 us)."""
    if type(digests) is dict:
        parts = []
        for arg, digest in digests.items():
            if type(arg) is not str or type(digest) is not str:
                break
            parts.append(_quote(arg) + ":" + _quote(digest))
        else:
            return "{" + ",".join(parts) + "}"
    return _compact(digests)


_quote = json.encoder.encode_basestring_ascii  # what JSONEncoder uses (ensure_ascii)


def insert_rows(cur: Any, sql: str, rows: Sequence[Tuple[Any, ...]]) -> None:
    """All ``rows`` in one driver call; a lone row skips executemany's set-up."""
    if len(rows) == 1:
        cur.execute(sql, rows[0])
    elif rows:
        cur.executemany(sql, rows)


def blob_row(digest: str, blob: Blob, param: Callable[[str], Any], bound: Any = None) -> Tuple[Any, ...]:
    """The ``fr_blobs`` row of ``blob``; ``bound`` is ``param(digest)`` when
    the caller has it already."""
    body = blob.read_all()
    if len(body) != blob.size:
        raise CorruptEntryError(f"value {digest[:16]}: got {len(body)} bytes, expected {blob.size}")
    meta = "{}" if not blob.meta else _compact(blob.meta)
    return (param(digest) if bound is None else bound, blob.kind, meta, blob.size, body)


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
    return BytesBlob(_intern(kind), meta, body)


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
    """``json.loads(text)``; what we write (compact, one object) in one C
    call of the decoder's scanner, 0.35 us against 0.86 for ``loads`` on a
    record's argument digests. Anything else takes the full way, which
    decodes it or says why not."""
    if type(text) is str:
        try:
            obj, end = _scan(text, 0)
        except (StopIteration, ValueError):
            pass
        else:
            if end == len(text):
                return obj
    return json.loads(text)


_scan = make_scanner(json.JSONDecoder())  # type: ignore[arg-type]  # typeshed names the class, not a decoder


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
    if text_of is blob_key:  # SQLite's 32-byte keys: without a call each
        key = raw_key.hex() if type(raw_key) is bytes else raw_key
        value = raw_value.hex() if type(raw_value) is bytes else raw_value
    else:
        key = text_of(raw_key)
        value = text_of(raw_value)
    try:
        meta = {} if metadata == "{}" else loads_json(metadata)
        digests = {} if arg_digests == "{}" else _json(arg_digests)
    except NotPlain as exc:
        raise CorruptEntryError(f"{Place('call', key, store)}: {exc}") from None
    except (TypeError, ValueError, RecursionError) as exc:
        where = Place("call", key, store)
        raise CorruptEntryError(f"{where}: metadata is not JSON ({type(exc).__name__}: {exc})") from None
    ok = (
        type(meta) is dict
        and type(digests) is dict
        and isinstance(arguments, _BINARY)
        and type(size) is int
        and size >= 0
        and type(key) is str
        and ((type(raw_key) is bytes and 0 < len(raw_key) <= 64) or HEX_DIGEST.fullmatch(key) is not None)
        and type(value) is str
        and (
            (type(raw_value) is bytes and 0 < len(raw_value) <= 64) or HEX_DIGEST.fullmatch(value) is not None
        )
        and type(name) is str
        and len(name) <= MAX_FIELD_CHARS
        and type(kind) is str
        and len(kind) <= MAX_FIELD_CHARS
        and type(scheme) is str
        and len(scheme) <= MAX_FIELD_CHARS
        and (version is None or (type(version) is str and len(version) <= MAX_FIELD_CHARS))
    )  # _is_digest and _short_text written out: this runs for every row read
    if ok:
        names = {}
        for arg, digest in digests.items():  # keys of a JSON object: str
            if type(digest) is not str or len(digest) > MAX_FIELD_CHARS or len(arg) > MAX_FIELD_CHARS:
                break
            names[_intern(arg)] = digest
        else:
            return checked_record(
                key,
                _intern(name),
                version,
                bytes(arguments),
                names,
                meta,
                value,
                _intern(kind),
                size,
                _intern(scheme),
            )
    problem = _row_problem(
        meta, digests, arguments, size, (key, raw_key), (value, raw_value), name, kind, scheme, version
    )
    raise CorruptEntryError(f"{Place('call', key, store)}: {problem}")


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
    return "unreadable"
