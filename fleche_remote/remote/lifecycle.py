"""The life of an ``SshCache``'s one connection: opened, reused, lost, retried.

:class:`~fleche_remote.remote.client.SshCache` says what each operation
asks of the remote; this mixin owns the connection those requests travel
on. It opens it lazily on first use (an ssh login, perhaps a 2FA prompt),
reuses it for the process's life, closes it when it carried nothing for
``idle_timeout`` seconds, and reopens a broken one only when
``retry_after`` allows it and no prompt can appear. Every request goes
through :meth:`Lifecycle._request`, which reports a connection failure
once per outage and, with ``on_error = "warn"``, answers from the
operation's offline fallback instead of raising (the policy itself is
:class:`~fleche_remote.remote.health.Outage`).

It is separate because it is one state machine with its own lock and its
own failure rules, and none of it depends on which operation is asked.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import RemoteConnectionError
from . import bootstrap as _bootstrap
from . import health
from .banner import warn_on_skew
from .connection import Connection
from .ssh_options import connection_needs_no_prompt
from .transport import SubprocessTransport, Transport

log = logging.getLogger("fleche_remote.client")


def _startup_message(
    host: str, python: str, setup: Sequence[str]
) -> Callable[[Optional[int], List[str]], str]:
    def explain(code: Optional[int], tail: List[str]) -> str:
        text = "\n".join(tail)
        if code == 255:
            last = tail[-1] if tail else "no message"
            # the fix first: the ssh line below says why, and doctor says more
            return (
                f"ssh could not connect to {host}: {last}; check the set-up with "
                f'`fleche-remote doctor {host}`, or write on_error = "warn" on this ssh layer so '
                f"that the other layers go on serving while it is unreachable"
            )
        if "No module named fleche_remote" in text or "No module named 'fleche_remote'" in text:
            return (
                f"fleche_remote is not installed for {python!r} on {host}: install it there "
                f"(pip install fleche-remote) or activate its environment with setup_commands"
            )
        if code == 127:
            return (
                f"the remote shell on {host} could not run a command (exit 127): is python={python!r} "
                f"on the remote PATH, and do setup_commands {list(setup)!r} exist there?"
            )
        if code == 126:
            return f"the remote command on {host} is not executable (exit 126): python={python!r}"
        if code is not None and code != 0 and setup and "fleche-remote serve" not in text:
            return (
                f"the remote command on {host} failed before the server started "
                f"(setup_commands {list(setup)!r})"
            )
        return f"the server on {host} exited before its banner"

    return explain


class Lifecycle:
    """The connection half of :class:`~fleche_remote.remote.client.SshCache`
    (the attributes below are set by its constructor)."""

    host: str
    python: str
    ssh: str
    ssh_options: Tuple[str, ...]
    setup_commands: Tuple[str, ...]
    command: Optional[List[str]]
    bootstrap: str
    connect_timeout: float
    timeout: float
    idle_timeout: Optional[float]
    _transport_factory: Optional[Callable[[], Transport]]
    _conn: Optional[Connection]
    _conn_lock: threading.Lock
    _finalizer: Optional[weakref.finalize]
    _last_used: float
    _idle_stop: Optional[threading.Event]
    _idle_closed: Optional[Connection]
    _outage: health.Outage

    if TYPE_CHECKING:

        @property
        def on_error(self) -> str: ...

        @property
        def retry_after(self) -> Optional[float]: ...

        def argv(self) -> List[str]: ...

    def _connection(self) -> Connection:
        conn = self._conn
        if conn is not None and conn.broken is None:
            return conn
        with self._conn_lock:
            conn = self._conn
            if conn is None:
                conn = self._conn = self._open()
            elif conn.broken is not None and self._outage.since is not None and self._outage.retry_due():
                log.info("%r: trying the remote again (retry_after = %g s)", self, self.retry_after)
                self._close_locked()
                conn = self._conn = self._open()
            return conn

    def _prompt_check(self) -> Callable[[], bool]:
        """Whether opening a connection can't ask anybody for anything (no
        reference to self, so that the cache is freed as soon as unused)."""
        if self.command is not None or self._transport_factory is not None:
            return lambda: True
        ssh, options, host = self.ssh, self.ssh_options, self.host
        return lambda: connection_needs_no_prompt(ssh, options, host)

    def _noise_reporter(self) -> Callable[[bytes], None]:
        # no reference to self: the connection outlives it in the finalizer
        key, host = (self.host, self.ssh_options, tuple(self.command or ())), self.host
        return lambda noise: health.report_login_noise(key, host, noise)

    def _open(self) -> Connection:
        if self._transport_factory is not None:
            transport = self._transport_factory()
        else:
            transport = SubprocessTransport(self.argv(), label=self.host)
            if self.command is None and self.bootstrap != "never":
                transport = _bootstrap.BootstrapTransport(
                    transport, _bootstrap.code_bundle(), connect_timeout=self.connect_timeout
                )
        host = self.host
        conn = Connection(
            transport,
            target=host,
            timeout=self.timeout,
            connect_timeout=self.connect_timeout,
            diagnose_startup=_bootstrap.explain_startup(
                self.host,
                self.python,
                self.bootstrap,
                _startup_message(self.host, self.python, self.setup_commands),
            ),
            on_hello=lambda hello: warn_on_skew(host, hello.library),
            on_noise=self._noise_reporter(),
        )
        self._finalizer = weakref.finalize(self, Connection.close, conn)
        self._last_used = time.monotonic()
        if self.idle_timeout is not None:
            self._idle_stop = threading.Event()
            health.watch_idle(self, conn, self._idle_stop)
        return conn

    def reconnect(self) -> None:
        """Close the connection (if any) and open a new one now.

        Connection failures never reconnect on their own (that would
        repeat a 2FA prompt unasked); call this to go on after one.
        """
        with self._conn_lock:
            self._close_locked()
            self._conn = self._open()

    def close(self) -> None:
        """End the remote server; the next operation starts a new one."""
        with self._conn_lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._idle_stop is not None:
            self._idle_stop.set()
            self._idle_stop = None
        if self._finalizer is not None:
            self._finalizer()  # closes the connection exactly once
            self._finalizer = None
        self._conn = None

    def idle_seconds_left(self) -> float:
        """Seconds until the connection counts as idle (<= 0: it does)."""
        return self._last_used + (self.idle_timeout or 0.0) - time.monotonic()

    def close_if_idle(self, conn: Connection) -> bool:
        """Close ``conn`` if it is still ours and carried nothing for
        ``idle_timeout`` seconds; whether the watch is over."""
        with self._conn_lock:
            if self._conn is not conn or conn.broken is not None:
                return True
            if self.idle_timeout is None or conn.in_flight or not conn.hello_received:
                return False  # busy, or still logging in
            if time.monotonic() - self._last_used < self.idle_timeout:
                return False
            log.debug("%r: closing the connection after %g s idle", self, self.idle_timeout)
            self._idle_closed = conn
            self._close_locked()
            return True

    def is_alive(self, timeout: float = 10.0) -> bool:
        """Whether the remote answers a ping within ``timeout`` seconds.

        Opens the connection if there is none (or reopens one that broke,
        when ``retry_after`` allows it), never raises, and never breaks a
        healthy connection that is merely slow: the ping goes on in the
        background and a late answer is simply not waited for.
        """
        done = threading.Event()
        answered: List[bool] = []

        def ping() -> None:
            try:
                self._connection().request("ping")
                answered.append(True)
                self._used()
            except Exception as exc:  # any failure means "not alive"
                log.debug("%r: ping failed: %s", self, exc)
            finally:
                done.set()

        threading.Thread(target=ping, name="fleche-remote ping", daemon=True).start()
        done.wait(timeout)
        return bool(answered)

    @property
    def connected(self) -> bool:
        """Whether a live connection is open (no connection is started)."""
        return self._conn is not None and self._conn.broken is None

    def _request(
        self,
        op: str,
        args: Optional[Dict[str, Any]] = None,
        *,
        offline: Optional[Callable[[], Any]] = None,
        **kwargs: Any,
    ) -> Any:
        """One request. A connection failure is reported once per outage;
        with ``on_error = "warn"`` and an ``offline`` answer, that answer is
        returned instead of raising."""
        return self._on_connection(lambda conn: conn.request(op, args, **kwargs), offline)

    def _on_connection(self, run: Callable[[Connection], Any], offline: Optional[Callable[[], Any]]) -> Any:
        """``run(connection)``, with :meth:`_request`'s failure rules: ``run``
        may send several requests, and is run again whole on a connection
        that was closed for idleness as it began."""
        conn: Optional[Connection] = None
        try:
            try:
                conn = self._connection()
                result = run(conn)
            except RemoteConnectionError:
                if self._idle_closed is None or conn is not self._idle_closed:
                    raise
                # closed for idleness between taking it and sending: reopen
                result = run(self._connection())
        except RemoteConnectionError as exc:
            return self._unavailable(exc, offline)
        self._used()
        return result

    def _used(self) -> None:
        self._last_used = time.monotonic()
        if self._outage.since is not None:
            self._outage.recovered()

    def _unavailable(self, exc: RemoteConnectionError, offline: Optional[Callable[[], Any]]) -> Any:
        self._outage.failed(exc)
        if offline is None or self.on_error == "raise":
            raise exc
        return offline()
