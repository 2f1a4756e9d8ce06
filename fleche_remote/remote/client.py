"""``SshCache``: a cache that lives on another machine, reached over ssh.

One ``ssh host python -m fleche_remote serve`` subprocess is started on
first use and reused for the life of the process, so a session costs one
authentication (one 2FA prompt). Every :class:`BaseCache` primitive is one
request on that connection; batches (``contains_many``, ``load_entries``,
``load_blobs``, ``save_records``) are one round trip each, ``query``
streams in flow-controlled pages, and values stream in bounded chunks both
ways. Requests from many threads are pipelined on the one connection.

The first request is written as soon as ssh starts, before the server's
banner arrives: its answer comes right behind the banner, so a cold start
costs the login plus one round trip.

This module says what each operation asks of the server. The connection
it travels on (opened, reused, idled out, retried, and what an outage
answers) is :mod:`~fleche_remote.remote.lifecycle`; what is done with the
values a reply streams back is :mod:`~fleche_remote.remote.receive`.
"""

from __future__ import annotations

import threading
import time
import weakref
from pathlib import Path
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

from .. import progress
from ..caches.base import BaseCache
from ..call import CallRecord, LazyCall
from ..codec.digest import Digest
from ..codec.values import Blob
from ..errors import ConfigError, ProtocolError, Rejected, RemoteConnectionError
from ..signing import SecretKeyArg, Signer
from ..storage.claims import Claims, LoadOrClaim
from ..storage.quota import SSH_LIMITS_MESSAGE
from . import bootstrap as _bootstrap
from . import health, ssh_table
from .claims import LOAD_OR_CLAIM, RemoteClaims, load_or_claim
from .command import SshCommand
from .connection import Connection
from .host_compute import HostCompute
from .lifecycle import Lifecycle
from .packing import SmallEntries, pipeline_parts, unpack_small_entries
from .pipeline import pipelined
from .protocol import BlobHeader, Inline, inline_choices
from .receive import Unsigned, spool, unpack_blobs
from .rows import entries as row_listing_entries
from .rows import listing
from .ssh_options import check_host
from .transport import PipeTransport, Transport


class SshCache(Lifecycle, SshCommand, HostCompute, BaseCache):
    """A :class:`BaseCache` whose storage is a cache on another host.

    Args:
        host: anything ``ssh`` accepts (``user@host``, an alias from
            ``~/.ssh/config``).
        cache_name: which cache of the remote's fleche.toml to serve
            (default: its ``[default] cache``).
        python: the remote interpreter that has fleche-remote installed.
        ssh_options: extra ``ssh`` arguments, e.g. ``("-o",
            "ControlMaster=auto", ...)`` or ``("-p", "2222")``.
        setup_commands: shell commands run first (``module load ...``,
            ``source venv/bin/activate``), joined with ``&&``; the server
            is ``exec``'d after them so no shell stays in the pipe.
        workdir: remote directory to ``cd`` into first (``~`` works); its
            fleche.toml is found from there.
        connect_timeout: seconds for ssh to log in and the server to
            announce itself (generous: a 2FA prompt happens in this time).
            Unless the user's ssh options or config set them, ssh also gets
            ``ConnectTimeout=10`` and ``ServerAliveInterval=5`` x
            ``ServerAliveCountMax=3``, so a silent host fails in ~10 s.
        timeout: seconds any single wait may last once connected; a hung
            server becomes a :class:`RemoteConnectionError` after it.
        on_error: ``"raise"`` (default): a connection failure raises
            :class:`RemoteConnectionError`. ``"warn"``: it is logged once
            per outage (a WARNING) and the cache answers as if empty
            (reads miss, queries find nothing), so a stack's local layers
            go on serving and its new results stay local; saves, evictions
            and ``info()`` still raise, so nothing is lost silently.
        retry_after: seconds after a failure when the next operation may
            reopen a broken connection by itself, if ssh needs no prompt
            (BatchMode, or a live ControlMaster socket). None: only
            :meth:`reconnect` does.
        idle_timeout: seconds after which a connection that carried
            nothing is closed; the next operation opens a new one (with no
            prompt when a ControlMaster socket is live). None: kept open.
        error_callback: called with the exception once per outage (the
            first connection failure after the remote last worked).
        max_bytes, max_calls, max_age, max_size: refused with a
            ConfigError: the remote cache keeps the limits of its own
            machine's fleche.toml, enforced by its server; a client's
            limits never reach another's cache.
        read_only: refuse writes locally, and start the server
            ``--read-only`` as well.
        fast_cipher: when the ssh configuration names no cipher, ask for
            AES-GCM on CPUs with AES instructions (about 1.6x the
            throughput of ssh's default chacha20 here); an explicit
            ``Ciphers``/``-c`` of the user always wins.
        ssh: the ssh program.
        progress: show a bar on stderr while a large value streams
            (``True``/``False``; ``None``: when stderr is a terminal; see
            :mod:`fleche_remote.progress`).
        command: run this argv instead of building an ssh command (a local
            ``python -m fleche_remote serve``, a container exec, ...).
        bootstrap: ``"auto"``: when the remote has no fleche_remote of
            this version, send this client's server code over the ssh
            pipe (cached there by hash; see
            :mod:`fleche_remote.remote.bootstrap`); ``"never"``: require
            an installed one; ``"always"``: send it even so.
        secret_key: sign every entry here, before it is sent, and check
            every one that comes back before anything is unpickled (see
            :mod:`fleche_remote.signing`). The server stores and serves the
            signed bytes as they are and never sees the key.
    """

    def __init__(
        self,
        host: str,
        cache_name: Optional[str] = None,
        python: str = "python3",
        ssh_options: Sequence[str] = (),
        setup_commands: Sequence[str] = (),
        workdir: Optional[str] = None,
        *,
        connect_timeout: float = 60.0,
        timeout: float = 60.0,
        read_only: bool = False,
        fast_cipher: bool = True,
        ssh: str = "ssh",
        progress: Optional[bool] = None,
        command: Optional[Sequence[str]] = None,
        bootstrap: str = "auto",
        secret_key: SecretKeyArg = None,
        on_error: str = "raise",
        retry_after: Optional[float] = None,
        idle_timeout: Optional[float] = None,
        error_callback: Optional[Callable[[BaseException], Any]] = None,
        max_bytes: Any = None,
        max_calls: Any = None,
        max_age: Any = None,
        max_size: Any = None,
        _transport_factory: Optional[Callable[[], Transport]] = None,
    ) -> None:
        given = {"max_bytes": max_bytes, "max_calls": max_calls, "max_age": max_age, "max_size": max_size}
        limited = [k for k, v in given.items() if v is not None]
        if limited:
            # the cache over there is its owner's: its server keeps the
            # limits of that machine's fleche.toml, never a client's
            raise ConfigError(SSH_LIMITS_MESSAGE.format(key=limited[0]), key=limited[0])
        if isinstance(ssh_options, str) or isinstance(setup_commands, str):
            raise TypeError("ssh_options and setup_commands are sequences of strings, not one string")
        self.host = check_host(host)
        self.cache_name = cache_name
        self.python = python
        self.ssh_options = tuple(ssh_options)
        self.setup_commands = tuple(setup_commands)
        self.workdir = workdir
        self.connect_timeout = float(connect_timeout)
        self.timeout = float(timeout)
        self._local_read_only = bool(read_only)
        self.fast_cipher = bool(fast_cipher)
        self.ssh = ssh
        self.progress = progress
        self.command = list(command) if command is not None else None
        self.bootstrap = _bootstrap.check_mode(bootstrap)
        self._transport_factory = _transport_factory
        #: signs and checks entries on this side; None for an unsigned cache
        self.signer: Optional[Signer] = Signer.of(secret_key)
        #: signs what leaves and checks what arrives (passes entries through when unsigned)
        self._seal: Union[Signer, Unsigned] = self.signer or Unsigned()
        self._conn: Optional[Connection] = None
        self._conn_lock = threading.Lock()
        self._finalizer: Optional[weakref.finalize] = None
        self.idle_timeout = health.check_seconds("idle_timeout", idle_timeout)
        self._last_used = time.monotonic()
        self._idle_stop: Optional[threading.Event] = None
        self._idle_closed: Optional[Connection] = None
        self._outage = health.Outage(repr(self), on_error, retry_after, error_callback, self._prompt_check())

    @property
    def on_error(self) -> str:
        """``"raise"`` or ``"warn"`` (see the class notes)."""
        return self._outage.on_error

    @property
    def retry_after(self) -> Optional[float]:
        return self._outage.retry_after

    @property
    def local_read_only(self) -> bool:
        """Whether this client refuses writes itself (``read_only=True``),
        whatever the server says."""
        return self._local_read_only

    @property
    def error_callback(self) -> Optional[Callable[[BaseException], Any]]:
        return self._outage.error_callback

    # -- construction helpers ----------------------------------------------

    @classmethod
    def in_process(cls, cache: BaseCache, *, read_only: bool = False, **kwargs: Any) -> SshCache:
        """An SshCache whose server is a thread in this process, over OS pipes.

        Same client, protocol and server code as over ssh, minus the
        process boundary; meant for tests and for measuring the protocol.
        """
        from .server import serve

        def factory() -> Transport:
            return PipeTransport(lambda i, o: serve(i, o, cache, read_only=read_only))

        return cls("in-process", _transport_factory=factory, read_only=read_only, **kwargs)

    @classmethod
    def from_config(cls, table: Mapping[str, Any], base_dir: Optional[Path] = None) -> SshCache:
        """Build from a ``type = "ssh"`` table of fleche.toml (keys as the constructor's)."""
        return cls(**ssh_table.kwargs_from_table(table))

    def to_config(self) -> Dict[str, Any]:
        """The fleche.toml table that rebuilds this cache."""
        return ssh_table.table_of(self)

    def _where(self, what: str, ident: str) -> str:
        """Names where a refused entry lives (no round trip)."""
        served = f"cache {self.cache_name!r}" if self.cache_name else "its default cache"
        workdir = f" from {self.workdir}" if self.workdir else ""
        return f"{self.host} ({served}{workdir})"

    def __repr__(self) -> str:
        name = f", cache_name={self.cache_name!r}" if self.cache_name else ""
        return f"SshCache({self.host!r}{name})"

    # -- information ---------------------------------------------------------

    def info(self, refresh: bool = True) -> Dict[str, Any]:
        """The server's description: cache (redacted), cache_name, read_only,
        versions, cwd, hostname, python, pid.

        Args:
            refresh: ask the server now; ``False`` returns what it said in
                the handshake, without a round trip.
        """
        if refresh:
            info = dict(self._request("info"))
        else:
            info = dict(self._connection().hello.info)
        info["login_noise"] = self.login_noise.decode("utf-8", "replace")
        return info

    @property
    def is_remote(self) -> bool:
        return True

    @property
    def read_only(self) -> bool:
        """Whether writes are refused; known from the handshake, no round trip.
        With ``on_error = "warn"``, an unreachable remote counts as writable
        (a save to it then raises, rather than being skipped)."""
        if self._local_read_only:
            return True
        try:
            return bool(self._connection().hello.info.get("read_only"))
        except RemoteConnectionError as exc:
            return bool(self._unavailable(exc, lambda: False))

    @property
    def login_noise(self) -> bytes:
        """What the remote login shell printed before the server's banner."""
        conn = self._connection()
        conn.hello  # noqa: B018 - the noise is known once the banner is in
        return conn.noise

    @property
    def bootstrap_status(self) -> Optional[str]:
        """How the server was started: ``"installed"`` (the remote's own
        fleche_remote), ``"cached"`` (code sent earlier, found by hash),
        ``"sent"`` (code sent now), or ``None`` (``bootstrap = "never"``,
        or not over ssh). Waits for the handshake."""
        conn = self._connection()
        conn.hello  # noqa: B018 - the status line comes before the banner
        return getattr(conn.transport, "status", None)

    @property
    def request_count(self) -> int:
        """Requests sent on the current connection: what a slow link charges
        for (one round trip each, less where they were pipelined)."""
        conn = self._conn
        return 0 if conn is None else conn.requests_sent

    def ping(self) -> None:
        """One empty round trip (for latency checks)."""
        self._request("ping")

    # -- primitives ----------------------------------------------------------

    def _downloading(self, consume: Callable[..., Any]) -> Callable[..., Any]:
        """``consume`` for a reply, with a progress bar for big values when asked."""
        return progress.downloads(consume, self.progress, self.host)

    def save_records(self, items: Sequence[Tuple[CallRecord, Blob]]) -> None:
        if self._local_read_only or self._known_read_only():
            raise Rejected(f"cannot save: {self!r} is read-only")
        if not items:
            return
        items = self._seal.sign_entries(items)  # here, so that the key never leaves this process
        inline: List[Optional[Inline]] = []
        blobs: List[Tuple[BlobHeader, Blob]] = []
        small = inline_choices([blob.size for _, blob in items])
        for (record, blob), is_small in zip(items, small):
            if is_small:
                inline.append(Inline(blob.kind, dict(blob.meta), blob.read_all()))
            else:
                inline.append(None)
                blobs.append((BlobHeader(blob.kind, blob.meta, blob.size, record.value), blob))
        args = {"records": [r for r, _ in items], "inline": inline}
        blobs, bar = progress.uploads(blobs, self.progress, self.host)
        try:
            self._request("save_records", args, blobs=blobs)
        finally:
            if bar is not None:
                bar.close()

    def load_records(self, keys: Sequence[str]) -> List[Optional[CallRecord]]:
        if not keys:
            return []
        args = {"keys": [str(k) for k in keys]}
        records = list(self._request("load_records", args, offline=lambda: [None] * len(keys)))
        return self._seal.open_records(records, self._where, keys)

    def load_blob(self, value_digest: str) -> Blob:
        blob: Blob = self._request(
            "load_blob",
            {"digest": str(value_digest)},
            consume=self._downloading(spool),
            offline=_absent(value_digest),
        )
        return self._seal.open_blob(blob, value_digest, self._where)

    def load_blobs(self, value_digests: Sequence[str]) -> List[Optional[Blob]]:
        """Blobs for ``value_digests`` in one round trip (small ones travel
        inside the reply, large ones stream after it)."""
        if not value_digests:
            return []
        args = {"digests": [str(d) for d in value_digests]}
        blobs: List[Optional[Blob]] = self._request(
            "load_blobs",
            args,
            consume=self._downloading(unpack_blobs),
            offline=lambda: [None] * len(value_digests),
        )
        return self._seal.open_blobs(blobs, value_digests, self._where)

    def load_entries(self, keys: Sequence[str]) -> List[Optional[Tuple[CallRecord, Blob]]]:
        """Records and their result blobs in one round trip. A long unsigned
        listing (a stack back-filling from this layer) goes in parts back
        to back, as rows where the server keeps them, and its large values
        follow in one more request, only if there are any."""
        if not keys:
            return []
        parts = pipeline_parts([str(k) for k in keys])
        if len(parts) > 1 and isinstance(self._seal, Unsigned) and "small_entries" in self._features():
            return self._entries_in_parts(keys, parts)

        def consume(result: Any, streams: List[Tuple[BlobHeader, Iterator[bytes]]]) -> Any:
            blobs = unpack_blobs([None if e is None else e[1] for e in result], streams)
            return [None if e is None else (e[0], b) for e, b in zip(result, blobs)]

        entries = self._request(
            "load_entries",
            {"keys": [str(k) for k in keys]},
            consume=self._downloading(consume),
            offline=lambda: [None] * len(keys),
        )
        return self._seal.open_entries(entries, self._where, keys)

    def _entries_in_parts(
        self, keys: Sequence[str], parts: List[List[str]]
    ) -> List[Optional[Tuple[CallRecord, Blob]]]:
        if "entry_rows" in self._features():
            found = self._on_connection(
                lambda conn: row_listing_entries(self, conn, parts), offline=lambda: [None] * len(keys)
            )
        else:
            found = self.load_records_and_small_blobs(keys)
        elsewhere = [e[0].value for e in found if e is not None and e[1] is None]
        fetched = dict(zip(elsewhere, self.load_blobs(elsewhere)))
        out: List[Optional[Tuple[CallRecord, Blob]]] = []
        for entry in found:
            if entry is not None and entry[1] is None:
                blob = fetched.get(entry[0].value)  # a value lost is no entry, as in one request
                entry = None if blob is None else (entry[0], blob)
            out.append(entry)
        return out

    def load_many(self, keys: Sequence[str], *, results: bool = False) -> List[Optional[LazyCall]]:
        # an unsigned listing of a server that hands on its rows: each
        # call's record is built and checked here when first read (remote/rows.py)
        if not keys or not isinstance(self._seal, Unsigned) or "entry_rows" not in self._features():
            return super().load_many(keys, results=results)
        parts = pipeline_parts([str(k) for k in keys])

        return self._on_connection(  # type: ignore[no-any-return]
            lambda conn: listing(self, conn, parts, results), offline=lambda: [None] * len(keys)
        )

    def _features(self) -> Sequence[str]:
        """What the server lists in its handshake (nothing when it cannot be reached)."""
        try:
            return self._connection().hello.info.get("features") or ()  # type: ignore[no-any-return]
        except RemoteConnectionError:
            return ()

    def load_records_and_small_blobs(self, keys: Sequence[str]) -> SmallEntries:
        """Records with their small values in one round trip (the obvious
        loop over ``load_many`` then costs one); large values stay on the
        server until read. A server that predates this answers records only."""
        if not keys:
            return []
        if "small_entries" not in self._features():
            return super().load_records_and_small_blobs(keys)
        parts = pipeline_parts([str(k) for k in keys])

        def run(conn: Connection) -> SmallEntries:
            out: SmallEntries = []
            answers = pipelined(conn, "load_entries", [{"keys": part, "small_only": True} for part in parts])
            try:
                for part, found in zip(parts, answers):
                    listed = [None if f is None else f[0] for f in found]
                    records = self._seal.open_records(listed, self._where, part)
                    out.extend(unpack_small_entries(found, records, self._seal, self._where))
            finally:
                answers.close()
            return out

        return self._on_connection(run, offline=lambda: [None] * len(keys))

    def contains(self, key: str) -> bool:
        # the commonest request: straight to the connection, without
        # BaseCache's detour through contains_many and its lists
        key = str(key)
        return self._on_connection(lambda conn: conn.contains(key), _not_found)  # type: ignore[no-any-return]

    def contains_many(self, keys: Sequence[str]) -> List[bool]:
        if not keys:
            return []
        args = {"keys": [str(k) for k in keys]}
        return list(self._request("contains_many", args, offline=lambda: [False] * len(keys)))

    def evict(self, key: str) -> None:
        if self._local_read_only or self._known_read_only():
            raise Rejected(f"cannot evict: {self!r} is read-only")
        self._request("evict", {"key": str(key)})

    def expand(self, short_key: str) -> Digest:
        return Digest(self._request("expand", {"prefix": str(short_key)}, offline=_absent(short_key)))

    def query_records(
        self,
        name: Optional[str] = None,
        arg_digests: Optional[Mapping[str, str]] = None,
        metadata: Optional[Mapping[str, Any]] = None,
    ) -> Iterator[CallRecord]:
        """Matching records, streamed in pages: the server runs ahead by at
        most ``QUERY_WINDOW`` pages of what this iterator has handed out,
        and stops when the iterator is closed or collected."""
        args = {
            "name": name,
            "arg_digests": dict(arg_digests) if arg_digests else None,
            "metadata": dict(metadata) if metadata else None,
            "page": QUERY_PAGE,
            "window": QUERY_WINDOW,
        }
        try:
            conn = self._connection()
            exchange = conn.exchange("query_records", args)
        except RemoteConnectionError as exc:
            self._unavailable(exc, lambda: None)  # offline: no records
            return
        with exchange:
            while True:
                try:
                    message = exchange.first()
                except RemoteConnectionError as exc:
                    self._unavailable(exc, lambda: None)  # offline: the records so far
                    return
                self._used()
                if message.more:
                    conn.send_one_way("credit", {"id": exchange.pending.rid, "n": 1})
                yield from self._seal.iter_records(message.result, self._where)
                if not message.more:
                    return

    def collect_garbage(self) -> int:
        if self._local_read_only or self._known_read_only():
            raise Rejected(f"cannot collect garbage: {self!r} is read-only")
        return int(self._request("collect_garbage"))

    def usage_report(self) -> Optional[Dict[str, Any]]:
        """What the remote cache holds and the limits of its own fleche.toml
        (``calls``, ``bytes``, ``by_name``, ``limits``); None when its
        server is too old to say, or its cache cannot."""
        try:
            return self._request("usage")
        except ProtocolError as exc:  # an older server: "unknown operation 'usage'"
            if "unknown operation" in str(exc):
                return None
            raise

    def trim_remote(
        self, max_bytes: Any = None, max_calls: Any = None, max_age: Any = None, dry_run: bool = False
    ) -> Dict[str, Any]:
        """One trim of the remote cache by these limits (its server does
        the work); what went and what remains."""
        if not dry_run and (self._local_read_only or self._known_read_only()):
            raise Rejected(f"cannot trim: {self!r} is read-only")
        args = {"max_bytes": max_bytes, "max_calls": max_calls, "max_age": max_age, "dry_run": dry_run}
        return self._request("trim", {k: v for k, v in args.items() if v is not None})

    def _known_read_only(self) -> bool:
        """Read-only as the server said, if it has said yet: a first save
        does not wait for the handshake (the server refuses it anyway), and
        nothing is opened to ask (a stack whose calls all hit its local
        layer never starts ssh; the write itself says what is wrong)."""
        conn = self._conn
        return conn is not None and conn.hello_received and bool(conn.hello.info.get("read_only"))

    # -- one-round-trip overrides ---------------------------------------------

    def load_value(self, key: str) -> Any:
        """The result under ``key`` (full or unique prefix), in one round
        trip; an array streams straight into its final buffer."""
        consume = self._downloading(self._seal.stream_decoder(self._where, key=key))
        return self._request("load_value", {"key": str(key)}, consume=consume, offline=_absent(key))

    def fetch_result(self, value_digest: str) -> Any:
        consume = self._downloading(self._seal.stream_decoder(self._where, digest=value_digest))
        args = {"digest": str(value_digest)}
        return self._request("load_blob", args, consume=consume, offline=_absent(value_digest))

    def claim_keeper(self) -> Optional[Claims]:
        """The server's claims (one round trip per batch), unless this
        cache or its server is read-only, or the server refused them."""
        if self._local_read_only or self._known_read_only():
            return None
        keeper = self.__dict__.get("_claims")
        if keeper is None:
            keeper = self.__dict__["_claims"] = RemoteClaims(self._request, repr(self))
        return None if keeper.unsupported else keeper

    def lookup_claims(self, entries: bool = False) -> Optional[Tuple[Claims, LoadOrClaim]]:
        """The server's lookup that claims on a miss (``load_or_claim``),
        so a ``@cached`` miss costs one round trip before computing, like a
        hit; None when there are no claims or the server predates it.
        Nothing is opened to decide: the lookup itself connects."""
        # before the handshake, asked anyway: a first call goes out with the
        # login, as a load_value does, and a server that lacks it says so
        conn = self._conn
        if conn is not None and conn.hello_received:
            if LOAD_OR_CLAIM not in (conn.hello.info.get("features") or ()):
                return None
        keeper = self.claim_keeper()
        if keeper is None:
            return None
        assert isinstance(keeper, RemoteClaims)
        run = load_or_claim(self._request, self._downloading, self._seal, self._where, keeper, entries)
        return keeper, run


def _not_found() -> bool:
    """The offline answer of ``contains`` (``on_error = "warn"``)."""
    return False


def _absent(key: str) -> Callable[[], Any]:
    """The offline answer of a lookup that raises on a miss."""

    def raise_missing() -> Any:
        raise KeyError(key)

    return raise_missing


#: Records per query page, and pages the server may send ahead of us.
QUERY_PAGE = 500
QUERY_WINDOW = 4


__all__ = ["SshCache"]
