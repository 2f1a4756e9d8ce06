"""How an ``SshCache`` lives with a remote that fails, idles or chatters.

Three policies, kept apart from the cache's operations:

* **Outages** (:class:`Outage`). A connection failure is reported once per
  outage, not once per call: ``error_callback`` is called with the first
  exception, and with ``on_error = "warn"`` one WARNING says that the
  remote is skipped (the cache then answers "not here" to reads, so a
  stack's local layers go on serving). The outage ends at the first
  request that succeeds again. A broken connection is reopened unasked
  only when ``retry_after`` is set and ssh can connect without a prompt
  (BatchMode, or a live ControlMaster socket): reopening a connection that
  asks for a password or a 2FA code behind the user's back would hang a
  job or lock an account.
* **Idle connections** (:func:`watch_idle`). With ``idle_timeout``, a
  thread closes a connection that carried nothing for that long; the next
  operation opens a new one.
* **Login noise** (:func:`report_login_noise`). What a login shell prints
  before the server's banner (``module load`` chatter, a motd) is logged
  once per host and process, at INFO, or at WARNING when it reads like an
  error (a failed ``module load`` is worth seeing; a welcome text is not).

Logging, not ``warnings.warn``: the same logger carries the write-behind
and back-fill warnings, and Python's warning registry would hide a second
outage's message for good.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import weakref
from typing import Any, Callable, Hashable, Optional, Protocol, Set

from .protocol import describe_noise

log = logging.getLogger("fleche_remote.client")

ON_ERROR_MODES = ("raise", "warn")

#: Login output that reads like something went wrong (case-insensitive).
_ERRORISH = re.compile(
    rb"error|command not found|not found|no such file|permission denied|cannot |failed|fatal",
    re.IGNORECASE,
)

_noise_lock = threading.Lock()
_noise_reported: Set[Hashable] = set()


def looks_like_error(noise: bytes) -> bool:
    """Whether login output reads like an error rather than a greeting."""
    return _ERRORISH.search(noise) is not None


def report_login_noise(key: Hashable, target: str, noise: bytes) -> None:
    """Log skipped login output once per ``key`` (a host and how it is
    reached) in this process: INFO, or WARNING when it looks like an error."""
    with _noise_lock:
        if key in _noise_reported:
            log.debug("skipped %d bytes of login output from %s again", len(noise), target)
            return
        _noise_reported.add(key)
    errorish = looks_like_error(noise)
    log.log(
        logging.WARNING if errorish else logging.INFO,
        "skipped %d bytes of login output from %s%s: %s",
        len(noise),
        target,
        " that look like an error" if errorish else "",
        describe_noise(noise),
    )


def check_on_error(value: str) -> str:
    if value not in ON_ERROR_MODES:
        raise ValueError(f"on_error must be one of {ON_ERROR_MODES}, got {value!r}")
    return value


def check_seconds(name: str, value: Optional[float]) -> Optional[float]:
    if value is None:
        return None
    seconds = float(value)
    if not seconds > 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return seconds


class Outage:
    """The failure state of one cache's remote (see the module notes).

    Args:
        target: how to name the remote in messages.
        on_error: ``"raise"`` or ``"warn"``.
        retry_after: seconds after a failure before a broken connection
            may be reopened unasked; None: only ``reconnect()`` does.
        error_callback: called with the first exception of each outage.
        can_reopen: whether a connection can be opened with no prompt
            (asked only when a retry is due).
    """

    def __init__(
        self,
        target: str,
        on_error: str,
        retry_after: Optional[float],
        error_callback: Optional[Callable[[BaseException], Any]],
        can_reopen: Callable[[], bool],
    ) -> None:
        self.target = target
        self.on_error = check_on_error(on_error)
        self.retry_after = check_seconds("retry_after", retry_after)
        self.error_callback = error_callback
        self._can_reopen = can_reopen
        self._lock = threading.Lock()
        #: ``time.monotonic()`` of the first failure of the current outage
        self.since: Optional[float] = None
        self.last_error: Optional[BaseException] = None
        self._last_attempt = 0.0

    def failed(self, exc: BaseException) -> None:
        """Record a connection failure; the first of an outage is reported."""
        with self._lock:
            first = self.since is None
            if first:  # the retry clock starts here (calls refused meanwhile don't reset it)
                self.since = self._last_attempt = time.monotonic()
            self.last_error = exc
        if not first:
            return
        if self.on_error == "warn":
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            retry = (
                f"it is tried again every {self.retry_after:g} s if ssh needs no prompt, or on reconnect()"
                if self.retry_after is not None
                else "call reconnect() to use it again"
            )
            log.warning(
                "%s is unavailable (%s); it is skipped and new results stay in the local layers "
                "(on_error = 'warn'); %s",
                self.target,
                first_line,
                retry,
            )
        if self.error_callback is not None:
            try:
                self.error_callback(exc)
            except Exception:
                log.exception("error_callback for %s raised", self.target)

    def recovered(self) -> None:
        """A request went through: the outage, if any, is over."""
        if self.since is None:
            return
        with self._lock:
            was = self.since
            self.since = None
            self.last_error = None
        if was is not None:
            log.info("%s is reachable again after %.0f s", self.target, time.monotonic() - was)

    def retry_due(self) -> bool:
        """Whether a broken connection may be reopened now, unasked."""
        if self.retry_after is None or time.monotonic() - self._last_attempt < self.retry_after:
            return False
        with self._lock:
            self._last_attempt = time.monotonic()  # one prompt-check per period
        return self._can_reopen()


class IdleOwner(Protocol):
    """What the idle watch needs of the cache that owns a connection."""

    idle_timeout: Optional[float]

    def idle_seconds_left(self) -> float:
        """Seconds until the connection counts as idle (<= 0: it does)."""

    def close_if_idle(self, conn: Any) -> bool:
        """Close ``conn`` if it is idle and still the owner's; whether the watch is over."""


def watch_idle(owner: IdleOwner, conn: Any, stop: threading.Event) -> threading.Thread:
    """Start a thread that calls ``owner.close_if_idle(conn)`` once ``conn``
    has carried nothing for ``owner.idle_timeout`` seconds; it ends when
    ``stop`` is set or the owner is collected (it holds only a weak ref)."""
    ref = weakref.ref(owner)

    def run() -> None:
        while not stop.is_set():
            cache = ref()
            if cache is None:
                return
            idle = cache.idle_timeout or 1.0
            wait = cache.idle_seconds_left()
            if wait <= 0:
                if cache.close_if_idle(conn):
                    return
                wait = min(idle, 1.0)  # busy (a transfer in flight): look again soon
            del cache  # don't keep the cache alive while sleeping
            stop.wait(wait)

    thread = threading.Thread(target=run, name="fleche-remote idle watch", daemon=True)
    thread.start()
    return thread


__all__ = [
    "ON_ERROR_MODES",
    "Outage",
    "check_on_error",
    "check_seconds",
    "looks_like_error",
    "report_login_noise",
    "watch_idle",
]
