"""The client's side of one connection: handshake, requests, replies.

It owns a :class:`~fleche_remote.remote.transport.Transport` and the
protocol state on top of it. One request is on the wire at a time
(``request`` holds a lock for the whole exchange), but every reply is
matched by id, so frames left by an abandoned request (a Ctrl-C while
waiting) are skipped rather than taken for the next answer.

Failure policy: anything that leaves the stream in an unknown state (a
timeout, garbage, an interrupted write, the peer exiting) kills the
transport and marks the connection broken; later requests raise
:class:`~fleche_remote.errors.RemoteConnectionError` until the owner
reconnects explicitly. Nothing reconnects silently: that would repeat a
2FA prompt behind the user's back.
"""

from __future__ import annotations

import builtins
import logging
import signal
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Type

from .. import errors as _errors
from ..errors import ProtocolError, RemoteConnectionError, RemoteError
from ..values import CHUNK_SIZE, Blob
from .protocol import (
    ABORT,
    DATA,
    END,
    MSG,
    NEED_DATA,
    BannerScanner,
    BlobHeader,
    ErrorResponse,
    Frame,
    FrameDecoder,
    Hello,
    Request,
    Response,
    check_version,
    describe_noise,
    encode_end,
    encode_message,
    frame_header,
)
from .transport import Transport, TransportTimeout

log = logging.getLogger("fleche_remote.client")

#: Requests smaller than this are written with Ctrl-C deferred until the
#: last byte is out, so an interrupt leaves the connection usable; larger
#: ones stay interruptible and close the connection instead.
DEFER_SIGINT_BELOW = 16 << 20

#: Value chunks up to this size are copied into the request's single write;
#: bigger ones are written from the value's own buffer.
_GATHER_BELOW = 64 << 10

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


class _DeferSigint:
    """Hold back Ctrl-C while a small request is written (main thread only)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.pending = False
        self._old: Any = None

    def __enter__(self) -> _DeferSigint:
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


class Connection:
    """Protocol state over one live transport (see the module notes).

    Args:
        transport: the byte pipe, already started.
        target: how to name the peer in messages (``host`` for ssh).
        timeout: seconds any single wait may last once connected.
        connect_timeout: seconds for the banner and ``Hello`` to arrive.
        diagnose_startup: turns (exit code, stderr lines) of a peer that
            died before its banner into a helpful message.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        target: str,
        timeout: float,
        connect_timeout: float,
        diagnose_startup: Optional[Callable[[Optional[int], List[str]], str]] = None,
    ) -> None:
        self.transport = transport
        self.target = target
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._diagnose_startup = diagnose_startup
        self._decoder = FrameDecoder()
        self._lock = threading.RLock()
        self._next_id = 1
        self.broken: Optional[str] = None
        self.noise = b""
        self.hello: Hello = self._handshake()

    # -- failure handling ---------------------------------------------------

    def _fail(self, message: str, exc: Optional[BaseException] = None) -> RemoteConnectionError:
        """Kill the transport, remember why, and build the error to raise."""
        kill = getattr(self.transport, "kill", self.transport.close)
        try:
            kill()
        except Exception:  # pragma: no cover - best effort
            pass
        code, tail = self.transport.diagnose()
        self.broken = message
        err_cls = type(exc) if isinstance(exc, RemoteConnectionError) else RemoteConnectionError
        return err_cls(message, returncode=code, stderr_tail=tail)

    def _check_usable(self) -> None:
        if self.broken is not None:
            raise RemoteConnectionError(
                f"the connection to {self.target} was lost earlier ({self.broken}); call reconnect()"
            )

    # -- handshake ----------------------------------------------------------

    def _handshake(self) -> Hello:
        scanner = BannerScanner()
        deadline = time.monotonic() + self.connect_timeout
        found = None
        try:
            while found is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TransportTimeout("deadline")
                data = self.transport.read(remaining)
                if not data:
                    code, tail = self.transport.diagnose()
                    why = (
                        self._diagnose_startup(code, tail)
                        if self._diagnose_startup
                        else f"the server at {self.target} exited before its banner"
                    )
                    if scanner.noise:
                        why += f"; it printed {describe_noise(scanner.noise)}"
                    raise self._fail(why)
                found = scanner.feed(data)
        except TransportTimeout:
            noise = scanner.noise
            seen = f"; received only {describe_noise(noise)}" if noise else "; received nothing"
            raise self._fail(
                f"no fleche-remote banner from {self.target} within {self.connect_timeout:g} s{seen}"
            ) from None
        except ProtocolError as exc:
            raise self._fail(str(exc)) from None
        self.noise, version, rest = found
        if self.noise:
            log.warning(
                "skipped %d bytes of login output from %s: %s",
                len(self.noise),
                self.target,
                describe_noise(self.noise),
            )
        try:
            check_version(version)
        except RemoteConnectionError as exc:
            raise self._fail(str(exc), exc) from None
        self._decoder.feed(rest)
        frame = self._next_frame(deadline)
        if frame.type != MSG or not isinstance(frame.message, Hello):
            raise self._fail(f"expected the server's Hello after its banner, got frame type {frame.type}")
        return frame.message

    # -- frames -------------------------------------------------------------

    def _next_frame(self, deadline: Optional[float] = None) -> Frame:
        while True:
            try:
                frame = self._decoder.next_frame()
            except ProtocolError as exc:
                raise self._fail(f"garbage from {self.target}: {exc}") from None
            if frame is not NEED_DATA:
                return frame  # type: ignore[return-value]
            wait = self.timeout if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                data = self.transport.read(wait)
            except TransportTimeout:
                raise self._fail(
                    f"no reply from {self.target} within {wait:g} s (server hung or stopped?); "
                    f"the connection was closed"
                ) from None
            except OSError as exc:
                raise self._fail(f"reading from {self.target} failed: {exc}") from None
            if not data:
                raise self._fail(f"the server at {self.target} closed the connection")
            self._decoder.feed(data)

    def _stream(self, rid: int, header: BlobHeader) -> Iterator[bytes]:
        """DATA payloads of one incoming value, until END."""
        received = 0
        while True:
            frame = self._next_frame()
            if frame.id != rid:
                continue
            if frame.type == DATA:
                received += len(frame.payload)
                yield frame.payload
            elif frame.type == END:
                if received != header.size:
                    raise self._fail(
                        f"value from {self.target} ended after {received} of {header.size} bytes"
                    )
                return
            elif frame.type == ABORT:
                raise _errors.CorruptEntryError(
                    f"the server could not send the value: {frame.payload.decode('utf-8', 'replace')}"
                )
            else:
                raise self._fail(f"expected value data from {self.target}, got a message")

    # -- requests -----------------------------------------------------------

    def request(
        self,
        op: str,
        args: Optional[Dict[str, Any]] = None,
        blobs: Sequence[Tuple[BlobHeader, Blob]] = (),
        consume: Optional[Callable[[Any, List[Tuple[BlobHeader, Iterator[bytes]]]], Any]] = None,
    ) -> Any:
        """Send one request and return its result.

        ``blobs`` stream after the request. When the reply carries value
        streams, ``consume(result, [(header, chunks), ...])`` reads them
        while the connection is held and its return value is returned.

        Raises:
            RemoteConnectionError: the transport died, hung or sent garbage.
            KeyError, Rejected, ...: the operation failed on the server.
        """
        with self._lock:
            self._check_usable()
            rid = self._next_id
            self._next_id = (self._next_id % 0xFFFFFFFF) + 1
            self._send(Request(rid, op, dict(args or {}), [h for h, _ in blobs]), blobs)
            while True:
                frame = self._next_frame()
                if frame.id != rid or frame.type != MSG:
                    continue  # the tail of an abandoned request
                message = frame.message
                if isinstance(message, ErrorResponse):
                    raise rebuild_exception(message)
                if not isinstance(message, Response):
                    raise self._fail(f"expected a reply from {self.target}, got {type(message).__name__}")
                streams = [(h, self._stream(rid, h)) for h in message.blobs]
                if consume is not None:
                    return consume(message.result, streams)
                for _, chunks in streams:  # nobody wants them: keep the wire in step
                    for _ in chunks:
                        pass
                return message.result

    def _send(self, request: Request, blobs: Sequence[Tuple[BlobHeader, Blob]]) -> None:
        head = encode_message(request)
        total = len(head) + sum(h.size for h, _ in blobs)
        started = complete = False
        try:
            with _DeferSigint(total < DEFER_SIGINT_BELOW):
                started = True
                # small frames are gathered into one write; a large chunk goes
                # out on its own, straight from the caller's buffer (no copy)
                pending = bytearray(head)
                for header, blob in blobs:
                    sent = 0
                    for chunk in blob.chunks(CHUNK_SIZE):
                        n = len(chunk)
                        pending += frame_header(DATA, request.id, n)
                        if n <= _GATHER_BELOW:
                            pending += chunk
                        else:
                            self.transport.write(pending, self.timeout)
                            self.transport.write(chunk, self.timeout)
                            pending = bytearray()
                        sent += n
                    if sent != header.size:
                        raise ValueError(f"value produced {sent} bytes, expected {header.size}")
                    pending += encode_end(request.id)
                self.transport.write(pending, self.timeout)
                complete = True
        except RemoteConnectionError as exc:
            raise self._fail(f"sending to {self.target} failed: {exc.args[0]}", exc) from None
        except BaseException:
            if started and not complete:
                # half a request is on the wire: the stream can't be trusted
                self._fail("a request was interrupted while it was being sent")
            raise

    def close(self) -> None:
        with self._lock:
            if self.broken is None:
                self.broken = "closed"
            self.transport.close()
