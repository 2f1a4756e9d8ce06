"""``Cache``: one value store plus one call store, as in fleche.toml."""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from ..call import CallRecord
from ..digest import Digest
from ..errors import AmbiguousDigestError, Rejected
from ..storage.base import CallStore, ValueStore
from ..values import Blob
from .base import BaseCache

_HEX = frozenset("0123456789abcdef")


def check_prefix(short_key: str) -> str:
    """Normalise a key prefix; ``KeyError`` for one that can't be a key."""
    prefix = str(short_key).lower()
    if not prefix or len(prefix) > 64 or not set(prefix) <= _HEX:
        raise KeyError(short_key)
    return prefix


class Cache(BaseCache):
    """Results in ``values``, call records in ``calls``.

    Args:
        values: where result blobs go (``values.type`` in fleche.toml).
        calls: where call records go (``calls.type``).
        read_only: refuse every write with :class:`~fleche_remote.Rejected`.
    """

    def __init__(self, values: ValueStore, calls: CallStore, *, read_only: bool = False) -> None:
        if not isinstance(values, ValueStore):
            raise TypeError(f"values must be a ValueStore, got {type(values).__name__}")
        if not isinstance(calls, CallStore):
            raise TypeError(f"calls must be a CallStore, got {type(calls).__name__}")
        self.values = values
        self.calls = calls
        self._read_only = bool(read_only)

    @property
    def read_only(self) -> bool:
        return self._read_only

    def __repr__(self) -> str:
        ro = ", read_only=True" if self._read_only else ""
        return f"Cache(values={self.values.to_config()}, calls={self.calls.to_config()}{ro})"

    def save_records(self, items: Sequence[Tuple[CallRecord, Blob]]) -> None:
        if self._read_only:
            raise Rejected(f"cannot save: {self!r} is read-only")
        for record, blob in items:
            # value first: whoever sees the record must find its value
            self.values.put(record.value, blob)
            self.calls.put(record)

    def load_records(self, keys: Sequence[str]) -> List[Optional[CallRecord]]:
        return self.calls.get_many(keys)

    def load_blob(self, value_digest: str) -> Blob:
        return self.values.get(value_digest)

    def contains_many(self, keys: Sequence[str]) -> List[bool]:
        return self.calls.contains_many(keys)

    def evict(self, key: str) -> None:
        if self._read_only:
            raise Rejected(f"cannot evict: {self!r} is read-only")
        full = self._full_key(key)
        if not self.calls.contains(full):
            raise KeyError(key)
        self.calls.delete(full)

    def expand(self, short_key: str) -> Digest:
        prefix = check_prefix(short_key)
        found = self.calls.keys_with_prefix(prefix, 2)
        if not found:
            raise KeyError(short_key)
        if len(found) > 1:
            raise AmbiguousDigestError(prefix, found)
        return Digest(found[0])

    def query_records(
        self,
        name: Optional[str] = None,
        arg_digests: Optional[Mapping[str, str]] = None,
        metadata: Optional[Mapping[str, Any]] = None,
    ) -> Iterator[CallRecord]:
        return self.calls.query(name, arg_digests, metadata)

    def collect_garbage(self) -> int:
        """Delete values no stored call refers to. Run it while no process
        is saving into this cache: a value written just before its record
        would look unreferenced."""
        if self._read_only:
            raise Rejected(f"cannot collect garbage: {self!r} is read-only")
        candidates = set(self.values.digests())
        for key in list(self.calls.keys()):
            try:
                candidates.discard(self.calls.get(key).value)
            except KeyError:
                continue
        for digest in candidates:
            self.values.delete(digest)
        return len(candidates)

    def close(self) -> None:
        self.values.close()
        self.calls.close()

    def describe(self) -> Dict[str, Any]:
        return {
            "class": "Cache",
            "values": self.values.to_config(),
            "calls": self.calls.to_config(),
            "read_only": self._read_only,
        }
