"""Canonical bytes: exactly what a signature of :mod:`fleche_remote.signing` covers.

A MAC is only as good as the bytes it is computed over. Those bytes must be
the same whichever store an entry went through and whichever process reads
it back: :func:`canonical` turns the plain data of records and metadata
into one unambiguous form, and :func:`blob_parts` / :func:`rereadable` hand a
value's body over in its largest pieces, spooled first when it is a
one-shot stream that will have to be read again.

Why a module of its own: this is pure encoding, with no keys, no MACs and
no policy. :mod:`fleche_remote.signing` decides what is signed, with which
key, and what is refused; here is only how the signed data is spelled in
bytes, which can be read (and tested) without thinking about keys.
"""

from __future__ import annotations

import json
import tempfile
from typing import Any, Iterator, Mapping

from .values import Blob, BytesBlob, BytesLike, PartsBlob, SpooledBlob, StreamBlob

# -- canonical bytes of plain data ------------------------------------------------------


def canonical(obj: Any) -> bytes:
    """Unambiguous bytes of plain data (what metadata may hold), the same
    whichever store it went through: dict keys sorted, tuples as lists
    (some stores give lists back). Compact ASCII JSON when the value has
    no bytes; otherwise every item tagged and length-prefixed, so that a
    ``bytes`` and a ``str`` or dict that looks like one never collide.

    Raises:
        TypeError: ``obj`` holds something that is not plain data.
    """
    try:  # JSON, in C, when it can say it exactly: everything but bytes
        return b"J" + _json(obj).encode("ascii")
    except TypeError:
        out = bytearray(b"C")
        _canon(obj, out)
        return bytes(out)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item") and not hasattr(obj, "__len__"):  # a NumPy scalar a store gave back
        return obj.item()
    raise TypeError(type(obj).__name__)  # bytes, and anything not plain: the tagged form


#: Sorted keys, no spaces, ASCII only: one text for one value. A tuple
#: comes out as a list, which is what some stores give back.
_json = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=True, check_circular=False, default=_json_default
).encode


def _canon(obj: Any, out: bytearray) -> None:
    kind = type(obj)
    if kind is str:
        data = obj.encode("utf-8", "surrogatepass")
        out += b"s%d:" % len(data)
        out += data
    elif kind is dict:
        out += b"d%d:" % len(obj)
        for k in sorted(obj):
            _canon(k, out)
            _canon(obj[k], out)
    elif obj is None:
        out += b"N"
    elif obj is True:
        out += b"T"
    elif obj is False:
        out += b"F"
    elif kind is int:
        out += b"i%d;" % obj
    elif kind is float:
        out += b"f" + obj.hex().encode() + b";"
    elif kind is bytes:
        out += b"b%d:" % len(obj)
        out += obj
    elif kind is list or kind is tuple:
        out += b"l%d:" % len(obj)
        for item in obj:
            _canon(item, out)
    else:
        _canon_other(obj, out)


def _canon_other(obj: Any, out: bytearray) -> None:
    """Subclasses and the odd types a store may give back, as their plain twin."""
    if isinstance(obj, bool):
        _canon(bool(obj), out)
    elif isinstance(obj, int):
        _canon(int(obj), out)
    elif isinstance(obj, float):
        _canon(float(obj), out)
    elif isinstance(obj, str):
        _canon(str(obj), out)
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        _canon(bytes(obj), out)
    elif isinstance(obj, (list, tuple)):
        _canon(list(obj), out)
    elif isinstance(obj, Mapping):
        _canon(dict(obj), out)
    elif hasattr(obj, "item") and not hasattr(obj, "__len__"):  # a NumPy scalar
        _canon(obj.item(), out)
    else:
        raise TypeError(f"cannot sign a {type(obj).__name__}: metadata must be plain data")


# -- blobs ------------------------------------------------------------------------------


def blob_parts(blob: Blob) -> Iterator[BytesLike]:
    """The body in the largest pieces at hand (no per-chunk overhead for
    bodies already in memory)."""
    if isinstance(blob, BytesBlob):
        yield blob._data
    elif isinstance(blob, PartsBlob):
        yield from blob._parts
    else:
        yield from blob.chunks()


def rereadable(blob: Blob) -> Blob:
    """``blob`` itself, or for a one-shot stream a spooled copy of it."""
    inner = getattr(blob, "inner", blob)  # a VerifyingBlob around a stream
    if not isinstance(inner, StreamBlob):
        return blob
    spool = tempfile.SpooledTemporaryFile(max_size=64 << 20, prefix="fleche-remote-sign-")
    for chunk in blob.chunks():
        spool.write(chunk)
    return SpooledBlob(blob.kind, blob.meta, blob.size, spool)
