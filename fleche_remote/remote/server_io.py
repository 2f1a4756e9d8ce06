"""The server's plumbing: frames in, frames out, and values on their way.

:mod:`~fleche_remote.remote.server` decides what to do with each request
(the read loop, dispatch, which thread answers); this module only moves
bytes for it, and holds the bounds that keep a hostile or slow client
from growing the server's memory:

* :class:`Input` reads whole frames from the input stream (main thread),
  a big payload straight into its final buffer;
* :class:`Output` writes whole frames from any thread, small answers
  before the chunks of a value (see :mod:`~fleche_remote.remote.turns`);
* :class:`Upload` carries one request's incoming values from the reader
  to the upload thread through a bounded queue, checking each frame
  against what the request announced;
* :class:`OutStream` is the credit count of one answer streamed by a
  thread of its own.

It is separate so that the request loop reads as the protocol's rules,
and the buffering and flow control can be read on their own.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, BinaryIO, Iterator, Sequence

from ..codec.values import CHUNK_SIZE
from ..errors import ProtocolError
from .handlers import IncomingBlob
from .protocol import ABORT, DATA, END, NEED_DATA, BlobHeader, Frame, FrameDecoder, Request
from .turns import WriteTurns

#: Read size: one chunk frame plus its header in a single call.
_READ_SIZE = CHUNK_SIZE + 64

#: Value chunks queued between the reader and the upload thread (~8 MiB).
UPLOAD_QUEUE_FRAMES = 8

#: How often blocked server threads look up to see if the server is stopping.
POLL = 0.5

EOF = object()


class Output:
    """Frames out, whole frames at a time, from any thread."""

    def __init__(self, stream: BinaryIO) -> None:
        self._out = stream
        self._turns = WriteTurns()
        self.broken = False
        self._unflushed = False  # written without a flush since the last one

    def send(self, parts: Sequence[Any], flush: bool = True, bulk: bool = False) -> bool:
        """Write ``parts`` as one unit; False once the client is gone.

        ``bulk`` marks one frame of a value: it lets small answers go first.
        """
        if not bulk and self._turns.try_small():  # the pipe is free: no turns to keep
            try:
                return self._write(parts, flush)
            finally:
                self._turns.release()
        with self._turns.bulk() if bulk else self._turns.small():
            return self._write(parts, flush)

    def _write(self, parts: Sequence[Any], flush: bool) -> bool:
        if self.broken:
            return False
        try:
            for part in parts:
                self._out.write(part)
            if flush:
                self._out.flush()
            self._unflushed = not flush
        except (BrokenPipeError, ConnectionResetError, ValueError, OSError):
            self.broken = True
            return False
        return True

    def flush(self) -> None:
        """Send what was written without a flush (nothing to do if all was)."""
        if self._unflushed:
            self.send((), flush=True)


class Input:
    """Blocking frame reads from the server's input stream (main thread)."""

    def __init__(self, stream: BinaryIO) -> None:
        self._read = getattr(stream, "read1", None) or stream.read
        self._readinto = getattr(stream, "readinto", None)
        self.decoder = FrameDecoder()
        # see FdTransport: a warm buffer instead of a fresh 1 MiB mapping per
        # read; only with a call that returns what is there (a raw stream's
        # readinto, a buffered one's readinto1), never one that waits to fill it
        self._scratch = memoryview(bytearray(_READ_SIZE))
        self._read_some = getattr(stream, "readinto1", None) or (
            self._readinto if not hasattr(stream, "read1") else None
        )

    def next_frame(self, block: bool = True) -> Any:
        """The next frame; ``NEED_DATA`` if none is complete and not ``block``;
        ``None`` at end of input."""
        frame = self.decoder.next_frame()
        if frame is not NEED_DATA or not block:
            return frame
        return self.read_frame()

    def read_frame(self) -> Any:
        """Read until the next frame is complete (the decoder holds none:
        ``next_frame(block=False)`` said ``NEED_DATA``); ``None`` at end of
        input. A read that is exactly one compact lookup comes back as its
        ``(id, keys)`` instead of a frame (see ``FrameDecoder.lookup_from``)."""
        while True:
            frame: Any
            claim = self.decoder.claim_payload() if self._readinto is not None else None
            if claim is not None:
                self._fill(*claim)
                frame = self.decoder.next_frame()
            else:
                if self._read_some is not None:
                    n = self._read_some(self._scratch)
                    data = self._scratch[:n].tobytes() if n else b""
                else:
                    data = self._read(_READ_SIZE)
                if not data:
                    if self.decoder.buffered:
                        raise ProtocolError(
                            f"input ended inside a frame ({self.decoder.buffered} bytes buffered)"
                        )
                    return None
                frame = self.decoder.lookup_from(data) or self.decoder.next_frame_from(data)
            if frame is not NEED_DATA:
                return frame

    def _fill(self, buf: bytearray, have: int) -> None:
        assert self._readinto is not None
        view = memoryview(buf)
        while have < len(buf):
            n = self._readinto(view[have:])
            if not n:
                raise ProtocolError(f"input ended inside a frame ({have} of {len(buf)} payload bytes)")
            have += n
        self.decoder.feed_claimed(buf)


class Upload:
    """The value streams of one request, fed by the reader, read by a handler."""

    def __init__(self, stopping: threading.Event, request: Request) -> None:
        #: set when the server stops: a handler waiting for data gives up
        self.stopping = stopping
        self.headers = list(request.blobs)
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=UPLOAD_QUEUE_FRAMES)
        self.index = 0  # the blob now arriving
        self.received = 0
        self.blobs = [IncomingBlob(h, self._source(h)) for h in self.headers]

    @property
    def complete(self) -> bool:
        return self.index >= len(self.headers)

    def route(self, frame: Frame) -> None:
        """Check one incoming frame against what was announced, and queue it."""
        if self.complete:
            raise ProtocolError(f"value data for request {frame.id} after its last value ended")
        header = self.headers[self.index]
        if frame.type == DATA:
            self.received += len(frame.payload)
            if self.received > header.size:
                raise ProtocolError(f"value longer than the announced {header.size} bytes")
        elif frame.type == END:
            if self.received != header.size:
                raise ProtocolError(f"value ended after {self.received} of {header.size} bytes")
        if frame.type in (END, ABORT):
            self.index += 1
            self.received = 0
        self._put(frame)

    def _put(self, item: Any) -> None:
        while True:
            try:
                self.queue.put(item, timeout=POLL)
                return
            except queue.Full:
                if self.stopping.is_set():
                    return

    def close_input(self) -> None:
        """The input ended: whatever waits for more data gets an error."""
        try:
            self.queue.put_nowait(EOF)
        except queue.Full:
            pass

    def _source(self, header: BlobHeader) -> Iterator[Any]:
        while True:
            try:
                frame = self.queue.get(timeout=POLL)
            except queue.Empty:
                if self.stopping.is_set():
                    raise ProtocolError("the server is stopping") from None
                continue
            if frame is EOF:
                self._put(EOF)  # the next blob's reader must see it too
                raise ProtocolError("input ended in the middle of a value")
            if frame.type == DATA:
                yield frame.payload
            elif frame.type == END:
                return
            else:  # ABORT: the client could not produce the value
                reason = bytes(frame.payload).decode("utf-8", "replace")
                raise ValueError(f"the client aborted the value: {reason}")


class OutStream:
    """Flow control for one answer streamed by a thread of its own."""

    def __init__(self, credits: int) -> None:
        self.credits = credits
        self.cancelled = False
        self.cond = threading.Condition()

    def grant(self, n: int) -> None:
        with self.cond:
            self.credits += n
            self.cond.notify_all()

    def cancel(self) -> None:
        with self.cond:
            self.cancelled = True
            self.cond.notify_all()
