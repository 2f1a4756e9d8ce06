"""``CacheStack``: layers, local first, searched top-down.

Saves go to the first layer. Loads try the layers in order, and a hit in a
lower layer is copied into the first one (record and value blob, as bytes:
nothing is unpickled on the way), so the next load is local and works
offline. Reading a call from a lower layer therefore fetches its value at
once, which is the point: the laptop keeps what the cluster computed.

Round trips are what a user on a laptop feels, so every batch walks the
stack once: each layer is asked at most once, and only for the keys the
layers above it lacked; whatever the lower layers had is back-filled into
the first layer in one ``save_records``. A lower layer is asked for
records *and* blobs together (``load_entries``), one round trip per
layer, rather than records first and then one blob at a time.

A layer may be *write-behind* (see :mod:`.writebehind`): saves still land
in the first layer, and are also pushed to that layer by a background
thread. It is read like any other layer; what is not pushed yet is found
anyway, in the first layer.
"""

from __future__ import annotations

import logging
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Set,
    Tuple,
    TypeVar,
    Union,
)

from ..call import CallRecord
from ..codec.digest import Digest
from ..codec.values import Blob, decode_value
from ..errors import AmbiguousDigestError, Rejected
from ..storage.claims import Claims, Holder, LoadOrClaim
from .base import BaseCache
from .writebehind import WRITE_BEHIND_KEY, WriteBehind

log = logging.getLogger("fleche_remote.stack")

#: Records of a lower layer's query are back-filled this many at a time:
#: one ``load_blobs`` round trip and one local ``save_records`` per page,
#: while the first results already reach the caller.
QUERY_BACKFILL_PAGE = 256

Entry = Tuple[CallRecord, Blob]


class CacheStack(BaseCache):
    """Several caches acting as one.

    Args:
        layers: caches in order; the first takes saves and back-fills.
        backfill: copy hits from lower layers into the first (default on).
        write_behind: lower layers that saves are also pushed to, in the
            background (each a layer of ``layers``, or a
            :class:`~fleche_remote.caches.writebehind.WriteBehind` around one to set
            its queue size or journal). ``write_behind = true`` on an ssh
            layer in fleche.toml.

    Raises:
        ValueError: no layers, or a write-behind layer that is not one of
            the lower layers.
    """

    def __init__(
        self,
        layers: Sequence[BaseCache],
        *,
        backfill: bool = True,
        write_behind: Iterable[Union[BaseCache, WriteBehind]] = (),
    ) -> None:
        layers = list(layers)
        if not layers:
            raise ValueError("a CacheStack needs at least one layer")
        for i, layer in enumerate(layers):
            if not isinstance(layer, BaseCache):
                raise TypeError(f"layer {i} is a {type(layer).__name__}, not a BaseCache")
        self.layers: List[BaseCache] = layers
        self.backfill = backfill
        writers: List[WriteBehind] = []
        for item in write_behind:
            writer = item if isinstance(item, WriteBehind) else WriteBehind(item)
            if not any(writer.layer is layer for layer in layers[1:]):
                raise ValueError(f"write-behind layer {writer.layer!r} is not one of the lower layers")
            if any(writer.layer is other.layer for other in writers):
                raise ValueError(f"layer {writer.layer!r} is given as write-behind twice")
            writer.attach(layers[0])
            writers.append(writer)
        #: the write-behind pushers, one per write-behind layer
        self.write_behind: Tuple[WriteBehind, ...] = tuple(writers)

    def __repr__(self) -> str:
        return f"CacheStack({self.layers!r})"

    def to_config(self) -> Any:
        """One table per layer, write-behind layers marked with
        ``write_behind = true``; ``backfill=False`` and a write-behind
        layer's queue and journal settings have no config form."""
        behind = [writer.layer for writer in self.write_behind]
        tables: List[Any] = []
        for layer in self.layers:
            table = layer.to_config()
            if any(layer is b for b in behind) and isinstance(table, dict):
                table = {**table, WRITE_BEHIND_KEY: True}
            tables.append(table)
        return tables

    @property
    def read_only(self) -> bool:
        return self.layers[0].read_only

    def save_records(self, items: Sequence[Tuple[CallRecord, Blob]]) -> None:
        if not (self.write_behind and items):
            self.layers[0].save_records(items)
            return
        keys = [record.key for record, _ in items]
        # journaled before the local save: a kill between the two then
        # leaves a pending key, never a local entry that is not pushed
        for writer in self.write_behind:
            writer.promise(keys)
        try:
            self.layers[0].save_records(items)
        except Rejected:  # nothing saved. (After another error some may be:
            # they stay pending, and a push drops those it finds missing)
            for writer in self.write_behind:
                writer.journal.remove(keys)
            raise
        for writer in self.write_behind:
            writer.enqueue(keys, promised=True)

    # -- write-behind --------------------------------------------------------

    def pending(self) -> List[Digest]:
        """Keys saved but not yet pushed to some write-behind layer (by this
        or an earlier process), in the order they were saved."""
        seen: Dict[str, None] = {}
        for writer in self.write_behind:
            seen.update(dict.fromkeys(writer.pending()))
        return [Digest(k) for k in seen]

    def push_pending(self) -> int:
        """Push what :meth:`pending` lists, now, in this thread (after a
        failure, call the remote's ``reconnect()`` first).

        Returns:
            How many entries were pushed.

        Raises:
            Exception: what the layer raised; entries not pushed stay pending.
        """
        return sum(writer.push_pending() for writer in self.write_behind)

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until the write-behind queues are pushed; False if some
        entry is still pending (a failure, or ``timeout`` seconds passed)."""
        return all([writer.flush(timeout) for writer in self.write_behind])

    # -- batches through the layers --------------------------------------------

    def _backfilling(self) -> bool:
        return self.backfill and not self.layers[0].read_only

    def _save_backfill(self, entries: Sequence[Entry]) -> None:
        """Copy lower-layer hits into the first layer, in one batch. A failure
        costs only the local copy, never the caller's answer."""
        if not entries:
            return
        try:
            self.layers[0].save_records(entries)
        except Exception:
            log.warning("could not back-fill %d entries into %r", len(entries), self.layers[0], exc_info=True)

    def load_entries(self, keys: Sequence[str]) -> List[Optional[Entry]]:
        return self._entries_from(keys, 0)

    def _entries_from(
        self, keys: Sequence[str], start: int, stop: Optional[int] = None
    ) -> List[Optional[Entry]]:
        """Entries from ``layers[start:stop]``, each asked once for what the
        ones above lacked; hits below the first layer back-filled in one batch."""
        backfill: List[Entry] = []

        def fetch(layer: BaseCache, some: List[str]) -> List[Optional[Entry]]:
            found = layer.load_entries(some)
            if layer is not self.layers[0]:
                backfill.extend(entry for entry in found if entry is not None)
            return found

        result = first_found(self.layers[start:stop], keys, fetch)
        if self._backfilling():
            self._save_backfill(backfill)
        return result

    def load_records(self, keys: Sequence[str]) -> List[Optional[CallRecord]]:
        if not self._backfilling():
            return self._load_records_only(keys)
        result: List[Optional[CallRecord]] = [None] * len(keys)
        found = self.layers[0].load_records(keys)
        missing = []
        for i, record in enumerate(found):
            if record is None:
                missing.append(i)
            else:
                result[i] = record
        if not missing:
            return result
        # the lower layers: records with their blobs, one round trip each
        entries = self._entries_from([keys[i] for i in missing], 1)
        still = []
        for i, entry in zip(missing, entries):
            if entry is None:
                still.append(i)
            else:
                result[i] = entry[0]
        # a layer may list a call whose value it lost: the call is still
        # there to see, but nothing is back-filled (only for true misses,
        # so a hit costs no extra round trip)
        for layer in self.layers[1:]:
            if not still:
                break
            listed = layer.load_records([keys[i] for i in still])
            remaining = []
            for i, record in zip(still, listed):
                if record is None:
                    remaining.append(i)
                else:
                    result[i] = record
                    log.warning(
                        "layer %r lists call %s but not its value; not back-filled", layer, record.key[:12]
                    )
            still = remaining
        return result

    def _load_records_only(self, keys: Sequence[str]) -> List[Optional[CallRecord]]:
        return first_found(self.layers, keys, lambda layer, some: layer.load_records(some))

    def load_blobs(self, value_digests: Sequence[str]) -> List[Optional[Blob]]:
        # no back-fill: a blob without its record is garbage in the first layer
        return first_found(self.layers, value_digests, lambda layer, some: layer.load_blobs(some))

    def load_blob(self, value_digest: str) -> Blob:
        blob = self.load_blobs([value_digest])[0]
        if blob is None:
            raise KeyError(value_digest)
        return blob

    def load_value(self, key: str) -> Any:
        """The result under ``key``: the record and value come together from
        the first layer that has both (one round trip), and are back-filled."""
        full = self._full_key(key)
        entry = self.load_entries([full])[0]
        if entry is None:
            raise KeyError(key)
        return decode_value(entry[1])

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
        """Records of every layer, each once; those from lower layers are
        back-filled a page at a time (one ``load_blobs`` per page)."""
        seen: Set[str] = set()
        for depth, layer in enumerate(self.layers):
            page: List[CallRecord] = []
            for record in layer.query_records(name, arg_digests, metadata):
                if record.key in seen:
                    continue
                seen.add(record.key)
                if not depth or not self._backfilling() or not isinstance(record, CallRecord):
                    # an UnreadableRecord is passed on as it is, never back-filled
                    yield record
                    continue
                page.append(record)
                if len(page) >= QUERY_BACKFILL_PAGE:
                    self._backfill_page(page, layer)
                    yield from page
                    page = []
            if page:
                self._backfill_page(page, layer)
                yield from page

    def _backfill_page(self, records: Sequence[CallRecord], source: BaseCache) -> None:
        # the first layer was queried with the same filters and did not
        # list these, but another process may have saved some meanwhile
        top = self.layers[0]
        lacking = [r for r, held in zip(records, top.contains_many([r.key for r in records])) if not held]
        if not lacking:
            return
        blobs = source.load_blobs([r.value for r in lacking])
        entries: List[Entry] = []
        for record, blob in zip(lacking, blobs):
            if blob is None:
                log.warning(
                    "layer %r lists call %s but not its value; not back-filled", source, record.key[:12]
                )
            else:
                entries.append((record, blob))
        self._save_backfill(entries)

    def collect_garbage(self) -> int:
        return sum(layer.collect_garbage() for layer in self.layers if not layer.read_only)

    def close(self) -> None:
        """Push what the write-behind queues hold (a bounded wait; what is
        left stays pending), then close every layer."""
        for writer in self.write_behind:
            writer.close()
        for layer in self.layers:
            layer.close()

    def describe(self) -> Dict[str, Any]:
        return {
            "class": "CacheStack",
            "layers": [layer.describe() for layer in self.layers],
            "read_only": self.read_only,
        }

    # -- claims: in the last layer that saves reach ----------------------------

    def claim_keeper(self) -> Optional[Claims]:
        """The lowest write-behind layer that keeps claims, else the first
        layer: the furthest place this stack's saves reach, so every stack
        that shares it (two laptops and one cluster) computes a call once.
        A claim there is released only once the result is pushed to it."""
        if self.read_only:
            return None
        depth = {id(layer): i for i, layer in enumerate(self.layers)}
        for writer in sorted(self.write_behind, key=lambda w: -depth[id(w.layer)]):
            keeper = writer.layer.claim_keeper()
            if keeper is not None:
                kept = getattr(self, "_pushed_claims", None)
                if kept is None or kept.inner is not keeper:
                    kept = self._pushed_claims = PushedFirst(keeper, writer)
                return kept
        return self.layers[0].claim_keeper()

    def lookup_claims(self, entries: bool = False) -> Optional[Tuple[Claims, LoadOrClaim]]:
        """When this stack claims in its last layer (a write-behind ssh
        layer), a lookup that asks the layers above as :meth:`load_value`
        does, then looks up and claims in that layer in one round trip: a
        miss then costs the same round trips as a hit there."""
        keeper = self.claim_keeper()
        last = self.layers[-1]
        if not isinstance(keeper, PushedFirst) or keeper.writer.layer is not last or len(self.layers) < 2:
            return None
        below = last.lookup_claims(entries=True)
        if below is None or below[0] is not keeper.inner:
            return None
        lookup = below[1]

        def run(key: str, holder: Holder, lease: float) -> Tuple[bool, Any]:
            entry = self._entries_from([key], 0, len(self.layers) - 1)[0]
            if entry is None:
                found, answer = lookup(key, holder, lease)
                if not found:
                    return False, answer
                entry = answer
                if self._backfilling():
                    self._save_backfill([entry])
            return True, entry if entries else decode_value(entry[1])

        return keeper, run


_T = TypeVar("_T")


def first_found(
    layers: Sequence[BaseCache],
    keys: Sequence[str],
    fetch: Callable[[BaseCache, List[str]], Sequence[Optional[_T]]],
) -> List[Optional[_T]]:
    """For each key (a call's key or a value's digest), what the first layer
    holding it gives (None where none does). Each layer is asked once, in
    one batch, for the keys still missing, so a stack of N layers costs at
    most N batches; back-filling is the caller's business."""
    result: List[Optional[_T]] = [None] * len(keys)
    missing = list(range(len(keys)))
    for layer in layers:
        if not missing:
            break
        found = fetch(layer, [keys[i] for i in missing])
        still = []
        for i, item in zip(missing, found):
            if item is None:
                still.append(i)
            else:
                result[i] = item
        missing = still
    return result


class PushedFirst(Claims):
    """Claims in a write-behind layer, released only after the holder's
    result has been pushed there: whoever takes the claim next, on another
    machine, must find the result."""

    #: the release waits for a push: the renewing thread sends it
    release_in_background = True

    def __init__(self, inner: Claims, writer: WriteBehind) -> None:
        self.inner = inner
        self.writer = writer

    def __repr__(self) -> str:
        return repr(self.inner)

    @property
    def reports_stored(self) -> bool:
        return bool(getattr(self.inner, "reports_stored", False))

    def before_release(self) -> None:
        self.writer.flush(self.writer.close_timeout)

    def claim(self, keys: Sequence[str], holder: Holder, lease: float) -> List[Optional[Holder]]:
        return self.inner.claim(keys, holder, lease)

    def renew(self, keys: Sequence[str], holder: Holder, lease: float) -> List[bool]:
        return self.inner.renew(keys, holder, lease)

    def release(self, keys: Sequence[str], holder: Holder) -> None:
        self.inner.release(keys, holder)

    def claimed(self, keys: Sequence[str]) -> List[bool]:
        return self.inner.claimed(keys)
