"""In-process stores: fast, thread-safe, gone when the process ends.

Each store's dict is guarded by one lock for every change and listing; a
lone lookup needs none (a dict lookup is atomic, in free-threaded builds
too).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence

from ..call import CallRecord
from ..codec.values import Blob, BytesBlob
from .base import CallStore, ValueStore
from .claims import Claims, KeptClaims, MemoryClaims
from .options import check_keys


class MemoryValueStore(ValueStore):
    """Blobs in a dict; a saved blob is copied so later mutation can't leak in."""

    type_name = "memory"

    def __init__(self) -> None:
        self._data: Dict[str, BytesBlob] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, table: Dict[str, Any], base_dir: Optional[Path] = None) -> MemoryValueStore:
        check_keys(table, (), "values.type = 'memory'")
        return cls()

    def to_config(self) -> Dict[str, Any]:
        return {"type": "memory"}

    def put(self, digest: str, blob: Blob) -> None:
        if digest in self._data:
            return
        stored = BytesBlob(blob.kind, blob.meta, blob.read_all())
        with self._lock:
            self._data.setdefault(digest, stored)

    def get(self, digest: str) -> Blob:
        return self._data[digest]

    def contains(self, digest: str) -> bool:
        return digest in self._data

    def delete(self, digest: str) -> None:
        with self._lock:
            self._data.pop(digest, None)

    def digests(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._data))


class MemoryCallStore(CallStore, KeptClaims):
    """Call records in a dict."""

    type_name = "memory"

    def __init__(self) -> None:
        self._data: Dict[str, CallRecord] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, table: Dict[str, Any], base_dir: Optional[Path] = None) -> MemoryCallStore:
        check_keys(table, (), "calls.type = 'memory'")
        return cls()

    def to_config(self) -> Dict[str, Any]:
        return {"type": "memory"}

    def put(self, record: CallRecord) -> None:
        with self._lock:
            self._data.setdefault(record.key, record)

    def put_many(self, records: Sequence[CallRecord]) -> None:
        with self._lock:
            for record in records:
                self._data.setdefault(record.key, record)

    def get(self, key: str) -> CallRecord:
        return self._data[key]

    def contains(self, key: str) -> bool:
        return key in self._data

    def delete(self, key: str) -> None:
        with self._lock:
            self._data.pop(key, None)

    def keys(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._data))

    # -- claims: threads of this process (see storage/claims.py) ---------------

    def _make_keeper(self) -> Claims:
        return MemoryClaims()
