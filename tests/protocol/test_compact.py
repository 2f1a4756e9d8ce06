"""The fast path of a small request: the compact forms of small messages
(what they encode, what falls back to a pickle, what garbage they refuse,
and that each side uses them only with a peer that speaks them), and a
server that answers a lone small request from whatever input stream."""

from __future__ import annotations

import os
import random
import threading
import time
from typing import Any, Callable, List

import pytest

from fleche_remote import Call
from fleche_remote.caches import Cache
from fleche_remote.errors import ProtocolError
from fleche_remote.remote.connection import Connection
from fleche_remote.remote.protocol import (
    BANNER,
    COMPACT_MAX,
    MSG,
    NEED_DATA,
    PROTOCOL_VERSION,
    BannerScanner,
    BlobHeader,
    ErrorResponse,
    Frame,
    FrameDecoder,
    Hello,
    Request,
    Response,
    encode_compact,
    encode_message,
    frame_header,
)
from fleche_remote.remote.server import serve
from fleche_remote.remote.transport import FdTransport, PipeTransport
from fleche_remote.storage.memory import MemoryCallStore, MemoryValueStore

KEY = "ab" * 32

COMPACT = [
    Request(1, "contains_many", {"keys": [KEY]}),
    Request(2, "contains_many", {"keys": [KEY, "cd" * 32, "short", "é∂ unicode ☃", ""]}),
    Request(3, "ping"),
    Request(0xFFFFFFFF, "load_records", {"keys": [f"{i:064x}" for i in range(100)]}),
    Response(4, [True]),
    Response(5, [False, True, True, False]),
    Response(6, []),
    Response(7),
]

NOT_COMPACT = [
    Request(1, "contains_many", {"keys": ["two\nlines"]}),
    Request(1, "contains_many", {"keys": []}),
    Request(1, "contains_many", {"keys": [KEY], "more": 1}),
    Request(1, "contains_many", {"keys": (KEY,)}),
    Request(1, "contains_many", {"keys": [1]}),
    Request(1, "evict", {"key": KEY}),
    Request(1, "save_records", {"keys": [KEY]}, [BlobHeader("bytes", {}, 1, KEY)]),
    Request(1, "é", {}),
    Request(1, "contains_many", {"keys": ["k" * 64] * (COMPACT_MAX // 64)}),
    Response(1, [True, None]),
    Response(1, [1, 0]),
    Response(1, {"a": 1}),
    Response(1, None, more=True),
    Response(1, None, [BlobHeader("bytes", {}, 1, KEY)]),
    ErrorResponse(1, "KeyError", "'k'", ("k",), ""),
    Hello(PROTOCOL_VERSION, "0", {}),
]


def decode_bytewise(data: bytes, decoder: FrameDecoder) -> List[Frame]:
    frames = []
    for i in range(len(data)):
        decoder.feed(data[i : i + 1])
        while True:
            frame = decoder.next_frame()
            if frame is NEED_DATA:
                break
            frames.append(frame)
    return frames


@pytest.mark.parametrize("message", COMPACT, ids=lambda m: type(m).__name__)
def test_compact_forms_round_trip_fed_one_byte_at_a_time(message: Any) -> None:
    frame = encode_message(message, compact=True)
    assert len(frame) < len(encode_message(message)), "the compact form is the shorter one"
    decoder = FrameDecoder()
    assert [(f.type, f.id, f.message) for f in decode_bytewise(frame, decoder)] == [
        (MSG, message.id, message)
    ]
    assert decoder.compact_seen


@pytest.mark.parametrize("message", NOT_COMPACT, ids=lambda m: type(m).__name__)
def test_messages_without_a_compact_form_travel_as_pickles(message: Any) -> None:
    assert encode_compact(message) is None
    assert encode_message(message, compact=True) == encode_message(message)
    decoder = FrameDecoder()
    decoder.feed(encode_message(message, compact=True))
    frame = decoder.next_frame()
    assert isinstance(frame, Frame) and frame.message == message
    assert not decoder.compact_seen


@pytest.mark.parametrize(
    "payload, says",
    [
        (b"\x05", "unknown compact message tag 0x05"),
        (b"\x00abc", "unknown compact message tag 0x00"),
        (b"\x03\x01\x02", "other than 0 or 1"),
        (b"\x04\x00", "1 more bytes, expected none"),
        (b"\x01\x09ping", "cut inside its operation name"),
        (b"\x01", "unknown compact message tag 0x01 in a 1-byte payload"),
        (b"\x01\x04ping\xff\xfe", "not text"),
        (b"\x01\x02\xc3\xa9" + KEY.encode(), "not text"),
        (b"\x02\x04pingx", "has 1 bytes after its name, expected none"),
        (b"\x01\x04ping" + b"k" * COMPACT_MAX, f"at most {COMPACT_MAX} are allowed"),
    ],
)
def test_malformed_compact_payloads_are_refused_with_what_arrived(payload: bytes, says: str) -> None:
    decoder = FrameDecoder()
    decoder.feed(frame_header(MSG, 3, len(payload)) + payload)
    with pytest.raises(ProtocolError, match=says.replace("(", r"\(")):
        decoder.next_frame()


def test_random_compact_shaped_payloads_decode_or_raise_protocol_error() -> None:
    rng = random.Random(1)
    for _ in range(3000):
        payload = bytes([rng.randrange(0, 6)]) + os.urandom(rng.randrange(0, 40))
        if rng.random() < 0.5 and len(payload) > 1:  # a plausible op length
            payload = payload[:1] + bytes([rng.randrange(0, 8)]) + payload[2:]
        decoder = FrameDecoder()
        decoder.feed(frame_header(MSG, 9, len(payload)) + payload)
        try:
            frame = decoder.next_frame()
        except ProtocolError:
            continue
        assert isinstance(frame, Frame) and isinstance(frame.message, (Request, Response))
        assert frame.message.id == 9


# -- each side uses the compact forms only with a peer that speaks them ---------------


class _PipeServer:
    """``serve`` on a thread over two pipes, spoken to frame by frame."""

    def __init__(self, cache: Any = None) -> None:
        c2s_r, c2s_w = os.pipe()
        s2c_r, s2c_w = os.pipe()
        self.to_server = os.fdopen(c2s_w, "wb", buffering=0)
        self.from_server = os.fdopen(s2c_r, "rb", buffering=0)
        cache = cache or Cache(values=MemoryValueStore(), calls=MemoryCallStore())
        inp, out = os.fdopen(c2s_r, "rb", buffering=0), os.fdopen(s2c_w, "wb", buffering=0)

        def run() -> None:
            try:
                serve(inp, out, cache)
            finally:
                out.close()
                inp.close()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        scanner, found = BannerScanner(), None
        while found is None:
            found = scanner.feed(self.from_server.read(1))
        self.decoder = FrameDecoder()
        self.decoder.feed(found[2])
        self.hello = self.answer()

    def answer(self) -> Any:
        while True:
            frame = self.decoder.next_frame()
            if frame is not NEED_DATA:
                return frame.message
            data = self.from_server.read(1)
            assert data, "the server closed the connection"
            self.decoder.feed(data)

    def close(self) -> None:
        self.to_server.close()
        self.thread.join(30)
        self.from_server.close()


def test_the_server_answers_pickles_until_its_client_speaks_compact() -> None:
    server = _PipeServer()
    try:
        assert "compact_messages" in server.hello.info["features"]
        server.to_server.write(encode_message(Request(1, "contains_many", {"keys": [KEY]})))
        assert server.answer() == Response(1, [False])
        assert not server.decoder.compact_seen, "a client that sent pickles gets pickles back"
        server.to_server.write(encode_message(Request(2, "contains_many", {"keys": [KEY, KEY]}), True))
        assert server.answer() == Response(2, [False, False])
        assert server.decoder.compact_seen
        server.to_server.write(encode_message(Request(3, "ping"), True))
        assert server.answer() == Response(3)
        server.to_server.write(encode_message(Request(4, "no_such_op"), True))
        error = server.answer()
        assert isinstance(error, ErrorResponse) and "unknown operation 'no_such_op'" in error.message
    finally:
        server.close()


class _FailingLookups(Cache):
    def contains_many(self, keys: Any) -> List[bool]:
        raise OSError(f"the disk went away while looking up {len(keys)} key(s)")


def test_a_lookup_is_answered_from_the_store_and_a_strange_one_by_the_generic_path() -> None:
    """The server answers a plain lookup straight from the store; its
    answers, and its errors, are those of the generic path, which still
    takes any lookup that is not a plain list of str keys."""
    cache = Cache(values=MemoryValueStore(), calls=MemoryCallStore())
    key = str(cache.save(Call("f", {"x": 1}, 1.0)))
    server = _PipeServer(cache)
    try:
        lookups = [
            ({"keys": [key, KEY]}, True),
            ({"keys": [key]}, False),
            ({"keys": [key], "ignored": 1}, False),
        ]
        for rid, (args, compact) in enumerate(lookups, start=1):
            server.to_server.write(encode_message(Request(rid, "contains_many", args), compact))
            assert server.answer() == Response(rid, [True, False][: len(args["keys"])])
        server.to_server.write(encode_message(Request(9, "contains_many", {"keys": [1]})))
        error = server.answer()
        assert isinstance(error, ErrorResponse) and "'keys' must be a list of str" in error.message
    finally:
        server.close()

    failing = _PipeServer(_FailingLookups(values=MemoryValueStore(), calls=MemoryCallStore()))
    try:
        failing.to_server.write(encode_message(Request(1, "contains_many", {"keys": [KEY]}), True))
        error = failing.answer()
        assert isinstance(error, ErrorResponse) and error.type == "OSError"
        assert "the disk went away while looking up 1 key(s)" in error.message
        failing.to_server.write(encode_message(Request(2, "ping"), True))
        assert failing.answer() == Response(2)  # and the connection goes on
    finally:
        failing.close()


def _scripted_server(
    inp: Any, out: Any, version: str, features: List[str], answer: Callable[[FrameDecoder, Any], None]
) -> None:
    """A server written by hand: its Hello lists ``features``, and each
    frame that arrives goes to ``answer`` (with the decoder that read it)."""
    out.write(BANNER + encode_message(Hello(PROTOCOL_VERSION, version, {"features": features})))
    decoder = FrameDecoder()
    while True:
        data = inp.read1(1 << 16) if hasattr(inp, "read1") else inp.read(1 << 16)
        if not data:
            return
        decoder.feed(data)
        while (frame := decoder.next_frame()) is not NEED_DATA:
            answer(decoder, frame)


def test_a_client_sends_pickles_to_a_server_that_does_not_announce_compact() -> None:
    """An older server: its Hello does not list ``compact_messages``, and a
    compact request would end its connection."""
    seen: List[Any] = []

    def old_server(inp: Any, out: Any) -> None:
        def answer(decoder: FrameDecoder, frame: Any) -> None:
            seen.append((decoder.compact_seen, frame.message))
            out.write(encode_message(Response(frame.id, [True] * len(frame.message.args["keys"]))))

        _scripted_server(inp, out, "0.0.old", ["small_entries"], answer)

    conn = Connection(PipeTransport(old_server), target="old", timeout=30, connect_timeout=30)
    try:
        assert conn.request("contains_many", {"keys": [KEY]}) == [True]
        assert conn.request("contains_many", {"keys": [KEY, KEY]}) == [True, True]
        assert conn.contains(KEY) is True  # the lookup lane's entry, with no lane to take
    finally:
        conn.close()
    assert [compact for compact, _ in seen] == [False, False, False]


# -- the server reads what is there, whatever its input stream -------------------------


@pytest.mark.parametrize("buffering", [0, 1 << 16], ids=["raw", "buffered"])
def test_the_server_answers_a_request_without_waiting_for_a_full_read_buffer(buffering: int) -> None:
    """The server reads into a 1 MiB buffer of its own; a call that fills
    it (a buffered stream's ``readinto``) would wait for a megabyte that a
    lone 90-byte lookup never brings. Raw and buffered pipes answer alike."""
    c2s_r, c2s_w = os.pipe()
    s2c_r, s2c_w = os.pipe()
    inp = os.fdopen(c2s_r, "rb", buffering=buffering)
    out = os.fdopen(s2c_w, "wb", buffering=0)
    cache = Cache(values=MemoryValueStore(), calls=MemoryCallStore())
    thread = threading.Thread(target=lambda: serve(inp, out, cache), daemon=True)
    thread.start()
    answers: List[Any] = []
    try:
        os.write(c2s_w, encode_message(Request(1, "contains_many", {"keys": [KEY]}), True))
        reader = threading.Thread(target=lambda: answers.append(_first_answer(s2c_r)), daemon=True)
        reader.start()
        reader.join(30)
        assert answers == [Response(1, [False])], "no answer within 30 s: the server waited for more input"
    finally:
        os.close(c2s_w)
        thread.join(30)
        for f in (inp, out):
            f.close()
        os.close(s2c_r)
    assert not thread.is_alive()


def _first_answer(fd: int) -> Any:
    scanner, found = BannerScanner(), None
    while found is None:
        found = scanner.feed(os.read(fd, 1 << 16))
    decoder = FrameDecoder()
    decoder.feed(found[2])
    messages = []
    while len(messages) < 2:  # the Hello, then the answer
        frame = decoder.next_frame()
        if frame is NEED_DATA:
            decoder.feed(os.read(fd, 1 << 16))
        else:
            messages.append(frame.message)
    return messages[1]


def test_a_transport_writes_every_byte_of_a_value_whose_items_are_wider_than_a_byte() -> None:
    """A value chunk may be a memoryview of float64s: its length counts
    items, not bytes (here 1 Mi of them, 8 MiB: more than the pipe holds,
    so the first write is partial), and every byte must still go out."""
    received = bytearray()

    def sink(inp: Any, out: Any) -> None:
        while True:
            data = inp.read(1 << 16)
            if not data:
                return
            received.extend(data)

    values = memoryview(bytearray(range(256)) * 32768).cast("d")
    transport = PipeTransport(sink)
    try:
        transport.write(values, 30)
        transport.write(b"end", 30)
    finally:
        transport.close()
    assert received == values.tobytes() + b"end"


def test_a_small_frame_goes_into_a_pipe_whole_or_not_at_all() -> None:
    """``write_atomic`` (a small request's write, with no Ctrl-C deferral
    around it) never leaves part of a frame behind: into a pipe, up to
    PIPE_BUF bytes, it writes all or nothing, also once the pipe is full;
    a larger frame, or a socket (which may split any write), is refused
    with nothing written, for the caller's ordinary write."""
    import select
    import socket

    go = threading.Event()
    received = bytearray()

    def sink(inp: Any, out: Any) -> None:
        go.wait(60)
        while True:
            data = inp.read(1 << 16)
            if not data:
                return
            received.extend(data)

    transport = PipeTransport(sink)
    frames = []
    try:
        assert not transport.write_atomic(b"x" * (select.PIPE_BUF + 1))
        for i in range(100_000):  # until the pipe is full (the sink is not reading yet)
            frame = bytes([i % 251]) * select.PIPE_BUF
            if not transport.write_atomic(frame):
                break
            frames.append(frame)
        else:
            raise AssertionError("the pipe never filled up")
        go.set()
        transport.write(b"end", 30)
    finally:
        go.set()
        transport.close()
    assert len(frames) > 1
    assert received == b"".join(frames) + b"end"

    a, b = socket.socketpair()
    try:
        over_socket = FdTransport(b.fileno(), a.fileno())
        assert not over_socket.write_atomic(b"small")
        a.setblocking(True)
        b.setblocking(False)
        with pytest.raises(BlockingIOError):
            b.recv(16)  # nothing was written
    finally:
        a.close()
        b.close()


def test_a_lone_request_reads_for_the_threads_that_come_after_it() -> None:
    """A request sent while no other is in flight reads its own answer (it
    leads from the start); a second thread's request sent meanwhile waits
    for that reader. Here the server answers the second request first, then
    the first with an error and a third with a value: each thread gets its
    own answer, and the connection is in step afterwards."""
    arrived: List[Request] = []
    both = threading.Event()

    def reordering_server(inp: Any, out: Any) -> None:
        def answer(decoder: FrameDecoder, frame: Any) -> None:
            arrived.append(frame.message)
            if len(arrived) == 2:
                first, second = arrived
                out.write(encode_message(Response(second.id, "second's"), True))
                error = ErrorResponse(first.id, "KeyError", "first's", ("first's",))
                out.write(encode_message(error, True))
                both.set()
            elif len(arrived) > 2:
                out.write(encode_message(Response(frame.id, f"{frame.message.op}'s"), True))

        _scripted_server(inp, out, "test", ["compact_messages"], answer)

    conn = Connection(PipeTransport(reordering_server), target="test", timeout=30, connect_timeout=30)
    outcome: List[Any] = []

    def second() -> None:
        outcome.append(conn.request("second"))

    try:
        conn.hello  # noqa: B018 - the handshake first: lone requests start after it
        with pytest.raises(KeyError, match="first's"):
            helper = threading.Timer(0.0, lambda: (_wait_for(lambda: conn.in_flight == 1), second()))
            helper.start()
            conn.request("first")
        helper.join(30)
        assert both.is_set() and outcome == ["second's"]
        assert conn.in_flight == 0
        assert conn.request("third") == "third's"
    finally:
        conn.close()


def _wait_for(condition: Any, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {seconds} s")
        time.sleep(0.001)


def test_two_threads_may_wait_on_one_transport_at_once() -> None:
    """The wait for an answer polls a poll object registered once; a second
    thread waiting at the same time (a start-up that reads its status line
    while the leader waits) must not trip over it, and both wake when
    bytes arrive."""
    r, w = os.pipe()
    transport = FdTransport(r, w)  # reads what it writes to itself
    first_woke = threading.Event()

    def first() -> None:
        transport.wait_readable(60)
        first_woke.set()

    waiter = threading.Thread(target=first, daemon=True)
    waiter.start()
    try:
        deadline = time.monotonic() + 60
        while True:  # until the first thread is inside poll() on the shared object
            try:
                transport._poll.poll(0)  # type: ignore[union-attr]
            except RuntimeError:
                break
            assert time.monotonic() < deadline, "the first waiter never started polling"
            time.sleep(0.001)
        threading.Timer(0.05, lambda: os.write(w, b"x")).start()
        transport.wait_readable(60)  # the second waiter, while the first still polls
        assert first_woke.wait(60)
        assert transport.read_ready() == b"x"
    finally:
        os.close(r)
        os.close(w)
