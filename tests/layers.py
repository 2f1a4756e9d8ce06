"""Test layers: real caches behind a tally (``Counting``) or a door (``Gate``).

They are ``BaseCache`` subclasses that forward every primitive to a real
cache, so a stack built from them behaves exactly as with the real cache,
and a test can say how many times each layer was asked, and for what.
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from fleche_remote import BaseCache, Cache, Digest
from fleche_remote.call import CallRecord
from fleche_remote.codec.values import Blob
from fleche_remote.storage.memory import MemoryCallStore, MemoryValueStore


def memory_cache(read_only: bool = False) -> Cache:
    return Cache(MemoryValueStore(), MemoryCallStore(), read_only=read_only)


class Counting(BaseCache):
    """``inner``, counting each primitive call and recording what it was asked.

    Attributes:
        counts: primitive name -> number of calls.
        asked: primitive name -> the keys (or digests) of each call.
        saved: the size of each ``save_records`` batch.
        fail_saves: an exception ``save_records`` raises instead of saving.
    """

    def __init__(self, inner: BaseCache) -> None:
        self.inner = inner
        self.counts: Dict[str, int] = collections.Counter()
        self.asked: Dict[str, List[List[str]]] = collections.defaultdict(list)
        self.saved: List[int] = []
        self.fail_saves: Optional[BaseException] = None

    def __repr__(self) -> str:
        return f"Counting({self.inner!r})"

    def _tally(self, name: str, keys: Sequence[str] = ()) -> None:
        self.counts[name] += 1
        self.asked[name].append([str(k) for k in keys])

    def reset(self) -> None:
        self.counts.clear()
        self.asked.clear()
        self.saved.clear()

    @property
    def read_only(self) -> bool:
        return self.inner.read_only

    def save_records(self, items: Sequence[Tuple[CallRecord, Blob]]) -> None:
        self._tally("save_records", [r.key for r, _ in items])
        if self.fail_saves is not None:
            raise self.fail_saves
        self.saved.append(len(items))
        self.inner.save_records(items)

    def load_records(self, keys: Sequence[str]) -> List[Optional[CallRecord]]:
        self._tally("load_records", keys)
        return self.inner.load_records(keys)

    def load_blob(self, value_digest: str) -> Blob:
        self._tally("load_blob", [value_digest])
        return self.inner.load_blob(value_digest)

    def load_blobs(self, value_digests: Sequence[str]) -> List[Optional[Blob]]:
        self._tally("load_blobs", value_digests)
        return self.inner.load_blobs(value_digests)

    def load_entries(self, keys: Sequence[str]) -> List[Optional[Tuple[CallRecord, Blob]]]:
        self._tally("load_entries", keys)
        return self.inner.load_entries(keys)

    def contains_many(self, keys: Sequence[str]) -> List[bool]:
        self._tally("contains_many", keys)
        return self.inner.contains_many(keys)

    def evict(self, key: str) -> None:
        self._tally("evict", [key])
        self.inner.evict(key)

    def expand(self, short_key: str) -> Digest:
        self._tally("expand", [short_key])
        return self.inner.expand(short_key)

    def query_records(
        self,
        name: Optional[str] = None,
        arg_digests: Optional[Mapping[str, str]] = None,
        metadata: Optional[Mapping[str, Any]] = None,
    ) -> Iterator[CallRecord]:
        self._tally("query_records")
        return self.inner.query_records(name, arg_digests, metadata)

    def collect_garbage(self) -> int:
        return self.inner.collect_garbage()

    def close(self) -> None:
        self.inner.close()


class Gate(Counting):
    """A counting layer whose ``save_records`` waits while the gate is shut.

    ``entered`` is set each time a save reaches the gate, so a test knows
    the pusher is held there without guessing how long that takes.
    """

    def __init__(self, inner: BaseCache) -> None:
        super().__init__(inner)
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()

    def save_records(self, items: Sequence[Tuple[CallRecord, Blob]]) -> None:
        self.entered.set()
        if not self.open.wait(60):
            raise TimeoutError("the test never opened the gate")
        super().save_records(items)
