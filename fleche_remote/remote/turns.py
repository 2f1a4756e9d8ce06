"""Whose frames go out next on a shared pipe.

Both ends write whole frames from several threads onto one byte stream: a
value's chunks from the thread that streams it, and small requests or
answers from everyone else. A plain :class:`threading.Lock` is not fair:
the streaming thread releases it between chunks and, still holding the
GIL, takes it straight back, so a small answer can wait for the whole
value (measured: a 16 MB download at 40 Mbit/s held a ``contains`` for
1.8 s). :class:`WriteTurns` gives small writes the next turn: a bulk
writer steps aside between its frames while any small writer waits.

A small write still waits for the one frame being written, so bulk frames
are kept short (:data:`BULK_FRAME`): a quarter of a mebibyte is 50 ms at
40 Mbit/s, and costs nothing measurable in throughput.

:class:`DeferSigint` keeps a frame whole in the other way: Ctrl-C waits
until its last byte is out.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import threading
from typing import Any, Callable, Iterator

#: Size of the DATA frames a value is streamed in, each way.
BULK_FRAME = 256 << 10


class WriteTurns:
    """A lock for frame writers where small writes overtake bulk ones."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(threading.Lock())
        self._urgent = 0
        #: Take the pipe for a small write if it is free at once (then
        #: :attr:`release` it): nobody is ahead to step aside, so this skips
        #: the bookkeeping of :meth:`small`, a third of a small answer's cost
        #: in the server's write path (measured). The lock's own methods, not
        #: Python ones wrapping them: a lone request takes and gives back the
        #: pipe once on each end (taking and giving back 0.25 -> 0.12 us).
        self.try_small: Callable[[], bool] = functools.partial(self._lock.acquire, False)
        #: Give back the pipe taken with :attr:`try_small`.
        self.release: Callable[[], None] = self._lock.release

    @contextlib.contextmanager
    def small(self) -> Iterator[None]:
        """Hold the pipe for a small write (a request, an answer, a credit)."""
        if self._lock.acquire(blocking=False):
            try:
                yield
            finally:
                self._lock.release()
            return
        with self._cond:
            self._urgent += 1
        try:
            with self._lock:
                yield
        finally:
            with self._cond:
                self._urgent -= 1
                if not self._urgent:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def bulk(self) -> Iterator[None]:
        """Hold the pipe for one frame of a value, after any waiting small write."""
        with self._cond:
            while self._urgent:
                self._cond.wait()
        with self._lock:
            yield


class DeferSigint:
    """Hold back Ctrl-C while a small frame is written (main thread only):
    an interrupt between two writes of one frame would leave the stream
    out of step, and the connection with it."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.pending = False
        self._old: Any = None

    def __enter__(self) -> DeferSigint:
        if self.enabled:
            try:
                self._old = signal.signal(signal.SIGINT, self._record)
            except ValueError:  # not the main interpreter
                self.enabled = False
        return self

    def _record(self, signum: int, frame: Any) -> None:
        self.pending = True

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self._old)
            if self.pending and exc[0] is None:
                raise KeyboardInterrupt
