"""The wire protocol, fed bytes directly: no I/O, every split, bad input."""

from __future__ import annotations

import os
import pickle
import random

import pytest

from fleche_remote.call import CallRecord
from fleche_remote.codec.plain import dumps_plain, loads_plain
from fleche_remote.errors import IncompatibleProtocolError, ProtocolError
from fleche_remote.remote.protocol import (
    ABORT,
    BANNER,
    DATA,
    END,
    MAGIC,
    MSG,
    NEED_DATA,
    PROTOCOL_VERSION,
    BannerScanner,
    BlobHeader,
    ErrorResponse,
    FrameDecoder,
    Hello,
    Request,
    Response,
    check_version,
    encode_abort,
    encode_end,
    encode_message,
    frame_header,
)

RECORD = CallRecord("ab" * 32, "mod.f", None, b"\x80\x04args", {"x": "d" * 64}, {"host": "n1"}, "cd" * 32)


def sample_stream() -> tuple[bytes, list[tuple[int, int, object]]]:
    """A realistic request: a save with two value streams, plus replies."""
    req = Request(
        7, "save_records", {"records": [RECORD, RECORD]}, [BlobHeader("bytes", {}, 5, "cd" * 32)] * 2
    )
    parts = [
        encode_message(req),
        frame_header(DATA, 7, 3) + b"abc",
        frame_header(DATA, 7, 2) + b"de",
        encode_end(7),
        frame_header(DATA, 7, 5) + b"fghij",
        encode_end(7),
        encode_message(Response(7, [True, None, {"a": (1, 2.5)}])),
        encode_message(ErrorResponse(8, "KeyError", "'k'", ("k",), "Traceback...")),
        encode_abort(9, "disk on fire"),
    ]
    expected = [
        (MSG, 7, req),
        (DATA, 7, b"abc"),
        (DATA, 7, b"de"),
        (END, 7, b""),
        (DATA, 7, b"fghij"),
        (END, 7, b""),
        (MSG, 7, Response(7, [True, None, {"a": (1, 2.5)}])),
        (MSG, 8, ErrorResponse(8, "KeyError", "'k'", ("k",), "Traceback...")),
        (ABORT, 9, b"disk on fire"),
    ]
    return b"".join(parts), expected


def drain(decoder: FrameDecoder) -> list:
    out = []
    while True:
        frame = decoder.next_frame()
        if frame is NEED_DATA:
            return out
        out.append((frame.type, frame.id, frame.message if frame.type == MSG else frame.payload))


def test_whole_stream_decodes_to_the_frames_sent():
    data, expected = sample_stream()
    decoder = FrameDecoder()
    decoder.feed(data)
    assert drain(decoder) == expected
    assert decoder.buffered == 0


def test_one_byte_at_a_time():
    data, expected = sample_stream()
    decoder = FrameDecoder()
    got = []
    for i in range(len(data)):
        decoder.feed(data[i : i + 1])
        got.extend(drain(decoder))
    assert got == expected


@pytest.mark.parametrize("seed", range(5))
def test_random_splits(seed):
    data, expected = sample_stream()
    rng = random.Random(seed)
    decoder = FrameDecoder()
    got, pos = [], 0
    while pos < len(data):
        step = rng.randint(1, 40)
        decoder.feed(data[pos : pos + step])
        pos += step
        got.extend(drain(decoder))
    assert got == expected


def drain_reads(decoder: FrameDecoder, data: bytes) -> list:
    """What a reader gets from one read of ``data``: ``next_frame_from``
    for its first frame, ``next_frame`` for the rest."""
    first = decoder.next_frame_from(data)
    if first is NEED_DATA:
        return []
    return [(first.type, first.id, first.message if first.type == MSG else first.payload), *drain(decoder)]


@pytest.mark.parametrize("seed", range(5))
def test_reads_handed_over_whole_decode_as_fed_ones(seed):
    # next_frame_from takes a whole one-frame read without the buffer and
    # anything else through it: the frames must not depend on which way
    data, expected = sample_stream()
    rng = random.Random(seed)
    frame_ends = []
    decoder = FrameDecoder()
    for i in range(len(data)):
        decoder.feed(data[i : i + 1])
        if drain(decoder):
            frame_ends.append(i + 1)
    cuts = sorted(set(rng.sample(range(1, len(data)), 12) + frame_ends[: rng.randint(1, len(frame_ends))]))
    decoder = FrameDecoder()
    got = []
    for start, end in zip([0, *cuts], [*cuts, len(data)]):
        got.extend(drain_reads(decoder, data[start:end]))
    assert got == expected
    assert decoder.buffered == 0


def value_stream(chunks: int, size: int = 256 << 10) -> tuple[bytes, list[bytes]]:
    """A value streaming in as the sender frames it: a request, then
    ``chunks`` DATA frames of ``size`` distinct bytes each, then END."""
    rng = random.Random(chunks)
    bodies = [rng.randbytes(size) for _ in range(chunks)]
    header = BlobHeader("bytes", {}, chunks * size, "cd" * 32)
    req = Request(3, "save_records", {"records": [RECORD]}, [header])
    data = encode_message(req) + b"".join(frame_header(DATA, 3, len(b)) + b for b in bodies) + encode_end(3)
    return data, bodies


def read_as_a_reader(decoder: FrameDecoder, data: bytes, read_size: int) -> list:
    """What the client's and the server's readers do with ``data`` arriving
    ``read_size`` bytes at a time: each read to ``next_frame_from`` and then
    ``next_frame`` until it needs data; a big frame whose header has come
    is claimed and the rest of it read straight into its buffer."""
    got, pos = [], 0
    while pos < len(data):
        claim = decoder.claim_payload()
        if claim is not None:
            buf, have = claim
            buf[have:] = data[pos : pos + len(buf) - have]
            pos += len(buf) - have
            decoder.feed_claimed(buf)
            got.extend(drain(decoder))
            continue
        got.extend(drain_reads(decoder, data[pos : pos + read_size]))
        pos += read_size
    return got


@pytest.mark.parametrize("read_size", [1 << 20, (1 << 20) + 64, 300 << 10, 100 << 10])
def test_value_chunks_read_several_at_a_time_arrive_whole_and_in_order(read_size):
    data, bodies = value_stream(9)
    decoder = FrameDecoder()
    got = read_as_a_reader(decoder, data, read_size)
    assert [t for t, _, _ in got] == [MSG, *[DATA] * 9, END]
    assert [bytes(p) for _, _, p in got[1:-1]] == bodies
    assert decoder.buffered == 0


def test_a_chunk_taken_from_a_read_stays_as_it_was_while_later_reads_arrive():
    # chunks sliced out of a read are views of it: the reader's next reads
    # must never change what an earlier chunk holds
    data, bodies = value_stream(8)
    decoder = FrameDecoder()
    got = read_as_a_reader(decoder, data, 1 << 20)
    held = [p for t, _, p in got if t == DATA]
    assert any(isinstance(p, memoryview) for p in held)  # the view path was taken
    read_as_a_reader(decoder, value_stream(8)[0], 1 << 20)  # another value, same decoder
    assert [bytes(p) for p in held] == bodies


def test_a_read_is_kept_in_order_with_what_is_fed_after_it():
    data, expected = sample_stream()
    head = len(encode_message(expected[0][2]))
    cut = head + len(frame_header(DATA, 7, 3)) + 3 + 5  # the request, a chunk, part of the next
    decoder = FrameDecoder()
    first = decoder.next_frame_from(data[:cut])
    assert first is not NEED_DATA and decoder.buffered == cut - head
    lookup = encode_message(Request(1, "contains_many", {"keys": ["ab" * 32]}), True)
    assert decoder.lookup_from(lookup) is None  # not while a read is being taken apart
    decoder.feed(data[cut:])  # more bytes before the kept read was drained
    got = [(first.type, first.id, first.message), *drain(decoder)]
    assert got == expected and decoder.buffered == 0


def test_a_bad_frame_inside_a_read_is_refused_after_the_good_ones_before_it():
    good = encode_message(Response(1, [True])) + frame_header(DATA, 1, 70000) + b"x" * 70000
    decoder = FrameDecoder()
    first = decoder.next_frame_from(good + b"\x00garbage" + b"." * 64)
    assert first.message == Response(1, [True])
    chunk = decoder.next_frame()
    assert (chunk.type, bytes(chunk.payload)) == (DATA, b"x" * 70000)
    with pytest.raises(ProtocolError, match="frame marker"):
        decoder.next_frame()
    limited = FrameDecoder(max_chunk=100)
    assert limited.next_frame_from(good).message == Response(1, [True])
    with pytest.raises(ProtocolError, match="exceeds the limit of 100 bytes"):
        limited.next_frame()


def test_a_read_of_exactly_one_small_message_leaves_nothing_buffered():
    decoder = FrameDecoder()
    for rid in (1, 2):
        frame = decoder.next_frame_from(
            encode_message(Request(rid, "contains_many", {"keys": ["ab" * 32]}), True)
        )
        assert (frame.type, frame.id, frame.message) == (
            MSG,
            rid,
            Request(rid, "contains_many", {"keys": ["ab" * 32]}),
        )
        assert decoder.buffered == 0 and decoder.compact_seen
    frame = decoder.next_frame_from(encode_message(Response(3, [True, None])))
    assert frame.message == Response(3, [True, None]) and decoder.buffered == 0


def test_a_whole_read_is_refused_as_a_fed_one_would_be():
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError, match="frame marker"):
        decoder.next_frame_from(b"Last login: Mon from 10.0.0.1\n")
    small = FrameDecoder(max_message=10)
    with pytest.raises(ProtocolError, match="exceeds the limit of 10 bytes"):
        small.next_frame_from(encode_message(Response(1, list(range(100)))))
    whole = encode_message(Response(6))
    framed_as_5 = whole[:2] + (5).to_bytes(4, "big") + whole[6:]  # the frame's id: 4 bytes after marker, type
    with pytest.raises(ProtocolError, match="does not match its message id"):
        FrameDecoder().next_frame_from(framed_as_5)


def test_truncated_stream_never_yields_a_partial_frame():
    data, expected = sample_stream()
    for cut in range(len(data)):
        decoder = FrameDecoder()
        decoder.feed(data[:cut])
        got = drain(decoder)
        assert got == expected[: len(got)]
        assert len(got) < len(expected)


def test_garbage_is_refused_at_the_first_bad_byte():
    decoder = FrameDecoder()
    decoder.feed(b"Last login: Mon from 10.0.0.1\n")
    with pytest.raises(ProtocolError, match="frame marker"):
        decoder.next_frame()


def test_unknown_frame_type():
    decoder = FrameDecoder()
    decoder.feed(frame_header(DATA, 1, 0)[:1] + bytes([99]) + frame_header(DATA, 1, 0)[2:])
    with pytest.raises(ProtocolError, match="unknown frame type 99"):
        decoder.next_frame()


def test_huge_length_is_refused_before_allocating():
    decoder = FrameDecoder(max_message=1 << 20)
    decoder.feed(frame_header(MSG, 1, 1 << 62))  # 4 EiB: would exhaust memory
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decoder.next_frame()
    decoder = FrameDecoder(max_chunk=1 << 20)
    decoder.feed(frame_header(DATA, 1, (1 << 20) + 1))
    with pytest.raises(ProtocolError, match="DATA frame"):
        decoder.next_frame()


def test_end_frame_with_payload_is_refused():
    decoder = FrameDecoder()
    decoder.feed(frame_header(END, 1, 3) + b"abc")
    with pytest.raises(ProtocolError, match="END frame"):
        decoder.next_frame()


def test_message_id_must_match_frame_id():
    payload = dumps_plain(Request(5, "ping"))
    decoder = FrameDecoder()
    decoder.feed(frame_header(MSG, 6, len(payload)) + payload)
    with pytest.raises(ProtocolError, match="does not match"):
        decoder.next_frame()


def test_msg_holding_plain_data_instead_of_a_message_is_refused():
    payload = dumps_plain({"op": "ping"})
    decoder = FrameDecoder()
    decoder.feed(frame_header(MSG, 1, len(payload)) + payload)
    with pytest.raises(ProtocolError, match="expected a message"):
        decoder.next_frame()


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize(
    "payload",
    [
        pickle.dumps(Evil()),
        pickle.dumps(Request(1, "save_records", {"records": [Evil()]})),
        pickle.dumps(eval),
        pickle.dumps(Evil(), protocol=0),
    ],
    ids=["reduce-os-system", "nested-in-request", "builtin-eval", "protocol-0"],
)
def test_restricted_decoder_refuses_code(payload):
    decoder = FrameDecoder()
    decoder.feed(frame_header(MSG, 1, len(payload)) + payload)
    with pytest.raises(ProtocolError, match="refusing to decode"):
        decoder.next_frame()


def test_garbage_payload_in_msg_frame():
    decoder = FrameDecoder()
    decoder.feed(frame_header(MSG, 1, 4) + b"\x80\x04\xff\xff")
    with pytest.raises(ProtocolError):
        decoder.next_frame()


def test_plain_codec_round_trips_records_and_containers():
    value = {"r": RECORD, "s": {1, 2}, "f": frozenset({"a"}), "c": 1 + 2j, "b": bytearray(b"x")}
    assert loads_plain(dumps_plain(value)) == value


def test_banner_found_after_noise_split_at_every_position():
    noise = b"Welcome to the cluster\r\nModule python/3.11 loaded\n\x1b[0m(base) "
    after = encode_message(Hello(PROTOCOL_VERSION, "0.1.0", {"read_only": False}))
    data = noise + BANNER + after
    for split in range(len(data) + 1):
        scanner = BannerScanner()
        first = scanner.feed(data[:split])
        if first is not None:
            got_noise, version, rest = first
            rest += data[split:]
        else:
            found = scanner.feed(data[split:])
            assert found is not None, split
            got_noise, version, rest = found
        assert (got_noise, version) == (noise, PROTOCOL_VERSION)
        decoder = FrameDecoder()
        decoder.feed(rest)
        assert drain(decoder)[0][2] == Hello(PROTOCOL_VERSION, "0.1.0", {"read_only": False})


def test_banner_scanner_gives_up_on_endless_noise():
    scanner = BannerScanner(max_noise=1000)
    with pytest.raises(ProtocolError, match="no fleche-remote banner"):
        for _ in range(100):
            scanner.feed(b"y" * 100)


def test_banner_needs_the_whole_version():
    scanner = BannerScanner()
    assert scanner.feed(MAGIC + b"\x00") is None
    assert scanner.feed(b"\x01") == (b"", 1, b"")


def test_incompatible_version_names_both():
    with pytest.raises(IncompatibleProtocolError, match=rf"protocol 99.*protocol {PROTOCOL_VERSION}"):
        check_version(99)
    check_version(PROTOCOL_VERSION)
