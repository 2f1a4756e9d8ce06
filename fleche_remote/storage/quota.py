"""Quotas: limits on what a cache keeps, and the least recently used out.

A cache table (or ``Cache(...)``) may carry ``max_bytes`` ("20 GB",
"500 MiB", or a number of bytes), ``max_calls`` and ``max_age`` ("30d",
"12h", "2s", or seconds); fleche's ``max_size = N`` reads as
``max_calls = N`` (fleche evicts at random; we evict the least recently
used). This module holds what does not depend on a store:

* parsing and the :class:`Limits` dataclass;
* :class:`UseRecorder`, which batches "last used" times in memory and
  hands them to the store at most every :data:`FLUSH_S` seconds and at
  close, so a load never costs a write transaction (diskcache's LRU writes
  on every read; joblib trusted atime, which ``noatime`` and ``relatime``
  mounts do not keep);
* :class:`UsesLog`, the append-only side file where the file and HDF5
  stores keep those times (SQL keeps them in a ``uses`` table);
* :func:`plan_eviction`, which picks what goes: expired entries, then
  the least recently used, down to :data:`LOW_WATER` of each limit, never
  an entry claimed by a computation, one of the save being made, or
  one loaded in the last :data:`FRESH_S` seconds, never a value stored in the last
  :data:`VALUE_GRACE_S`.

What a limit counts. Each entry costs its value's size plus its record
(:func:`record_bytes`): a value shared by several records counts once per
record, an over-estimate that errs on the side of evicting early.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

from ..errors import ConfigError
from ..progress import human_bytes

#: Seconds between two flushes of recorded uses. A crash loses at most
#: this much use history, which only makes an entry look idler than it was.
FLUSH_S = 5.0

#: A trim evicts down to this fraction of each limit, so that the next
#: few saves do not each trigger another trim (amortised eviction).
LOW_WATER = 0.9

#: An entry loaded this recently is never evicted: its reader may still be
#: at work on it. (A just-saved entry needs no such rule: it is the newest,
#: so it goes last.) Short, because whatever it keeps is overshoot.
FRESH_S = 0.2

#: A value stored (or stored again) this recently is never deleted when
#: its record is evicted: a save of an equal result may be between writing
#: the value and writing its record. It stays, unreferenced, until the
#: next ``collect_garbage``.
VALUE_GRACE_S = 1.0

#: What a record costs beyond its argument bytes: key, name, digests and
#: metadata, index rows. An estimate, the same for every store.
RECORD_OVERHEAD = 256

#: The cache-table keys this module reads (``max_size`` is fleche's name).
LIMIT_KEYS = ("max_bytes", "max_calls", "max_age", "max_size")

#: Why an ssh layer takes no limits: the cache over there is another's.
SSH_LIMITS_MESSAGE = (
    "{key} does not apply to an ssh layer: a client's limits do not reach the cache on the other "
    "machine, which its owner keeps within the limits of that machine's own fleche.toml; put "
    "{key} in the cache table there (the one the server serves), or on a local layer of this stack"
)

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_AGE_UNITS = {
    "": 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0,
}  # fmt: skip
_NUMBER_UNIT = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*")


def _amount(value: Any, key: str, units: Mapping[str, float], like: str, unit_names: str, of: str) -> float:
    """A positive amount from a number or ``"<number> <unit>"``; errors say
    what was expected, with examples (``like``) and the known units."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{key} must be {like}, got {value!r}", key=key)
    if isinstance(value, str):
        m = _NUMBER_UNIT.fullmatch(value)
        unit = m.group(2).lower() if m else ""
        if m is None or unit not in units:
            raise ConfigError(f"{key} must be {like}, got {value!r}; units: {unit_names}", key=key)
        amount = float(m.group(1)) * units[unit]
    else:
        amount = float(value)
    if not math.isfinite(amount) or amount <= 0:
        raise ConfigError(f"{key} must be more than 0 {of}, got {value!r}", key=key)
    return amount


def parse_size(value: Any, key: str = "max_bytes") -> int:
    """Bytes from ``"20 GB"`` (powers of 1000), ``"500 MiB"`` (of 1024) or
    a number of bytes."""
    like = 'a size like "20 GB", "500 MiB" or 1000000 (bytes)'
    return int(_amount(value, key, _SIZE_UNITS, like, ", ".join(u for u in _SIZE_UNITS if u), "bytes"))


def parse_age(value: Any, key: str = "max_age") -> float:
    """Seconds from ``"30d"``, ``"12h"``, ``"15min"``, ``"2s"`` or a number of seconds."""
    like = 'an age like "30d", "12h", "15min" or "2s"'
    return _amount(value, key, _AGE_UNITS, like, "s, min, h, d, w", "seconds")


def _count(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a whole number of calls, at least 1, got {value!r}", key=key)
    return value


def format_size(n: float) -> str:
    """``1234567`` -> ``"1.2 MB"`` (powers of 1000, as ``du -h --si``, and
    as limits are written)."""
    return human_bytes(n, base=1000)


def format_age(seconds: float) -> str:
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


@dataclass(frozen=True)
class Limits:
    """What a cache may keep; ``None`` is no limit.

    Args:
        max_bytes: bytes of values and records (see the module docstring).
        max_calls: stored calls.
        max_age: seconds since a result was stored; an older one is a miss.
    """

    max_bytes: Optional[int] = None
    max_calls: Optional[int] = None
    max_age: Optional[float] = None

    @classmethod
    def of(
        cls, max_bytes: Any = None, max_calls: Any = None, max_age: Any = None, max_size: Any = None
    ) -> Limits:
        """Limits from config values (strings with units, or numbers).

        Raises:
            ConfigError: a value is malformed, or both ``max_calls`` and
                fleche's ``max_size`` are given.
        """
        if max_size is not None:
            if max_calls is not None:
                raise ConfigError(
                    "give max_calls or max_size (fleche's name for it), not both", key="max_size"
                )
            max_calls = _count(max_size, "max_size")
        return cls(
            None if max_bytes is None else parse_size(max_bytes),
            None if max_calls is None else _count(max_calls, "max_calls"),
            None if max_age is None else parse_age(max_age),
        )

    @classmethod
    def split(cls, table: Mapping[str, Any]) -> Tuple[Limits, Dict[str, Any]]:
        """The limits of a cache table, and the table without their keys."""
        limits = cls.of(**{k: table[k] for k in LIMIT_KEYS if k in table})
        return limits, {k: v for k, v in table.items() if k not in LIMIT_KEYS}

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.max_bytes, self.max_calls, self.max_age))

    def to_config(self) -> Dict[str, Any]:
        cfg: Dict[str, Any] = {}
        if self.max_bytes is not None:
            cfg["max_bytes"] = self.max_bytes
        if self.max_calls is not None:
            cfg["max_calls"] = self.max_calls
        if self.max_age is not None:
            cfg["max_age"] = format_age(self.max_age)
        return cfg

    def over(self, calls: int, nbytes: int) -> bool:
        """Whether ``calls`` entries of ``nbytes`` exceed a count or size limit."""
        return (self.max_calls is not None and calls > self.max_calls) or (
            self.max_bytes is not None and nbytes > self.max_bytes
        )

    def describe(self) -> str:
        parts = []
        if self.max_bytes is not None:
            parts.append(f"max_bytes {format_size(self.max_bytes)}")
        if self.max_calls is not None:
            parts.append(f"max_calls {self.max_calls}")
        if self.max_age is not None:
            parts.append(f"max_age {format_age(self.max_age)}")
        return ", ".join(parts) or "no limits"


def record_bytes(arguments_size: int) -> int:
    """What a record costs in a limit, beyond its value (see :data:`RECORD_OVERHEAD`)."""
    return RECORD_OVERHEAD + arguments_size


@dataclass(frozen=True)
class Entry:
    """One stored call as eviction sees it."""

    key: str
    name: str
    value: str
    size: int  #: value bytes plus :func:`record_bytes`
    stored: float  #: when it was stored (Unix time)
    used: float  #: when it was last loaded or stored


@dataclass
class Usage:
    """What a cache holds: calls and bytes, in total and per function name."""

    calls: int = 0
    bytes: int = 0
    by_name: Dict[str, Tuple[int, int]] = field(default_factory=dict)

    def add(self, name: str, calls: int, nbytes: int) -> None:
        self.calls += calls
        self.bytes += nbytes
        c, b = self.by_name.get(name, (0, 0))
        self.by_name[name] = (c + calls, b + nbytes)

    @classmethod
    def of(cls, entries: Iterable[Entry]) -> Usage:
        usage = cls()
        for e in entries:
            usage.add(e.name, 1, e.size)
        return usage


def plan_eviction(
    entries: Iterable[Entry],
    limits: Limits,
    now: float,
    *,
    protect: Set[str] = frozenset(),  # type: ignore[assignment]
    claimed: Optional[Callable[[Sequence[str]], Sequence[bool]]] = None,
    low_water: float = LOW_WATER,
) -> Tuple[List[Entry], Usage]:
    """What to evict, and what remains.

    Expired entries (stored more than ``max_age`` ago) go first; then, if
    the rest is over a count or size limit, the least recently used go
    until it is under ``low_water`` of each. Entries in ``protect`` (the
    save that triggered the trim), loaded in the last :data:`FRESH_S`
    seconds, or claimed (``claimed`` answers for a batch of keys) stay.
    """
    everything = list(entries)
    fresh_after = now - FRESH_S
    # a just-saved entry is the newest, so least-recently-used order takes it
    # last; a just-loaded one may still be being read: it stays
    movable = [e for e in everything if e.key not in protect and not (e.stored < e.used >= fresh_after)]
    if claimed is not None and movable:
        held = claimed([e.key for e in movable])
        movable = [e for e, h in zip(movable, held) if not h]
    evict: List[Entry] = []
    gone: Set[str] = set()
    if limits.max_age is not None:
        oldest = now - limits.max_age
        for e in movable:
            if e.stored < oldest:
                evict.append(e)
                gone.add(e.key)
    calls = len(everything) - len(evict)
    nbytes = sum(e.size for e in everything) - sum(e.size for e in evict)
    if limits.over(calls, nbytes):
        max_calls = None if limits.max_calls is None else int(limits.max_calls * low_water)
        max_bytes = None if limits.max_bytes is None else int(limits.max_bytes * low_water)
        target = Limits(max_bytes, max_calls)
        for e in sorted((e for e in movable if e.key not in gone), key=lambda e: e.used):
            if not target.over(calls, nbytes):
                break
            evict.append(e)
            gone.add(e.key)
            calls -= 1
            nbytes -= e.size
    return evict, Usage.of(e for e in everything if e.key not in gone)


class UseRecorder:
    """Last-used times, batched in memory, written at most every ``every``
    seconds (by the next use after that) and at :meth:`flush`.

    Args:
        write: stores ``{key: time}``; a store's ``touch``.
        every: seconds between writes.
    """

    def __init__(self, write: Callable[[Dict[str, float]], None], every: float = FLUSH_S) -> None:
        self._write = write
        self._every = every
        self._pending: Dict[str, float] = {}
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def add(self, keys: Iterable[str], when: Optional[float] = None) -> None:
        when = time.time() if when is None else when
        with self._lock:
            for key in keys:
                self._pending[key] = when
            due = time.monotonic() - self._last >= self._every
        if due:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, {}
            self._last = time.monotonic()
        if batch:
            self._write(batch)


class UsesLog:
    """Last-used times in an append-only text file (``key time`` lines).

    One ``write`` per flush, with ``O_APPEND``, so the lines of processes
    that flush together do not interleave on a local file system. The
    newest time of a key wins when reading. :meth:`compact` rewrites the
    file (temp file, then rename) with one line per surviving key; a flush
    that lands during the rewrite is lost, which only makes its entries
    look idler.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def record(self, uses: Mapping[str, float]) -> None:
        if not uses:
            return
        data = "".join(f"{k} {t:.3f}\n" for k, t in uses.items()).encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except FileNotFoundError:
            os.makedirs(self.path.parent, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def read(self) -> Dict[str, float]:
        try:
            text = self.path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return {}
        out: Dict[str, float] = {}
        for line in text.splitlines():
            key, _, when = line.partition(" ")
            try:
                t = float(when)
            except ValueError:
                continue  # a torn last line of a killed writer
            if t > out.get(key, 0.0):
                out[key] = t
        return out

    def compact(self, keep: Mapping[str, float]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(f"{k} {t:.3f}\n" for k, t in keep.items()))
        os.replace(tmp, self.path)

    def forget(self, keys: Sequence[str]) -> None:
        """Drop the lines of ``keys`` (evicted entries)."""
        uses = self.read()
        if uses:
            dropped = set(keys)
            self.compact({k: t for k, t in uses.items() if k not in dropped})


class LoggedUses:
    """The use-recording part of a call store whose last-used times live in
    a :class:`UsesLog` beside its data (file and HDF5 stores); listed before
    ``CallStore`` among the bases, it replaces that ABC's defaults."""

    @property
    def _uses(self) -> UsesLog:
        raise NotImplementedError

    def touch(self, uses: Mapping[str, float]) -> None:
        self._uses.record(uses)

    def last_used(self) -> Dict[str, float]:
        return self._uses.read()

    def forget_uses(self, keys: Sequence[str]) -> None:
        self._uses.forget(keys)
