"""``CacheStack``: layers, local first, searched top-down.

Saves go to the first layer. Loads try the layers in order, and a hit in a
lower layer is copied into the first one (record and value blob, as bytes:
nothing is unpickled on the way), so the next load is local and works
offline. Reading a call from a lower layer therefore fetches its value at
once, which is the point: the laptop keeps what the cluster computed.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

from ..call import CallRecord
from ..digest import Digest
from ..errors import AmbiguousDigestError, Rejected
from ..values import Blob
from .base import BaseCache

log = logging.getLogger("fleche_remote.stack")


class CacheStack(BaseCache):
    """Several caches acting as one.

    Args:
        layers: caches in order; the first takes saves and back-fills.
        backfill: copy hits from lower layers into the first (default on).
    """

    def __init__(self, layers: Sequence[BaseCache], *, backfill: bool = True) -> None:
        layers = list(layers)
        if not layers:
            raise ValueError("a CacheStack needs at least one layer")
        for i, layer in enumerate(layers):
            if not isinstance(layer, BaseCache):
                raise TypeError(f"layer {i} is a {type(layer).__name__}, not a BaseCache")
        self.layers: List[BaseCache] = layers
        self.backfill = backfill

    def __repr__(self) -> str:
        return f"CacheStack({self.layers!r})"

    @property
    def read_only(self) -> bool:
        return self.layers[0].read_only

    def save_records(self, items: Sequence[Tuple[CallRecord, Blob]]) -> None:
        self.layers[0].save_records(items)

    def _backfill(self, records: Sequence[CallRecord], source: BaseCache) -> None:
        top = self.layers[0]
        if not self.backfill or top.read_only or source is top:
            return
        for record in records:
            try:
                top.save_records([(record, source.load_blob(record.value))])
            except KeyError:
                log.warning(
                    "layer %r lists call %s but not its value; not back-filled", source, record.key[:12]
                )

    def load_records(self, keys: Sequence[str]) -> List[Optional[CallRecord]]:
        result: List[Optional[CallRecord]] = [None] * len(keys)
        missing = list(range(len(keys)))
        for depth, layer in enumerate(self.layers):
            if not missing:
                break
            found = layer.load_records([keys[i] for i in missing])
            still = []
            hits = []
            for i, record in zip(missing, found):
                if record is None:
                    still.append(i)
                else:
                    result[i] = record
                    hits.append(record)
            if depth and hits:
                self._backfill(hits, layer)
            missing = still
        return result

    def load_blob(self, value_digest: str) -> Blob:
        for layer in self.layers:
            try:
                return layer.load_blob(value_digest)
            except KeyError:
                continue
        raise KeyError(value_digest)

    def contains_many(self, keys: Sequence[str]) -> List[bool]:
        result = [False] * len(keys)
        missing = list(range(len(keys)))
        for layer in self.layers:
            if not missing:
                break
            found = layer.contains_many([keys[i] for i in missing])
            still = []
            for i, hit in zip(missing, found):
                if hit:
                    result[i] = True
                else:
                    still.append(i)
            missing = still
        return result

    def evict(self, key: str) -> None:
        """Evict ``key`` from every writable layer that holds it.

        Raises:
            KeyError: no layer holds it.
            Rejected: only read-only layers hold it.
        """
        full = self._full_key(key)
        held = [layer for layer in self.layers if layer.contains(full)]
        if not held:
            raise KeyError(key)
        writable = [layer for layer in held if not layer.read_only]
        if not writable:
            raise Rejected(f"cannot evict {full[:12]}: only read-only layers hold it")
        for layer in writable:
            layer.evict(full)

    def expand(self, short_key: str) -> Digest:
        matches: Set[str] = set()
        for layer in self.layers:
            try:
                matches.add(layer.expand(short_key))
            except AmbiguousDigestError as exc:
                matches.update(exc.candidates)
            except KeyError:
                continue
            if len(matches) > 1:
                raise AmbiguousDigestError(str(short_key), sorted(matches))
        if not matches:
            raise KeyError(short_key)
        return Digest(matches.pop())

    def query_records(
        self,
        name: Optional[str] = None,
        arg_digests: Optional[Mapping[str, str]] = None,
        metadata: Optional[Mapping[str, Any]] = None,
    ) -> Iterator[CallRecord]:
        seen: Set[str] = set()
        for layer in self.layers:
            for record in layer.query_records(name, arg_digests, metadata):
                if record.key not in seen:
                    seen.add(record.key)
                    yield record

    def collect_garbage(self) -> int:
        return sum(layer.collect_garbage() for layer in self.layers if not layer.read_only)

    def close(self) -> None:
        for layer in self.layers:
            layer.close()

    def describe(self) -> Dict[str, Any]:
        return {
            "class": "CacheStack",
            "layers": [layer.describe() for layer in self.layers],
            "read_only": self.read_only,
        }
