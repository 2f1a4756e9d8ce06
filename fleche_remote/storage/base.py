"""Value stores and call stores: the two halves of a cache.

As in fleche.toml's ``values.type`` / ``calls.type``, a :class:`Cache`
pairs one :class:`ValueStore` (result blobs, by value digest) with one
:class:`CallStore` (call records, by call key). Each backend is one module
that registers its classes under a ``type`` name; heavy imports (SQLAlchemy,
h5py, NumPy) happen inside that module only, when the type is used.

The ABCs hold the few primitives a backend must write; generic operations
(batches, prefix expansion, filtering) have default implementations here
that a backend overrides where it can do better (SQL indexes, for one).

Contract shared by every backend:

* ``put`` is idempotent: writing a key that exists leaves one entry and
  succeeds, even when two processes race on it.
* writes are atomic: a reader sees the whole entry or no entry.
* ``get`` of a missing key raises ``KeyError``; a present but unreadable
  entry raises :class:`~fleche_remote.errors.CorruptEntryError`.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Type

from ..call import CallRecord, UnreadableRecord
from ..codec.values import Blob
from ..errors import ConfigError, CorruptEntryError
from .quota import VALUE_GRACE_S, Entry, Usage, record_bytes

#: Values whose body is at most this many bytes live *inline*, in the call
#: store's database next to the records, when the call store can hold them
#: (see :class:`InlineValues`); bigger ones go to the value store, as files
#: or HDF5 datasets, streamed. 32 KiB is diskcache's threshold too
#: (``disk_min_file_size``), and SQLite's own measurements ("Internal Versus
#: External BLOBs", sqlite.org/intern-v-extern-blob.html) put the crossover
#: where a blob read from the database stops beating a file read between
#: about 20 and 100 KiB on 4-8 KiB pages. Below it, a file per value costs
#: an inode, a directory entry and a temp-file-and-rename per save, which is
#: what made small saves slow and what fills an HPC inode quota (~1 M files)
#: long before its byte quota.
INLINE_MAX = 32 * 1024


class ValueStore(ABC):
    """Blobs addressed by their content digest."""

    #: the ``values.type`` name this class is registered under
    type_name: str = ""

    @abstractmethod
    def put(self, digest: str, blob: Blob) -> None:
        """Store ``blob`` under ``digest`` atomically; a no-op if present.

        The store may stop reading ``blob`` early when the digest is
        already present; callers that stream drain the rest themselves.
        """

    @abstractmethod
    def get(self, digest: str) -> Blob:
        """The blob stored under ``digest``; ``KeyError`` if absent."""

    @abstractmethod
    def contains(self, digest: str) -> bool:
        """Whether ``digest`` is stored."""

    @abstractmethod
    def delete(self, digest: str) -> None:
        """Remove ``digest``; no error if it is absent."""

    @abstractmethod
    def digests(self) -> Iterator[str]:
        """Every stored digest (for garbage collection and copying)."""

    @abstractmethod
    def to_config(self) -> Dict[str, Any]:
        """The fleche.toml table that rebuilds this store (``type`` first)."""

    @classmethod
    @abstractmethod
    def from_config(cls, table: Dict[str, Any], base_dir: Optional[Path] = None) -> ValueStore:
        """Build the store from its fleche.toml table.

        Relative paths resolve against ``base_dir`` (the directory of the
        file that declared them), else the current directory. Unknown or
        mistyped keys raise :class:`~fleche_remote.errors.ConfigError`.
        """

    def close(self) -> None:
        """Release files, connections and locks; the store may be reopened."""

    def open_read_only(self) -> None:
        """From now on, open what the store keeps without writing it: a
        read-only cache calls this on its stores, so that opening a store
        creates, upgrades or migrates nothing (see the SQL stores). The
        default does nothing: a store whose opening writes nothing."""

    def collect_temporaries(self) -> int:
        """Remove what killed writers left half-written; returns how many.

        Only stores that write temp files have any (the file stores); the
        others write in transactions and return 0. Never touches a live
        writer's temp file.
        """
        return 0

    def stored_at(self, digest: str) -> Optional[float]:
        """When ``digest`` was last stored (or stored again), as a Unix
        time; None when the store does not know.

        Garbage collection spares values younger than a grace period: a
        save writes its value before its record, so a fresh value with no
        record yet is not an orphan.
        """
        return None

    # -- quotas: eviction of values (see storage/quota.py) -------------------

    def discard_many(
        self, digests: Sequence[str], since: float, referenced: Callable[[Sequence[str]], List[bool]]
    ) -> List[str]:
        """Delete the values of ``digests`` that no record refers to and
        that were not stored (or stored again) at or after ``since``;
        returns those deleted.

        ``referenced`` answers, for a batch, whether a record refers to
        each digest. A save writes its value before its record, and storing
        a value again refreshes its time, so a value a concurrent save is
        about to refer to is either fresh (kept) or referenced (kept); this
        default keeps values stored up to
        :data:`~fleche_remote.storage.quota.VALUE_GRACE_S` before ``since``,
        for the window between its checks and its delete. A store that can
        move a value aside atomically (the file store) does so first and
        checks again, which closes the window instead.
        """
        since -= VALUE_GRACE_S  # the window between the checks and the delete
        candidates = [d for d in digests if (self.stored_at(d) or 0.0) < since]
        if not candidates:
            return []
        gone = [d for d, ref in zip(candidates, referenced(candidates)) if not ref]
        for digest in gone:
            self.delete(digest)
        return gone


class CallStore(ABC):
    """Call records addressed by call key."""

    type_name: str = ""

    @abstractmethod
    def put(self, record: CallRecord) -> None:
        """Store ``record`` atomically; idempotent for an existing key."""

    @abstractmethod
    def get(self, key: str) -> CallRecord:
        """The record under ``key``; ``KeyError`` if absent."""

    @abstractmethod
    def contains(self, key: str) -> bool:
        """Whether ``key`` is stored."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; no error if it is absent."""

    @abstractmethod
    def keys(self) -> Iterator[str]:
        """Every stored call key."""

    @abstractmethod
    def to_config(self) -> Dict[str, Any]:
        """The fleche.toml table that rebuilds this store (``type`` first)."""

    @classmethod
    @abstractmethod
    def from_config(cls, table: Dict[str, Any], base_dir: Optional[Path] = None) -> CallStore:
        """Build the store from its fleche.toml table.

        Relative paths resolve against ``base_dir`` (the directory of the
        file that declared them), else the current directory. Unknown or
        mistyped keys raise :class:`~fleche_remote.errors.ConfigError`.
        """

    # -- generic operations; backends override where they can index --------

    def put_many(self, records: Sequence[CallRecord]) -> None:
        """Store several records; a backend that can makes it one transaction."""
        for record in records:
            self.put(record)

    def refers_to(self, value_digests: Sequence[str]) -> List[bool]:
        """Whether some stored record refers to each value digest (what
        garbage collection keeps). The default reads every record; an
        indexed store answers from its index."""
        wanted = set(value_digests)
        found = set()
        for key in self.keys():
            try:
                value = self.get(key).value
            except KeyError:  # evicted while we iterate
                continue
            if value in wanted:
                found.add(value)
        return [d in found for d in value_digests]

    def get_many(self, keys: Iterable[str]) -> List[Optional[CallRecord]]:
        """Records for ``keys`` in order, ``None`` where absent."""
        out: List[Optional[CallRecord]] = []
        for key in keys:
            try:
                out.append(self.get(key))
            except KeyError:
                out.append(None)
        return out

    def contains_many(self, keys: Iterable[str]) -> List[bool]:
        return [self.contains(k) for k in keys]

    def keys_with_prefix(self, prefix: str, limit: int = 2) -> List[str]:
        """Up to ``limit`` stored keys starting with ``prefix``."""
        found: List[str] = []
        for key in self.keys():
            if key.startswith(prefix):
                found.append(key)
                if len(found) >= limit:
                    break
        return found

    def query(
        self,
        name: Optional[str] = None,
        arg_digests: Optional[Mapping[str, str]] = None,
        metadata: Optional[Mapping[str, Any]] = None,
    ) -> Iterator[CallRecord]:
        """Records matching a name, argument digests and metadata values.

        A record that does not decode comes as an
        :class:`~fleche_remote.call.UnreadableRecord` (whatever the filters:
        they cannot be checked), so that one bad entry never hides the rest.
        """
        for key in self.keys():
            try:
                record = self.get(key)
            except KeyError:  # evicted while we iterate
                continue
            except CorruptEntryError as exc:
                yield UnreadableRecord(key, str(exc))  # type: ignore[misc]
                continue
            if record_matches(record, name, arg_digests, metadata):
                yield record

    def close(self) -> None:
        """Release files, connections and locks; the store may be reopened."""

    def open_read_only(self) -> None:
        """See :meth:`ValueStore.open_read_only`."""

    def collect_temporaries(self) -> int:
        """Remove what killed writers left half-written; returns how many
        (see :meth:`ValueStore.collect_temporaries`)."""
        return 0

    # -- quotas (see storage/quota.py); backends override where they can index --

    def touch(self, uses: Mapping[str, float]) -> None:
        """Record when keys were last used (``{key: unix time}``), in one
        write; a store that keeps no use times ignores it, and eviction
        then goes by the time of storing."""

    def last_used(self) -> Dict[str, float]:
        """The use times :meth:`touch` recorded, by key."""
        return {}

    def stored_times(self, keys: Sequence[str]) -> List[Optional[float]]:
        """When each record was stored (Unix time), ``None`` where unknown
        or absent; what ``max_age`` counts from."""
        return [None] * len(keys)

    def entries(self) -> Iterator[Entry]:
        """Every stored call as eviction sees it (size, stored, last used).
        The default reads every record."""
        used = self.last_used()
        for key in self.keys():
            try:
                record = self.get(key)
            except KeyError:  # evicted while we iterate
                continue
            stored = self.stored_times([key])[0] or 0.0
            size = record.value_size + record_bytes(len(record.arguments))
            yield Entry(key, record.name, record.value, size, stored, max(used.get(key, 0.0), stored))

    def usage(self) -> Usage:
        """Calls and bytes held, in total and per function name."""
        return Usage.of(self.entries())

    def delete_entries(self, keys: Sequence[str]) -> List[str]:
        """Delete the records of ``keys`` (and their use times); returns
        the value digests they referred to, for the caller to discard
        those no other record refers to."""
        values = []
        for key, record in zip(keys, self.get_many(keys)):
            if record is not None:
                self.delete(key)
                values.append(record.value)
        self.forget_uses(keys)
        return values

    def forget_uses(self, keys: Sequence[str]) -> None:
        """Drop the use times of deleted keys (a no-op where none are kept)."""


class InlineValues(ABC):
    """A call store that can also keep small value blobs next to its records.

    A call store declares the ability by inheriting this mixin (SQL does;
    file, memory and HDF5 call stores do not). A
    :class:`~fleche_remote.caches.Cache` over such a store writes every
    value of at most :data:`INLINE_MAX` bytes here, in the same transaction
    as the record that refers to it, and looks here first when it loads a
    value. Blobs are keyed by value digest and written insert-or-ignore, so
    content addressing and deduplication hold as in a value store.
    """

    @abstractmethod
    def put_entries(self, records: Sequence[CallRecord], blobs: Mapping[str, Blob]) -> None:
        """Store ``records`` and the small ``blobs`` (digest -> blob, each
        at most :data:`INLINE_MAX` bytes) in one transaction; existing keys
        and digests are left as they are."""

    @abstractmethod
    def get_blobs(self, digests: Sequence[str]) -> List[Optional[Blob]]:
        """Inline blobs for ``digests`` in order, ``None`` where not held inline."""

    @abstractmethod
    def get_entries(self, keys: Sequence[str]) -> List[Optional[Tuple[CallRecord, Optional[Blob]]]]:
        """Records for ``keys`` with their inline blob (``None`` when the
        value is not inline); ``None`` where the record is absent."""

    @abstractmethod
    def blob_digests(self) -> Iterator[str]:
        """Every digest held inline."""

    @abstractmethod
    def collect_blobs(self) -> int:
        """Delete the inline blobs no record refers to; returns how many."""


def record_matches(
    record: CallRecord,
    name: Optional[str],
    arg_digests: Optional[Mapping[str, str]],
    metadata: Optional[Mapping[str, Any]],
) -> bool:
    """The filter semantics every backend's ``query`` must implement."""
    if name is not None and record.name != name:
        return False
    for arg, d in (arg_digests or {}).items():
        if record.arg_digests.get(arg) != d:
            return False
    for mkey, mval in (metadata or {}).items():
        if mkey not in record.metadata or record.metadata[mkey] != mval:
            return False
    return True


# -- registry ---------------------------------------------------------------

_VALUE_TYPES: Dict[str, str] = {
    "memory": "fleche_remote.storage.memory:MemoryValueStore",
    "pickle": "fleche_remote.storage.file:FileValueStore",
    "cloudpickle": "fleche_remote.storage.file:FileValueStore",
    "sql": "fleche_remote.storage.sql.stores:SqlValueStore",
    "hdf5": "fleche_remote.storage.hdf5:Hdf5ValueStore",
}
_CALL_TYPES: Dict[str, str] = {
    "memory": "fleche_remote.storage.memory:MemoryCallStore",
    "pickle": "fleche_remote.storage.file:FileCallStore",
    "cloudpickle": "fleche_remote.storage.file:FileCallStore",
    "sql": "fleche_remote.storage.sql.stores:SqlCallStore",
    "hdf5": "fleche_remote.storage.hdf5:Hdf5CallStore",
}


def register_value_store(name: str, cls: Type[ValueStore] | str) -> None:
    """Make ``values.type = name`` build ``cls`` (a class or "module:Class")."""
    _register(_VALUE_TYPES, ValueStore, name, cls)


def register_call_store(name: str, cls: Type[CallStore] | str) -> None:
    """Make ``calls.type = name`` build ``cls`` (a class or "module:Class")."""
    _register(_CALL_TYPES, CallStore, name, cls)


def _register(table: Dict[str, Any], base: type, name: str, cls: Any) -> None:
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"store type name must be an identifier, got {name!r}")
    if not isinstance(cls, str):
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise TypeError(f"{cls!r} is not a subclass of {base.__name__}")
        abstract = getattr(cls, "__abstractmethods__", None)
        if abstract:
            missing = ", ".join(sorted(abstract))
            raise TypeError(f"{cls.__name__} does not implement {missing}")
    table[name] = cls


def _resolve(table: Dict[str, Any], name: str, what: str) -> Any:
    try:
        entry = table[name]
    except KeyError:
        known = ", ".join(sorted(table))
        raise ConfigError(f"unknown {what} type {name!r}; known types: {known}", key="type") from None
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)
    return entry


def value_store_class(name: str) -> Type[ValueStore]:
    return _resolve(_VALUE_TYPES, name, "values")  # type: ignore[no-any-return]


def call_store_class(name: str) -> Type[CallStore]:
    return _resolve(_CALL_TYPES, name, "calls")  # type: ignore[no-any-return]


def value_store_types() -> List[str]:
    return sorted(_VALUE_TYPES)


def call_store_types() -> List[str]:
    return sorted(_CALL_TYPES)


def build_store(kind: str, table: Mapping[str, Any], base_dir: Optional[Path] = None) -> Any:
    """Build a store from its config table (``kind`` is "values" or "calls").

    Each store class offers ``from_config(table, base_dir)``; ``base_dir``
    is the directory of the fleche.toml that declared the table, against
    which relative paths resolve.
    """
    type_name = table.get("type")
    if not isinstance(type_name, str):
        raise ConfigError(f"{kind}.type must be a string naming a store type", key=f"{kind}.type")
    cls = value_store_class(type_name) if kind == "values" else call_store_class(type_name)
    return cls.from_config(dict(table), base_dir)
