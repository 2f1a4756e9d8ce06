"""Values as opaque blobs: encoding, streaming, and their content digests.

A cached result is turned into a :class:`Blob` exactly once, in the
process that computed or asked for it. Everything in between (value
stores, the wire, the server, back-fills between stack layers) moves the
blob's bytes without decoding them. That is what keeps the server from
ever unpickling a client's data, and what lets a 4 GiB array stream in
bounded chunks.

Blob kinds:

``"pickle"``
    cloudpickle bytes of an arbitrary object.
``"bytes"``
    a ``bytes`` value, stored as is.
``"ndarray"``
    a NumPy array of a non-object dtype: ``meta`` carries ``dtype`` (the
    ``dtype.str``) and ``shape``; the body is the C-ordered raw buffer, so
    an HDF5 store can keep it as a native dataset and the client can
    receive it straight into a preallocated array.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Union

from .digest import Digest
from .errors import CorruptEntryError

#: Chunk size for streaming value bodies (files, wire, hashing). 1 MiB keeps
#: per-chunk overhead negligible (<0.1% at ssh speeds) while the memory any
#: side holds beyond the value itself stays at a chunk or two.
CHUNK_SIZE = 1 << 20

KINDS = ("pickle", "bytes", "ndarray")

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

    def __repr__(self) -> str:
        return f"<{type(self).__name__} kind={self.kind} size={self.size} meta={self.meta}>"


class BytesBlob(Blob):
    """A blob whose body is already in memory (no copy is made)."""

    def __init__(self, kind: str, meta: Dict[str, Any], data: BytesLike) -> None:
        self.kind = kind
        self.meta = dict(meta)
        view = memoryview(data)
        self._data = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        self.size = self._data.nbytes

    def chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[BytesLike]:
        for start in range(0, self.size, chunk_size):
            yield self._data[start : start + chunk_size]

    def read_all(self) -> bytes:
        return self._data.tobytes()


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

    def chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[BytesLike]:
        if self._opener is not None:
            fh = self._opener()
        else:
            fh = open(self.path, "rb")
            fh.seek(self.offset)
        with fh:
            remaining = self.size
            while remaining > 0:
                data = fh.read(min(chunk_size, remaining))
                if not data:
                    raise CorruptEntryError(
                        f"value file {self.path} is truncated: expected {self.size} "
                        f"body bytes, {self.size - remaining} present"
                    )
                remaining -= len(data)
                yield data


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


def _meta_bytes(kind: str, meta: Dict[str, Any]) -> bytes:
    return json.dumps([kind, meta], sort_keys=True, separators=(",", ":")).encode()


def blob_hasher(kind: str, meta: Dict[str, Any]) -> hashlib._Hash:
    """A SHA-256 already fed with the blob's kind and meta; feed it the body."""
    h = hashlib.sha256(b"fleche-remote/value/1\x00")
    h.update(_meta_bytes(kind, meta) + b"\x00")
    return h


def blob_digest(blob: Blob) -> Digest:
    """Content digest of a blob: equal values are stored once under it."""
    h = blob_hasher(blob.kind, blob.meta)
    for chunk in blob.chunks():
        h.update(chunk)
    return Digest(h.hexdigest())


class VerifyingBlob(Blob):
    """Wraps a blob and checks, as the last chunk passes, that it hashes to
    ``expected``. A store that writes temp-then-rename therefore never
    renames a body that arrived corrupted or under a forged digest.
    """

    def __init__(self, inner: Blob, expected: str) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.meta = inner.meta
        self.size = inner.size
        self.expected = expected

    def chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[BytesLike]:
        h = blob_hasher(self.kind, self.meta)
        seen = 0
        for chunk in self.inner.chunks(chunk_size):
            seen += len(chunk)
            h.update(chunk)
            yield chunk
        if seen != self.size:
            raise CorruptEntryError(f"value body has {seen} bytes, header said {self.size}")
        if h.hexdigest() != self.expected:
            raise CorruptEntryError(
                f"value body hashes to {h.hexdigest()[:16]}..., expected {self.expected[:16]}..."
            )


def _is_plain_ndarray(obj: Any) -> bool:
    mod = type(obj).__module__
    if not (mod == "numpy" or mod.startswith("numpy.")):
        return False
    import numpy as np

    return type(obj) is np.ndarray and obj.dtype != object and not obj.dtype.fields


def encode_value(obj: Any) -> Blob:
    """Turn a result into a blob without copying large buffers.

    A C- or F-contiguous NumPy array is exposed through a memoryview of its
    own buffer, so saving a 4 GiB array allocates nothing of its size.
    """
    if type(obj) is bytes:
        return BytesBlob("bytes", {}, obj)
    if _is_plain_ndarray(obj):
        import numpy as np

        arr = obj if obj.flags.c_contiguous else np.ascontiguousarray(obj)
        meta = {"dtype": arr.dtype.str, "shape": list(arr.shape)}
        # a uint8 view: datetime64 and friends do not export a buffer themselves
        body = memoryview(arr.reshape(-1).view(np.uint8)) if arr.size else b""
        return BytesBlob("ndarray", meta, body)
    import cloudpickle

    return BytesBlob("pickle", {}, cloudpickle.dumps(obj, protocol=4))


def decode_value(blob: Blob) -> Any:
    """Rebuild the result a blob encodes (only in the process that wants it).

    An ndarray body is copied chunk by chunk into a preallocated array, so
    the peak memory is the array plus one chunk.
    """
    if blob.kind == "bytes":
        return blob.read_all()
    if blob.kind == "ndarray":
        import numpy as np

        arr = np.empty(tuple(blob.meta["shape"]), dtype=np.dtype(blob.meta["dtype"]))
        if arr.nbytes != blob.size:
            raise CorruptEntryError(f"ndarray body has {blob.size} bytes, dtype and shape need {arr.nbytes}")
        target = memoryview(arr.reshape(-1).view(np.uint8)) if arr.size else memoryview(b"")
        pos = 0
        for chunk in blob.chunks():
            n = len(chunk)
            target[pos : pos + n] = chunk
            pos += n
        if pos != arr.nbytes:
            raise CorruptEntryError(f"ndarray body ended after {pos} of {arr.nbytes} bytes")
        return arr
    if blob.kind == "pickle":
        import cloudpickle

        return cloudpickle.loads(blob.read_all())
    raise CorruptEntryError(f"unknown value kind {blob.kind!r}; expected one of {KINDS}")
