"""Body hashing: one rule for every variable-length byte body.

Keys (:mod:`.digest`), ``Path`` arguments (:mod:`.paths`) and value digests
(:mod:`.values`) all hash their byte bodies the same way; this module is
that rule and nothing else, so each of them can use it without importing
the others.

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

import struct
from typing import Any, Callable, Optional

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


def body(tag: bytes, data: Any, n: int, update: Callable[[bytes], None]) -> None:
    """``tag``, the length, then the body itself or, from the threshold on, its bulk digest."""
    update(tag + _U64.pack(n))
    if n < BULK_THRESHOLD:
        update(data)
    else:
        h = bulk_hasher()
        h.update(data)
        update(h.digest())
