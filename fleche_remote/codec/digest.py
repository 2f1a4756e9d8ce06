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

Hashing (scheme ``fleche-remote/2``)
------------------------------------

One rule covers every variable-length byte body (``str``, ``bytes``, array
buffers, pickled fallbacks, and value bodies, see :mod:`.values`): a body
of ``n < BULK_THRESHOLD`` bytes (1 MiB) is fed to SHA-256 as itself; a
body of ``n >= BULK_THRESHOLD`` bytes is fed as the 16-byte XXH3-128
digest of its bytes (the canonical, big-endian form). ``n`` is always fed
first, so the two forms cannot be confused. Keys and value digests stay
hex SHA-256 (64 characters) everywhere.

Why, measured with ``benchmarks/bench_hash.py`` on a 2-core x86-64 with
SHA-NI (see "Hashing" in ``benchmarks/README.md``): SHA-256 runs at
~1.5 GB/s, so a 1 GiB argument cost 0.7 s per key and every save hashed
each large value twice (client, then server). BLAKE3 reaches ~2.5 GB/s on
one thread and ~3.8 GB/s on both cores: 0.28 s, still short of the goal of
0.15 s, and it takes a core from ssh. XXH3-128 runs at 12-17 GB/s
(~0.07 s per GiB), so hashing is never the bottleneck of a save or a key.
SHA-256 stays for everything small and for the structure: it is in every
Python's standard library, it uses SHA-NI, and on small items it costs
~1 us per call, like BLAKE2b and BLAKE3. The 1 MiB threshold keeps
ordinary arguments and small values on the standard library alone (small
calls never import ``xxhash``, and a server with nothing installed can
still check small values), while every body large enough for hashing
speed to matter goes through XXH3 (at 1 MiB it is ~45x faster than
SHA-256; the combined form pays off from a few KiB on).

XXH3 is not a cryptographic hash: someone can construct two inputs with
the same XXH3-128. That does not weaken the cache, because of who can
write to it. Keys are computed by clients only; a server never unpickles
arguments, so it cannot check that a record's key belongs to its call. So
anyone with write access can already file any result under any key, and
collision resistance of the key hash could never protect against writers;
read-only users cannot write at all. What the hash must prevent is
accidents: two different arguments or values that happen to share a
digest. For that, 128 well-mixed bits give a chance of about ``n**2 /
2**129`` among ``n`` distinct large bodies, nothing at any real cache
size. The same argument covers value digests: a writer able to forge a
colliding value could as well have filed a record pointing at any value.
A cache whose writers do not trust each other needs signatures, which no
hash choice gives.

``xxhash`` has wheels for CPython 3.9-3.13 on Linux (x86-64, aarch64,
ppc64le, s390x; glibc and musl), macOS and Windows, and is a dependency.
It is imported only when a body reaches the threshold; if it is missing
then, :class:`BulkHashUnavailable` says what to install. XXH3's output
was frozen in xxHash 0.8.0; the first use checks two published test
vectors so that an older or broken build fails loudly instead of making
keys nobody else computes.
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

#: Names the whole scheme (key encoding, value digest, bulk hash and its
#: threshold). Records carry it, so a later change needs no migration.
DIGEST_SCHEME_NAME = "fleche-remote/2"

#: Bumping this changes every key; it is part of the hash input so that a
#: future change of encoding can never collide with today's keys.
DIGEST_SCHEME = b"fleche-remote/digest/2\x00"

#: Bodies of at least this many bytes are hashed with XXH3-128 and only its
#: digest enters SHA-256. It is part of the scheme: changing it changes keys.
#: Tests may patch it (it is read at each use) to cross the boundary cheaply.
BULK_THRESHOLD = 1 << 20

#: Largest block of a non-contiguous array copied at once while hashing or
#: streaming it in C order; bounds the memory beyond the array itself.
BLOCK_BYTES = 16 << 20

#: Published XXH3-128 vectors (xxHash's sanity tests): (input, hex digest).
_XXH3_128_VECTORS = ((b"", "99aa06d3014798d86001c324468d497f"), (b"abc", "06b05ab6733a618578af5f94892f3950"))

_U64 = struct.Struct(">Q")


class BulkHashUnavailable(ImportError):
    """The ``xxhash`` package, needed to hash bodies of 1 MiB or more, is missing or wrong."""


_xxh3_128: Optional[Callable[..., Any]] = None


def bulk_hasher() -> Any:
    """A fresh XXH3-128 hasher (``update``/``digest``), importing ``xxhash`` on first use.

    Raises:
        BulkHashUnavailable: ``xxhash`` is not installed, or computes
            XXH3-128 differently from the published test vectors.
    """
    global _xxh3_128
    if _xxh3_128 is None:
        try:
            import xxhash
        except ImportError:
            raise BulkHashUnavailable(
                f"fleche-remote hashes values and arguments of {BULK_THRESHOLD} bytes or more with "
                f"XXH3-128, from the 'xxhash' package, which is not installed here; install it with "
                f"`python -m pip install 'xxhash>=3'`"
            ) from None
        for data, expected in _XXH3_128_VECTORS:
            got = xxhash.xxh3_128(data).hexdigest()
            if got != expected:
                raise BulkHashUnavailable(
                    f"xxhash {getattr(xxhash, 'VERSION', '?')} computes XXH3-128({data!r}) = {got}, "
                    f"expected {expected}; upgrade it with `python -m pip install -U 'xxhash>=3'`"
                )
        _xxh3_128 = xxhash.xxh3_128
    return _xxh3_128()


class BodyHasher:
    """Feeds one variable-length body to ``update`` under the bulk rule.

    The length need not be known in advance: bodies are buffered until they
    reach :data:`BULK_THRESHOLD` (at most 1 MiB held), then switch to
    XXH3-128 without copying further chunks.
    """

    __slots__ = ("_bulk", "_small", "size")

    def __init__(self) -> None:
        self._small = bytearray()
        self._bulk: Any = None
        self.size = 0

    def update(self, data: Any) -> None:
        n = data.nbytes if isinstance(data, memoryview) else len(data)
        self.size += n
        if self._bulk is not None:
            self._bulk.update(data)
        elif self.size >= BULK_THRESHOLD:
            self._bulk = bulk_hasher()
            if self._small:
                self._bulk.update(self._small)
                self._small = bytearray()
            self._bulk.update(data)
        else:
            self._small += data

    def finish(self, update: Callable[[bytes], None]) -> None:
        """Feed the length and the body (or its bulk digest) to ``update``."""
        update(_U64.pack(self.size))
        update(self._bulk.digest() if self._bulk is not None else bytes(self._small))


def _body(tag: bytes, data: Any, n: int, update: Callable[[bytes], None]) -> None:
    """``tag``, the length, then the body itself or, from the threshold on, its bulk digest."""
    update(tag + _U64.pack(n))
    if n < BULK_THRESHOLD:
        update(data)
    else:
        h = bulk_hasher()
        h.update(data)
        update(h.digest())


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
    h = _PREFIXED.copy()
    h.update(b"t" + _U64.pack(4))
    for part in ("call", name, normalize_version(version)):
        _encode(part, h.update)
    items = sorted((_sub_digest(k, 0), bytes.fromhex(d)) for k, d in arg_digests.items())
    h.update(b"d" + _U64.pack(len(items)))
    for kd, vd in items:
        h.update(kd + vd)
    return Digest(h.hexdigest())
