"""The lookup lane: a lone ``contains`` goes from bytes to keys and from
booleans to bytes without message objects. Each function must agree with
the generic path exactly, and hand anything else back untouched."""

from __future__ import annotations

from typing import Any, List

import pytest

from fleche_remote import Call
from fleche_remote.caches import Cache
from fleche_remote.errors import ProtocolError
from fleche_remote.remote.client import SshCache
from fleche_remote.remote.protocol import (
    COMPACT_MAX,
    HEADER_SIZE,
    LOOKUP_OP,
    MSG,
    NEED_DATA,
    FrameDecoder,
    Request,
    Response,
    encode_found,
    encode_lookup,
    encode_message,
    frame_header,
)
from fleche_remote.storage.memory import MemoryCallStore, MemoryValueStore

from .test_compact import COMPACT, KEY, NOT_COMPACT

ALL_MESSAGES = COMPACT + NOT_COMPACT

KEYS = [KEY, "", "short", "é∂ unicode ☃", "\udcff lone surrogate", "k" * (COMPACT_MAX - 20)]


@pytest.mark.parametrize("key", [*KEYS, "two\nlines", "k" * COMPACT_MAX, 7])
@pytest.mark.parametrize("rid", [1, 0xFFFFFFFF])
def test_a_lookup_is_encoded_as_the_generic_path_encodes_it(key: Any, rid: int) -> None:
    generic = encode_message(Request(rid, LOOKUP_OP, {"keys": [key]}), True)
    lane = encode_lookup(rid, key)
    if lane is None:  # no compact form: the generic path sends a pickle
        assert generic[HEADER_SIZE] >= 0x20
    else:
        assert lane == generic


ANSWERS = [[True], [False], [True, False, True], [], None, [1], [True, None], {"a": 1}, [True] * COMPACT_MAX]


@pytest.mark.parametrize("found", ANSWERS)
def test_an_answer_is_encoded_as_the_generic_path_encodes_it(found: Any) -> None:
    assert encode_found(9, found) == encode_message(Response(9, found), True)


def generic(data: bytes, decoder: FrameDecoder) -> List[Any]:
    """Every frame the generic path decodes from one read of ``data``."""
    first = decoder.next_frame_from(data)
    frames = []
    while first is not NEED_DATA:
        frames.append(first)
        first = decoder.next_frame()
    return frames


@pytest.mark.parametrize("message", ALL_MESSAGES, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("compact", [True, False])
def test_a_read_is_taken_as_a_lookup_only_when_it_is_exactly_one(message: Any, compact: bool) -> None:
    data = encode_message(message, compact)
    decoder = FrameDecoder()
    got = decoder.lookup_from(data)
    expected = generic(data, FrameDecoder())
    (frame,) = expected
    is_lookup = compact and type(message) is Request and message.op == LOOKUP_OP and data[HEADER_SIZE] < 0x20
    if is_lookup:
        assert got == (frame.id, frame.message.args["keys"])
        assert decoder.buffered == 0 and decoder.compact_seen
    else:
        assert got is None
        assert generic(data, decoder) == expected  # nothing was consumed


@pytest.mark.parametrize("message", ALL_MESSAGES, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("compact", [True, False])
def test_a_read_is_taken_as_an_answer_only_when_it_is_exactly_one_to_that_request(
    message: Any, compact: bool
) -> None:
    data = encode_message(message, compact)
    rid = getattr(message, "id", 0)
    (frame,) = generic(data, FrameDecoder())
    plain_bools = (
        type(message) is Response
        and not message.blobs
        and not message.more
        and type(message.result) is list
        and all(type(r) is bool for r in message.result)
    )
    decoder = FrameDecoder()
    assert decoder.found_from(data, rid + 1) is None  # another request's answer
    got = decoder.found_from(data, rid)
    if compact and plain_bools:
        assert got == frame.message.result
        assert decoder.buffered == 0
    else:
        assert got is None
        assert generic(data, decoder) == [frame]


def test_a_piece_of_a_frame_or_more_than_one_is_left_to_the_generic_path() -> None:
    lookup = encode_message(Request(3, LOOKUP_OP, {"keys": [KEY]}), True)
    answer = encode_message(Response(3, [True]), True)
    for data, take in ((lookup, FrameDecoder.lookup_from), (answer, lambda d, b: d.found_from(b, 3))):
        for piece in (data[:-1], data + data, data + data[:5], data[:HEADER_SIZE]):
            decoder = FrameDecoder()
            assert take(decoder, piece) is None
            fresh = [f.message for f in generic(piece, FrameDecoder())]
            assert [f.message for f in generic(piece, decoder)] == fresh
        held = FrameDecoder()
        held.feed(data[:3])  # a frame already begun: the read continues it
        assert take(held, data) is None


def test_a_malformed_lane_frame_gets_the_generic_path_s_error() -> None:
    head = encode_lookup(1, "")
    assert head is not None
    bad_text = frame_header(MSG, 1, len(head) - HEADER_SIZE + 1) + head[HEADER_SIZE:] + b"\xff"
    bad_bool = frame_header(MSG, 1, 2) + b"\x03\x02"
    too_big = encode_message(Response(1, [True] * 100), True)
    for data, take, says in (
        (bad_text, FrameDecoder.lookup_from, "not text"),
        (bad_bool, lambda d, b: d.found_from(b, 1), "other than 0 or 1"),
        (too_big, lambda d, b: d.found_from(b, 1), "exceeds the limit"),
    ):
        decoder = FrameDecoder(max_message=50)
        assert take(decoder, data) is None
        with pytest.raises(ProtocolError, match=says):
            decoder.next_frame_from(data)


def test_contains_through_a_server_agrees_with_the_cache_for_keys_on_and_off_the_lane() -> None:
    cache = Cache(values=MemoryValueStore(), calls=MemoryCallStore())
    stored = str(cache.save(Call("f", {"x": 1}, 1.0)))
    remote = SshCache.in_process(cache)
    try:
        for key in [stored, "cd" * 32, *KEYS, "two\nlines"]:
            assert remote.contains(key) is cache.contains(key), key
        assert remote.contains_many([stored, "cd" * 32]) == [True, False]
    finally:
        remote.close()
