"""Stable content hashing of call arguments.

A call's key must be the same in every process, on every supported Python
and platform, or a result computed on the cluster is never found from the
laptop. ``pickle`` output is not stable enough for that (it depends on
memo order, protocol and library versions), so ordinary argument types are
fed to SHA-256 through a small canonical, tagged encoding instead:

* every item starts with a one-byte type tag, and variable-length items
  carry their length, so ``("ab", "c")`` and ``("a", "bc")`` differ;
* ``dict`` and ``set`` entries are sorted by the digest of their encoding,
  so insertion order does not matter and keys need not be comparable;
* ``1``, ``1.0`` and ``True`` are different keys, as they are different
  arguments.

Anything the encoder does not know falls back to its cloudpickle bytes,
with one warning per type that the key may not be stable across processes.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import math
import struct
import warnings
from pathlib import PurePath
from typing import Any, Callable, Set

#: Bumping this changes every key; it is part of the hash input so that a
#: future change of encoding can never collide with today's keys.
DIGEST_SCHEME = b"fleche-remote/digest/1\x00"


class Digest(str):
    """A hex SHA-256 digest; a ``str``, so it prints, compares and indexes as one."""

    __slots__ = ()

    def short(self, n: int = 12) -> str:
        """The first ``n`` hex characters, enough to :meth:`~BaseCache.expand`."""
        return str(self)[:n]


class UnstableDigestWarning(UserWarning):
    """An argument was hashed through pickle; its key may differ elsewhere."""


_warned_types: Set[str] = set()


def _fallback(obj: Any, update: Callable[[bytes], None]) -> None:
    import cloudpickle

    tname = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if tname not in _warned_types:
        _warned_types.add(tname)
        warnings.warn(
            f"hashing an argument of type {tname} through cloudpickle; its key "
            f"may differ between processes or library versions. Pass plain data, "
            f"a dataclass, or a NumPy array for a stable key.",
            UnstableDigestWarning,
            stacklevel=4,
        )
    data = cloudpickle.dumps(obj, protocol=4)
    update(b"P" + struct.pack(">Q", len(data)))
    update(data)


def _encode(obj: Any, update: Callable[[bytes], None], depth: int = 0) -> None:
    if depth > 200:
        raise RecursionError("argument nested more than 200 levels deep")
    t = type(obj)
    if obj is None:
        update(b"N")
    elif t is bool:
        update(b"T" if obj else b"F")
    elif t is int:
        text = str(obj).encode()
        update(b"i" + struct.pack(">I", len(text)) + text)
    elif t is float:
        if math.isnan(obj):
            update(b"fnan")  # every NaN is the same argument
        else:
            update(b"f" + struct.pack(">d", obj))
    elif t is complex:
        update(b"c" + struct.pack(">dd", obj.real, obj.imag))
    elif t is str:
        data = obj.encode("utf-8", "surrogatepass")
        update(b"s" + struct.pack(">Q", len(data)))
        update(data)
    elif t in (bytes, bytearray, memoryview):
        data = bytes(obj)
        update(b"b" + struct.pack(">Q", len(data)))
        update(data)
    elif t in (tuple, list):
        update((b"t" if t is tuple else b"l") + struct.pack(">Q", len(obj)))
        for item in obj:
            _encode(item, update, depth + 1)
    elif t is dict:
        items = sorted((_sub_digest(k, depth), _sub_digest(v, depth)) for k, v in obj.items())
        update(b"d" + struct.pack(">Q", len(items)))
        for kd, vd in items:
            update(kd + vd)
    elif t in (set, frozenset):
        elems = sorted(_sub_digest(x, depth) for x in obj)
        update((b"S" if t is set else b"Z") + struct.pack(">Q", len(elems)))
        for ed in elems:
            update(ed)
    elif isinstance(obj, PurePath):
        _encode_named(b"p", "path", obj.as_posix(), update, depth)
    elif isinstance(obj, enum.Enum):
        _encode_named(b"e", _qualname(t), obj.name, update, depth)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        _encode_named(b"D", _qualname(t), fields, update, depth)
    elif _is_numpy(obj):
        _encode_numpy(obj, update, depth)
    elif isinstance(obj, (int, float, str, tuple)) and not _is_numpy(obj):
        # subclasses (IntEnum handled above, NamedTuple, str subclasses such
        # as Digest) hash as their plain base value plus the class name
        base: Any = next(b for b in (bool, int, float, str, tuple) if isinstance(obj, b))
        _encode_named(b"u", _qualname(t), base(obj), update, depth)
    else:
        _fallback(obj, update)


def _qualname(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


def _encode_named(tag: bytes, name: str, payload: Any, update: Callable[[bytes], None], depth: int) -> None:
    data = name.encode()
    update(tag + struct.pack(">I", len(data)) + data)
    _encode(payload, update, depth + 1)


def _sub_digest(obj: Any, depth: int) -> bytes:
    h = hashlib.sha256()
    _encode(obj, h.update, depth + 1)
    return h.digest()


def _is_numpy(obj: Any) -> bool:
    mod = type(obj).__module__
    return mod == "numpy" or mod.startswith("numpy.")


def _encode_numpy(obj: Any, update: Callable[[bytes], None], depth: int) -> None:
    import numpy as np

    if isinstance(obj, np.ndarray) and obj.dtype != object:
        arr = np.ascontiguousarray(obj)
        # structured dtypes: field names and types matter, not only the layout
        dtype_text = arr.dtype.str if arr.dtype.fields is None else repr(arr.dtype.descr)
        header = f"{dtype_text}|{','.join(map(str, arr.shape))}".encode()
        update(b"a" + struct.pack(">I", len(header)) + header)
        update(struct.pack(">Q", arr.nbytes))
        if arr.nbytes:
            # the same bytes as the buffer, but datetime64/timedelta64 export no buffer
            update(memoryview(arr.reshape(-1).view(np.uint8)))  # type: ignore[arg-type]
    elif isinstance(obj, np.generic) and obj.dtype != object:
        data = obj.tobytes()
        header = obj.dtype.str.encode()
        update(b"g" + struct.pack(">I", len(header)) + header + data)
    elif isinstance(obj, np.ndarray):
        update(b"O" + struct.pack(">I", obj.ndim))
        _encode(tuple(obj.shape), update, depth + 1)
        _encode(obj.ravel().tolist(), update, depth + 1)
    else:
        _fallback(obj, update)


def digest_of(obj: Any) -> Digest:
    """Stable SHA-256 digest of one object (see the module notes)."""
    h = hashlib.sha256(DIGEST_SCHEME)
    _encode(obj, h.update)
    return Digest(h.hexdigest())


def call_digest(name: str, arguments: dict[str, Any], version: str | None = None) -> Digest:
    """The key a call is saved under: its name, version and arguments."""
    return digest_of(("call", name, version, arguments))
