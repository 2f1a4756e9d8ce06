"""The client's side of one connection: handshake, pipelined requests, replies.

It owns a :class:`~fleche_remote.remote.transport.Transport` and the
protocol state on top of it. Many threads may have requests in flight on
it at once; replies are matched to requests by id.

How replies find their request (the "leader/follower" pattern): there is
no reader thread. A thread waiting for its reply becomes the *leader* if
nobody is reading: it reads from the transport, decodes frames and files
each under the request it belongs to, waking that request's thread, until
a frame for its own request arrives; then it hands leadership to whoever
still waits. A single-threaded caller therefore reads its own replies
directly, with no thread switch on the hot path, while threads that share
the connection never wait for each other's round trips. A request sent
while no other is in flight leads from the start and takes its own frames
without filing them (``_alone``): the common case pays for no sharing.

Bounds, so that a fast producer cannot exhaust memory on either side:

* at most ``MAX_IN_FLIGHT`` requests are outstanding; the next one waits;
* value streams to the server are sent one at a time (small requests may
  pass between their chunks), which is what lets the server take uploads
  in order with a bounded queue;
* frames queued for a request whose thread has not taken them yet are
  capped at ``MAX_QUEUED_BYTES``: the leader stops reading until that
  thread catches up (it needs no leadership to do so);
* paged answers are flow-controlled with credits (see the protocol notes).

Failure policy: anything that leaves the stream in an unknown state (a
timeout, garbage, an interrupted write, the peer exiting) kills the
transport and fails every request in flight with the same
:class:`~fleche_remote.errors.RemoteConnectionError`; later requests raise
it too until the owner reconnects explicitly. Nothing reconnects silently:
that would repeat a 2FA prompt behind the user's back. A request abandoned
by its caller (Ctrl-C while waiting) leaves the connection usable: its
remaining frames are skipped, and a value stream is cancelled.

What each request is owed (the frames filed under it, the reader of its
answer, remote errors rebuilt) is :mod:`~fleche_remote.remote.exchange`.
"""

from __future__ import annotations

import collections
import copy
import logging
import threading
import time
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

from ..codec.values import Blob
from ..errors import ProtocolError, RemoteConnectionError
from .exchange import Exchange, Pending, frame_size
from .exchange import rebuild_exception as rebuild_exception  # still importable from here
from .protocol import (
    COMPACT_FEATURE,
    LOOKUP_OP,
    MSG,
    NEED_DATA,
    BannerScanner,
    BlobHeader,
    Frame,
    FrameDecoder,
    Hello,
    Request,
    Response,
    check_version,
    describe_noise,
    encode_lookup,
    encode_message,
)
from .sending import RequestWriter
from .transport import Transport, TransportTimeout

log = logging.getLogger("fleche_remote.client")

#: Outstanding requests per connection. 64 keeps a 20 ms link busy at
#: ~3000 small requests/s from many threads while bounding what a server
#: may have queued for us.
MAX_IN_FLIGHT = 64

#: Received frames waiting for a thread that has not taken them yet. Past
#: this the leader pauses reading (a slow consumer slows the connection
#: down; it never grows our memory).
MAX_QUEUED_BYTES = 32 << 20

#: How often a waiting thread re-checks the connection while another
#: thread leads (the leader enforces the real deadline).
_FOLLOW_SLICE = 0.5


class Connection:
    """Protocol state over one live transport (see the module notes).

    Construction does not wait for the server: the first request goes out
    at once, and its answer arrives right behind the server's banner.

    Args:
        transport: the byte pipe, already started.
        target: how to name the peer in messages (``host`` for ssh).
        timeout: seconds any single wait may last once connected.
        connect_timeout: seconds for the banner and ``Hello`` to arrive.
        diagnose_startup: turns (exit code, stderr lines) of a peer that
            died before its banner into a helpful message.
        on_hello: called once with the server's ``Hello`` (version checks).
        on_noise: called once with what a login shell printed before the
            banner, if anything (the owner decides how loudly to report
            it); without it, the noise is logged at INFO.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        target: str,
        timeout: float,
        connect_timeout: float,
        diagnose_startup: Optional[Callable[[Optional[int], List[str]], str]] = None,
        on_hello: Optional[Callable[[Hello], None]] = None,
        on_noise: Optional[Callable[[bytes], None]] = None,
    ) -> None:
        self.transport = transport
        self.target = target
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._diagnose_startup = diagnose_startup
        self._on_hello = on_hello
        self._on_noise = on_noise
        self._decoder = FrameDecoder(check_budget=False)  # see FrameDecoder: the server is trusted
        self._scanner: Optional[BannerScanner] = BannerScanner()
        self._started = time.monotonic()
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._writer = RequestWriter(transport, timeout, self.fail)
        self._waiting = 0  # threads in self._cond.wait(): nobody to wake, no notify
        self._pending: Dict[int, Pending] = {}
        self._queued_total = 0
        self._leading = False
        self._leader = 0  # thread ident of the leader, to spot a flag left by Ctrl-C
        # the lone request whose thread leads (see _alone): its id (-1: none;
        # never a frame's) and where its frames go, no lock taken
        self._lone_rid = -1
        self._lone_frames: Deque[Frame] = collections.deque()
        self._lone_found: Optional[List[bool]] = None  # its answer when read whole as a list of bools
        self._last_taken = time.monotonic()  # when a waiting thread last took a frame
        self._next_id = 1
        self._hello: Optional[Hello] = None
        self._compact = False  # the server decodes compact messages (its Hello says so)
        self.broken: Optional[str] = None
        self._error: Optional[RemoteConnectionError] = None
        self.noise = b""
        #: requests sent so far (one-way ones included): round trips are
        #: what a slow link charges for, so tests and benchmarks count them.
        self.requests_sent = 0

    # -- failure handling ---------------------------------------------------

    def fail(self, message: str, exc: Optional[BaseException] = None) -> RemoteConnectionError:
        """Kill the transport, remember why, wake every waiter; the error to raise."""
        with self._cond:
            if self._error is not None:
                return self._error
        kill = getattr(self.transport, "kill", self.transport.close)
        try:
            kill()
        except Exception:  # pragma: no cover - best effort
            pass
        code, tail = self.transport.diagnose()
        err_cls = type(exc) if isinstance(exc, RemoteConnectionError) else RemoteConnectionError
        err = err_cls(message, returncode=code, stderr_tail=tail)
        with self._cond:
            if self._error is None:
                self.broken = message
                self._error = err
            self._cond.notify_all()
            return self._error

    def _check_usable(self) -> None:
        if self.broken is not None:
            raise RemoteConnectionError(
                f"the connection to {self.target} was lost earlier ({self.broken}); call reconnect()",
                returncode=self._error.returncode if self._error else None,
                stderr_tail=self._error.stderr_tail if self._error else (),
            )

    # -- the handshake --------------------------------------------------------

    @property
    def hello(self) -> Hello:
        """The server's ``Hello`` (waits for it if it has not arrived yet)."""
        if self._hello is None:
            self.next_frame(None)
        assert self._hello is not None
        return self._hello

    @property
    def hello_received(self) -> bool:
        return self._hello is not None

    @property
    def in_flight(self) -> int:
        """Requests sent whose answers are not all read yet."""
        return len(self._pending)

    def _take_banner(self, data: bytes) -> bytes:
        """Feed bytes before the banner; returns what follows it, once found."""
        assert self._scanner is not None
        try:
            found = self._scanner.feed(data)
        except ProtocolError as exc:
            raise self.fail(str(exc)) from None
        if found is None:
            return b""
        self.noise, version, rest = found
        self._scanner = None
        if self.noise and self._on_noise is not None:
            self._on_noise(self.noise)
        elif self.noise:
            log.info(
                "skipped %d bytes of login output from %s: %s",
                len(self.noise),
                self.target,
                describe_noise(self.noise),
            )
        try:
            check_version(version)
        except RemoteConnectionError as exc:
            raise self.fail(str(exc), exc) from None
        return rest

    def _startup_failure(self, why_eof: bool) -> RemoteConnectionError:
        noise = self._scanner.noise if self._scanner is not None else b""
        if why_eof:
            code, tail = self.transport.diagnose()
            why = (
                self._diagnose_startup(code, tail)
                if self._diagnose_startup
                else f"the server at {self.target} exited before its banner"
            )
            if noise:
                why += f"; it printed {describe_noise(noise)}"
            return self.fail(why)
        seen = f"; received only {describe_noise(noise)}" if noise else "; received nothing"
        return self.fail(
            f"no fleche-remote banner from {self.target} within {self.connect_timeout:g} s{seen}"
        )

    # -- reading (by whichever thread leads) ----------------------------------

    def _read_some(self) -> None:
        """Read once from the transport and file every complete frame.

        Only the wait for data may be interrupted harmlessly; an interrupt
        (Ctrl-C) after bytes left the pipe but before they were filed
        would leave the stream out of step, so it closes the connection.
        """
        if self._hello is None:
            wait = max(0.0, self._started + self.connect_timeout - time.monotonic())
        else:
            wait = self.timeout
        try:
            self.transport.wait_readable(wait)
        except TransportTimeout:
            if self._hello is None:
                raise self._startup_failure(False) from None
            raise self.fail(
                f"no reply from {self.target} within {wait:g} s (server hung or stopped?); "
                f"the connection was closed"
            ) from None
        try:
            claim = self._decoder.claim_payload() if self._scanner is None else None
            if claim is not None:
                self._fill(claim[0], claim[1], wait)
                self._file_frames(self._next_frame())
            else:
                data = self.transport.read_ready()
                if data is None:
                    return
                if not data:
                    if self._hello is None:
                        raise self._startup_failure(True)
                    raise self.fail(f"the server at {self.target} closed the connection")
                if self._scanner is not None:
                    data = self._take_banner(data)
                    if not data:
                        return
                elif self._lone_rid >= 0:
                    found = self._decoder.found_from(data, self._lone_rid)
                    if found is not None:  # the lone request's answer, read whole (the lookup lane)
                        self._lone_found = found
                        return
                try:
                    frame = self._decoder.next_frame_from(data)
                except ProtocolError as exc:
                    raise self.fail(f"garbage from {self.target}: {exc}") from None
                self._file_frames(frame)
        except RemoteConnectionError:
            raise
        except OSError as exc:
            raise self.fail(f"reading from {self.target} failed: {exc}") from None
        except BaseException:
            self.fail("a reply was interrupted while it was being read")
            raise

    def _fill(self, buf: bytearray, have: int, wait: float) -> None:
        """Read the rest of a big payload straight into its buffer."""
        view = memoryview(buf)
        while have < len(buf):
            n = self.transport.readinto_ready(view[have:])
            if n is None:
                try:
                    self.transport.wait_readable(wait)
                except TransportTimeout:
                    raise self.fail(
                        f"no reply from {self.target} within {wait:g} s (server hung or stopped?); "
                        f"the connection was closed"
                    ) from None
                continue
            if n == 0:
                raise self.fail(f"the server at {self.target} closed the connection")
            have += n
        self._decoder.feed_claimed(buf)

    def _next_frame(self) -> Any:
        try:
            return self._decoder.next_frame()
        except ProtocolError as exc:
            raise self.fail(f"garbage from {self.target}: {exc}") from None

    def _file_frames(self, frame: Any) -> None:
        """File ``frame`` (the decoder's next, maybe ``NEED_DATA``) and every
        complete one after it."""
        while True:
            if frame is NEED_DATA:
                return
            assert isinstance(frame, Frame)
            if frame.id == self._lone_rid:
                self._lone_frames.append(frame)  # its own thread reads it: no lock, counted when it lets go
                frame = self._next_frame()
                continue
            if self._hello is None:
                if frame.type != MSG or not isinstance(frame.message, Hello):
                    raise self.fail(
                        f"expected the server's Hello after its banner, got frame type {frame.type}"
                    )
                self._hello = frame.message
                info = frame.message.info
                features = info.get("features") if isinstance(info, dict) else None
                self._compact = isinstance(features, list) and COMPACT_FEATURE in features
                if self._on_hello is not None:
                    self._on_hello(frame.message)
                with self._cond:
                    self._cond.notify_all()
                frame = self._next_frame()
                continue
            with self._cond:
                pending = self._pending.get(frame.id)
                if pending is not None:  # else the tail of an abandoned request
                    size = frame_size(frame)
                    pending.frames.append(frame)
                    pending.queued += size
                    self._queued_total += size
                    self._wake()
            frame = self._next_frame()

    def next_frame(self, pending: Optional[Pending]) -> Optional[Frame]:
        """The next frame for ``pending`` (or, with ``None``, the Hello)."""
        while True:
            abandoned = False
            with self._cond:
                while True:
                    if pending is not None and pending.frames:
                        frame = pending.frames.popleft()
                        size = frame_size(frame)
                        pending.queued -= size
                        self._queued_total -= size
                        self._last_taken = time.monotonic()
                        self._wake()
                        return frame
                    if pending is None and self._hello is not None:
                        return None
                    if self._error is not None:
                        raise copy.copy(self._error)
                    if self._leading and self._leader == threading.get_ident():
                        self._leading = False  # Ctrl-C hit this thread between leading and letting go
                    if not self._leading and self._queued_total < MAX_QUEUED_BYTES:
                        self._leading = True
                        self._leader = threading.get_ident()
                        break
                    if self._queue_abandoned():
                        abandoned = True
                        break
                    self._wait()
            if abandoned:  # outside the lock: _fail takes it
                raise self.fail(
                    f"replies from {self.target} filled the queue and nobody took them for "
                    f"{self.timeout:g} s (a request abandoned mid-answer?); the connection was closed"
                )
            try:
                self._lead(pending)
            finally:
                with self._cond:
                    self._leading = False
                    self._wake()

    def _wake(self) -> None:
        """Wake the threads waiting on ``_cond`` (held), if there are any."""
        if self._waiting:
            self._cond.notify_all()

    def _wait(self) -> None:
        """Wait on ``_cond`` (held) for a change, or a slice of time."""
        self._waiting += 1
        try:
            self._cond.wait(_FOLLOW_SLICE)
        finally:
            self._waiting -= 1

    def _queue_abandoned(self) -> bool:
        """The queue is full and no thread has taken a frame for ``timeout``:
        its frames belong to a request nobody reads (one that Ctrl-C cut
        off before its answer was forgotten), so reading can never resume."""
        return (
            self._queued_total >= MAX_QUEUED_BYTES
            and not self._leading
            and time.monotonic() - self._last_taken > self.timeout
        )

    def _lead(self, pending: Optional[Pending]) -> None:
        """Read until ``pending`` has a frame (or the Hello is in)."""
        while True:
            if pending is not None and pending.frames:
                return
            if pending is None and self._hello is not None:
                return
            if self._queued_total >= MAX_QUEUED_BYTES:
                return  # let the consumers catch up before reading more
            self._read_some()

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
        and its return value is returned.

        Raises:
            RemoteConnectionError: the transport died, hung or sent garbage.
            KeyError, Rejected, ...: the operation failed on the server.
        """
        if not blobs:
            alone = self._alone(op, args)
            if alone is not None:
                plain, answer = alone
                if not plain:
                    return self.answer(answer, consume)
                return answer if consume is None else consume(answer, [])
        return self.answer(self.exchange(op, args, blobs), consume)

    def contains(self, key: str) -> bool:
        """``request(LOOKUP_OP, {"keys": [key]})[0]``, the commonest request,
        by the lookup lane (see the protocol module) when it goes alone."""
        args = {"keys": [key]}
        alone = self._alone(LOOKUP_OP, args, key)
        if alone is None:
            found = self.answer(self.exchange(LOOKUP_OP, args), None)
        else:
            plain, found = alone
            if not plain:
                found = self.answer(found, None)
        return found[0]  # type: ignore[no-any-return]

    def answer(self, exchange: Exchange, consume: Optional[Callable[..., Any]] = None) -> Any:
        """The result of ``exchange`` (read by ``consume`` with its value
        streams, if given); the request is forgotten, whatever happens."""
        with exchange as reply:
            message = reply.first()
            streams = [(h, reply.stream(h)) for h in message.blobs]
            if consume is not None:
                return consume(message.result, streams)
            for _, chunks in streams:  # nobody wants them: keep the wire in step
                for _ in chunks:
                    pass
            return message.result

    def _alone(
        self, op: str, args: Optional[Dict[str, Any]], lookup: Optional[str] = None
    ) -> Optional[Tuple[bool, Any]]:
        """A request while no other is in flight: its thread leads from the
        start and reads its answer with no lock taken per frame, and a plain
        answer (a result, no values, no pages) is returned as it arrives.

        A single-threaded caller's requests all go this way; per request it
        takes the connection's lock three times instead of six, and builds
        no :class:`Exchange` (client Python per request 8.5 -> 6.5 us, on a
        fake transport). ``None`` when others are in flight (use
        :meth:`exchange`); ``(True, result)``; or ``(False, exchange)`` for
        an answer the general reader takes from here (an error, values,
        pages), its frames counted in the queue like any other's. With
        ``lookup``, the request is a :data:`LOOKUP_OP` of that one key, sent
        and answered by the lookup lane where the compact forms allow.
        """
        if self.broken is not None:
            self._check_usable()
        with self._mutex:  # the condition's lock, without its Python-level __enter__
            if self._pending or self._leading or self._hello is None:
                return None
            rid = self._next_id
            self._next_id = (rid % 0xFFFFFFFF) + 1
            self.requests_sent += 1
            pending = self._pending[rid] = Pending(rid)
            frames = self._lone_frames = pending.frames
            self._lone_rid = rid
            self._lone_found = None
            self._leading = True
            self._leader = threading.get_ident()
        plain, result = False, None  # a plain answer (a result, no values, no pages) and its result
        try:
            try:
                head = encode_lookup(rid, lookup) if lookup is not None and self._compact else None
                if head is None:
                    head = encode_message(Request(rid, op, args), self._compact)  # now: args not copied
                try:
                    self._writer.small(head)
                except RemoteConnectionError as exc:
                    raise self._send_failed(exc) from None
                while not frames and self._lone_found is None and self._queued_total < MAX_QUEUED_BYTES:
                    self._read_some()
            finally:
                with self._mutex:
                    self._lone_rid = -1
                    self._leading = False
                    if self._lone_found is not None:  # read whole by the lookup lane
                        plain, result, self._lone_found = True, self._lone_found, None
                    elif len(frames) == 1:
                        frame = frames[0]
                        message = frame.message
                        if type(message) is Response and frame.type == MSG and not message.blobs:
                            plain, result = not message.more, message.result
                    if plain:
                        del self._pending[rid]
                    else:  # the general reader's bookkeeping from here on
                        for frame in frames:
                            size = frame_size(frame)
                            pending.queued += size
                            self._queued_total += size
                    if self._waiting:
                        self._cond.notify_all()
        except BaseException:
            with Exchange(self, pending):  # forgets it, and stops an answer nobody reads
                raise
        if plain:
            return True, result
        return False, Exchange(self, pending)

    def exchange(
        self, op: str, args: Optional[Dict[str, Any]] = None, blobs: Sequence[Tuple[BlobHeader, Blob]] = ()
    ) -> Exchange:
        """Send a request; the returned context manager reads its answer."""
        exchange = self._exchange(op, args, blobs, wait=True)
        assert exchange is not None
        return exchange

    def try_exchange(self, op: str, args: Dict[str, Any]) -> Optional[Exchange]:
        """:meth:`exchange` if one of the ``MAX_IN_FLIGHT`` slots is free
        now, else ``None`` (nothing sent)."""
        return self._exchange(op, args, (), wait=False)

    def _exchange(
        self, op: str, args: Optional[Dict[str, Any]], blobs: Sequence[Tuple[BlobHeader, Blob]], wait: bool
    ) -> Optional[Exchange]:
        """:meth:`exchange`; with ``wait=False``, ``None`` (nothing sent)
        when all ``MAX_IN_FLIGHT`` slots are taken."""
        self._check_usable()
        with self._cond:
            if len(self._pending) >= MAX_IN_FLIGHT:
                if not wait:
                    return None
                self._wait_for_slot()
            rid = self._next_id
            self._next_id = (self._next_id % 0xFFFFFFFF) + 1
            self.requests_sent += 1
            pending = Pending(rid)
            self._pending[rid] = pending  # holds one of the MAX_IN_FLIGHT slots until released
        try:
            self._send(Request(rid, op, dict(args or {}), [h for h, _ in blobs]), blobs)
        except BaseException:
            self._forget(pending)
            raise
        return Exchange(self, pending)

    def _wait_for_slot(self) -> None:
        """Wait (holding ``_cond``) until fewer than ``MAX_IN_FLIGHT`` requests are in flight."""
        deadline = time.monotonic() + max(self.timeout, self.connect_timeout)
        while len(self._pending) >= MAX_IN_FLIGHT:
            self._check_usable()
            if time.monotonic() > deadline:
                raise RemoteConnectionError(
                    f"{MAX_IN_FLIGHT} requests to {self.target} stayed unanswered for {self.timeout:g} s"
                )
            self._wait()

    def send_one_way(self, op: str, args: Dict[str, Any]) -> None:
        """A request the server acts on without answering (credit, cancel)."""
        if self.broken is not None:
            return
        with self._cond:
            rid = self._next_id
            self._next_id = (self._next_id % 0xFFFFFFFF) + 1
            self.requests_sent += 1
        self._send(Request(rid, op, args, []), ())

    def release(self, pending: Pending) -> None:
        """Forget ``pending`` (its remaining frames are skipped) and free
        its slot among the requests in flight."""
        self._forget(pending)

    def _forget(self, pending: Pending) -> None:
        with self._cond:
            if self._pending.pop(pending.rid, None) is not None:
                self._queued_total -= pending.queued
                pending.frames.clear()
                pending.queued = 0
                self._wake()

    def _send(self, request: Request, blobs: Sequence[Tuple[BlobHeader, Blob]]) -> None:
        head = encode_message(request, self._compact)
        try:
            if blobs:
                self._writer.with_values(request.id, head, blobs)
            else:
                self._writer.small(head)
        except RemoteConnectionError as exc:
            raise self._send_failed(exc) from None

    def _send_failed(self, exc: RemoteConnectionError) -> RemoteConnectionError:
        if self._hello is None and self._error is None:
            # the peer died before its banner: say why rather than "broken pipe"
            try:
                self.next_frame(None)
            except RemoteConnectionError as startup:
                return startup
        return self.fail(f"sending to {self.target} failed: {exc.args[0]}", exc)

    def close(self) -> None:
        with self._cond:
            if self.broken is None:
                self.broken = "closed"
                self._error = RemoteConnectionError(f"the connection to {self.target} was closed")
            self._cond.notify_all()
        self.transport.close()
