"""Values as opaque blobs: encoding, streaming, and their content digests.

A cached result is turned into a :class:`Blob` exactly once, in the
process that computed or asked for it. Everything in between (value
stores, the wire, the server, back-fills between stack layers) moves the
blob's bytes without decoding them. That is what keeps the server from
ever unpickling a client's data, and what lets a 4 GiB array stream in
bounded chunks.

Blob kinds:

``"pickle"``
    a pickle stream (cloudpickle, protocol 5) of an arbitrary object with
    no large buffers.
``"pickle5"``
    an object holding large buffers (a dict of arrays, a DataFrame...):
    the body is the protocol-5 pickle stream followed by its out-of-band
    buffers, raw and in order; ``meta["buffers"]`` lists their sizes (the
    stream is the rest). Saving streams each buffer from the object's own
    memory, and loading reads each one straight into a fresh writable
    buffer that the rebuilt object keeps, so a big value is never
    concatenated into one ``bytes`` nor copied out of one.
``"bytes"``
    a ``bytes`` value, stored as is.
``"ndarray"``
    a NumPy array of a non-object dtype: ``meta`` carries ``dtype`` (the
    ``dtype.str``) and ``shape``; the body is the C-ordered raw buffer, so
    an HDF5 store can keep it as a native dataset and the client can
    receive it straight into a preallocated array.

Passes over a large value (each one a full read of its memory):

* save: one hash (XXH3-128 through :class:`~.digest.BodyHasher`, about
  0.07 s per GiB) and one write (file or wire), straight from the
  object's own buffers; a non-contiguous array is gathered in bounded
  slabs, once per pass, instead of copied whole first.
* load: one read, into the final buffers (:meth:`Blob.fill`; a file
  store's ``readinto`` goes straight from the page cache).

The value digest is SHA-256 of ``VALUE_SCHEME``, the kind and meta as
canonical JSON, the body's length and the body under the bulk rule of
:mod:`.digest` (bodies of 1 MiB or more enter as their XXH3-128).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from abc import ABC, abstractmethod
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Union

from ..errors import CorruptEntryError
from . import bodyhash
from .bodyhash import DIGEST_SCHEME_NAME, BodyHasher, bulk_hasher
from .digest import Digest, c_order_blocks

#: Chunk size for streaming value bodies (files, wire, hashing). 1 MiB keeps
#: per-chunk overhead negligible (<0.1% at ssh speeds) while the memory any
#: side holds beyond the value itself stays at a chunk or two.
CHUNK_SIZE = 1 << 20

KINDS = ("pickle", "pickle5", "bytes", "ndarray")

#: Prefix of every value digest under scheme ``fleche-remote/2``.
VALUE_SCHEME = b"fleche-remote/value/2\x00"

#: Value digest prefixes by scheme name, for checking digests a record of
#: an older (or newer) scheme claims.
_VALUE_SCHEMES = {DIGEST_SCHEME_NAME: VALUE_SCHEME}

#: Pickled buffers smaller than this stay inside the pickle stream: below
#: it, a copy costs less than the bookkeeping of a separate buffer.
OUT_OF_BAND_MIN = 64 << 10

#: At most this many buffers go out of band; ``meta["buffers"]`` then stays
#: under ~12 KB of JSON, well inside an HDF5 attribute (64 KiB) and a wire
#: message. Further buffers are pickled in-band (one copy each).
OUT_OF_BAND_MAX = 1024

#: Files are read into their target in pieces of this size, so a load stays
#: interruptible and never asks the kernel for more than 2 GiB at once.
_READINTO_STEP = 64 << 20

BytesLike = Union[bytes, bytearray, memoryview]


class Blob(ABC):
    """An encoded value: ``kind``, plain ``meta``, and ``size`` body bytes."""

    kind: str
    meta: Dict[str, Any]
    size: int

    @abstractmethod
    def chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[BytesLike]:
        """Yield the body in pieces of at most ``chunk_size`` bytes."""

    def read_all(self) -> bytes:
        """The whole body as one ``bytes`` (fine for small values)."""
        return b"".join(self.chunks())  # join takes any bytes-like: one copy

    def fill(self, targets: Sequence[memoryview]) -> None:
        """Read the whole body into ``targets`` (writable byte views), in order.

        Their sizes must add up to ``size``. This is how values are decoded:
        the body lands in its final buffers, with no intermediate ``bytes``
        where the source allows (files use ``readinto``); here, each chunk
        is copied once into place.

        Raises:
            CorruptEntryError: the body is shorter or longer than the targets.
        """
        _check_targets(self, targets)
        source = iter(self.chunks())
        pending = memoryview(b"")
        done = 0
        for target in targets:
            pos, n = 0, target.nbytes
            while pos < n:
                if not pending:
                    chunk = next(source, None)
                    if chunk is None:
                        raise CorruptEntryError(f"value body ended after {done + pos} of {self.size} bytes")
                    pending = _byte_view(chunk)
                k = min(n - pos, pending.nbytes)
                target[pos : pos + k] = pending[:k]
                pending = pending[k:]
                pos += k
            done += n
        extra = pending.nbytes + sum(len(c) for c in source)  # also keeps a stream in step
        if extra:
            raise CorruptEntryError(f"value body is {extra} bytes longer than its {self.size}")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} kind={self.kind} size={self.size} meta={self.meta}>"


def _byte_view(data: BytesLike) -> memoryview:
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _check_targets(blob: Blob, targets: Sequence[memoryview]) -> None:
    total = sum(t.nbytes for t in targets)
    if total != blob.size:
        raise CorruptEntryError(f"value body has {blob.size} bytes, its meta needs {total}")


class BytesBlob(Blob):
    """A blob whose body is already in memory (no copy is made)."""

    def __init__(self, kind: str, meta: Dict[str, Any], data: BytesLike) -> None:
        self.kind = kind
        self.meta = dict(meta)
        self._data = _byte_view(data)
        self.size = self._data.nbytes

    def chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[BytesLike]:
        for start in range(0, self.size, chunk_size):
            yield self._data[start : start + chunk_size]

    def read_all(self) -> bytes:
        return self._data.tobytes()


class PartsBlob(Blob):
    """A blob whose body is several in-memory buffers back to back, never joined.

    ``parts`` may be views of the value's own memory (array buffers, a
    pickle's out-of-band buffers): nothing is copied until a consumer
    writes the chunks somewhere.
    """

    def __init__(self, kind: str, meta: Dict[str, Any], parts: Iterable[BytesLike]) -> None:
        self.kind = kind
        self.meta = dict(meta)
        self._parts = [_byte_view(p) for p in parts]
        self.size = sum(p.nbytes for p in self._parts)

    def chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[BytesLike]:
        for part in self._parts:
            for start in range(0, part.nbytes, chunk_size):
                yield part[start : start + chunk_size]


class _ArrayBlob(Blob):
    """A non-C-contiguous array, streamed in C order through bounded slabs."""

    def __init__(self, arr: Any) -> None:
        self.kind = "ndarray"
        self.meta = {"dtype": arr.dtype.str, "shape": list(arr.shape)}
        self.size = int(arr.nbytes)
        self._arr = arr

    def chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[BytesLike]:
        for block in c_order_blocks(self._arr):
            for start in range(0, block.nbytes, chunk_size):
                yield block[start : start + chunk_size]


class FileBlob(Blob):
    """A blob whose body sits in a file at ``offset``; read lazily, in chunks.

    ``opener`` lets compressed stores hand back a decompressing stream.
    """

    def __init__(
        self,
        kind: str,
        meta: Dict[str, Any],
        size: int,
        path: str | os.PathLike[str],
        offset: int = 0,
        opener: Optional[Callable[[], Any]] = None,
    ) -> None:
        self.kind = kind
        self.meta = dict(meta)
        self.size = size
        self.path = os.fspath(path)
        self.offset = offset
        self._opener = opener

    def _open(self) -> Any:
        if self._opener is not None:
            return self._opener()
        fh = open(self.path, "rb", buffering=0)  # unbuffered: readinto goes straight to the target
        fh.seek(self.offset)
        return fh

    def _truncated(self, present: int) -> CorruptEntryError:
        return CorruptEntryError(
            f"value file {self.path} is truncated: expected {self.size} body bytes, {present} present"
        )

    def chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[BytesLike]:
        with self._open() as fh:
            remaining = self.size
            while remaining > 0:
                data = fh.read(min(chunk_size, remaining))
                if not data:
                    raise self._truncated(self.size - remaining)
                remaining -= len(data)
                yield data

    def read_all(self) -> bytes:
        # FileIO.read(n) reads straight into the bytes it returns: one copy
        parts = []
        remaining = self.size
        with self._open() as fh:
            while remaining > 0:
                data = fh.read(remaining)
                if not data:
                    raise self._truncated(self.size - remaining)
                remaining -= len(data)
                parts.append(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def fill(self, targets: Sequence[memoryview]) -> None:
        _check_targets(self, targets)
        done = 0
        with self._open() as fh:
            for target in targets:
                pos, n = 0, target.nbytes
                while pos < n:
                    got = fh.readinto(target[pos : pos + min(n - pos, _READINTO_STEP)])
                    if not got:
                        raise self._truncated(done + pos)
                    pos += got
                done += n


class StreamBlob(Blob):
    """A one-shot blob fed by an iterator (e.g. chunks arriving on the wire).

    ``drain()`` consumes whatever the reader left, so a stream stays in step
    even when a store decided it already had the value.
    """

    def __init__(self, kind: str, meta: Dict[str, Any], size: int, source: Iterable[BytesLike]) -> None:
        self.kind = kind
        self.meta = dict(meta)
        self.size = size
        self._source = iter(source)
        self._started = False

    def chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[BytesLike]:
        if self._started:
            raise RuntimeError("a StreamBlob can be read only once")
        self._started = True
        return self._source

    def drain(self) -> None:
        self._started = True
        for _ in self._source:
            pass


class SpooledBlob(Blob):
    """A value held in a temp file (or a spooled one), re-readable any
    number of times: what a one-shot :class:`StreamBlob` becomes when it
    must be read twice (checked, then stored) or kept past its stream."""

    def __init__(self, kind: str, meta: Dict[str, Any], size: int, spool: Any) -> None:
        self.kind = kind
        self.meta = dict(meta)
        self.size = size
        self._spool = spool

    def chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[BytesLike]:
        self._spool.seek(0)
        while True:
            data = self._spool.read(chunk_size)
            if not data:
                return
            yield data


def _meta_bytes(kind: str, meta: Dict[str, Any]) -> bytes:
    return json.dumps([kind, meta], sort_keys=True, separators=(",", ":")).encode()


class BlobHasher:
    """Computes a value digest while the body streams past: ``update`` each
    chunk, then ``hexdigest()``. Large bodies cost XXH3-128 speed, not
    SHA-256 speed (see :mod:`.digest`).
    """

    __slots__ = ("_body", "_head")

    def __init__(self, head: bytes) -> None:
        self._head = head
        self._body = BodyHasher()

    @property
    def size(self) -> int:
        """Body bytes seen so far."""
        return self._body.size

    def update(self, data: BytesLike) -> None:
        self._body.update(data)

    def digest(self) -> bytes:
        import hashlib

        h = hashlib.sha256(self._head)
        self._body.finish(h.update)
        return h.digest()

    def hexdigest(self) -> str:
        return self.digest().hex()


def blob_hasher(kind: str, meta: Dict[str, Any], scheme: str = DIGEST_SCHEME_NAME) -> BlobHasher:
    """A hasher already fed with the blob's kind and meta; feed it the body.

    Args:
        scheme: the digest scheme to compute (a record's ``digest_scheme``).

    Raises:
        CorruptEntryError: ``scheme`` is not one this version knows.
    """
    prefix = _VALUE_SCHEMES.get(scheme)
    if prefix is None:
        raise CorruptEntryError(
            f"value digest scheme {scheme!r} is unknown to this fleche-remote; "
            f"it knows {sorted(_VALUE_SCHEMES)} (upgrade the older side)"
        )
    return BlobHasher(prefix + _meta_bytes(kind, meta) + b"\x00")


def digest_from_body(
    kind: str, meta: Dict[str, Any], body: BodyHasher, scheme: str = DIGEST_SCHEME_NAME
) -> Digest:
    """The digest of a blob whose body was already fed to ``body``: lets a
    pass over the body serve for a digest whose meta is only known after
    it (a signed blob's, whose meta holds the body's signature)."""
    h = blob_hasher(kind, meta, scheme)
    h._body = body
    return Digest(h.hexdigest())


#: Kind and scheme to the head a value digest starts with, for blobs
#: without meta (see :func:`blob_digest`).
_EMPTY_META_HEADS: Dict[Any, bytes] = {}
_U64 = struct.Struct(">Q")


def blob_digest(blob: Blob, scheme: str = DIGEST_SCHEME_NAME) -> Digest:
    """Content digest of a blob: equal values are stored once under it."""
    if type(blob) is BytesBlob and not blob.meta and blob.size < bodyhash.BULK_THRESHOLD:
        # a small pickle: the bytes BlobHasher would hash, in one pass
        # (3.6 -> ~1 us for a list of ten floats)
        head = _EMPTY_META_HEADS.get((blob.kind, scheme))
        if head is None:
            head = blob_hasher(blob.kind, {}, scheme)._head
            if len(_EMPTY_META_HEADS) < 64:
                _EMPTY_META_HEADS[blob.kind, scheme] = head
        small = hashlib.sha256(head)
        small.update(_U64.pack(blob.size))
        small.update(blob._data)
        return Digest(small.hexdigest())
    h = blob_hasher(blob.kind, blob.meta, scheme)
    if isinstance(blob, BytesBlob):
        h.update(blob._data)  # one call over the whole buffer: no per-chunk overhead
    elif isinstance(blob, PartsBlob):
        for part in blob._parts:
            h.update(part)
    else:
        for chunk in blob.chunks():
            h.update(chunk)
    return Digest(h.hexdigest())


class VerifyingBlob(Blob):
    """Wraps a blob and checks, as the last chunk passes, that it hashes to
    ``expected``. A store that writes temp-then-rename therefore never
    renames a body that arrived corrupted or under a forged digest.

    Hashing happens on the chunks as they stream to the store: no pass of
    its own. A body of :data:`~.bodyhash.BULK_THRESHOLD` bytes or more needs
    the ``xxhash`` package; without it, reading raises
    :class:`~.digest.BulkHashUnavailable` before the first chunk, so
    nothing is half-written.

    Args:
        scheme: the digest scheme ``expected`` was computed with.
    """

    def __init__(self, inner: Blob, expected: str, scheme: str = DIGEST_SCHEME_NAME) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.meta = inner.meta
        self.size = inner.size
        self.expected = expected
        self.scheme = scheme

    def chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[BytesLike]:
        h = blob_hasher(self.kind, self.meta, self.scheme)
        if self.size >= bodyhash.BULK_THRESHOLD:  # read at use: tests may lower it
            bulk_hasher()  # fail now, with the package to install, not after the body
        for chunk in self.inner.chunks(chunk_size):
            h.update(chunk)
            if h.size > self.size:
                raise CorruptEntryError(f"value body is longer than the {self.size} bytes announced")
            yield chunk
        if h.size != self.size:
            raise CorruptEntryError(f"value body has {h.size} bytes, header said {self.size}")
        got = h.hexdigest()
        if got != self.expected:
            raise CorruptEntryError(f"value body hashes to {got[:16]}..., expected {self.expected[:16]}...")


def _is_plain_ndarray(obj: Any) -> bool:
    mod = type(obj).__module__
    if not (mod == "numpy" or mod.startswith("numpy.")):
        return False
    import numpy as np

    return type(obj) is np.ndarray and obj.dtype != object and not obj.dtype.fields


#: Types ``pickle`` writes as ``cloudpickle`` does, inline, with no buffer
#: to keep out of band.
_SCALARS = frozenset({int, float, str, bool, type(None)})


def _flat_scalars(obj: Any) -> bool:
    """Whether ``obj`` is a scalar, or a short list or tuple of them."""
    kind = type(obj)
    if kind in _SCALARS:
        return True
    if (kind is not list and kind is not tuple) or len(obj) > 256:
        return False
    for item in obj:
        if type(item) not in _SCALARS:
            return False
    return True


def encode_value(obj: Any) -> Blob:
    """Turn a result into a blob without copying large buffers.

    A C-contiguous NumPy array is exposed through a memoryview of its own
    buffer; any other array streams in C order through bounded slabs.
    Other objects are pickled with protocol 5: buffers of at least
    :data:`OUT_OF_BAND_MIN` bytes stay where they are and follow the
    stream (kind ``"pickle5"``), so a dict of arrays is not copied into one
    ``bytes`` either.
    """
    if type(obj) is bytes:
        return BytesBlob("bytes", {}, obj)
    if _is_plain_ndarray(obj):
        if not obj.flags.c_contiguous:
            return _ArrayBlob(obj)
        meta = {"dtype": obj.dtype.str, "shape": list(obj.shape)}
        # a C-contiguous array is one view of its own buffer (none if empty)
        return BytesBlob("ndarray", meta, next(c_order_blocks(obj), b""))
    import pickle

    if _flat_scalars(obj):
        # cloudpickle writes the same bytes for these; its Python-level
        # pickler costs ~1 us more on a small result
        return BytesBlob("pickle", {}, pickle.dumps(obj, protocol=5))

    import cloudpickle

    buffers: List[memoryview] = []

    def out_of_band(buf: pickle.PickleBuffer) -> bool:
        # returning True pickles the buffer in-band (inside the stream)
        if len(buffers) >= OUT_OF_BAND_MAX:
            return True
        try:
            raw = buf.raw()
        except BufferError:  # not contiguous: only in-band can copy it
            return True
        if raw.nbytes < OUT_OF_BAND_MIN:
            return True
        buffers.append(raw)
        return False

    stream = cloudpickle.dumps(obj, protocol=5, buffer_callback=out_of_band)
    if not buffers:
        return BytesBlob("pickle", {}, stream)
    return PartsBlob("pickle5", {"buffers": [b.nbytes for b in buffers]}, [stream, *buffers])


def _buffer_sizes(blob: Blob) -> List[int]:
    sizes = blob.meta.get("buffers")
    if (
        not isinstance(sizes, list)
        or not all(type(n) is int and n >= 0 for n in sizes)
        or sum(sizes) > blob.size
    ):
        raise CorruptEntryError(
            f"a pickle5 value needs meta 'buffers', a list of sizes adding up to at most its "
            f"{blob.size} bytes; got {sizes!r}"
        )
    return sizes


def decode_value(blob: Blob) -> Any:
    """Rebuild the result a blob encodes (only in the process that wants it).

    Bodies are read straight into their final buffers (:meth:`Blob.fill`):
    an ndarray into a preallocated array, a pickle5 value's buffers into
    writable ``bytearray`` s that the rebuilt arrays use as their memory.
    The peak is the value plus its (small) pickle stream.

    Raises:
        CorruptEntryError: an unknown kind, or a body that does not match
            its meta.
    """
    if blob.kind == "bytes":
        return blob.read_all()
    if blob.kind == "ndarray":
        import numpy as np

        arr = np.empty(tuple(blob.meta["shape"]), dtype=np.dtype(blob.meta["dtype"]))
        if arr.nbytes != blob.size:
            raise CorruptEntryError(f"ndarray body has {blob.size} bytes, dtype and shape need {arr.nbytes}")
        blob.fill([memoryview(arr.reshape(-1).view(np.uint8))] if arr.size else [])  # type: ignore[arg-type]
        return arr
    if blob.kind == "pickle":
        import pickle

        if type(blob) is BytesBlob:
            return pickle.loads(blob._data)  # cloudpickle's loads; no copy of the body
        return pickle.loads(blob.read_all())
    if blob.kind == "pickle5":
        import pickle

        sizes = _buffer_sizes(blob)
        stream = bytearray(blob.size - sum(sizes))
        buffers = [bytearray(n) for n in sizes]
        blob.fill([memoryview(stream)] + [memoryview(b) for b in buffers])
        return pickle.loads(stream, buffers=buffers)
    raise CorruptEntryError(f"unknown value kind {blob.kind!r}; expected one of {KINDS}")
