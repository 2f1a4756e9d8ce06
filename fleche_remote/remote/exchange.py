"""One request's answer, as the client's connection keeps track of it.

:class:`~fleche_remote.remote.connection.Connection` owns the wire: it
writes requests, and whichever thread leads reads frames and files each
under the request it belongs to. What is filed, and how a caller reads it
back, is here:

* :class:`Pending` is one request in flight: the frames received for it
  that its thread has not taken yet (their size counts against the
  connection's ``MAX_QUEUED_BYTES``);
* :class:`Exchange` is the caller's side of that request: its messages,
  its value streams checked against their headers, and, when the caller
  leaves early, the request forgotten and its stream cancelled;
* :func:`rebuild_exception` turns an error answer back into the
  exception the server raised, with the remote traceback attached.

It is separate so that the wire (reading, leading, sending, failing) and
the bookkeeping of what each request is owed can be read on their own.
"""

from __future__ import annotations

import builtins
import collections
from typing import Any, Deque, Dict, Iterator, Optional, Protocol, Type

from .. import errors as _errors
from ..errors import RemoteError
from .protocol import ABORT, DATA, END, MSG, BlobHeader, ErrorResponse, Frame, Response


class Channel(Protocol):
    """What an exchange needs of its connection (a
    :class:`~fleche_remote.remote.connection.Connection`), and no more."""

    target: str
    #: why the connection failed, or None while it works
    broken: Optional[str]

    def next_frame(self, pending: Pending) -> Optional[Frame]:
        """The next frame filed for ``pending``, reading the wire if need be."""

    def fail(self, message: str, exc: Optional[BaseException] = None) -> BaseException:
        """Break the connection; the error to raise."""

    def release(self, pending: Pending) -> None:
        """Forget ``pending`` and free its slot."""

    def send_one_way(self, op: str, args: Dict[str, Any]) -> None:
        """Send a request that gets no answer."""


_REBUILDABLE: Dict[str, Type[BaseException]] = {
    name: getattr(builtins, name)
    for name in (
        "KeyError",
        "LookupError",
        "IndexError",
        "ValueError",
        "TypeError",
        "OSError",
        "FileNotFoundError",
        "PermissionError",
        "IsADirectoryError",
        "NotImplementedError",
        "RuntimeError",
        "MemoryError",
    )
}
for _name in (
    "Rejected",
    "AmbiguousDigestError",
    "ConfigError",
    "StorageError",
    "CorruptEntryError",
    "ProtocolError",
):
    _REBUILDABLE[f"fleche_remote.errors.{_name}"] = getattr(_errors, _name)


def rebuild_exception(err: ErrorResponse) -> BaseException:
    """The local twin of a remote exception, with the remote traceback.

    Built-in types and fleche-remote's own come back as themselves (so
    ``except KeyError`` works across ssh); anything else is a
    :class:`RemoteError` naming the remote type.
    """
    cls = _REBUILDABLE.get(err.type)
    exc: BaseException
    if cls is not None:
        try:
            exc = cls(*err.args) if err.args else cls(err.message)
        except Exception:
            exc = cls(err.message)
    else:
        exc = RemoteError(err.type, err.message, err.traceback)
    exc.remote_traceback = err.traceback  # type: ignore[attr-defined]
    if cls is not None and err.traceback and hasattr(exc, "add_note"):
        exc.add_note("--- remote traceback ---\n" + err.traceback.rstrip())
    return exc


class Pending:
    """One request in flight: the frames received for it, not yet taken."""

    __slots__ = ("frames", "queued", "rid")

    def __init__(self, rid: int) -> None:
        self.rid = rid
        self.frames: Deque[Frame] = collections.deque()
        self.queued = 0


def frame_size(frame: Frame) -> int:
    return len(frame.payload) + 64


class Exchange:
    """The answer side of one request: its messages and value streams.

    Used as a context manager; leaving it early (an exception, Ctrl-C, a
    consumer that stopped reading) forgets the request, so its remaining
    frames are skipped, and asks the server to stop a stream in progress.
    """

    def __init__(self, conn: Channel, pending: Pending) -> None:
        self.conn = conn
        self.pending = pending
        self.finished = False
        self._streams_left = 0
        self._more = False

    def __enter__(self) -> Exchange:
        return self

    def __exit__(self, *exc: object) -> None:
        conn = self.conn
        conn.release(self.pending)
        if not self.finished and conn.broken is None:
            try:
                conn.send_one_way("cancel", {"id": self.pending.rid})
            except Exception:  # the connection is failing anyway
                pass

    def _next(self) -> Frame:
        frame = self.conn.next_frame(self.pending)
        assert frame is not None
        return frame

    def _settle(self) -> None:
        self.finished = not self._streams_left and not self._more

    def first(self) -> Response:
        """The next message (one page, for a paged answer).

        Raises:
            the rebuilt remote exception, for an error answer.
        """
        frame = self._next()
        message = frame.message
        if frame.type != MSG:
            raise self.conn.fail(f"expected a reply from {self.conn.target}, got frame type {frame.type}")
        if isinstance(message, ErrorResponse):
            self.finished = True
            raise rebuild_exception(message)
        if not isinstance(message, Response):
            raise self.conn.fail(f"expected a reply from {self.conn.target}, got {type(message).__name__}")
        self._streams_left = len(message.blobs)
        self._more = message.more
        self._settle()
        return message

    def stream(self, header: BlobHeader) -> Iterator[bytes]:
        """DATA payloads of one incoming value, until END."""
        received = 0
        while True:
            frame = self._next()
            if frame.type == DATA:
                received += len(frame.payload)
                yield frame.payload
            elif frame.type == END:
                if received != header.size:
                    raise self.conn.fail(
                        f"value from {self.conn.target} ended after {received} of {header.size} bytes"
                    )
                self._streams_left -= 1
                self._settle()
                return
            elif frame.type == ABORT:
                self._streams_left -= 1
                self._settle()
                reason = bytes(frame.payload).decode("utf-8", "replace")
                raise _errors.CorruptEntryError(f"the server could not send the value: {reason}")
            else:
                raise self.conn.fail(f"expected value data from {self.conn.target}, got a message")
