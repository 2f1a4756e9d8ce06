"""Write-behind: a stack's saves pushed to a slow layer in the background.

A compute loop on a laptop should not wait on the network for every
result. With a write-behind layer (``write_behind = true`` on an ssh layer
of a stack), a save lands in the stack's first layer as always, and its key
is queued; a background thread pushes queued entries to the layer in
batches (one ``save_records`` each).

Design rules:

* **The queue holds keys, not values.** The pusher reads each batch back
  from the first layer (one ``load_entries``), so memory stays bounded
  whatever the values weigh, and the same path serves a later process that
  retries what an earlier one could not push.
* **Bounded, with back-pressure.** When ``queue_size`` keys wait, a save
  blocks until the pusher catches up, rather than letting memory grow.
* **Nothing is lost.** A key is written to a journal before the first
  layer saves it (a kill at any point leaves no local entry, or a journal
  line for it), and struck out once it has arrived, so :meth:`WriteBehind.pending` is
  exactly what did not arrive, in this process or an earlier one. After a
  failure (logged once, as a warning) the pusher stops: the connection is
  broken and ``SshCache`` never reconnects on its own (that would repeat a
  2FA prompt). Saves go on, into the first layer and the journal;
  ``push_pending()`` after the remote's ``reconnect()`` pushes them.
* **Flushed on the way out**: ``close()`` and interpreter exit wait (a
  bounded time) for the queue to drain; what is left stays pending.

The journal (:mod:`.journal`) is what makes it so.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import threading
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Deque, List, Optional, Sequence, Union

from ..codec.digest import Digest
from ..exiting import before_connections_close
from .journal import Journal, default_journal_dir

if TYPE_CHECKING:
    from .base import BaseCache

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: one process per journal
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("fleche_remote.writebehind")

#: On an ssh layer of a stack in fleche.toml: push saves to it in the
#: background.
WRITE_BEHIND_KEY = "write_behind"

#: Keys that may wait before a save blocks. Keys are small; the bound is
#: about how far the remote may lag behind the compute loop.
DEFAULT_QUEUE_SIZE = 4096
#: Entries per push: one ``save_records`` round trip each.
DEFAULT_BATCH_SIZE = 256
#: Seconds ``close()`` and interpreter exit wait for the queue to drain.
DEFAULT_CLOSE_TIMEOUT = 60.0


def _identity(cache: BaseCache) -> Any:
    try:
        return cache.to_config()
    except TypeError:
        return repr(cache)


def _volatile(cache: BaseCache) -> bool:
    from ..storage.memory import MemoryCallStore
    from .cache import Cache

    return isinstance(cache, Cache) and isinstance(cache.calls, MemoryCallStore)


class WriteBehind:
    """Pushes a stack's saves to one of its lower layers, in the background.

    Give it (or just the layer) to :class:`~fleche_remote.caches.CacheStack`
    as ``write_behind=[...]``; the stack attaches it to its first layer.

    Args:
        layer: the layer to push to (typically an ``SshCache``).
        queue_size: keys that may wait before a save blocks.
        batch_size: entries per push (one round trip each).
        journal: the journal file; default: under
            :func:`default_journal_dir`, named by the two layers' identity.
        close_timeout: seconds ``close()`` and interpreter exit wait for
            the queue to drain.
    """

    def __init__(
        self,
        layer: BaseCache,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        batch_size: int = DEFAULT_BATCH_SIZE,
        journal: Union[str, os.PathLike[str], None] = None,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    ) -> None:
        from .base import BaseCache

        if not isinstance(layer, BaseCache):
            raise TypeError(f"write-behind needs a BaseCache layer, got {type(layer).__name__}")
        if queue_size < 1 or batch_size < 1:
            raise ValueError(f"queue_size and batch_size must be positive, got {queue_size}, {batch_size}")
        self.layer = layer
        self.queue_size = int(queue_size)
        self.batch_size = int(batch_size)
        self.close_timeout = float(close_timeout)
        self._journal_path = Path(journal).expanduser() if journal is not None else None
        self._journal: Optional[Journal] = None
        self._source: Optional[BaseCache] = None
        self._cond = threading.Condition()
        self._queue: Deque[str] = collections.deque()
        self._in_flight = 0
        self._failure: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        self._generation = 0

    def __repr__(self) -> str:
        return f"WriteBehind({self.layer!r})"

    def attach(self, source: BaseCache) -> None:
        """Push entries read from ``source`` (the stack's first layer).

        Raises:
            ValueError: already attached to another first layer.
            ConfigError: the journal's path holds something other than a
                regular file that only this user can write (checked now,
                before anything is saved).
        """
        if self._source is not None and self._source is not source:
            raise ValueError(f"{self!r} already pushes from {self._source!r}")
        self._source = source
        self.journal.open()

    @property
    def journal(self) -> Journal:
        """The journal of keys not yet pushed (opened on first use)."""
        if self._journal is None:
            source = self._require_source()
            path = self._journal_path
            if path is None and not _volatile(source):
                ident = json.dumps([_identity(source), _identity(self.layer)], sort_keys=True, default=str)
                name = hashlib.sha256(ident.encode()).hexdigest()[:24]
                path = default_journal_dir() / f"{name}.journal"
            header = f"fleche-remote write-behind journal: {source!r} -> {self.layer!r}"
            self._journal = Journal(path, header.replace("\n", " "))
        return self._journal

    @property
    def failure(self) -> Optional[BaseException]:
        """The error that stopped pushing, until ``push_pending()`` succeeds."""
        return self._failure

    def _require_source(self) -> BaseCache:
        if self._source is None:
            raise RuntimeError(f"{self!r} is not part of a CacheStack")
        return self._source

    # -- the saving side -------------------------------------------------------

    def promise(self, keys: Sequence[str]) -> None:
        """Journal ``keys`` before the first layer saves them: a kill at any
        point then leaves each one either not saved or pending (an entry
        the first layer never got is dropped when its push finds none)."""
        self.journal.add(keys)

    def enqueue(self, keys: Sequence[str], *, promised: bool = False) -> None:
        """Queue ``keys`` (just saved into the first layer) for pushing;
        blocks while the queue is full.

        Args:
            promised: :meth:`promise` has journaled them already.
        """
        if not promised:
            self.journal.add(keys)  # first: a crash from here on leaves them pending
        with self._cond:
            for key in keys:
                while self._failure is None and len(self._queue) >= self.queue_size:
                    self._start_locked()
                    self._cond.wait(1.0)  # re-checks a pusher that died
                if self._failure is not None:
                    return  # journaled; push_pending() takes them
                self._start_locked()
                self._queue.append(str(key))
                self._cond.notify_all()

    def _start_locked(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._generation += 1
        self._thread = threading.Thread(
            target=self._run,
            args=(self._generation,),
            name=f"fleche-remote write-behind to {self.layer!r}",
            daemon=True,
        )
        self._thread.start()
        _ACTIVE.add(self)

    # -- the pushing side ------------------------------------------------------

    def _run(self, generation: int) -> None:
        while True:
            with self._cond:
                while not self._queue and self._generation == generation:
                    self._cond.wait()
                if self._generation != generation:
                    return
                batch = [self._queue.popleft() for _ in range(min(self.batch_size, len(self._queue)))]
                self._in_flight = len(batch)
                self._cond.notify_all()  # room in the queue
            try:
                self._push(batch)
            except Exception as exc:
                self._fail(exc)
            finally:
                with self._cond:
                    self._in_flight = 0
                    self._cond.notify_all()

    def _push(self, keys: Sequence[str]) -> int:
        entries = self._require_source().load_entries(keys)
        items = [entry for entry in entries if entry is not None]
        gone = len(keys) - len(items)
        if gone:
            # evicted from the first layer after it was saved: nothing to push
            log.info("%d write-behind entries are no longer in the first layer; dropped", gone)
        if items:
            self.layer.save_records(items)
        self.journal.remove(keys)
        return len(items)

    def _fail(self, exc: BaseException) -> None:
        # said before the failure is visible: a flush() that returns False
        # on it must find the warning logged already (only this pusher
        # thread fails; push_pending() raises instead)
        with self._cond:
            first = self._failure is None
        if first:
            log.warning(
                "write-behind to %r failed, and stops until push_pending(): %s. Saves go on into the "
                "first layer; what did not arrive is listed by pending() (journal %s)",
                self.layer,
                exc,
                self.journal.path or "in memory",
            )
        with self._cond:
            self._failure = exc
            self._queue.clear()  # still journaled: pending() lists them
            self._cond.notify_all()

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until everything queued has been pushed.

        Returns:
            True when it all arrived; False after a failure, or when
            ``timeout`` seconds passed first (it then goes on in the
            background).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._failure is None and (self._queue or self._in_flight):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return self._failure is None

    def pending(self) -> List[Digest]:
        """Keys saved into the first layer and not yet pushed, by this
        process or an earlier one, oldest first."""
        return [Digest(key) for key in self.journal.live()]

    def push_pending(self) -> int:
        """Push every pending entry now, in this thread, in batches; resumes
        background pushing when it all arrived.

        Returns:
            How many entries were pushed.

        Raises:
            Exception: what the layer raised (e.g. ``RemoteConnectionError``:
                call its ``reconnect()`` first); entries not pushed stay
                pending.
        """
        keys = self.journal.live()
        pushed = 0
        for start in range(0, len(keys), self.batch_size):
            pushed += self._push(keys[start : start + self.batch_size])
        with self._cond:
            self._failure = None
        return pushed

    def close(self, timeout: Optional[float] = None) -> None:
        """Wait (at most ``timeout``, default ``close_timeout``) for the queue
        to drain, then stop the pusher; what is left stays pending."""
        wait = self.close_timeout if timeout is None else timeout
        if self._thread is not None and not self.flush(wait) and self._failure is None:
            log.warning(
                "write-behind to %r: %d entries not pushed within %.0f s stay pending",
                self.layer,
                len(self._queue) + self._in_flight,
                wait,
            )
        with self._cond:
            self._generation += 1  # the pusher exits after its current batch
            self._queue.clear()
            self._thread = None
            self._cond.notify_all()
        _ACTIVE.discard(self)
        if self._journal is not None:
            self._journal.close()


_ACTIVE: weakref.WeakSet[WriteBehind] = weakref.WeakSet()


def _flush_at_exit() -> None:
    deadline = time.monotonic() + DEFAULT_CLOSE_TIMEOUT
    for writer in list(_ACTIVE):
        writer.close(min(writer.close_timeout, max(0.0, deadline - time.monotonic())))


before_connections_close(_flush_at_exit)

__all__ = ["Journal", "WriteBehind", "default_journal_dir"]
