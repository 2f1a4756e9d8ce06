"""How a :class:`~fleche_remote.caches.Cache` keeps within its limits.

Whoever owns the store enforces its limits: a ``Cache`` over local stores
does it as it saves (an ssh server is such a cache, with the limits of its
own fleche.toml). The work is amortised: the cache keeps a running total
(what it last measured plus what it saved since) and measures again, with
the store's own ``usage()`` (one aggregate query in SQL), only when that
total crosses a limit or when it alone has added :data:`RECHECK` of a
limit since it last looked (to notice what other processes saved). A trim
then evicts the least recently used down to
:data:`~fleche_remote.storage.quota.LOW_WATER` of each limit.

The overshoot this allows, and that the tests hold it to: the entries of
the save that crossed the limit, plus :data:`RECHECK` of ``max_bytes``
(and of ``max_calls``) per other process saving at the same time, plus
what was loaded in the last :data:`~fleche_remote.storage.quota.FRESH_S`
seconds (never evicted: its reader may not be done). Over a value store
that cannot move a value aside atomically (HDF5, SQL, memory), a value
stored in the last :data:`~fleche_remote.storage.quota.VALUE_GRACE_S`
outlives its evicted record until ``collect_garbage``: limits count the
values of records.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, List, Optional, Protocol, Sequence, Set

from ..call import CallRecord
from ..storage.quota import LOW_WATER, Entry, Limits, Usage, UseRecorder, plan_eviction, record_bytes


class Trimmed(Protocol):
    """What a trim needs of the cache it trims (a
    :class:`~fleche_remote.caches.Cache`): its call store, and removing
    entries with their values."""

    calls: Any

    def remove_entries(self, keys: Sequence[str], since: float) -> Any:
        """Remove ``keys``' records, and values no other record refers to."""


#: Fraction of a limit one process may add before it measures the store
#: again to see what other processes added.
RECHECK = 0.05


@dataclass
class TrimReport:
    """What one trim evicted (or, dry, would evict), and what remains."""

    evicted: List[Entry] = field(default_factory=list)
    remaining: Usage = field(default_factory=Usage)
    dry_run: bool = False

    @property
    def evicted_bytes(self) -> int:
        return sum(e.size for e in self.evicted)


class Quota:
    """The limits of one cache, its running totals and its use recorder."""

    def __init__(self, cache: Trimmed, limits: Limits) -> None:
        self.cache = cache
        self.limits = limits
        self.recorder = UseRecorder(cache.calls.touch)
        self._lock = threading.Lock()
        self._measured: Optional[Usage] = None
        self._added_calls = 0
        self._added_bytes = 0

    def used(self, keys: Iterable[str]) -> None:
        """Loads of ``keys`` count as uses (batched; see UseRecorder)."""
        self.recorder.add(keys)

    def saved(self, records: Sequence[CallRecord]) -> None:
        """Account for a save; trim when the running total says so."""
        size = sum(r.value_size + record_bytes(len(r.arguments)) for r in records)
        with self._lock:
            self._added_calls += len(records)
            self._added_bytes += size
            due = self._due()
        if due:
            self.enforce(protect={r.key for r in records})

    def _due(self) -> bool:
        limits, measured = self.limits, self._measured
        if limits.max_bytes is None and limits.max_calls is None:
            return False  # max_age alone: expired entries are misses, evicted when loaded
        if measured is None:
            return True
        if limits.over(measured.calls + self._added_calls, measured.bytes + self._added_bytes):
            return True
        return (limits.max_bytes is not None and self._added_bytes > RECHECK * limits.max_bytes) or (
            limits.max_calls is not None and self._added_calls > RECHECK * limits.max_calls
        )

    def enforce(self, protect: Set[str] = frozenset()) -> None:  # type: ignore[assignment]
        """Measure the store; trim it if it is over a limit."""
        usage = self.cache.calls.usage()
        if self.limits.over(usage.calls, usage.bytes):
            self.trim(protect=protect)
        else:
            self._reset(usage)

    def _reset(self, usage: Usage) -> None:
        with self._lock:
            self._measured = usage
            self._added_calls = self._added_bytes = 0

    def trim(
        self,
        limits: Optional[Limits] = None,
        *,
        dry_run: bool = False,
        protect: Set[str] = frozenset(),  # type: ignore[assignment]
        low_water: float = LOW_WATER,
    ) -> TrimReport:
        """Evict expired entries, then the least recently used, until the
        cache is under ``low_water`` of ``limits`` (default: its own); with
        ``dry_run``, only say what would go."""
        return trim(
            self.cache,
            limits or self.limits,
            dry_run=dry_run,
            protect=protect,
            quota=self,
            low_water=low_water,
        )


def trim(
    cache: Trimmed,
    limits: Limits,
    *,
    dry_run: bool = False,
    protect: Set[str] = frozenset(),  # type: ignore[assignment]
    quota: Optional[Quota] = None,
    low_water: float = LOW_WATER,
) -> TrimReport:
    """One trim of ``cache`` by ``limits`` (what ``fleche-remote gc
    --max-bytes`` runs, and what a cache with limits runs as it saves)."""
    if quota is not None:
        quota.recorder.flush()
    calls = cache.calls
    started = time.time()
    claimed = getattr(calls, "claimed", None)
    evict, remaining = plan_eviction(
        calls.entries(), limits, started, protect=protect, claimed=claimed, low_water=low_water
    )
    if evict and not dry_run:
        cache.remove_entries([e.key for e in evict], since=started)
    if quota is not None and not dry_run:
        quota._reset(remaining)
    return TrimReport(evict, remaining, dry_run)
