"""``Cache``: one value store plus one call store, as in fleche.toml.

Small values inline. When the call store can hold values
(:class:`~fleche_remote.storage.base.InlineValues`: the SQL store), a
value of at most :data:`~fleche_remote.storage.base.INLINE_MAX` bytes is
written into the call store's database, in the transaction of its record,
instead of the value store: a million small results are then one database,
not a million files, and a save is one transaction. Bigger values go to
the value store (files, HDF5), streamed, before their records. Loads look
inline first. Over any other call store a ``Cache`` keeps every value in
its value store, as before.

Signed. With a ``secret_key`` a ``Cache`` signs every entry it stores and
checks every one it hands out, before anything is unpickled (see
:mod:`fleche_remote.signing`): records in :meth:`Cache.load_records`,
:meth:`~Cache.query_records` and :meth:`~Cache.load_entries`, values as
their bodies are read. Stores keep the signatures as plain data; they
need not know.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from ..call import CallRecord, LazyCall
from ..codec.digest import Digest
from ..codec.values import Blob, BytesBlob, StreamBlob, decode_value
from ..errors import AmbiguousDigestError, ConfigError, CorruptEntryError, Rejected
from ..redaction import REDACTED, redact
from ..signing import SecretKeyArg, Signer
from ..storage.base import INLINE_MAX, CallStore, InlineValues, ValueStore
from ..storage.claims import Claims
from ..storage.quota import Limits, Usage
from .base import BaseCache
from .quota import Quota, TrimReport, trim

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
        read_only: refuse every write with :class:`~fleche_remote.Rejected`,
            and open the stores without writing them (a SQL database with
            tables of an older form is not migrated: opening it is a
            :class:`~fleche_remote.errors.StorageError` saying how to).
            The stores read only from then on, for whoever else uses them.
        secret_key: sign every entry saved and refuse, with a
            :class:`~fleche_remote.signing.SignatureError`, every entry
            loaded that is not signed with it: a hex string (several keys
            separated by ``:``, the first signs), raw ``bytes``, a list of
            either, or a :class:`~fleche_remote.signing.Signer`.
            ``FLECHE_SECRET_KEY`` applies to caches built from fleche.toml,
            not to this constructor.
        inline_max: values of at most this many bytes go into a call store
            that can hold them (SQL) instead of ``values``; 0 sends every
            value to ``values``. Default
            :data:`~fleche_remote.storage.base.INLINE_MAX`; fleche.toml's
            explicit ``values`` / ``calls`` tables default to 0 (the value
            store the user named gets the values) unless the calls table
            says ``inline_max``.
        max_bytes: evict the least recently used entries when values and
            records exceed this ("20 GB", "500 MiB" or a number of bytes).
        max_calls: likewise, when more calls than this are stored.
        max_age: a result stored longer ago than this ("30d", "12h", "2s"
            or seconds) is a miss, computed again.
        max_size: fleche's name for ``max_calls``.

    Raises:
        ConfigError: ``secret_key`` is not hex, or is empty; a limit or
            ``inline_max`` is malformed.
    """

    #: A value in the value store younger than this (seconds) is never
    #: collected as garbage: its record may be on its way.
    GC_GRACE_SECONDS: float = 3600.0

    def __init__(
        self,
        values: ValueStore,
        calls: CallStore,
        *,
        read_only: bool = False,
        secret_key: SecretKeyArg = None,
        inline_max: Optional[int] = None,
        max_bytes: Any = None,
        max_calls: Any = None,
        max_age: Any = None,
        max_size: Any = None,
    ) -> None:
        if not isinstance(values, ValueStore):
            raise TypeError(f"values must be a ValueStore, got {type(values).__name__}")
        if not isinstance(calls, CallStore):
            raise TypeError(f"calls must be a CallStore, got {type(calls).__name__}")
        self.values = values
        self.calls = calls
        self._read_only = bool(read_only)
        if self._read_only:
            # before their first use: a store that would create or migrate
            # its tables on opening (SQL) leaves them as they are instead
            values.open_read_only()
            calls.open_read_only()
        #: the call store, when it keeps small values inline
        self._inline: Optional[InlineValues] = calls if isinstance(calls, InlineValues) else None
        #: signs and checks entries; None for an unsigned cache
        self.signer: Optional[Signer] = Signer.of(secret_key)
        if inline_max is None:
            inline_max = INLINE_MAX
        if (
            isinstance(inline_max, bool)
            or not isinstance(inline_max, int)
            or not (0 <= inline_max <= INLINE_MAX)
        ):
            raise ConfigError(
                f"inline_max must be a number of bytes from 0 to {INLINE_MAX}, got {inline_max!r}",
                key="inline_max",
            )
        #: values of at most this many bytes go inline (when the call store can)
        self.inline_max = inline_max
        #: the limits this cache keeps within (see caches/quota.py); falsy: none
        self.limits = Limits.of(max_bytes, max_calls, max_age, max_size)
        self.quota: Optional[Quota] = Quota(self, self.limits) if self.limits and not read_only else None

    @property
    def read_only(self) -> bool:
        return self._read_only

    def to_config(self) -> Dict[str, Any]:
        """The ``values`` / ``calls`` table that builds this cache again;
        a secret key from ``FLECHE_SECRET_KEY`` stays out of it."""
        cfg: Dict[str, Any] = {"values": self.values.to_config(), "calls": self.calls.to_config()}
        if self._inline is not None and self.inline_max:
            cfg["calls"]["inline_max"] = self.inline_max
        cfg.update(self.limits.to_config())
        if self._read_only:
            cfg["read_only"] = True
        if self.signer is not None and self.signer.in_config:
            cfg["secret_key"] = self.signer.to_config()
        return cfg

    def __repr__(self) -> str:
        ro = ", read_only=True" if self._read_only else ""
        signed = f", secret_key={REDACTED!r}" if self.signer is not None else ""
        return f"Cache(values={self.values.to_config()}, calls={self.calls.to_config()}{ro}{signed})"

    def _where(self, what: str, ident: str) -> str:
        """Where an entry lives, for a refusal's message: its file when the
        store keeps one per entry, else the store's (redacted) table."""
        store: Any = self.calls if what == "call" else self.values
        path_of = getattr(store, "_path", None)
        if callable(path_of):
            try:
                path = path_of(ident)
                if what == "call" or self._inline is None or os.path.exists(path):
                    return str(path)
            except Exception:  # a digest the store would not file: fall back to the table
                pass
        if what == "value" and self._inline is not None and self._inline.get_blobs([ident])[0] is not None:
            return f"the calls store {redact(self.calls.to_config())} (inline)"
        return f"{what}s store {redact(store.to_config())}"

    def save_records(self, items: Sequence[Tuple[CallRecord, Blob]]) -> None:
        if self._read_only:
            raise Rejected(f"cannot save: {self!r} is read-only")
        if self.signer is not None:
            items = self.signer.sign_entries(items)
        inline = self._inline if self.inline_max else None
        if inline is None:
            for record, blob in items:
                # value first: whoever sees the record must find its value
                self.values.put(record.value, blob)
                _drain(blob)
            self.calls.put_many([record for record, _ in items])
            self._saved(items)
            return
        small: Dict[str, Blob] = {}
        for record, blob in items:
            if blob.size > self.inline_max:
                self.values.put(record.value, blob)  # big values first, streamed
            elif record.value not in small:
                small[record.value] = _in_memory(record.value, blob)
            _drain(blob)
        # then every record and small value in one transaction
        inline.put_entries([record for record, _ in items], small)
        self._saved(items)

    def _saved(self, items: Sequence[Tuple[CallRecord, Blob]]) -> None:
        if self.quota is not None:
            self.quota.saved([record for record, _ in items])

    def load_records(self, keys: Sequence[str]) -> List[Optional[CallRecord]]:
        records = self._live(keys, self.calls.get_many(keys))
        if self.signer is None:
            return records
        return self.signer.open_records(records, self._where, keys)

    def load_blob(self, value_digest: str) -> Blob:
        blob = self._load_blob(value_digest)
        if self.signer is None:
            return blob
        return self.signer.open_blob(blob, value_digest, self._where)

    def _load_blob(self, value_digest: str) -> Blob:
        if self._inline is not None:
            blob = self._inline.get_blobs([value_digest])[0]
            if blob is not None:
                return blob
        return self.values.get(value_digest)

    def load_blobs(self, value_digests: Sequence[str]) -> List[Optional[Blob]]:
        blobs = self._load_blobs(value_digests)
        if self.signer is None:
            return blobs
        return self.signer.open_blobs(blobs, value_digests, self._where)

    def _load_blobs(self, value_digests: Sequence[str]) -> List[Optional[Blob]]:
        if self._inline is None:
            return [self._value_or_none(d) for d in value_digests]
        out = self._inline.get_blobs(value_digests)
        for i, blob in enumerate(out):
            if blob is None:
                out[i] = self._value_or_none(value_digests[i])
        return out

    def load_records_and_small_blobs(
        self, keys: Sequence[str]
    ) -> List[Optional[Tuple[CallRecord, Optional[Blob]]]]:
        """With values inline in the call store, its records and their small
        values come in one query (the value files stay closed); a signed
        cache checks each record and blob as it opens them, so it goes the
        plain way."""
        if self._inline is None or self.signer is not None:
            return super().load_records_and_small_blobs(keys)
        return self._live(keys, self._inline.get_entries(keys))

    def load_rows(self, keys: Sequence[str]) -> Optional[List[Optional[Tuple[Any, ...]]]]:
        """The call store's rows for ``keys`` as stored, unchecked (see
        :meth:`~fleche_remote.storage.sql.stores.SqlCallStore.get_rows`), less
        what ``max_age`` expired, and counted as used; ``None`` when the call
        store keeps no rows to hand on (not SQL, or not keeping values
        inline) or entries are signed (a signed reader checks every record)."""
        if not self.hands_rows():
            return None
        return self._live(keys, self._inline.get_rows(keys))  # type: ignore[union-attr]

    def hands_rows(self) -> bool:
        """Whether :meth:`load_rows` answers (a server lists it in its handshake)."""
        return self.signer is None and getattr(self._inline, "get_rows", None) is not None

    def load_entries(self, keys: Sequence[str]) -> List[Optional[Tuple[CallRecord, Blob]]]:
        entries = self._live(keys, self._load_entries(keys))
        if self.signer is None:
            return entries
        return self.signer.open_entries(entries, self._where, keys)

    def _load_entries(self, keys: Sequence[str]) -> List[Optional[Tuple[CallRecord, Blob]]]:
        dangling: List[str] = []
        if self._inline is None:
            records = self.calls.get_many(keys)
            blobs = iter(self._load_blobs([r.value for r in records if r is not None]))
            found: List[Optional[Tuple[CallRecord, Blob]]] = []
            for record in records:
                blob = None if record is None else next(blobs)
                found.append(None if record is None or blob is None else (record, blob))
                if record is not None and blob is None:
                    dangling.append(record.key)
            self._repair(dangling)
            return found
        out: List[Optional[Tuple[CallRecord, Blob]]] = []
        for entry in self._inline.get_entries(keys):
            if entry is None:
                out.append(None)
                continue
            record, blob = entry
            if blob is None:
                blob = self._value_or_none(record.value)
            out.append(None if blob is None else (record, blob))
            if blob is None:
                dangling.append(record.key)
        self._repair(dangling)
        return out

    def _repair(self, keys: List[str]) -> None:
        """Drop records whose value is gone (a scratch purge, a user's
        ``rm``): the call is a miss, and its next save stores it whole
        again. A read-only cache leaves them."""
        if keys and not self._read_only:
            self.calls.delete_entries(keys)

    def _value_or_none(self, value_digest: str) -> Optional[Blob]:
        try:
            return self.values.get(value_digest)
        except KeyError:
            return None

    def contains_many(self, keys: Sequence[str]) -> List[bool]:
        return self.calls.contains_many(keys)

    def load(self, key: str) -> LazyCall:
        """As :meth:`BaseCache.load`; with small values inline (and no
        signature to check first), the record and its value come in one
        query and ``.result`` decodes the value read with it, without
        looking it up again (a small ``load(key).result`` 14.2 -> ~12 us)."""
        inline = self._inline
        if inline is None or self.signer is not None:
            return super().load(key)
        full = self._full_key(key)
        entry = self._live([full], inline.get_entries([full]))[0]
        if entry is None:
            raise KeyError(key)
        record, blob = entry
        if blob is None:  # in the value store: read when ``.result`` is
            return self._lazy(record)
        return LazyCall(record, functools.partial(decode_value, blob))

    def load_value(self, key: str) -> Any:
        """The result stored under ``key`` (full or unique prefix): record
        and value in one pass (one query over a SQL call store), without
        building the :class:`~fleche_remote.LazyCall` that ``load`` makes.

        Raises:
            KeyError: nothing stored under ``key``.
        """
        entry = self.load_entries([self._full_key(key)])[0]
        if entry is None:
            raise KeyError(key)
        return decode_value(entry[1])

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
        records = self.calls.query(name, arg_digests, metadata)
        if self.signer is None:
            return records
        return self.signer.iter_records(records, self._where)

    def collect_garbage(self) -> int:
        """Delete values no stored call refers to, inline and in the value
        store; returns how many. Safe beside concurrent saves: inline values
        go in one transaction with their records, and a value in the value
        store is spared while it is younger than :attr:`GC_GRACE_SECONDS`
        (a save writes its value, then its record; storing a value again
        refreshes its time). Temp files of killed writers go too (never a
        live writer's), and count."""
        if self._read_only:
            raise Rejected(f"cannot collect garbage: {self!r} is read-only")
        removed = self._inline.collect_blobs() if self._inline is not None else 0
        removed += self.values.collect_temporaries() + self.calls.collect_temporaries()
        started = time.time()
        candidates = list(self.values.digests())
        referenced = self.calls.refers_to(candidates) if candidates else []
        for digest, keep in zip(candidates, referenced):
            if keep:
                continue
            stored = self.values.stored_at(digest)
            if stored is not None and stored > started - self.GC_GRACE_SECONDS:
                continue  # may be a save in progress: its record comes next
            self.values.delete(digest)
            removed += 1
        return removed

    def close(self) -> None:
        if self.quota is not None:
            self.quota.recorder.flush()
        self.values.close()
        self.calls.close()

    def describe(self) -> Dict[str, Any]:
        described = {
            "class": "Cache",
            "values": self.values.to_config(),
            "calls": self.calls.to_config(),
            "read_only": self._read_only,
        }
        if self.signer is not None:
            described["signed_with"] = self.signer.key_id
        return described

    # -- claims: in the call store, when it can hold them -----------------------

    def claim_keeper(self) -> Optional[Claims]:
        if self._read_only or not isinstance(self.calls, Claims):
            return None
        return self.calls

    # -- quotas (see caches/quota.py) ----------------------------------------------

    def _live(self, keys: Sequence[str], found: List[Any]) -> List[Any]:
        """``found`` (records or entries, by ``keys``) less what ``max_age``
        expired, which is evicted so that its next save stores it anew;
        what remains counts as used."""
        if self.quota is None:
            return found
        present = [k for k, f in zip(keys, found) if f is not None]
        max_age = self.limits.max_age
        if max_age is not None and present:
            oldest = time.time() - max_age
            stored = dict(zip(present, self.calls.stored_times(present)))
            expired = {k for k, t in stored.items() if t is not None and t < oldest}
            if expired:
                self.remove_entries(sorted(expired), since=oldest)
                found = [None if k in expired else f for k, f in zip(keys, found)]
                present = [k for k in present if k not in expired]
        self.quota.used(present)
        return found

    def remove_entries(self, keys: Sequence[str], since: float) -> int:
        """Evict ``keys``: records, and the values no other record refers
        to, unless stored (again) at or after ``since`` (a save may be on
        its way). Returns how many records went."""
        values = self.calls.delete_entries(keys)
        if values:
            self.values.discard_many(sorted(set(values)), since, self.calls.refers_to)
        return len(values)

    def usage(self) -> Usage:
        """Calls and bytes this cache holds, in total and per function name."""
        return self.calls.usage()

    def trim(self, limits: Optional[Limits] = None, *, dry_run: bool = False) -> TrimReport:
        """Evict expired entries, then the least recently used, until the
        cache is within ``limits`` (default: its own); ``dry_run`` only
        reports what would go. (Trims a cache makes as it saves go further,
        to 90 % of each limit, so that the next saves need none.)

        Raises:
            Rejected: the cache is read-only (unless ``dry_run``).
        """
        if self._read_only and not dry_run:
            raise Rejected(f"cannot trim: {self!r} is read-only")
        limits = limits if limits is not None else self.limits
        if self.quota is not None:
            return self.quota.trim(limits, dry_run=dry_run, low_water=1.0)
        return trim(self, limits, dry_run=dry_run, low_water=1.0)


def _in_memory(digest: str, blob: Blob) -> Blob:
    """``blob`` with its body in memory, read (and, for a stream from the
    wire, verified) before any write transaction starts."""
    if isinstance(blob, BytesBlob):
        return blob
    body = blob.read_all()
    if len(body) != blob.size:
        raise CorruptEntryError(f"value {digest[:16]}: got {len(body)} bytes, expected {blob.size}")
    return BytesBlob(blob.kind, blob.meta, body)


def _drain(blob: Blob) -> None:
    """Consume what a store left unread of a one-shot stream (it had the
    value already), so that the next value of a batch arriving on the same
    stream starts where it should."""
    inner = getattr(blob, "inner", blob)  # a VerifyingBlob's stream
    if isinstance(inner, StreamBlob):
        inner.drain()
