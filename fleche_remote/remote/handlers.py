"""What a server does for each operation: the allow-list dispatch table.

Requests are decoded by the restricted decoder and dispatched through the
explicit tables below, never ``getattr`` on a received name. A read-only
server uses a table with every write removed, so a read-only key cannot
write, evict or collect garbage whatever its client sends. An append-only
server keeps only ``save_records``, behind a check that refuses to replace
an entry already stored under another value: results can be added, never
changed or removed.

A handler takes the server context, the request's arguments and its
incoming value streams, and returns a :class:`Reply`: a result (plain
data) plus the values to stream back, or :class:`Pages` for an answer
that comes in several messages. Handlers never unpickle a client's data:
saved values are opaque blobs, stored after checking that their bytes
hash to the digest they claim.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

from .. import __version__
from ..caches.base import BaseCache
from ..call import CallRecord, record_problem
from ..codec.bodyhash import DIGEST_SCHEME_NAME
from ..codec.budget import check_pickle
from ..codec.peek import PEEK_BUDGET
from ..codec.values import Blob, BytesBlob, StreamBlob, VerifyingBlob, blob_digest
from ..errors import ProtocolError, Rejected
from ..storage.claims import Claims, Holder
from .claims import LOAD_OR_CLAIM
from .packing import pack_blobs, pack_small_entries
from .protocol import COMPACT_FEATURE, PROTOCOL_VERSION, BlobHeader, Inline

#: Optional forms of requests this server understands (in ``info``):
#: ``load_entries`` with ``small_only``, records with their small values;
#: small lookups and their answers in the protocol's compact forms.
FEATURES = ("small_entries", COMPACT_FEATURE)
#: Listed too when the served cache hands on its rows (``Cache.hands_rows``; remote/rows.py).
#: The rows' columns (``READ_ENTRY``) are part of what it names: other columns need another name.
ROWS_FEATURE = "entry_rows"

#: A query page holds at most this many records, or about this many bytes.
PAGE_RECORDS = 500
PAGE_BYTES = 1 << 20

#: Pages the server may send ahead of the client's credits.
DEFAULT_WINDOW = 4
MAX_WINDOW = 64


class Context:
    """What handlers share: the cache and how the server presents itself."""

    def __init__(
        self, cache: BaseCache, cache_name: Optional[str], read_only: bool, append_only: bool = False
    ) -> None:
        self.cache = cache
        self.cache_name = cache_name
        self.read_only = read_only
        self.append_only = append_only
        self.info: Dict[str, Any] = {}
        self.compute: Any = None  # a compute.jobs.ComputeHost when sweeps may run here
        self.jobs: Any = None


class IncomingBlob(StreamBlob):
    """A value arriving as DATA frames (fed by the server's reader)."""

    def __init__(self, header: BlobHeader, source: Iterator[Any]) -> None:
        self.header = header
        self.done = False
        super().__init__(header.kind, header.meta, header.size, source)

    def drain(self) -> None:
        """Consume what the store left unread, so the next value lines up."""
        if self.done:
            return
        try:
            for _ in self._source if self._started else self.chunks():
                pass
        except ValueError:  # the client aborted it: nothing more will come
            pass
        self.done = True


@dataclass
class Reply:
    """A result, plus (digest, blob) pairs to stream after it in order."""

    result: Any = None
    blobs: List[Tuple[str, Blob]] = field(default_factory=list)


@dataclass
class Pages:
    """An answer in pages: each item of ``pages`` is one message's result."""

    pages: Iterator[Any]
    window: int = DEFAULT_WINDOW


Handler = Callable[[Context, Dict[str, Any], List[IncomingBlob]], Union[Reply, Pages]]


# -- argument checks ------------------------------------------------------------


def _str(args: Dict[str, Any], name: str) -> str:
    value = args.get(name)
    if not isinstance(value, str):
        raise ProtocolError(f"argument {name!r} must be a str, got {type(value).__name__}")
    return value


def _str_list(args: Dict[str, Any], name: str) -> List[str]:
    value = args.get(name)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ProtocolError(f"argument {name!r} must be a list of str")
    return value


def _int(args: Dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = args.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"argument {name!r} must be an int, got {type(value).__name__}")
    return min(max(value, low), high)


def _optional_mapping(args: Dict[str, Any], name: str) -> Optional[Dict[str, Any]]:
    value = args.get(name)
    if value is not None and not isinstance(value, dict):
        raise ProtocolError(f"argument {name!r} must be a dict or None, got {type(value).__name__}")
    return value


# -- handlers -----------------------------------------------------------------------


def _h_ping(ctx: Context, args: Dict[str, Any], blobs: List[IncomingBlob]) -> Reply:
    return Reply()


def _h_info(ctx: Context, args: Dict[str, Any], blobs: List[IncomingBlob]) -> Reply:
    ctx.info = server_info(ctx.cache, ctx.cache_name, ctx.read_only, ctx.append_only)
    return Reply(ctx.info)


def _h_contains_many(ctx: Context, args: Dict[str, Any], blobs: List[IncomingBlob]) -> Reply:
    return Reply(ctx.cache.contains_many(_str_list(args, "keys")))


def _h_load_records(ctx: Context, args: Dict[str, Any], blobs: List[IncomingBlob]) -> Reply:
    return Reply(ctx.cache.load_records(_str_list(args, "keys")))


def _h_load_entries(ctx: Context, args: Dict[str, Any], blobs: List[IncomingBlob]) -> Reply:
    keys = _str_list(args, "keys")
    if args.get("small_only") is True:
        if args.get("rows") is True:  # as stored, for the client to check (remote/rows.py)
            load_rows = getattr(ctx.cache, "load_rows", None)
            rows = None if load_rows is None else load_rows(keys)
            if rows is not None:
                return Reply({"rows": rows})
        return Reply(pack_small_entries(ctx.cache.load_records_and_small_blobs(keys)))
    entries = ctx.cache.load_entries(keys)
    items, streamed = pack_blobs([(e[0].value, e[1]) if e else ("", None) for e in entries])
    result = [None if e is None else [e[0], item] for e, item in zip(entries, items)]
    return Reply(result, streamed)


def _h_load_blobs(ctx: Context, args: Dict[str, Any], blobs: List[IncomingBlob]) -> Reply:
    digests = _str_list(args, "digests")
    items, streamed = pack_blobs(list(zip(digests, ctx.cache.load_blobs(digests))))
    return Reply(items, streamed)


def _h_expand(ctx: Context, args: Dict[str, Any], blobs: List[IncomingBlob]) -> Reply:
    return Reply(str(ctx.cache.expand(_str(args, "prefix"))))


def _h_query_records(ctx: Context, args: Dict[str, Any], blobs: List[IncomingBlob]) -> Pages:
    name = args.get("name")
    if name is not None and not isinstance(name, str):
        raise ProtocolError(f"argument 'name' must be a str or None, got {type(name).__name__}")
    arg_digests = _optional_mapping(args, "arg_digests")
    if arg_digests and not all(isinstance(k, str) and isinstance(v, str) for k, v in arg_digests.items()):
        # a filter that could never match is an error, not an empty answer
        raise ProtocolError("argument 'arg_digests' must map argument names (str) to digests (str)")
    metadata = _optional_mapping(args, "metadata")
    size = _int(args, "page", PAGE_RECORDS, 1, 10 * PAGE_RECORDS)
    window = _int(args, "window", DEFAULT_WINDOW, 1, MAX_WINDOW)
    records = ctx.cache.query_records(name, arg_digests, metadata)
    return Pages(_paginate(records, size), window)


def _paginate(records: Iterator[CallRecord], size: int) -> Iterator[List[CallRecord]]:
    page: List[CallRecord] = []
    nbytes = 0
    for record in records:
        page.append(record)
        nbytes += len(getattr(record, "arguments", b"")) + 512
        if len(page) >= size or nbytes >= PAGE_BYTES:
            yield page
            page, nbytes = [], 0
    yield page  # the last page (maybe empty) ends the answer


def _h_load_blob(ctx: Context, args: Dict[str, Any], blobs: List[IncomingBlob]) -> Reply:
    digest = _str(args, "digest")
    return Reply(None, [(digest, ctx.cache.load_blob(digest))])


def _h_load_value(ctx: Context, args: Dict[str, Any], blobs: List[IncomingBlob]) -> Reply:
    key = _str(args, "key")
    record = ctx.cache.load_records([ctx.cache._full_key(key)])[0]
    if record is None:
        raise KeyError(key)
    return _with_value(ctx, record)


def _with_value(ctx: Context, record: CallRecord) -> Reply:
    """``record`` with its value streamed after it (``load_value``'s answer)."""
    return Reply(record, [(record.value, ctx.cache.load_blob(record.value))])


def _check_records(records: Any) -> List[CallRecord]:
    """Refuse, at the door, records that no reader could list: fields of
    the wrong type, metadata that is not small plain data (see
    :func:`~fleche_remote.call.record_problem`), arguments that are not a
    pickle within the peek budget (checked, never unpickled)."""
    if not isinstance(records, list) or not all(isinstance(r, CallRecord) for r in records):
        raise ProtocolError("save_records needs a list of CallRecords")
    for record in records:
        problem = record_problem(record)
        if problem is None:
            try:
                check_pickle(record.arguments, PEEK_BUDGET)
            except ProtocolError as exc:
                problem = f"its arguments: {exc}"
        if problem is not None:
            key = getattr(record, "key", "?")
            raise ProtocolError(f"refusing to store call {str(key)[:16]}: {problem}")
    return records


def _h_save_records(ctx: Context, args: Dict[str, Any], blobs: List[IncomingBlob]) -> Reply:
    records = _check_records(args.get("records"))
    inline = args.get("inline")
    if inline is None:
        inline = [None] * len(records)
    if not isinstance(inline, list) or len(inline) != len(records):
        raise ProtocolError("save_records needs one inline entry (or None) per record")
    if sum(item is None for item in inline) != len(blobs):
        raise ProtocolError("save_records needs one value stream per record without an inline value")
    # all inline values first, in one batch (one transaction for SQL stores)
    batch: List[Tuple[CallRecord, Blob]] = []
    for record, item in zip(records, inline):
        if item is None:
            continue
        if not isinstance(item, Inline) or not isinstance(item.body, bytes):
            raise ProtocolError(f"inline value for {record.key[:12]} is a {type(item).__name__}")
        blob = BytesBlob(item.kind, item.meta, item.body)
        if blob_digest(blob, _scheme(record)) != record.value:
            raise ProtocolError(f"inline value for {record.key[:12]} does not hash to its record's digest")
        batch.append((record, blob))
    if batch:
        ctx.cache.save_records(batch)
    # then the streamed ones, one by one, in the order they arrive
    streamed = iter(blobs)
    for record, item in zip(records, inline):
        if item is not None:
            continue
        incoming = next(streamed)
        if incoming.header.digest != record.value:
            raise ProtocolError("a value stream's digest does not match its record")
        ctx.cache.save_records([(record, VerifyingBlob(incoming, record.value, _scheme(record)))])
        incoming.drain()
    return Reply()


def _h_save_records_append_only(ctx: Context, args: Dict[str, Any], blobs: List[IncomingBlob]) -> Reply:
    """``save_records`` that never replaces a stored entry.

    A record already stored with the same value is a no-op (a re-save of
    the same result, as a back-filling stack does); one stored with another
    value is refused before anything is written. The stores themselves
    keep the first record of a key, so this check is what turns a silent
    no-op into an error the client sees.
    """
    records = _check_records(args.get("records"))
    stored = ctx.cache.load_records([r.key for r in records])
    for record, old in zip(records, stored):
        if old is not None and old.value != record.value:
            raise Rejected(
                f"this server is append-only: {record.key[:16]} is already stored with another "
                f"value, and an entry cannot be overwritten"
            )
    return _h_save_records(ctx, args, blobs)


def _scheme(record: CallRecord) -> str:
    """The digest scheme the client used: the server checks with the same one."""
    return str(getattr(record, "digest_scheme", DIGEST_SCHEME_NAME))


def _h_evict(ctx: Context, args: Dict[str, Any], blobs: List[IncomingBlob]) -> Reply:
    ctx.cache.evict(_str(args, "key"))
    return Reply()


def _h_collect_garbage(ctx: Context, args: Dict[str, Any], blobs: List[IncomingBlob]) -> Reply:
    return Reply(ctx.cache.collect_garbage())


# -- claims (see fleche_remote.claiming): writes, allowed append-only too --------

#: Leases a client may ask for, in seconds: a claim that outlived its
#: holder by more than an hour would stall its waiters for that long.
LEASE_RANGE = (0.1, 3600.0)


def _claims_args(ctx: Context, args: Dict[str, Any]) -> Tuple[Claims, List[str], Holder]:
    keeper = ctx.cache.claim_keeper()
    if keeper is None:
        raise Rejected("this server's cache keeps no claims (it is read-only, or its store cannot)")
    try:
        holder = Holder.from_wire(args.get("holder"))
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None
    return keeper, _str_list(args, "keys"), holder


def _lease(args: Dict[str, Any]) -> float:
    value = args.get("lease")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ProtocolError(f"argument 'lease' must be a number of seconds, got {type(value).__name__}")
    return min(max(float(value), LEASE_RANGE[0]), LEASE_RANGE[1])


def _h_claim(ctx: Context, args: Dict[str, Any], blobs: List[IncomingBlob]) -> Reply:
    keeper, keys, holder = _claims_args(ctx, args)
    found = keeper.claim(keys, holder, _lease(args))
    # after the claim, not before: a holder saves, then releases, so a
    # result saved by the last holder is seen here, and not computed again
    ours = [k for k, h in zip(keys, found) if h is None]
    stored = {k for k, hit in zip(ours, ctx.cache.contains_many(ours)) if hit}
    if stored:
        keeper.release(sorted(stored), holder)
    return Reply(
        ["stored" if k in stored else None if h is None else h.to_wire() for k, h in zip(keys, found)]
    )


def _h_load_or_claim(ctx: Context, args: Dict[str, Any], blobs: List[IncomingBlob]) -> Reply:
    """A ``@cached`` call's lookup and, on a miss, its claim, in one round
    trip: the answer of ``load_value`` when the call is stored, else the
    claim's (None: the client's to compute; a holder: another's). A hit
    leaves the holder and the lease unread."""
    keys = _str_list(args, "keys")
    if len(keys) != 1:
        raise ProtocolError(f"load_or_claim takes one key, got {len(keys)}")
    record = ctx.cache.load_records(keys)[0]
    if record is None:
        keeper, _, holder = _claims_args(ctx, args)
        found = keeper.claim(keys, holder, _lease(args))[0]
        if found is not None:
            return Reply(found.to_wire())
        # claimed: the last holder may have saved and released between the
        # lookup and the claim, so look again before the client computes
        record = ctx.cache.load_records(keys)[0]
        if record is None:
            return Reply(None)
        keeper.release(keys, holder)
    return _with_value(ctx, record)


def _h_renew_claims(ctx: Context, args: Dict[str, Any], blobs: List[IncomingBlob]) -> Reply:
    keeper, keys, holder = _claims_args(ctx, args)
    return Reply(keeper.renew(keys, holder, _lease(args)))


def _h_release_claims(ctx: Context, args: Dict[str, Any], blobs: List[IncomingBlob]) -> Reply:
    keeper, keys, holder = _claims_args(ctx, args)
    keeper.release(keys, holder)
    return Reply()


def _h_claimed(ctx: Context, args: Dict[str, Any], blobs: List[IncomingBlob]) -> Reply:
    keeper = ctx.cache.claim_keeper()
    keys = _str_list(args, "keys")
    return Reply([False] * len(keys) if keeper is None else keeper.claimed(keys))


#: Claims change no stored result, so an append-only server keeps them;
#: a read-only one drops them (its clients compute without claims).
CLAIM_HANDLERS: Dict[str, Handler] = {
    "claim": _h_claim,
    LOAD_OR_CLAIM: _h_load_or_claim,
    "renew_claims": _h_renew_claims,
    "release_claims": _h_release_claims,
    "claimed": _h_claimed,
}


def _h_usage(ctx: Context, args: Dict[str, Any], blobs: List[IncomingBlob]) -> Reply:
    """What the served cache holds and the limits its fleche.toml set (for
    ``du`` and ``doctor``); a cache with no usage answers ``None``."""
    usage = getattr(ctx.cache, "usage", None)
    if usage is None:
        return Reply(None)
    return Reply(usage_report(usage(), getattr(ctx.cache, "limits", None)))


def _h_trim(ctx: Context, args: Dict[str, Any], blobs: List[IncomingBlob]) -> Reply:
    """One trim by the limits given (``fleche-remote gc --max-bytes``): an
    explicit command of a client that may write, not a standing limit."""
    from ..storage.quota import Limits

    trim = getattr(ctx.cache, "trim", None)
    if trim is None:
        raise ValueError(f"{type(ctx.cache).__name__} cannot be trimmed")
    limits = Limits.of(args.get("max_bytes"), args.get("max_calls"), args.get("max_age"))
    report = trim(limits or None, dry_run=bool(args.get("dry_run", False)))
    return Reply(
        {
            "evicted": len(report.evicted),
            "evicted_bytes": report.evicted_bytes,
            "remaining": usage_report(report.remaining, None),
            "dry_run": report.dry_run,
        }
    )


def usage_report(usage: Any, limits: Any) -> Dict[str, Any]:
    """A :class:`~fleche_remote.storage.quota.Usage` and limits as plain data."""
    return {
        "calls": usage.calls,
        "bytes": usage.bytes,
        "by_name": {name: list(cb) for name, cb in usage.by_name.items()},
        "limits": limits.to_config() if limits else {},
    }


_SAFE_EXCEPTIONS = {
    "KeyError": KeyError,
    "ValueError": ValueError,
    "OSError": OSError,
    "RuntimeError": RuntimeError,
}


def _h_debug_raise(ctx: Context, args: Dict[str, Any], blobs: List[IncomingBlob]) -> Reply:
    exc_type = _SAFE_EXCEPTIONS.get(_str(args, "type"))
    if exc_type is None:
        raise type("InjectedError", (Exception,), {})(args.get("message", ""))
    raise exc_type(args.get("message", ""))


READ_HANDLERS: Dict[str, Handler] = {
    "ping": _h_ping,
    "info": _h_info,
    "contains_many": _h_contains_many,
    "load_records": _h_load_records,
    "load_entries": _h_load_entries,
    "load_blobs": _h_load_blobs,
    "expand": _h_expand,
    "query_records": _h_query_records,
    "load_blob": _h_load_blob,
    "load_value": _h_load_value,
    "usage": _h_usage,
}
WRITE_HANDLERS: Dict[str, Handler] = {
    "save_records": _h_save_records,
    "evict": _h_evict,
    "collect_garbage": _h_collect_garbage,
    "trim": _h_trim,
}


def handler_table(read_only: bool, debug_ops: bool = False, append_only: bool = False) -> Dict[str, Handler]:
    """The operations a server answers: a read-only one has no write
    entries, an append-only one only a ``save_records`` that refuses to
    replace what is stored."""
    table = dict(READ_HANDLERS)
    if append_only and not read_only:
        table["save_records"] = _h_save_records_append_only
    elif not read_only:
        table.update(WRITE_HANDLERS)
    if not read_only:
        table.update(CLAIM_HANDLERS)
    if debug_ops:
        table["debug_raise"] = _h_debug_raise
    table.update(COMPUTE_HANDLERS)  # in every mode: they refuse by themselves, saying why
    return table


def served_features(cache: BaseCache, read_only: bool = False) -> List[str]:
    """What this server answers beyond protocol 2's first form, for ``cache``."""
    rows = getattr(cache, "hands_rows", None)
    more = [ROWS_FEATURE] if rows is not None and rows() else []
    if not read_only:
        more.append(LOAD_OR_CLAIM)  # claims are taken: not on a --read-only server
    return [*FEATURES, *more]


def server_info(
    cache: BaseCache, cache_name: Optional[str], read_only: bool, append_only: bool = False
) -> Dict[str, Any]:
    """What ``SshCache.info()`` reports: the cache (credentials redacted),
    versions, and where and as what the server runs."""
    try:
        from ..config import cache_to_config, redact

        described: Any = redact(cache_to_config(cache))
    except Exception:  # a cache the config layer can't express
        described = cache.describe()
    cloudpickle = sys.modules.get("cloudpickle")  # reported if loaded; never imported for this
    return {
        "cache": described,
        "cache_name": cache_name,
        "read_only": bool(read_only or cache.read_only),
        "append_only": bool(append_only),
        # what this server answers beyond protocol 2's first form: a client
        # asks for these only when they are listed (an older server lacks them)
        "features": served_features(cache, read_only),
        "versions": {
            "library": __version__,
            "protocol": PROTOCOL_VERSION,
            "cloudpickle": getattr(cloudpickle, "__version__", None),
            "python": sys.version.split()[0],
        },
        "cwd": os.getcwd(),
        "hostname": socket.gethostname(),
        "python": sys.executable,
        "pid": os.getpid(),
        "peak_rss_bytes": _peak_rss(),
    }


def _peak_rss() -> Optional[int]:
    """The server's peak resident memory, so a client can check that a huge
    value really streamed through in bounded memory."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def rejected_write(op: str, append_only: bool = False) -> Rejected:
    """The refusal of a write the server's mode took out of its table."""
    if append_only:
        return Rejected(f"this server is append-only: {op!r} is not allowed (saves only add new entries)")
    return Rejected(f"this server is read-only: {op!r} is not allowed")


# -- computing: f.map(..., on=...) ---------------------------------------------------
#
# The function and the arguments arrive as opaque bytes and go, unread, into
# a job directory; worker processes (fleche_remote.compute.worker) unpickle
# and run them. These handlers only check shapes, write files and start
# the workers. They are in every table and refuse by themselves, so the
# refusal can say why: a read-only server, a key whose forced command did
# not opt in (serve --allow-compute), a host without a [compute] table.


def _compute_jobs(ctx: Context) -> Any:
    host = ctx.compute
    if ctx.read_only:
        raise Rejected(
            "computing is not allowed for this key: this server is read-only (a forced command or "
            "--read-only); results can be read here, not computed"
        )
    if host is not None and host.forced and not host.allowed:
        raise Rejected(
            "computing is not allowed for this key: its authorized_keys forced command runs the server "
            "without --allow-compute (add that flag to the command to let this key run code here)"
        )
    if host is None or host.settings is None:
        from ..config.compute import NO_COMPUTE_HINT

        raise Rejected(NO_COMPUTE_HINT)
    if ctx.jobs is None:
        from ..compute.jobs import Jobs

        ctx.jobs = Jobs(host)
    return ctx.jobs


def _h_compute_submit(ctx: Context, args: Dict[str, Any], blobs: List[IncomingBlob]) -> Reply:
    jobs = _compute_jobs(ctx)
    function = args.get("function")
    about = _optional_mapping(args, "about")
    records = args.get("records")
    arguments = args.get("arguments")
    if not isinstance(function, bytes):
        raise ProtocolError("compute_submit needs 'function' as bytes")
    if about is None or not all(isinstance(k, str) for k in about):
        raise ProtocolError("compute_submit needs 'about', a dict")
    for name in ("name", "module", "qualname"):
        if not isinstance(about.get(name), str):
            raise ProtocolError(f"compute_submit needs about[{name!r}] as a str")
    if not isinstance(records, list) or not all(isinstance(r, CallRecord) for r in records):
        raise ProtocolError("compute_submit needs 'records', a list of CallRecords")
    if not isinstance(arguments, list) or len(arguments) != len(records):
        raise ProtocolError("compute_submit needs one argument blob per record")
    if not all(isinstance(a, bytes) for a in arguments):
        raise ProtocolError("compute_submit needs each argument blob as bytes")
    known = ("name", "module", "qualname", "digest", "parts", "strict", "file")
    about = {k: about[k] for k in known if k in about}
    stored = ctx.cache.contains_many([r.key for r in records])
    return Reply(
        jobs.submit(function, {"function": about, "name": about["name"]}, records, arguments, stored)
    )


def _h_compute_status(ctx: Context, args: Dict[str, Any], blobs: List[IncomingBlob]) -> Reply:
    jobs = _compute_jobs(ctx)
    points = args.get("points")
    if not isinstance(points, list) or not all(
        isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and type(p[1]) is int for p in points
    ):
        raise ProtocolError("compute_status needs 'points', a list of [job, index]")
    return Reply(jobs.status(points))


COMPUTE_HANDLERS: Dict[str, Handler] = {
    "compute_submit": _h_compute_submit,
    "compute_status": _h_compute_status,
}
