"""Values into replies, and out of them: the shapes both ends agree on.

A batch reply carries each value one of three ways: ``Inline`` (small,
inside the message, within :data:`~fleche_remote.remote.protocol.WIRE_INLINE_BUDGET`),
``True`` (streamed after the message, in order) or ``None`` (absent). A
listing's reply (``load_entries`` with ``small_only``) has a fourth,
``False``: not sent, fetched when it is read. None of this knows about
connections or stores, so the server's handlers and the client share it.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

from ..call import CallRecord
from ..codec.values import Blob, BytesBlob
from .protocol import Inline, inline_choices

#: Records, each with its value's blob when it came along (``None``: fetch it
#: when read); ``None`` where a key is absent.
SmallEntries = List[Optional[Tuple[CallRecord, Optional[Blob]]]]


#: A listing of at least twice this many keys is asked in parts, each of at
#: least this many, at most :data:`PIPELINE_PARTS` of them, sent back to back
#: (:func:`~fleche_remote.remote.pipeline.pipelined`): the
#: server reads and packs one part while the client unpacks the one before.
#: Measured over loopback ssh, 1000 small calls: 21 ms in one request, 19 in
#: 2 parts, 18 in 4, 17 in 8; smaller parts would cost a request's overhead
#: each for little more overlap.
PIPELINE_PART_KEYS = 128
PIPELINE_PARTS = 8


def pipeline_parts(keys: List[str]) -> List[List[str]]:
    """``keys`` split into the parts a listing is asked in (one part for a short one)."""
    parts = min(PIPELINE_PARTS, len(keys) // PIPELINE_PART_KEYS)
    if parts <= 1:
        return [keys]
    step = -(-len(keys) // parts)
    return [keys[i : i + step] for i in range(0, len(keys), step)]


def pack_blobs(blobs: Sequence[Tuple[str, Optional[Blob]]]) -> Tuple[List[Any], List[Tuple[str, Blob]]]:
    """Each blob as ``Inline`` (small, within the budget), ``True`` (streams
    after the message) or ``None`` (absent)."""
    items: List[Any] = []
    streamed: List[Tuple[str, Blob]] = []
    small = inline_choices([None if blob is None else blob.size for _, blob in blobs])
    for (digest, blob), inline in zip(blobs, small):
        if blob is None:
            items.append(None)
        elif inline:
            items.append(Inline(blob.kind, dict(blob.meta), blob.read_all()))
        else:
            items.append(True)
            streamed.append((digest, blob))
    return items, streamed


def pack_small_entries(found: Sequence[Optional[Tuple[CallRecord, Optional[Blob]]]]) -> List[Any]:
    """``[record, value]`` per key (``None`` where absent): a value as
    ``Inline`` when the store had it at hand and it fits the message,
    ``False`` when the client is to fetch it when it is read. Nothing
    streams: a listing of large results costs their records only."""
    small = inline_choices([None if f is None or f[1] is None else f[1].size for f in found])
    result: List[Any] = []
    for entry, inline in zip(found, small):
        if entry is None:
            result.append(None)
            continue
        record, blob = entry
        # the blob's meta is its own copy already, and it is pickled at once
        item = Inline(blob.kind, blob.meta, blob.read_all()) if inline and blob is not None else False
        result.append([record, item])
    return result


def unpack_small_entries(
    found: Sequence[Any], records: Sequence[Optional[CallRecord]], seal: Any, where: Any
) -> SmallEntries:
    """The client's side of :func:`pack_small_entries`: ``records`` are the
    reply's records as ``seal`` opened them (checked, for a signed cache),
    and each value that came along is opened by the same seal."""
    out: SmallEntries = []
    for record, entry in zip(records, found):
        if record is None:
            out.append(None)
        elif isinstance(entry[1], Inline):
            item = entry[1]
            blob = BytesBlob(item.kind, item.meta, item.body)
            out.append((record, seal.open_blob(blob, record.value, where, record.digest_scheme)))
        else:
            out.append((record, None))
    return out
