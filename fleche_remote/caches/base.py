"""``BaseCache``: the one interface every cache offers.

A cache is built from a handful of record-level primitives, which move
:class:`~fleche_remote.call.CallRecord` s and value
:class:`~fleche_remote.codec.values.Blob` s without ever decoding a result. The
user-facing methods (``save``, ``load``, ``query``, ...) are written once,
here, on top of them. That split is what lets the same interface be a
local directory (:class:`~fleche_remote.caches.Cache`), a stack of layers
(:class:`~fleche_remote.caches.CacheStack`) or a server across ssh
(:class:`~fleche_remote.remote.client.SshCache`): the remote forwards the
primitives, so the server never unpickles what a client saved, and a
back-fill between layers copies bytes, not objects.

The batch primitives (``contains_many``, ``load_records``,
``save_records``) exist so that a remote can answer a batch in one round
trip; local caches just loop.
"""

from __future__ import annotations

import abc
import functools
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

from ..call import Call, CallRecord, LazyCall, make_record
from ..codec.digest import Digest
from ..codec.values import Blob, blob_digest, decode_value, encode_value
from ..errors import Rejected
from ..query import QueryPlan, check_keywords, plan_query
from ..storage.claims import Claims, LoadOrClaim

#: Filter keys with this name match metadata instead of an argument (one of
#: the reserved fields, :data:`fleche_remote.query.FIELDS`).
METADATA_FILTER = "metadata"


class BaseCache(abc.ABC):
    """A persistent map from call keys to calls and their results."""

    # -- primitives ---------------------------------------------------------

    @abc.abstractmethod
    def save_records(self, items: Sequence[Tuple[CallRecord, Blob]]) -> None:
        """Store each record with the blob of its result.

        Raises:
            Rejected: the cache is read-only.
        """

    @abc.abstractmethod
    def load_records(self, keys: Sequence[str]) -> List[Optional[CallRecord]]:
        """Records for full ``keys`` in order; ``None`` where absent."""

    @abc.abstractmethod
    def load_blob(self, value_digest: str) -> Blob:
        """The blob of a stored result; ``KeyError`` if absent."""

    @abc.abstractmethod
    def contains_many(self, keys: Sequence[str]) -> List[bool]:
        """Whether each full key is stored, in one pass (one round trip)."""

    # -- batch primitives with generic defaults; remotes and indexed stores
    # -- override them to answer in one round trip / one query

    def load_blobs(self, value_digests: Sequence[str]) -> List[Optional[Blob]]:
        """Blobs for ``value_digests`` in order, ``None`` where absent."""
        out: List[Optional[Blob]] = []
        for digest in value_digests:
            try:
                out.append(self.load_blob(digest))
            except KeyError:
                out.append(None)
        return out

    def load_entries(self, keys: Sequence[str]) -> List[Optional[Tuple[CallRecord, Blob]]]:
        """Records and their result blobs for full ``keys``, ``None`` where
        either is absent: what a stack needs to back-fill, in one pass."""
        records = self.load_records(keys)
        present = [r for r in records if r is not None]
        blobs = iter(self.load_blobs([r.value for r in present]))
        out: List[Optional[Tuple[CallRecord, Blob]]] = []
        for record in records:
            if record is None:
                out.append(None)
                continue
            blob = next(blobs)
            out.append(None if blob is None else (record, blob))
        return out

    def load_records_and_small_blobs(
        self, keys: Sequence[str]
    ) -> List[Optional[Tuple[CallRecord, Optional[Blob]]]]:
        """Records for full ``keys``, each with its value's blob when that is
        small and at hand (``None``: fetch it when it is read), ``None``
        where absent: what ``load_many`` starts from.

        A remote answers with the small values inside the same reply, so the
        obvious loop ``[c.result for c in cache.load_many(keys)]`` is one
        round trip; a local store has its values at hand anyway, and by
        default hands records only (values stay lazy).
        """
        return [None if r is None else (r, None) for r in self.load_records(keys)]

    @abc.abstractmethod
    def evict(self, key: str) -> None:
        """Forget the call under ``key`` (a full key or a unique prefix).

        The result's value stays until no call refers to it and
        ``collect_garbage`` runs, because equal results are shared.

        Raises:
            KeyError: nothing is stored under ``key``.
            Rejected: the cache is read-only.
        """

    @abc.abstractmethod
    def expand(self, short_key: str) -> Digest:
        """The one full key that starts with ``short_key``.

        Raises:
            KeyError: no stored key starts with it.
            AmbiguousDigestError: more than one does.
        """

    @abc.abstractmethod
    def query_records(
        self,
        name: Optional[str] = None,
        arg_digests: Optional[Mapping[str, str]] = None,
        metadata: Optional[Mapping[str, Any]] = None,
    ) -> Iterator[CallRecord]:
        """Records matching all given filters (see :meth:`query`)."""

    @property
    @abc.abstractmethod
    def read_only(self) -> bool:
        """True when writes raise :class:`~fleche_remote.errors.Rejected`."""

    def close(self) -> None:
        """Release files, connections and subprocesses (reopened on use)."""

    @property
    def is_remote(self) -> bool:
        """Whether this cache lives on another machine: a local ``Path``
        in a result means nothing there (see :mod:`fleche_remote.cached`)."""
        return False

    def to_config(self) -> Any:
        """The fleche.toml table (a list of tables for a stack) that builds
        this cache again; what :func:`fleche_remote.config.cache_to_config`
        returns, and what write-behind names its journal after.

        Each cache knows its own form, so nothing below the config layer
        has to import it.

        Raises:
            TypeError: this cache has no config form.
        """
        raise TypeError(f"a {type(self).__name__} has no config form (it has no to_config() method)")

    def __enter__(self) -> BaseCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the user-facing API, built on the primitives ----------------------

    def save(self, call: Call) -> Digest:
        """Store ``call`` with its result; returns the key it is filed under.

        Saving a call that is already stored is a no-op that succeeds, so
        concurrent writers of the same work never fail each other.

        Raises:
            Rejected: the cache is read-only.
            TypeError: ``call.metadata`` is not plain data.
        """
        return self.save_many([call])[0]

    def save_many(self, calls: Iterable[Call]) -> List[Digest]:
        """Save several calls (one round trip on a remote)."""
        self._check_writable("save")
        items = []
        for call in calls:
            blob = encode_value(call.result)
            items.append((make_record(call, blob, blob_digest(blob)), blob))
        if items:
            self.save_records(items)
        return [Digest(r.key) for r, _ in items]

    def load(self, key: str) -> LazyCall:
        """The stored call under ``key`` (full or unique prefix); its
        ``result`` loads on first access.

        Raises:
            KeyError: nothing stored under ``key``.
            AmbiguousDigestError: a prefix matched more than one key.
        """
        full = self._full_key(key)
        record = self.load_records([full])[0]
        if record is None:
            raise KeyError(key)
        return self._lazy(record)

    def load_many(self, keys: Sequence[str], *, results: bool = False) -> List[Optional[LazyCall]]:
        """Stored calls for full ``keys``, ``None`` where absent (one round trip).

        Args:
            keys: full keys.
            results: fetch the results too, in the same round trip, so that
                ``.result`` costs nothing more (a sweep's lookups).
        """
        if not results:
            return self.lazy_calls_of(self.load_records_and_small_blobs(list(keys)))
        out: List[Optional[LazyCall]] = []
        for entry in self.load_entries(list(keys)):
            if entry is None:
                out.append(None)
                continue
            record, blob = entry
            lazy = self._lazy(record)
            lazy._result = decode_value(blob)
            out.append(lazy)
        return out

    def lazy_calls_of(
        self, found: Sequence[Optional[Tuple[CallRecord, Optional[Blob]]]]
    ) -> List[Optional[LazyCall]]:
        """Lazy calls of records (``None`` kept), with the values that came
        along; the others are fetched together when the first is read."""
        present = [f for f in found if f is not None]
        batch = _Batch(
            self, [r for r, _ in present], {i: b for i, (_, b) in enumerate(present) if b is not None}
        )
        lazies = iter(batch.lazy_calls())
        return [None if f is None else next(lazies) for f in found]

    def load_value(self, key: str) -> Any:
        """The result stored under ``key`` (full or unique prefix).

        Raises:
            KeyError: nothing stored under ``key``.
        """
        return self.load(key).result

    def contains(self, key: str) -> bool:
        """Whether a call is stored under the full ``key``."""
        return self.contains_many([key])[0]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.contains(key)

    def query(
        self,
        name: Any = None,
        *,
        arguments: Optional[Mapping[str, Any]] = None,
        metadata: Optional[Mapping[str, Any]] = None,
        module: Optional[str] = None,
        version: Any = None,
        **filters: Any,
    ) -> Iterator[LazyCall]:
        """Stream stored calls matching every filter given.

        Two forms, which can be mixed: keywords naming arguments,
        ``query("mod.f", x=1)``, and fleche's, ``query(name="f",
        module="mod", arguments={"x": 1}, metadata={...}, version=2)`` (or
        a fleche ``QueryCall``). Arguments compare by their stable digest,
        so ``x=1`` matches a call made with ``x=1`` but not ``x=1.0``. See
        :mod:`fleche_remote.query` for every rule (``None`` wildcards,
        partial metadata tables, bare qualnames).

        The filters are checked here, before anything is searched, so a
        bad one raises at the call, not on first iteration.

        Raises:
            TypeError: a filter of the wrong type, or one fleche-remote
                cannot apply (``code_digest=``, ``result=``).
            ValueError: an empty ``name`` or ``module``.
        """
        check_keywords(filters)
        plan = plan_query(
            name, arguments=arguments, metadata=metadata, module=module, version=version, filters=filters
        )
        return self.run_query(plan)

    def run_query(self, plan: QueryPlan) -> Iterator[LazyCall]:
        records = self.query_records(plan.name, plan.arg_digests or None, plan.metadata or None)
        chunk: List[CallRecord] = []
        for record in records:
            if not isinstance(record, CallRecord):  # an UnreadableRecord: no call to give
                continue
            if plan.accepts(record):
                chunk.append(record)
            if len(chunk) >= QUERY_BATCH:
                yield from _Batch(self, chunk).lazy_calls()
                chunk = []
        yield from _Batch(self, chunk).lazy_calls()

    def collect_garbage(self) -> int:
        """Remove stored values no call refers to; returns how many.

        Only meaningful for caches that own their storage; others return 0.
        """
        return 0

    # -- helpers ------------------------------------------------------------

    def fetch_result(self, value_digest: str) -> Any:
        """Decode the stored result with this value digest (what
        ``LazyCall.result`` calls). A remote overrides it to stream the
        value straight into its final buffer in one round trip.

        Raises:
            KeyError: no value with that digest is stored.
        """
        return decode_value(self.load_blob(value_digest))

    def _lazy(self, record: CallRecord) -> LazyCall:
        digest = record.value
        return LazyCall(record, lambda: self.fetch_result(digest))

    def _full_key(self, key: str) -> str:
        key = str(key)
        if len(key) == 64:
            return key
        return str(self.expand(key))

    def _check_writable(self, what: str) -> None:
        if self.read_only:
            raise Rejected(f"cannot {what}: {self!r} is read-only")

    def describe(self) -> Dict[str, Any]:
        """A short plain-data description (for ``info`` and the CLI)."""
        return {"class": type(self).__name__, "read_only": self.read_only}

    # -- claims (see fleche_remote.claiming) -----------------------------------

    def claim_keeper(self) -> Optional[Claims]:
        """Where a ``@cached`` miss on this cache claims its key before
        computing it: the place its saves are shared through. None: no
        claims (a read-only cache, or storage that cannot hold them), and
        a miss is computed as it comes."""
        return None

    def lookup_claims(self, entries: bool = False) -> Optional[Tuple[Claims, LoadOrClaim]]:
        """This cache's claim keeper and a lookup of one key that, on a miss,
        claims it there in the same round trip (see
        :data:`~fleche_remote.storage.claims.LoadOrClaim`); with ``entries``,
        a hit gives the ``(record, blob)`` rather than the result. None (the
        default) where the lookup and the claim are two steps anyway, as on
        a local store, where neither costs a round trip."""
        return None


#: A batch of lazy results (``load_many``, a page of ``query``) fetches the
#: values not yet loaded together, when the first of them is read: at most
#: this many bytes (by the records' ``value_size``) per round trip. The
#: obvious loop ``[c.result for c in cache.load_many(keys)]`` then costs a
#: few round trips instead of one per call (21.9 s for 1000 small values at
#: 20 ms RTT, measured before this existed), while memory stays bounded.
BATCH_FETCH_BYTES = 32 << 20

#: A value larger than this is fetched alone when read, streamed straight
#: into its final buffer (``fetch_result``), as a single ``load`` does.
BATCH_FETCH_ALONE = 4 << 20

#: Records of a query grouped into one batch.
QUERY_BATCH = 500


class _Batch:
    """Lazy calls of one batch of records that fetch their values together.

    Reading ``.result`` of one call fetches it and the following calls'
    values (within :data:`BATCH_FETCH_BYTES`) in one ``load_blobs``; each
    is decoded only when its own ``.result`` is read.
    """

    def __init__(
        self, cache: BaseCache, records: Sequence[CallRecord], fetched: Optional[Dict[int, Blob]] = None
    ) -> None:
        self.cache = cache
        self.records = list(records)
        self.fetched: Dict[int, Blob] = fetched or {}
        self.taken: List[bool] = [False] * len(self.records)

    def lazy_calls(self) -> List[LazyCall]:
        return [LazyCall(record, functools.partial(self.result, i)) for i, record in enumerate(self.records)]

    def result(self, i: int) -> Any:
        self.taken[i] = True
        record = self.records[i]
        blob = self.fetched.pop(i, None)
        if blob is None:
            if record.value_size > BATCH_FETCH_ALONE:
                return self.cache.fetch_result(record.value)
            blob = self._fetch_from(i)
        return decode_value(blob)

    def _fetch_from(self, i: int) -> Blob:
        wanted: List[int] = []
        seen = set()  # a blob is read once: equal results are fetched again when read
        budget = BATCH_FETCH_BYTES
        for j in range(i, len(self.records)):
            size = self.records[j].value_size
            digest = self.records[j].value
            if j != i and (self.taken[j] or j in self.fetched or size > BATCH_FETCH_ALONE or digest in seen):
                continue
            if j != i and size > budget:
                break
            wanted.append(j)
            seen.add(digest)
            budget -= size
        digests = [self.records[j].value for j in wanted]
        blobs = dict(zip(digests, self.cache.load_blobs(digests)))
        for j in wanted[1:]:
            blob = blobs.get(self.records[j].value)
            if blob is not None:
                self.fetched[j] = blob
        first = blobs.get(self.records[i].value)
        if first is None:
            raise KeyError(self.records[i].value)
        return first
