"""Calls as the user sees them (``Call``, ``LazyCall``) and as stores keep
them (``CallRecord``).

A :class:`CallRecord` is plain data only: the arguments ride along as
opaque cloudpickle bytes plus one stable digest per argument, so a store
or a server can index, filter and move records without unpickling
anything a user wrote. The result is not in the record at all; the record
points at it by its value digest.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional

from .codec.bodyhash import DIGEST_SCHEME_NAME
from .codec.digest import (
    Digest,
    call_digest,
    call_digest_from_arg_digests,
    digest_hex,
    normalize_version,
)
from .codec.plain import check_plain, register_plain
from .errors import CorruptEntryError

if TYPE_CHECKING:
    from .codec.values import Blob


@dataclass
class Call:
    """One function call: what was called, with what, and what it returned.

    Args:
        name: the function's qualified name (``module.qualname`` for
            :func:`~fleche_remote.cached`).
        arguments: parameter name to value, as bound by the function.
        result: the return value.
        metadata: plain data (str/int/float/bool/None/list/dict) recorded
            next to the call, e.g. wall time and host.
        version: bump it to invalidate earlier results of ``name``.
    """

    name: str
    arguments: Dict[str, Any]
    result: Any = None
    metadata: Optional[Dict[str, Any]] = None
    version: Optional[str] = None

    def key(self) -> Digest:
        """The digest ``save`` files this call under; stable across processes."""
        return call_digest(self.name, dict(self.arguments), self.version)


#: What a record decoded without a ``digest_scheme`` field was made with:
#: records from before the field existed used the first scheme.
LEGACY_DIGEST_SCHEME = "fleche-remote/1"


@register_plain
@dataclass(frozen=True)
class CallRecord:
    """A call as stored: plain fields only, safe to decode anywhere.

    ``digest_scheme`` names how ``key``, ``arg_digests`` and ``value`` were
    computed (:data:`~fleche_remote.codec.digest.DIGEST_SCHEME_NAME`), so a store
    can tell records of different schemes apart, and a server can check a
    value under the scheme its record claims, without any migration.
    """

    key: str
    name: str
    version: Optional[str]
    arguments: bytes
    arg_digests: Dict[str, str]
    metadata: Dict[str, Any]
    value: str
    value_kind: str = "pickle"
    value_size: int = 0
    digest_scheme: str = DIGEST_SCHEME_NAME

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # Pickles of records written before ``digest_scheme`` existed lack
        # it; without this, the class default would claim today's scheme.
        # (Our own code, run by the restricted decoder: it only fills fields.)
        if isinstance(state, dict) and "digest_scheme" not in state:
            state = {**state, "digest_scheme": LEGACY_DIGEST_SCHEME}
        self.__dict__.update(state)


@register_plain
@dataclass(frozen=True)
class UnreadableRecord:
    """What a listing yields for a stored record that could not be read.

    One bad record (planted in a shared directory, or saved through an
    append-only key) must not hide the others: a store's ``query`` yields
    this in its place, a server sends it on as plain data, and
    ``fleche-remote ls`` shows it as ``<unreadable: reason>``. Code that
    wants calls (:meth:`~fleche_remote.BaseCache.query`) skips it.
    """

    key: str
    reason: str


#: A call record's encoded size at most (its arguments ride inside it): a
#: gzip bomb in a shared directory is refused past this, never inflated.
MAX_RECORD_BYTES = 256 << 20

#: Longest name, version, digest or kind a record may carry: room for any
#: qualified name, and a bound on what a listing prints.
MAX_FIELD_CHARS = 4096

#: What a key or value digest is: lowercase hex, at most 512 bits.
HEX_DIGEST = re.compile(r"[0-9a-f]{1,128}")
_TEXT_FIELDS = ("key", "name", "value", "value_kind", "digest_scheme")


def record_problem(record: Any) -> Optional[str]:
    """What is wrong with a decoded record's fields, or None when nothing is.

    A record holds plain fields of fixed types (see :class:`CallRecord`);
    one that arrives with an ``int`` for its arguments, a list for its
    metadata or a 200,000-deep structure is refused here, by every store
    on read and by a server on save, before any reader trips on it.
    """
    if not isinstance(record, CallRecord):
        return f"holds a {type(record).__name__}, expected a CallRecord"
    fields = getattr(record, "__dict__", {})
    for name in _TEXT_FIELDS:
        value = fields.get(name)
        if not isinstance(value, str):
            return f"its {name} is a {type(value).__name__}, expected str"
        if len(value) > MAX_FIELD_CHARS:
            return f"its {name} is {len(value)} characters long (at most {MAX_FIELD_CHARS})"
    for name in ("key", "value"):
        if not HEX_DIGEST.fullmatch(fields[name]):
            return f"its {name} {fields[name][:80]!r} is not a hex digest"
    version = fields.get("version")
    if version is not None and (not isinstance(version, str) or len(version) > MAX_FIELD_CHARS):
        return f"its version is a {type(version).__name__}, expected str or None"
    if not isinstance(fields.get("arguments"), (bytes, bytearray)):
        return f"its arguments are a {type(fields.get('arguments')).__name__}, expected pickled bytes"
    size = fields.get("value_size")
    if type(size) is not int or size < 0:
        return f"its value_size is {size!r}, expected an int >= 0"
    digests = fields.get("arg_digests")
    if not isinstance(digests, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and len(k) <= MAX_FIELD_CHARS and len(v) <= MAX_FIELD_CHARS
        for k, v in digests.items()
    ):
        return f"its arg_digests are {type(digests).__name__}, expected a dict of str to str"
    metadata = fields.get("metadata")
    if not isinstance(metadata, dict):
        return f"its metadata is a {type(metadata).__name__}, expected a dict"
    try:
        check_plain(metadata, "its metadata")
    except TypeError as exc:
        return str(exc)
    return None


_new = object.__new__
_set = object.__setattr__


def checked_record(
    key: str,
    name: str,
    version: Optional[str],
    arguments: bytes,
    arg_digests: Dict[str, str],
    metadata: Dict[str, Any],
    value: str,
    value_kind: str,
    value_size: int,
    digest_scheme: str,
) -> CallRecord:
    """A :class:`CallRecord` of fields its reader has already checked, each
    once, as :func:`record_problem` would (the SQL store checks its columns
    as it converts them): the frozen dataclass's ``__init__`` sets each
    field through ``object.__setattr__``, ~1 us a record against 0.35 here,
    and a listing of 1000 records paid it on every read.
    """
    record = _new(CallRecord)
    _set(
        record,
        "__dict__",
        {
            "key": key,
            "name": name,
            "version": version,
            "arguments": arguments,
            "arg_digests": arg_digests,
            "metadata": metadata,
            "value": value,
            "value_kind": value_kind,
            "value_size": value_size,
            "digest_scheme": digest_scheme,
        },
    )
    return record  # type: ignore[no-any-return]


def check_record(record: Any, where: str) -> CallRecord:
    """``record``, if its fields are plain data of the right types.

    Raises:
        CorruptEntryError: naming ``where`` and what is wrong.
    """
    problem = record_problem(record)
    if problem is not None:
        raise CorruptEntryError(f"{where}: {problem}")
    return record  # type: ignore[no-any-return]


def make_record(call: Call, blob: Blob, value_digest: str) -> CallRecord:
    """Build the stored form of ``call`` whose result encodes to ``blob``.

    Every field is made here, of the right type, so the record is built as
    :func:`checked_record` builds one (the dataclass's ``__init__`` cost
    ~1 us of a small save's ~25 us of Python).
    """
    metadata = dict(call.metadata) if call.metadata else {}
    if metadata:
        check_plain(metadata, "Call.metadata")
    arguments = dict(call.arguments)
    # each argument is hashed once: the key is built from these digests
    arg_digests = {k: digest_hex(v) for k, v in arguments.items()}
    name = call.name
    version = normalize_version(call.version)  # an int version is stored as its text
    return checked_record(
        str(call_digest_from_arg_digests(name, arg_digests, version)),
        name,
        version,
        _pickle_arguments(arguments),
        arg_digests,
        metadata,
        str(value_digest),
        blob.kind,
        blob.size,
        DIGEST_SCHEME_NAME,
    )


#: Argument values that ``pickle`` writes as cloudpickle would: for a call
#: of these only, the C pickler runs without cloudpickle's reducer (1.6 ->
#: 0.5 us for one int). Readers unpickle both the same way.
_PLAIN_ARGUMENTS = frozenset({int, float, str, bytes, bool, type(None)})


def _pickle_arguments(arguments: Dict[str, Any]) -> bytes:
    for value in arguments.values():
        if type(value) not in _PLAIN_ARGUMENTS:
            import cloudpickle

            return cloudpickle.dumps(arguments, protocol=4)  # type: ignore[no-any-return]
    return pickle.dumps(arguments, protocol=4)


_UNSET: Any = object()

#: The metadata entry where a signed cache keeps a record's signature
#: (see :mod:`fleche_remote.signing`); ``LazyCall.metadata`` leaves it out.
SIGNATURE_KEY = "fleche_remote.signature"


class LazyCall:
    """A stored call whose ``result`` is loaded on first access.

    ``name``, ``metadata`` and ``key`` are available at once; ``arguments``
    are unpickled when first read (a listing that looks at results only,
    ``[c.result for c in cache.load_many(keys)]``, paid ~0.5 us a call for
    them), and the (possibly large) result is fetched from its cache only
    when ``.result`` is read; each is then kept.
    """

    __slots__ = ("_arguments", "_loader", "_result", "record")

    def __init__(self, record: CallRecord, loader: Callable[[], Any]) -> None:
        self.record = record
        self._loader = loader
        self._result = _UNSET
        self._arguments: Any = _UNSET

    @property
    def arguments(self) -> Dict[str, Any]:
        """Parameter name to value, unpickled on first read.

        Raises:
            CorruptEntryError: the stored arguments do not unpickle in this
                process (a module they need is missing here, or the bytes
                are damaged); the original exception is its ``__cause__``.
        """
        if self._arguments is _UNSET:
            import cloudpickle

            try:
                self._arguments = cloudpickle.loads(self.record.arguments)
            except Exception as exc:
                record = self.record
                raise CorruptEntryError(
                    f"the arguments of call {record.key[:16]} ({record.name}) do not unpickle here "
                    f"({type(exc).__name__}: {exc}); its result and metadata are still readable. "
                    f"If a module they need is missing, install or import it; otherwise the entry "
                    f"is damaged: evict it and compute it again"
                ) from exc
        return self._arguments  # type: ignore[no-any-return]

    @property
    def key(self) -> Digest:
        return Digest(self.record.key)

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def version(self) -> Optional[str]:
        return self.record.version

    @property
    def metadata(self) -> Mapping[str, Any]:
        meta = self.record.metadata
        if SIGNATURE_KEY in meta:  # a signed cache's stamp, not the caller's metadata
            return {k: v for k, v in meta.items() if k != SIGNATURE_KEY}
        return meta

    @property
    def value_digest(self) -> Digest:
        return Digest(self.record.value)

    @property
    def loaded(self) -> bool:
        """Whether ``result`` has been fetched already."""
        return self._result is not _UNSET

    @property
    def result(self) -> Any:
        if self._result is _UNSET:
            self._result = self._loader()
        return self._result

    def to_call(self) -> Call:
        """A plain :class:`Call` (loads the result)."""
        return Call(self.name, dict(self.arguments), self.result, dict(self.metadata), self.version)

    def __repr__(self) -> str:
        state = "loaded" if self.loaded else "not loaded"
        return f"<LazyCall {self.name} key={self.record.key[:12]} result {state}>"


__all__ = [
    "HEX_DIGEST",
    "MAX_FIELD_CHARS",
    "Call",
    "CallRecord",
    "LazyCall",
    "UnreadableRecord",
    "check_record",
    "checked_record",
    "make_record",
    "record_problem",
]
