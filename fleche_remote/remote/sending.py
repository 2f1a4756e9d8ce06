"""The client's writes: requests onto the shared pipe, frames kept whole.

:class:`~fleche_remote.remote.connection.Connection` decides what to send
and what a failure means; this module only puts the bytes on the wire so
that the stream stays in step, whatever happens:

* a small request into a free pipe goes out in one write that takes it
  whole or not at all (see ``write_atomic``), so nothing is deferred;
* otherwise Ctrl-C waits until the last byte of a request is out (below
  ``DEFER_SIGINT_BELOW``; a bigger one stays interruptible and a request
  cut short breaks the connection instead);
* one value stream at a time, and small requests pass between its chunks
  (see :mod:`~fleche_remote.remote.turns`).
"""

from __future__ import annotations

import threading
from typing import Callable, Sequence, Tuple

from ..codec.values import Blob
from ..errors import RemoteConnectionError
from .protocol import DATA, BlobHeader, encode_end, frame_header
from .transport import Transport
from .turns import BULK_FRAME, DeferSigint, WriteTurns

#: Requests smaller than this are written with Ctrl-C deferred until the
#: last byte is out, so an interrupt leaves the connection usable; larger
#: ones stay interruptible and close the connection instead.
DEFER_SIGINT_BELOW = 16 << 20

#: Value chunks up to this size are copied into the request's single write;
#: bigger ones are written from the value's own buffer.
_GATHER_BELOW = 64 << 10


class RequestWriter:
    """Writes requests, each as whole frames, from any thread.

    Args:
        transport: the pipe.
        timeout: seconds a write may make no progress.
        torn: called with the reason when a request was cut short after
            some of it left (the stream can't be trusted any more); the
            interruption itself propagates afterwards.

    Raises (from both methods):
        RemoteConnectionError: the transport failed (the caller says why).
    """

    def __init__(self, transport: Transport, timeout: float, torn: Callable[[str], object]) -> None:
        self.transport = transport
        self.timeout = timeout
        self._torn = torn
        self._turns = WriteTurns()  # small requests overtake a value's chunks
        self._upload_lock = threading.Lock()

    def small(self, data: bytes) -> None:
        """Write one request with no values."""
        if self._turns.try_small():  # a free pipe: a small frame goes out whole in one call
            try:
                if self.transport.write_atomic(data):
                    return
            finally:
                self._turns.release()
        with DeferSigint(len(data) < DEFER_SIGINT_BELOW), self._turns.small():
            self.transport.write(data, self.timeout)

    def with_values(self, rid: int, head: bytes, blobs: Sequence[Tuple[BlobHeader, Blob]]) -> None:
        """Write a request (``head``) and the values it announced."""
        total = len(head) + sum(h.size for h, _ in blobs)
        started = complete = False
        # one value stream at a time; small requests pass between its chunks
        with self._upload_lock:
            try:
                with DeferSigint(total < DEFER_SIGINT_BELOW):
                    started = True
                    pending = bytearray(head)
                    for header, blob in blobs:
                        sent = 0
                        for chunk in blob.chunks(BULK_FRAME):
                            n = len(chunk)
                            pending += frame_header(DATA, rid, n)
                            if n <= _GATHER_BELOW:
                                pending += chunk
                            else:
                                with self._turns.bulk():
                                    self.transport.write(pending, self.timeout)
                                    self.transport.write(chunk, self.timeout)
                                pending = bytearray()
                            sent += n
                        if sent != header.size:
                            raise ValueError(f"value produced {sent} bytes, expected {header.size}")
                        pending += encode_end(rid)
                    with self._turns.small():
                        self.transport.write(pending, self.timeout)
                    complete = True
            except RemoteConnectionError:
                raise  # the caller says why the transport failed
            except BaseException:
                if started and not complete:
                    # half a request is on the wire: the stream can't be trusted
                    self._torn("a request was interrupted while it was being sent")
                raise
