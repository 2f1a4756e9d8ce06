"""Hostile input, fuzzed with hypothesis: the frame decoder and the server.

The properties, for any bytes a client (or a broken link) can send:

* the decoder returns frames or ``NEED_DATA``, or raises ``ProtocolError``,
  nothing else, and never buffers more than it was fed (a huge announced
  length is refused before anything is allocated);
* the server (``serve`` in this process, over byte streams) answers every
  request it reads with a ``Response`` or an ``ErrorResponse``, or stops
  with ``ProtocolError`` (``python -m fleche_remote serve`` turns that into
  a one-line message and a clean exit); it never raises anything else;
* what was stored before is still there, byte for byte, and nothing has
  been written outside the store.

Runs are derandomized and bounded (``max_examples``), with no deadline, so
they are reproducible and do not flake on a loaded machine. A handful of
the same inputs also go through the real sshd in
``tests/faults/test_hostile_ssh.py``.
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path
from typing import Any, Dict, List, Sequence, Set, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleche_remote.caches import Cache
from fleche_remote.call import Call, CallRecord
from fleche_remote.codec.plain import dumps_plain
from fleche_remote.errors import ProtocolError
from fleche_remote.remote.handlers import READ_HANDLERS, WRITE_HANDLERS
from fleche_remote.remote.protocol import (
    ABORT,
    BANNER,
    DATA,
    END,
    HEADER_SIZE,
    MARKER,
    MSG,
    NEED_DATA,
    BlobHeader,
    ErrorResponse,
    FrameDecoder,
    Hello,
    Inline,
    Request,
    Response,
    encode_abort,
    encode_end,
    encode_message,
    frame_header,
)
from fleche_remote.remote.server import serve
from fleche_remote.storage.file import FileCallStore, FileValueStore
from fleche_remote.storage.memory import MemoryCallStore, MemoryValueStore
from fleche_remote.storage.sql.stores import SqlCallStore

FUZZ = settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

#: Strings a hostile client would try: path escapes, NUL bytes, SQL LIKE
#: wildcards (a prefix of ``%`` must not match every key), case games.
HOSTILE_STRINGS = [
    "../",
    "../../etc/passwd",
    "/etc/passwd",
    "ab/../..",
    "a\x00b",
    "\x00",
    "%",
    "_",
    "a%",
    "_b",
    "%%",
    "a_c%",
    "..",
    ".",
    "",
    "AB" * 32,
    "ab" * 33,
    "é" * 10,
]

hostile_text = st.sampled_from(HOSTILE_STRINGS) | st.text(max_size=24)

plain = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | hostile_text | st.binary(max_size=32),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(hostile_text, inner, max_size=4),
    max_leaves=12,
)

ARG_NAMES = [
    "keys", "key", "prefix", "digest", "digests", "records", "inline",
    "name", "page", "window", "metadata", "arg_digests", "n", "id", "type", "message",
]  # fmt: skip

records = st.builds(
    CallRecord,
    key=hostile_text,
    name=hostile_text,
    version=st.none() | hostile_text,
    arguments=st.binary(max_size=16),
    arg_digests=st.dictionaries(hostile_text, hostile_text, max_size=2),
    metadata=st.dictionaries(hostile_text, plain, max_size=2),
    value=hostile_text,
)
inlines = st.builds(
    Inline, kind=hostile_text, meta=st.dictionaries(hostile_text, plain, max_size=2), body=st.binary()
)

arg_values = (
    plain
    | st.lists(hostile_text, max_size=4)
    | st.lists(records, max_size=3)
    | st.lists(st.none() | inlines, max_size=3)
)
arguments = st.dictionaries(st.sampled_from(ARG_NAMES) | hostile_text, arg_values, max_size=4)

READ_OPS = sorted(READ_HANDLERS)
ALL_OPS = READ_OPS + sorted(WRITE_HANDLERS)


def requests(ops: Sequence[str]) -> st.SearchStrategy[List[Tuple[str, Any, Any, List[int]]]]:
    """Lists of (op, args, blob sizes announced, chunk sizes actually sent)."""
    op = st.sampled_from(list(ops)) | hostile_text | st.sampled_from(["credit", "cancel", "debug_raise"])
    one = st.tuples(
        op,
        arguments | plain,
        st.lists(st.integers(0, 3000), max_size=2),
        st.lists(st.integers(0, 2000), max_size=3),
    )
    return st.lists(one, min_size=1, max_size=6)


def build_input(items: Sequence[Tuple[str, Any, List[int], List[int]]]) -> Tuple[bytes, Set[int]]:
    """The bytes a client sends for ``items``, and the ids that expect an answer."""
    out = bytearray()
    answered: Set[int] = set()
    for n, (op, args, announced, chunks) in enumerate(items, start=1):
        headers = [BlobHeader("bytes", {}, size, "ab" * 32) for size in announced]
        out += encode_message(Request(n, op, args, headers))  # type: ignore[arg-type]
        if op not in ("credit", "cancel"):
            answered.add(n)
        for _ in headers:
            for size in chunks:
                out += frame_header(DATA, n, size) + os.urandom(size)
            out += encode_end(n)
    return bytes(out), answered


class _Output(io.BytesIO):
    """The server's output, watched: which requests have had a final answer."""

    def __init__(self) -> None:
        super().__init__()
        self.cond = threading.Condition()
        self.finals: Set[int] = set()
        self._decoder = FrameDecoder()
        self._banner = b""

    def write(self, data: Any) -> int:
        n = super().write(data)
        with self.cond:
            if len(self._banner) < len(BANNER):
                take = len(BANNER) - len(self._banner)
                self._banner += bytes(data[:take])
                data = data[take:]
            self._decoder.feed(bytes(data))
            for frame in drain(self._decoder):
                message = frame.message
                if isinstance(message, ErrorResponse) or (isinstance(message, Response) and not message.more):
                    self.finals.add(message.id)
            self.cond.notify_all()
        return n


class _Input(io.BytesIO):
    """The client's side: its requests, then, like a client waiting for its
    answers, no end of input until every request was answered (or
    :data:`ANSWER_DEADLINE` passed)."""

    def __init__(self, data: bytes, output: _Output, answered: Set[int]) -> None:
        super().__init__(data)
        self.output = output
        self.answered = answered

    def read1(self, size: int = -1) -> bytes:
        chunk = super().read1(size)
        if not chunk:
            with self.output.cond:
                self.output.cond.wait_for(lambda: self.answered <= self.output.finals, ANSWER_DEADLINE)
        return chunk


#: Only turns a server that never answers into a failure.
ANSWER_DEADLINE = 30.0


def run_server(
    cache: Cache,
    data: bytes,
    answered: Set[int] = frozenset(),
    **modes: bool,  # type: ignore[assignment]
) -> Tuple[List[Any], BaseException | None]:
    """Serve ``data`` to the end; the decoded answers, and ProtocolError if it stopped on one."""
    output = _Output()
    stopped: BaseException | None = None
    try:
        serve(_Input(data, output, set(answered)), output, cache, **modes)  # type: ignore[arg-type]
    except ProtocolError as exc:
        stopped = exc
    raw = output.getvalue()
    assert raw.startswith(BANNER)
    decoder = FrameDecoder()
    decoder.feed(raw[len(BANNER) :])
    frames = []
    while True:
        frame = decoder.next_frame()
        if frame is NEED_DATA:
            break
        frames.append(frame)
    assert decoder.buffered == 0, "the server wrote half a frame"
    assert frames and isinstance(frames[0].message, Hello)
    return frames[1:], stopped


def stocked_cache(root: Path, backend: str) -> Tuple[Cache, Dict[str, Any], Dict[Path, bytes]]:
    """A cache with a few entries, and a snapshot of every file under ``root``."""
    values = FileValueStore(root / "values")
    calls = (
        SqlCallStore(f"sqlite:///{root}/calls.db") if backend == "sqlite" else FileCallStore(root / "calls")
    )
    cache = Cache(values, calls)
    stored = {}
    for i in range(5):
        result: Any = b"x" * (40_000 * i) if i % 2 else {"i": i}
        stored[str(cache.save(Call("fuzz.f", {"i": i}, result)))] = result
    return cache, stored, snapshot(root)


def snapshot(root: Path) -> Dict[Path, bytes]:
    return {
        p: p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith("calls.db")
    }


def check_untouched(cache: Cache, stored: Dict[str, Any], root: Path, before: Dict[Path, bytes]) -> None:
    assert cache.contains_many(list(stored)) == [True] * len(stored)
    for key, result in stored.items():
        assert cache.load_value(key) == result
    assert snapshot(root) == before
    assert sorted(cache.calls.keys()) == sorted(stored)


# -- the decoder ------------------------------------------------------------------


def drain(decoder: FrameDecoder) -> List[Any]:
    """Frames until NEED_DATA; ProtocolError is the only other way out."""
    frames = []
    while True:
        frame = decoder.next_frame()
        if frame is NEED_DATA:
            return frames
        frames.append(frame)


@FUZZ
@given(st.binary(max_size=4096), st.lists(st.integers(1, 64), max_size=8))
def test_random_bytes_decode_or_fail_with_protocol_error(data: bytes, splits: List[int]) -> None:
    decoder = FrameDecoder(max_message=1 << 16, max_chunk=1 << 12)
    pos = 0
    try:
        for size in [*splits, len(data)]:
            decoder.feed(data[pos : pos + size])
            pos += size
            drain(decoder)
            assert decoder.buffered <= len(data)
    except ProtocolError:
        pass


headers = st.builds(
    lambda marker, ftype, fid, length: (
        bytes([marker, ftype]) + fid.to_bytes(4, "big") + length.to_bytes(8, "big")
    ),
    st.sampled_from([MARKER, MARKER, MARKER, 0, 0xFF]),
    st.integers(0, 8),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**64 - 1) | st.integers(0, 3000) | st.sampled_from([2**63, 2**64 - 1, (1 << 30) + 1]),
)


@FUZZ
@given(st.lists(st.tuples(headers, st.binary(max_size=3000)), min_size=1, max_size=6))
def test_frame_shaped_garbage_never_allocates_what_it_announces(parts: List[Tuple[bytes, bytes]]) -> None:
    """Headers that look right, lengths up to 2**64-1: the decoder holds no
    more than it was given, whatever the header says."""
    decoder = FrameDecoder()
    fed = 0
    try:
        for header, payload in parts:
            decoder.feed(header + payload)
            fed += HEADER_SIZE + len(payload)
            for frame in drain(decoder):
                assert frame.type in (MSG, DATA, END, ABORT)
            assert decoder.buffered <= fed
    except ProtocolError:
        pass


VALID = [
    encode_message(Request(3, "contains_many", {"keys": ["ab" * 32]})),
    encode_message(
        Request(4, "save_records", {"records": [], "inline": []}, [BlobHeader("bytes", {}, 3, "c")])
    ),
    frame_header(DATA, 4, 3) + b"abc",
    encode_end(4),
    encode_abort(5, "gone"),
    encode_message(Response(6, {"a": [1, 2.5, None]})),
    encode_message(ErrorResponse(7, "KeyError", "'k'", ("k",), "tb")),
]


@FUZZ
@given(st.sampled_from(VALID), st.lists(st.integers(0, 10_000), min_size=1, max_size=8), st.integers(0, 400))
def test_bit_flipped_and_truncated_frames(frame: bytes, flips: List[int], cut: int) -> None:
    damaged = bytearray(frame)
    for bit in flips:
        damaged[(bit // 8) % len(damaged)] ^= 1 << (bit % 8)
    for data in (bytes(damaged), bytes(damaged[: min(cut, len(damaged))]), frame[: min(cut, len(frame) - 1)]):
        decoder = FrameDecoder()
        decoder.feed(data)
        try:
            drain(decoder)
        except ProtocolError:
            continue
    # an undamaged frame cut short is only ever incomplete, never an error
    decoder = FrameDecoder()
    decoder.feed(frame[: min(cut, len(frame) - 1)])
    assert drain(decoder) == []


def decode_reads(data: bytes, splits: List[int], in_place: bool) -> List[Any]:
    """Frames and the first error from ``data`` arriving in reads of the
    given sizes: fed to the buffer, or each read handed to
    ``next_frame_from`` as the readers do (then ``next_frame``)."""
    decoder = FrameDecoder(max_message=256, max_chunk=64)  # limits the frames below reach
    out: List[Any] = []

    def take(frame: Any) -> bool:
        if frame is NEED_DATA:
            return False
        out.append((frame.type, frame.id, frame.message if frame.type == MSG else bytes(frame.payload)))
        return True

    pos = 0
    try:
        for size in [*splits, len(data)]:
            read, pos = data[pos : pos + size], pos + size
            if not read:
                continue
            if in_place:
                more = take(decoder.next_frame_from(read))
            else:
                decoder.feed(read)
                more = True
            while more:
                more = take(decoder.next_frame())
    except ProtocolError as exc:
        out.append(("refused", str(exc)))
    return out


# frames of any type, mostly well formed: a length that mostly fits the payload
small_frames = st.builds(
    lambda marker, ftype, fid, payload, skew: (
        bytes([marker, ftype, *fid.to_bytes(4, "big"), *max(0, len(payload) + skew).to_bytes(8, "big")])
        + payload
    ),
    st.sampled_from([MARKER, MARKER, MARKER, 0]),
    st.integers(0, 5),
    st.integers(0, 9),
    st.binary(max_size=120),
    st.sampled_from([0, 0, 0, 0, 1, -1, 200]),
)


@FUZZ
@given(
    st.lists(st.sampled_from(VALID) | small_frames | st.binary(max_size=40), min_size=1, max_size=10),
    st.lists(st.integers(1, 700), max_size=10),
)
def test_reads_taken_apart_in_place_decode_as_fed_ones(pieces: List[bytes], splits: List[int]) -> None:
    """Several frames in one read are sliced out of it; whatever the bytes
    and however they arrive, the frames and the error must be those of the
    buffer's way."""
    data = b"".join(pieces)
    assert decode_reads(data, splits, in_place=True) == decode_reads(data, splits, in_place=False)


# -- the server -------------------------------------------------------------------


def check_answers(frames: List[Any], stopped: BaseException | None, answered: Set[int]) -> None:
    finals: Dict[int, Any] = {}
    for frame in frames:
        if frame.type != MSG:
            continue
        message = frame.message
        assert isinstance(message, (Response, ErrorResponse)), message
        assert message.id in answered, f"an answer to {message.id}, which asked for none"
        if isinstance(message, ErrorResponse) or not message.more:
            assert message.id not in finals, f"two final answers to request {message.id}"
            finals[message.id] = message
    if stopped is None:
        assert set(finals) == answered, f"requests left unanswered: {sorted(answered - set(finals))}"
    for message in finals.values():
        if isinstance(message, ErrorResponse):
            assert message.message or message.type, "an error without a message"


@pytest.mark.parametrize("backend", ["file", "sqlite"])
def test_fuzzed_requests_on_a_writable_server_leave_stored_data_alone(tmp_path: Path, backend: str) -> None:
    """Every read operation, saves with hostile records, unknown and one-way
    operations, wrong argument types, announced values that do or don't
    match what follows."""
    cache, stored, before = stocked_cache(tmp_path, backend)

    @FUZZ
    @given(requests([*READ_OPS, "save_records"]))
    def run(items: List[Tuple[str, Any, List[int], List[int]]]) -> None:
        data, answered = build_input(items)
        frames, stopped = run_server(cache, data, answered)
        check_answers(frames, stopped, answered)
        check_untouched(cache, stored, tmp_path, before)

    try:
        run()
    finally:
        cache.close()


@pytest.mark.parametrize("mode", ["read_only", "append_only"])
def test_fuzzed_writes_to_a_restricted_server_change_nothing(tmp_path: Path, mode: str) -> None:
    """Evict and garbage collection included: a restricted server refuses them."""
    cache, stored, before = stocked_cache(tmp_path, "file")
    write = mode == "read_only"

    @FUZZ
    @given(requests(ALL_OPS))
    def run(items: List[Tuple[str, Any, List[int], List[int]]]) -> None:
        data, answered = build_input(items)
        frames, stopped = run_server(cache, data, answered, **{mode: True})
        check_answers(frames, stopped, answered)
        check_untouched(cache, stored, tmp_path, before)

    try:
        run()
        # and the targeted cases, explicitly: every one refused, by name
        keys = list(stored)
        data, answered = build_input(
            [
                ("evict", {"key": keys[0]}, [], []),
                ("evict", {"key": keys[0][:6]}, [], []),
                ("collect_garbage", {}, [], []),
            ]
        )
        frames, stopped = run_server(cache, data, answered, **{mode: True})
        assert stopped is None
        errors = [f.message for f in frames if isinstance(f.message, ErrorResponse)]
        assert [e.type for e in errors] == ["fleche_remote.errors.Rejected"] * 3
        assert all(("read-only" if write else "append-only") in e.message for e in errors)
        check_untouched(cache, stored, tmp_path, before)
    finally:
        cache.close()


bad_headers = (
    st.builds(BlobHeader, kind=plain, meta=plain, size=st.integers(-5, 5) | plain, digest=plain) | plain
)


@FUZZ
@given(
    st.sampled_from([True, 1.0]) | st.just(1),
    plain,
    plain,
    st.lists(bad_headers, max_size=2) | plain,
)
def test_requests_of_the_wrong_shape_are_refused_cleanly(rid: Any, op: Any, args: Any, blobs: Any) -> None:
    """Fields of the wrong type, which no encoder of ours would produce
    (the decoder rebuilds dataclasses without calling their constructor):
    the server answers with an error or closes with ProtocolError."""
    payload = dumps_plain(Request(rid, op, args, blobs))
    data = frame_header(MSG, 1, len(payload)) + payload + encode_message(Request(2, "ping"))
    cache = Cache(MemoryValueStore(), MemoryCallStore())
    frames, stopped = run_server(cache, data, {1, 2})
    if stopped is None:
        check_answers(frames, stopped, {1, 2})
        first = {f.message.id: f.message for f in frames}[1]
        if not (isinstance(op, str) and op in READ_HANDLERS and isinstance(args, dict)):
            assert isinstance(first, ErrorResponse)


def test_hostile_keys_and_prefixes_are_not_found_and_delete_nothing(tmp_path: Path) -> None:
    """Evict, expand and loads with path escapes, NUL bytes and LIKE wildcards,
    on a writable server: KeyError each time, nothing removed."""
    for backend in ("file", "sqlite"):
        root = tmp_path / backend
        root.mkdir()
        (tmp_path / "outside").write_bytes(b"keep")
        cache, stored, before = stocked_cache(root, backend)
        items = []
        for key in HOSTILE_STRINGS:
            items += [
                ("evict", {"key": key}, [], []),
                ("expand", {"prefix": key}, [], []),
                ("load_value", {"key": key}, [], []),
                ("load_blob", {"digest": key}, [], []),
            ]
        items += [("load_blobs", {"digests": HOSTILE_STRINGS}, [], [])]
        items += [("contains_many", {"keys": HOSTILE_STRINGS}, [], [])]
        data, answered = build_input(items)
        frames, stopped = run_server(cache, data, answered)
        assert stopped is None
        check_answers(frames, stopped, answered)
        by_id = {f.message.id: f.message for f in frames if f.type == MSG}
        for n, (op, _, _, _) in enumerate(items, start=1):
            answer = by_id[n]
            if op in ("load_blobs", "contains_many"):
                assert isinstance(answer, Response)
                assert answer.result in ([None] * len(HOSTILE_STRINGS), [False] * len(HOSTILE_STRINGS))
            else:
                assert isinstance(answer, ErrorResponse) and answer.type == "KeyError", (op, answer)
        check_untouched(cache, stored, root, before)
        assert (tmp_path / "outside").read_bytes() == b"keep"
        cache.close()


def test_huge_announced_lengths_are_refused_at_once(tmp_path: Path) -> None:
    """A MSG or DATA header claiming more than the limits ends the server
    before it reads (or allocates) the payload."""
    cache, stored, before = stocked_cache(tmp_path, "file")
    for ftype, length in [(MSG, 2**64 - 1), (MSG, (1 << 30) + 1), (DATA, 2**63), (ABORT, 1 << 40)]:
        data = encode_message(Request(1, "ping")) + frame_header(ftype, 2, length) + b"\x00" * 64
        frames, stopped = run_server(cache, data)
        assert isinstance(stopped, ProtocolError) and "exceeds the limit" in str(stopped)
        assert [f.message.id for f in frames] == [1]  # the request before it was answered
    check_untouched(cache, stored, tmp_path, before)
    cache.close()


def test_values_announced_and_never_sent_are_bounded(tmp_path: Path) -> None:
    """A client that announces value after value and sends none: the
    server stops at its limit instead of queueing them without end."""
    cache, stored, before = stocked_cache(tmp_path, "file")
    header = BlobHeader("bytes", {}, 10, "ab" * 32)
    data = b"".join(
        encode_message(Request(n, "save_records", {"records": []}, [header])) for n in range(1, 2000)
    )
    _, stopped = run_server(cache, data)
    assert isinstance(stopped, ProtocolError) and "are waiting for their data" in str(stopped)
    check_untouched(cache, stored, tmp_path, before)
    cache.close()
