"""Values as the client receives them: decoded, unpacked or spooled.

A reply that carries values streams them after its message, chunk by
chunk, on the shared connection. What :class:`~fleche_remote.remote.client.SshCache`
does with those streams depends on who asked: a result is decoded
straight into its final buffers (``load_value``); a blob that another
store will take over is read to the end first (``load_blob``), into
memory when it is small, into a temp file past
:data:`SPOOL_IN_MEMORY_BELOW`, because it must outlive the wire stream;
a batch mixes values that travelled inside the reply with streamed ones.

It is separate from the client because none of it knows about requests,
connections or outages: these are the ``consume`` functions that
:meth:`~fleche_remote.remote.connection.Connection.request` hands a
reply's streams to.
"""

from __future__ import annotations

import tempfile
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

from ..call import CallRecord
from ..codec.values import Blob, BytesBlob, SpooledBlob, StreamBlob, decode_value
from .protocol import BlobHeader, Inline

#: Spool a fetched value to disk past this size (``load_blob`` hands the
#: bytes to another store, so they must outlive the wire stream).
SPOOL_IN_MEMORY_BELOW = 64 << 20


def decode_first(result: Any, streams: List[Tuple[BlobHeader, Iterator[bytes]]]) -> Any:
    header, chunks = streams[0]
    return decode_value(StreamBlob(header.kind, header.meta, header.size, chunks))


def unpack_blobs(items: List[Any], streams: List[Tuple[BlobHeader, Iterator[bytes]]]) -> List[Optional[Blob]]:
    """Blobs from a reply's items: ``Inline`` ones as they are, ``True`` ones
    from the streams that follow, in order (spooled: they outlive the wire)."""
    out: List[Optional[Blob]] = []
    pending = iter(streams)
    spooled = 0
    for item in items:
        if item is None:
            out.append(None)
        elif isinstance(item, Inline):
            out.append(BytesBlob(item.kind, item.meta, item.body))
        else:
            header, chunks = next(pending)
            blob = _spool_one(header, chunks, in_memory=spooled + header.size < SPOOL_IN_MEMORY_BELOW)
            spooled += header.size
            out.append(blob)
    return out


def _spool_one(header: BlobHeader, chunks: Iterator[bytes], in_memory: bool) -> Blob:
    if in_memory:
        return BytesBlob(header.kind, header.meta, b"".join(chunks))
    spool = tempfile.TemporaryFile(prefix="fleche-remote-")
    for chunk in chunks:
        spool.write(chunk)
    return SpooledBlob(header.kind, header.meta, header.size, spool)


def spool(result: Any, streams: List[Tuple[BlobHeader, Iterator[bytes]]]) -> Blob:
    header, chunks = streams[0]
    return _spool_one(header, chunks, in_memory=header.size < SPOOL_IN_MEMORY_BELOW)


class Unsigned:
    """What an unsigned cache seals and opens entries with: they pass as
    they are, so each operation is written once for both kinds."""

    def sign_entries(self, items: Sequence[Tuple[CallRecord, Blob]]) -> Sequence[Tuple[CallRecord, Blob]]:
        return items

    def open_records(
        self, records: List[Optional[CallRecord]], where: Any, keys: Any
    ) -> List[Optional[CallRecord]]:
        return records

    def open_blob(self, blob: Blob, digest: str, where: Any, scheme: Any = None) -> Blob:
        return blob

    def open_blobs(self, blobs: List[Optional[Blob]], digests: Any, where: Any) -> List[Optional[Blob]]:
        return blobs

    def open_entries(self, entries: Any, where: Any, keys: Any) -> List[Optional[Tuple[CallRecord, Blob]]]:
        return list(entries)

    def iter_records(self, records: Iterable[CallRecord], where: Any) -> Iterable[CallRecord]:
        return records

    def stream_decoder(
        self, where: Any, *, key: Optional[str] = None, digest: Optional[str] = None
    ) -> Callable[..., Any]:
        return decode_first
