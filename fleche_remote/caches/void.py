"""``VoidCache``: a cache that keeps nothing.

fleche's ``values.type = "void"`` / ``calls.type = "void"`` pair, which a
user writes to turn caching off without touching decorated code: every
save succeeds and is dropped, nothing is ever found. It is writable on
purpose (a read-only cache would make ``@cached`` log a refused write on
every call), and it has a config form, so ``cache_to_config`` round-trips.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from ..call import CallRecord
from ..codec.digest import Digest
from ..codec.values import Blob
from .base import BaseCache

#: The table a void cache is written as: both halves ``void``, as in fleche.
VOID_CONFIG: Dict[str, Any] = {"values": {"type": "void"}, "calls": {"type": "void"}}


class VoidCache(BaseCache):
    """Saves are dropped, lookups miss, queries are empty."""

    def save_records(self, items: Sequence[Tuple[CallRecord, Blob]]) -> None:
        # dropped unread: a caller that streams a body drains it itself
        return None

    def load_records(self, keys: Sequence[str]) -> List[Optional[CallRecord]]:
        return [None for _ in keys]

    def load_blob(self, value_digest: str) -> Blob:
        raise KeyError(value_digest)

    def contains_many(self, keys: Sequence[str]) -> List[bool]:
        return [False for _ in keys]

    def evict(self, key: str) -> None:
        raise KeyError(key)

    def expand(self, short_key: str) -> Digest:
        raise KeyError(short_key)

    def query_records(
        self,
        name: Optional[str] = None,
        arg_digests: Optional[Mapping[str, str]] = None,
        metadata: Optional[Mapping[str, Any]] = None,
    ) -> Iterator[CallRecord]:
        return iter(())

    @property
    def read_only(self) -> bool:
        return False

    def to_config(self) -> Dict[str, Any]:
        """The fleche.toml table that builds this cache again."""
        return {kind: dict(table) for kind, table in VOID_CONFIG.items()}

    def __repr__(self) -> str:
        return "VoidCache()"
