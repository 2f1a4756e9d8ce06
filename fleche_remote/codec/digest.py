"""Stable content hashing: call keys and value digests.

A call's key must be the same in every process, on every supported Python
and platform, or a result computed on the cluster is never found from the
laptop. ``pickle`` output is not stable enough for that (it depends on
memo order, protocol and library versions), so ordinary argument types are
fed to SHA-256 through a small canonical, tagged encoding instead:

* every item starts with a one-byte type tag, and variable-length items
  carry their length, so ``("ab", "c")`` and ``("a", "bc")`` differ;
* ``dict`` and ``set`` entries are sorted by their own digests (each
  computed exactly as :func:`digest_of` would), so insertion order does not
  matter, keys need not be comparable, and a call key can be rebuilt from
  the per-argument digests a record already holds;
* ``1``, ``1.0`` and ``True`` are different keys, as they are different
  arguments;
* a concrete :class:`pathlib.Path` is keyed by its name and the content of
  the file or directory tree it names, so a changed input file is a new
  call (see :mod:`.paths`); a ``PurePath``, or a path that names nothing,
  by its spelling.

Anything the encoder does not know falls back to its cloudpickle bytes,
with one warning per type that the key may not be stable across processes.

Byte bodies (``str``, ``bytes``, array buffers, pickled fallbacks) are
hashed by the rule of :mod:`.bodyhash` (scheme ``fleche-remote/2``: SHA-256
below 1 MiB, XXH3-128 from there on), which also explains the choice.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import math
import struct
import warnings
from pathlib import Path, PurePath
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Set

from ..errors import user_stacklevel
from .bodyhash import DIGEST_SCHEME, BodyHasher
from .bodyhash import body as _body

_U64 = struct.Struct(">Q")

#: Largest block of a non-contiguous array copied at once while hashing or
#: streaming it in C order; bounds the memory beyond the array itself.
BLOCK_BYTES = 16 << 20


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
            stacklevel=user_stacklevel(),  # the user's call, however deep the argument
        )
    data = cloudpickle.dumps(obj, protocol=4)
    _body(b"P", data, len(data), update)


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
        _body(b"s", data, len(data), update)
    elif t is bytes or t is bytearray:
        _body(b"b", obj, len(obj), update)
    elif t is memoryview:
        view = obj if obj.c_contiguous else memoryview(obj.tobytes())
        _body(b"b", view, view.nbytes, update)
    elif t in (tuple, list):
        update((b"t" if t is tuple else b"l") + _U64.pack(len(obj)))
        for item in obj:
            _encode(item, update, depth + 1)
    elif t is dict:
        items = sorted((_sub_digest(k, depth), _sub_digest(v, depth)) for k, v in obj.items())
        update(b"d" + _U64.pack(len(items)))
        for kd, vd in items:
            update(kd + vd)
    elif t in (set, frozenset):
        elems = sorted(_sub_digest(x, depth) for x in obj)
        update((b"S" if t is set else b"Z") + _U64.pack(len(elems)))
        for ed in elems:
            update(ed)
    elif isinstance(obj, Path):
        # a concrete path is keyed by the file or tree it names (see .paths)
        from .paths import encode_path

        encode_path(obj, update, lambda: _encode_named(b"p", "path", obj.as_posix(), update, depth))
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


#: SHA-256 already fed with the scheme prefix; ``copy()`` is cheaper than
#: hashing the prefix again for every dict entry and set element.
_PREFIXED = hashlib.sha256(DIGEST_SCHEME)


def _sub_digest(obj: Any, depth: int) -> bytes:
    # the same bytes as digest_of(obj), so a call key can be rebuilt from
    # per-argument digests (see call_digest_from_arg_digests)
    h = _PREFIXED.copy()
    _encode(obj, h.update, depth + 1)
    return h.digest()


def _is_numpy(obj: Any) -> bool:
    mod = type(obj).__module__
    return mod == "numpy" or mod.startswith("numpy.")


def c_order_blocks(arr: Any, limit: Optional[int] = None) -> Iterator[memoryview]:
    """The bytes of a NumPy array in C order, as consecutive byte views.

    A C-contiguous array yields one view of its own buffer (no copy). Any
    other array is copied in slabs along its leading axes, each at most
    ``limit`` bytes (default :data:`BLOCK_BYTES`; or one innermost row, if
    a row is bigger), so a Fortran-ordered or strided 1 GiB array never
    needs a second GiB.
    """
    import numpy as np

    if limit is None:
        limit = BLOCK_BYTES  # read at use: tests may lower it
    if arr.flags.c_contiguous or arr.ndim == 0 or arr.nbytes <= limit:
        flat = np.ascontiguousarray(arr).reshape(-1)
        if flat.size:
            # a uint8 view: datetime64 and friends export no buffer themselves
            yield memoryview(flat.view(np.uint8))  # type: ignore[arg-type]
        return
    rows = arr.shape[0]
    per_row = arr.nbytes // rows if rows else 0
    if arr.ndim == 1 or per_row <= limit:
        step = max(1, limit // max(per_row, 1))
        for start in range(0, rows, step):
            yield from c_order_blocks(arr[start : start + step], max(limit, per_row * step))
    else:
        for i in range(rows):
            yield from c_order_blocks(arr[i], limit)


def _encode_numpy(obj: Any, update: Callable[[bytes], None], depth: int) -> None:
    import numpy as np

    if isinstance(obj, np.ndarray) and obj.dtype != object:
        # structured dtypes: field names and types matter, not only the layout
        dtype_text = obj.dtype.str if obj.dtype.fields is None else repr(obj.dtype.descr)
        header = f"{dtype_text}|{','.join(map(str, obj.shape))}".encode()
        update(b"a" + struct.pack(">I", len(header)) + header)
        # memory layout is not the value: the body is always the C-order bytes
        body = BodyHasher()
        for block in c_order_blocks(obj):
            body.update(block)
        body.finish(update)
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
    h = _PREFIXED.copy()
    _encode(obj, h.update)
    return Digest(h.hexdigest())


def digest_hex(obj: Any) -> str:
    """:func:`digest_of` as a plain ``str``: what a record stores per argument."""
    h = _PREFIXED.copy()
    _encode(obj, h.update)
    return h.hexdigest()


def normalize_version(version: Any) -> Optional[str]:
    """A function version as keys and records hold it: ``None`` or a ``str``.

    An ``int`` is accepted and stands for its decimal string, so
    ``version=2`` and ``version="2"`` are one version with one set of keys
    (and ``LazyCall.version`` reads back ``"2"`` either way). That is a
    choice: every backend stores the version as text (an SQL ``TEXT``
    column, an HDF5 string attribute), so an int could not come back as an
    int, and a key must be rebuildable from what a record holds. fleche
    keys ``2`` and ``"2"`` apart; nothing is lost by joining them, since
    fleche-remote keys differ from fleche's anyway.

    Raises:
        TypeError: ``version`` is another type (``bool`` included, which
            would otherwise pass as an int).
    """
    if version is None or type(version) is str:
        return version  # type: ignore[no-any-return]
    if isinstance(version, str):
        return str(version)
    if isinstance(version, int) and not isinstance(version, bool):
        return str(int(version))
    raise TypeError(
        f"version must be a str, an int or None, got {type(version).__name__} {version!r}; "
        f"bump it (e.g. version=2 or version='2024-06') when a function's meaning changes"
    )


def call_digest(name: str, arguments: Dict[str, Any], version: Any = None) -> Digest:
    """The key a call is saved under: its name, version and arguments.

    ``version`` goes through :func:`normalize_version` (``2`` is ``"2"``).
    """
    return digest_of(("call", name, normalize_version(version), arguments))


def call_digest_from_arg_digests(name: str, arg_digests: Mapping[str, str], version: Any = None) -> Digest:
    """The same key as :func:`call_digest`, from ``{name: digest_of(value)}``.

    A record stores one digest per argument anyway; building the key from
    them hashes each (possibly huge) argument once instead of twice.
    """
    version = normalize_version(version)
    memo = type(name) is str
    head = _CALL_HEADS.get((name, version)) if memo else None
    if head is None:
        head = _PREFIXED.copy()
        head.update(b"t" + _U64.pack(4))
        for part in ("call", name, version):
            _encode(part, head.update)
        if memo:
            if len(_CALL_HEADS) >= _MEMO_MAX:
                _CALL_HEADS.clear()
            _CALL_HEADS[name, version] = head
    h = head.copy()
    names = _ARG_NAME_DIGESTS
    items = []
    for k, d in arg_digests.items():
        kd = names.get(k) if type(k) is str else None
        if kd is None:
            kd = _sub_digest(k, 0)
            if type(k) is str:
                if len(names) >= _MEMO_MAX:
                    names.clear()
                names[k] = kd
        items.append(kd + bytes.fromhex(d))
    items.sort()
    h.update(b"d" + _U64.pack(len(items)) + b"".join(items))
    return Digest(h.hexdigest())


#: What a key's hash starts with for one function name and version, and the
#: digest of each argument name: the same for every call of a function, so
#: each is hashed once, not on every save (a small call's key 4.7 -> ~2 us).
#: Bounded: past :data:`_MEMO_MAX` entries the memo starts over.
_CALL_HEADS: Dict[Any, Any] = {}
_ARG_NAME_DIGESTS: Dict[str, bytes] = {}
_MEMO_MAX = 4096
