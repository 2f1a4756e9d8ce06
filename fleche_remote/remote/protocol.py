"""The fleche-remote wire protocol. No I/O happens in this module.

Design rules (everything that shapes the bytes lives here):

* The server speaks first: a magic banner and its protocol version (see
  :mod:`.banner`), then frames.
* After the banner everything is a frame: a 14-byte header
  ``marker(0xFE) type(u8) id(u32) length(u64)`` and ``length`` payload
  bytes. The marker makes garbage on the wire fail loudly at the first
  bad byte instead of being read as a length.
* ``MSG`` frames carry one message (a registered frozen dataclass) encoded
  with :mod:`fleche_remote.codec.plain`, and decoded with its restricted
  unpickler: nothing that arrives can name a class outside the allow-list.
* Values travel as ``DATA`` frames (raw bytes, at most ``max_chunk``
  each) after the message that announced them in a :class:`BlobHeader`,
  closed by ``END``; ``ABORT`` ends a stream early with an error message.
  So a value of any size streams in bounded chunks and neither side holds
  more than a chunk beyond the value itself.
* Every request carries an id and every frame of its answer repeats it;
  replies are matched by id, never by order. Many requests may be in
  flight at once (pipelining), the server may answer them in any order,
  and the frames of different answers may interleave: a large value
  streaming back never holds small answers up for its whole length.
* A value stream a client sends is never interleaved with another value
  stream of that client (small requests may come between its chunks), so
  the server can take uploads one at a time, in arrival order, with a
  bounded queue each.
* Small values travel inside the message itself (``Inline``), so a batch
  of small saves or loads is one frame each way.
* A long answer (``query_records``) comes as several ``Response`` s with
  ``more=True`` and a last one with ``more=False``. The server sends at
  most ``window`` pages ahead of the client's ``credit`` messages, so a
  client that reads slowly never makes either side buffer without bound;
  ``cancel`` ends such a stream (or a value stream) early.
* ``credit`` and ``cancel`` are one-way requests: no answer comes back.
* A length over the configured limit is refused before anything is
  allocated.
* The commonest small messages (a lookup of a few keys, ``ping``, and
  their answers: a list of booleans or nothing) have a *compact* form
  inside the same MSG frame: a tag byte below 0x20, which is no pickle
  opcode, and a fixed layout (see :func:`encode_compact`). It decodes to
  the same message with no unpickler and no budget walk (~20 us of the
  server's ~80 us per ``contains``). A client sends it only to a server
  whose ``Hello`` lists ``compact_messages`` in its features, and a server
  answers in it only a client that sent it, so either side may be older.

Compatibility policy: ``PROTOCOL_VERSION`` changes only when the frame
layout or the meaning of an existing message changes; the two sides must
then agree exactly. New operations and new optional arguments do not bump
it: arguments travel by name, and a server answers an operation it does
not know with an error the client reports.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ..codec.plain import dumps_plain, loads_plain, register_plain
from ..errors import ProtocolError

# what the server says first is .banner's; its names are the wire's, so they are here too
from .banner import BANNER as BANNER
from .banner import DEFAULT_MAX_NOISE as DEFAULT_MAX_NOISE
from .banner import MAGIC as MAGIC
from .banner import PROTOCOL_VERSION as PROTOCOL_VERSION
from .banner import BannerScanner as BannerScanner
from .banner import check_version as check_version
from .banner import describe_noise as describe_noise

MARKER = 0xFE
_HEADER = struct.Struct(">BBIQ")
HEADER_SIZE = _HEADER.size

MSG = 1
DATA = 2
END = 3
ABORT = 4
FRAME_TYPES = {MSG: "MSG", DATA: "DATA", END: "END", ABORT: "ABORT"}

#: Messages hold call records, whose arguments can be large arrays; 1 GiB
#: admits them while refusing a corrupted 64-bit length before allocating.
DEFAULT_MAX_MESSAGE = 1 << 30
#: Data chunks are sent at 1 MiB; allow 16x slack for other senders.
DEFAULT_MAX_CHUNK = 16 << 20

BytesLike = Union[bytes, bytearray, memoryview]

#: A server that decodes the compact forms lists this among its Hello's
#: ``info["features"]``; a new form needs a new name.
COMPACT_FEATURE = "compact_messages"
#: Compact messages are for small lookups; bigger ones go as pickles (whose
#: cost is spread over their keys anyway), so a compact payload is refused
#: past this, before it is split.
COMPACT_MAX = 64 << 10
_C_KEYS = 0x01  # Request(id, op, {"keys": [str, ...]}): tag, len(op) u8, op, keys joined by "\n"
_C_BARE = 0x02  # Request(id, op): tag, len(op) u8, op
_C_BOOLS = 0x03  # Response(id, [bool, ...]): tag, one byte 0/1 each
_C_NONE = 0x04  # Response(id, None): tag
_C_TRUE_FALSE = (False, True)

#: A payload that fills the receive buffer exactly is handed over instead of
#: copied when it is at least this big (a value chunk, typically).
_SWAP_ABOVE = 64 << 10


# -- messages -----------------------------------------------------------------


@register_plain
@dataclass(frozen=True)
class BlobHeader:
    """Announces a value stream that follows as DATA frames, then END."""

    kind: str
    meta: Dict[str, Any]
    size: int
    digest: str


@register_plain
@dataclass(frozen=True)
class Hello:
    """The server's first message: versions and its ``info`` dict."""

    protocol: int
    library: str
    info: Dict[str, Any]


@register_plain
@dataclass(frozen=True, init=False)
class Request:
    """One operation; ``args`` by name; ``blobs`` stream after it in order."""

    id: int
    op: str
    args: Dict[str, Any] = field(default_factory=dict)
    blobs: List[BlobHeader] = field(default_factory=list)

    def __init__(
        self,
        id: int,
        op: str,
        args: Optional[Dict[str, Any]] = None,
        blobs: Optional[List[BlobHeader]] = None,
    ) -> None:
        # frozen, but filled in directly: the generated __init__ sets each
        # field through object.__setattr__ (0.57 against 0.25 us a message)
        state = self.__dict__
        state["id"], state["op"] = id, op
        state["args"] = {} if args is None else args
        state["blobs"] = [] if blobs is None else blobs


@register_plain
@dataclass(frozen=True, init=False)
class Response:
    """A successful answer; ``blobs`` stream after it in order.

    ``more=True`` marks one page of a longer answer; more ``Response`` s
    with the same id follow, the last with ``more=False``.
    """

    id: int
    result: Any = None
    blobs: List[BlobHeader] = field(default_factory=list)
    more: bool = False

    def __init__(
        self, id: int, result: Any = None, blobs: Optional[List[BlobHeader]] = None, more: bool = False
    ) -> None:
        state = self.__dict__  # see Request.__init__
        state["id"], state["result"], state["more"] = id, result, more
        state["blobs"] = [] if blobs is None else blobs


@register_plain
@dataclass(frozen=True)
class Inline:
    """A small value carried inside a message instead of a DATA stream."""

    kind: str
    meta: Dict[str, Any]
    body: bytes


#: Values up to this size travel inside the reply or request message; larger
#: ones stream as DATA frames. 64 KiB keeps a message of small results one
#: frame while a big value never sits whole in a message.
WIRE_INLINE_MAX = 64 << 10

#: Inline bytes one message may carry in all; the rest of a batch streams.
WIRE_INLINE_BUDGET = 8 << 20


def inline_choices(sizes: Sequence[Optional[int]]) -> List[bool]:
    """Which of a message's values (by size; ``None``: absent) travel inline.

    One rule for both ends, so a request and a reply of the same values
    are shaped alike: small ones inline, in order, while the message's
    budget lasts; the rest stream after it.
    """
    budget = WIRE_INLINE_BUDGET
    out: List[bool] = []
    for size in sizes:
        small = size is not None and size <= WIRE_INLINE_MAX and size <= budget
        if small:
            budget -= size  # type: ignore[operator]
        out.append(small)
    return out


@register_plain
@dataclass(frozen=True)
class ErrorResponse:
    """A failed operation, as data: the client rebuilds the exception."""

    id: int
    type: str
    message: str
    args: Tuple[Any, ...] = ()
    traceback: str = ""


Message = Union[Hello, Request, Response, ErrorResponse]
_MESSAGE_TYPES = (Hello, Request, Response, ErrorResponse)


# -- frames -------------------------------------------------------------------


@dataclass
class Frame:
    """One decoded frame. ``payload`` is the raw bytes (or a bytearray) for
    DATA/ABORT, ``b""`` for END; a MSG's decoded message is in ``message``.

    Not frozen, unlike the messages: the decoder makes one per frame, and
    a frozen dataclass's ``__init__`` sets each field through
    ``object.__setattr__`` (0.65 against 0.3 us, measured)."""

    type: int
    id: int
    payload: Any = b""  # bytes, or a bytearray handed over without a copy
    message: Optional[Message] = None


def frame_header(ftype: int, fid: int, length: int) -> bytes:
    """The 14 header bytes of a frame (send the payload separately to
    avoid copying a large chunk)."""
    return _HEADER.pack(MARKER, ftype, fid, length)


def encode_message(message: Message, compact: bool = False) -> bytes:
    """A whole MSG frame for ``message``; in its compact form if ``compact``
    and it has one (see :func:`encode_compact`)."""
    payload = (encode_compact(message) if compact else None) or dumps_plain(message)
    return _HEADER.pack(MARKER, MSG, getattr(message, "id", 0), len(payload)) + payload


def encode_compact(message: Message) -> Optional[bytes]:
    """The compact payload of ``message``, or ``None`` if it has none.

    Forms (the first byte is the tag, a control byte: no pickle opcode is one):

    * ``01 n op keys``: a ``Request`` with no values and ``args`` exactly
      ``{"keys": [...]}``, one or more str without a newline, joined by
      ``\n`` in UTF-8; ``n`` is the length of the ASCII ``op``;
    * ``02 n op``: a ``Request`` with no values and no arguments;
    * ``03 b*``: a final ``Response`` with no values whose result is a
      list of bools, one byte (0 or 1) each;
    * ``04``: a final ``Response`` with no values and result ``None``.
    """
    cls = type(message)
    if cls is Response:
        assert isinstance(message, Response)
        if message.blobs or message.more:
            return None
        result = message.result
        if result is None:
            return b"\x04"
        if type(result) is not list or len(result) >= COMPACT_MAX:
            return None
        for r in result:  # a loop, not all() over a generator: a third of the answer's encode
            if type(r) is not bool:
                return None
        return b"\x03" + bytes(result)
    if cls is not Request:
        return None
    assert isinstance(message, Request)
    args = message.args
    if message.blobs:
        return None
    if not args:
        return _compact_head(_C_BARE, message.op)
    keys = args.get("keys") if len(args) == 1 else None
    if type(keys) is not list or not keys:
        return None
    if len(keys) == 1:  # the commonest lookup: no join, no count
        joined = keys[0]
        if type(joined) is not str or "\n" in joined:
            return None
    else:
        if not all(type(k) is str for k in keys):
            return None
        joined = "\n".join(keys)
        if joined.count("\n") != len(keys) - 1:
            return None  # a key holds a newline
    head = _compact_head(_C_KEYS, message.op)
    if head is None:
        return None
    payload = head + joined.encode("utf-8", "surrogatepass")
    return payload if len(payload) <= COMPACT_MAX else None


@functools.lru_cache(maxsize=64)
def _compact_head(tag: int, op: str) -> Optional[bytes]:
    """Tag, length and name of a compact request (a few operations, each
    encoded once), or ``None`` for a name the form cannot carry."""
    if type(op) is not str or not op.isascii() or not 0 < len(op) < 256:
        return None
    return bytes((tag, len(op))) + op.encode("ascii")


def decode_compact(payload: BytesLike, fid: int) -> Message:
    """The message of a compact payload (see :func:`encode_compact`).

    Raises:
        ProtocolError: an unknown tag, a payload over :data:`COMPACT_MAX`,
            or bytes that do not fit the tag's layout.
    """
    if len(payload) > COMPACT_MAX:
        raise ProtocolError(f"compact message of {len(payload)} bytes; at most {COMPACT_MAX} are allowed")
    tag = payload[0]
    if tag == _C_BOOLS:
        try:
            found = [_C_TRUE_FALSE[b] for b in payload[1:]]
        except IndexError:
            raise ProtocolError("compact list of bools holds a byte other than 0 or 1") from None
        return Response(fid, found)
    if tag == _C_NONE:
        if len(payload) != 1:
            raise ProtocolError(f"compact empty answer with {len(payload) - 1} more bytes, expected none")
        return Response(fid)
    if tag not in (_C_KEYS, _C_BARE) or len(payload) < 2:
        raise ProtocolError(f"unknown compact message tag 0x{tag:02x} in a {len(payload)}-byte payload")
    end = 2 + payload[1]
    try:
        op = bytes(payload[2:end]).decode("ascii")
        rest = bytes(payload[end:]).decode("utf-8", "surrogatepass")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"compact request that is not text: {exc}") from None
    if len(op) != end - 2 or not op:
        raise ProtocolError(f"compact request cut inside its operation name ({len(payload)} bytes)")
    if tag == _C_BARE:
        if rest:
            raise ProtocolError(f"compact request {op!r} has {len(rest)} bytes after its name, expected none")
        return Request(fid, op)
    return Request(fid, op, {"keys": rest.split("\n")})


# -- the lookup lane ------------------------------------------------------------
#
# A lone ``contains`` is one compact frame each way, each read whole in one
# read. Building its Request, Response and Frame objects and walking the
# generic checks of encode_compact and decode_compact cost more than the
# store's own answer (~1.5 us a side, measured), so these go from the bytes
# to what the caller needs and back. They agree exactly with the generic
# path (tests/protocol holds them to it); for anything else they return
# None and the caller takes the generic path.

#: The operation the lane carries (a lookup of keys).
LOOKUP_OP = "contains_many"
_LOOKUP_HEAD = bytes((_C_KEYS, len(LOOKUP_OP))) + LOOKUP_OP.encode("ascii")


def encode_lookup(rid: int, key: str) -> Optional[bytes]:
    """``encode_message(Request(rid, LOOKUP_OP, {"keys": [key]}), True)``,
    or ``None`` for a key the compact form cannot carry."""
    if type(key) is not str or "\n" in key:
        return None
    payload = _LOOKUP_HEAD + key.encode("utf-8", "surrogatepass")
    if len(payload) > COMPACT_MAX:
        return None
    return _HEADER.pack(MARKER, MSG, rid, len(payload)) + payload


def encode_found(rid: int, found: Any) -> bytes:
    """``encode_message(Response(rid, found), True)``: a lookup's answer to
    a client that speaks the compact forms."""
    if type(found) is list and len(found) < COMPACT_MAX:
        for r in found:
            if type(r) is not bool:
                break
        else:
            return _HEADER.pack(MARKER, MSG, rid, len(found) + 1) + bytes((_C_BOOLS, *found))
    return encode_message(Response(rid, found), True)


def encode_end(fid: int) -> bytes:
    return frame_header(END, fid, 0)


def encode_abort(fid: int, reason: str) -> bytes:
    payload = reason.encode("utf-8", "replace")[:65536]
    return frame_header(ABORT, fid, len(payload)) + payload


class NeedData:
    """Sentinel type: the decoder needs more bytes before the next frame."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()


class FrameDecoder:
    """Turns received bytes into :class:`Frame` s; feed it any split.

    Args:
        max_message: largest MSG payload accepted.
        max_chunk: largest DATA/ABORT payload accepted.
        check_budget: check each message against the decoder's budget
            (memo, nesting, sizes) before unpickling it, as the server does
            with what clients send. The client's decoder skips it: the
            server it talks to also hands it result pickles that it loads
            in full, so the check would guard nothing and costs ~15 us a
            message (measured on a contains reply).
    """

    def __init__(
        self,
        max_message: int = DEFAULT_MAX_MESSAGE,
        max_chunk: int = DEFAULT_MAX_CHUNK,
        *,
        check_budget: bool = True,
    ) -> None:
        self.max_message = max_message
        self.max_chunk = max_chunk
        self.check_budget = check_budget
        self._buf = bytearray()
        self._whole: Optional[BytesLike] = None
        self._header: Optional[Tuple[int, int, int]] = None
        # a read handed to next_frame_from, and how far its frames are taken
        # (see _next_from_read); set only while _buf, _whole and _header are empty
        self._read = b""
        self._at = 0
        #: a compact message arrived: the peer speaks the compact forms
        self.compact_seen = False

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        whole = len(self._whole) if self._whole is not None else 0
        return len(self._buf) + whole + len(self._read) - self._at

    def feed(self, data: BytesLike) -> None:
        if self._read:
            self._keep_rest()
        if self._header is not None and not self._buf and type(data) in (bytes, bytearray):
            if len(data) == self._header[2]:
                self._whole = data  # exactly the awaited payload: keep it, no copy
                return
        if self._whole is not None:
            self._buf += self._whole
            self._whole = None
        self._buf += data

    def claim_payload(self) -> Optional[Tuple[bytearray, int]]:
        """For a big frame still arriving: a buffer of its whole payload size
        holding the bytes received so far, and how many those are.

        The caller reads the rest straight into the buffer (``readinto``)
        and hands it back with :meth:`feed_claimed`: a value chunk is then
        written into memory once, not appended and sliced out again.
        ``None`` when there is no such frame.
        """
        if self._header is None or self._whole is not None:
            return None
        length = self._header[2]
        have = len(self._buf)
        if length < _SWAP_ABOVE or have >= length:
            return None
        buf = bytearray(length)
        buf[:have] = self._buf
        self._buf = bytearray()
        return buf, have

    def feed_claimed(self, buf: bytearray) -> None:
        """Return the buffer from :meth:`claim_payload`, now full."""
        assert self._header is not None and len(buf) == self._header[2] and not self._buf
        self._whole = buf

    def awaiting(self) -> int:
        """Bytes still missing from the frame being received (0 when
        between frames): a reader may fetch exactly that many in one piece
        and :meth:`feed` them without a copy."""
        if self._header is None or self._whole is not None:
            return 0
        return max(0, self._header[2] - len(self._buf))

    def next_frame(self) -> Union[Frame, NeedData]:
        """The next complete frame, or ``NEED_DATA``.

        Raises:
            ProtocolError: garbage, an unknown frame type, an oversized
                length, or a MSG that does not decode to a message.
        """
        if self._read:
            return self._next_from_read()
        if self._header is None:
            if len(self._buf) < HEADER_SIZE:
                return NEED_DATA
            marker, ftype, fid, length = _HEADER.unpack_from(self._buf)
            if marker != MARKER:
                raise ProtocolError(
                    f"expected frame marker 0x{MARKER:02x}, got 0x{marker:02x} "
                    f"(garbage on the wire: {bytes(self._buf[:32])!r})"
                )
            if ftype not in FRAME_TYPES:
                raise ProtocolError(f"unknown frame type {ftype}; expected one of {sorted(FRAME_TYPES)}")
            limit = self.max_message if ftype == MSG else self.max_chunk
            if ftype == END and length:
                raise ProtocolError(f"END frame with a {length}-byte payload; expected none")
            if length > limit:
                raise ProtocolError(
                    f"{FRAME_TYPES[ftype]} frame of {length} bytes exceeds the limit of {limit} bytes"
                )
            del self._buf[:HEADER_SIZE]
            self._header = (ftype, fid, length)
        ftype, fid, length = self._header
        payload: BytesLike
        if self._whole is not None:
            payload, self._whole = self._whole, None
        elif len(self._buf) < length:
            return NEED_DATA
        elif len(self._buf) == length and length >= _SWAP_ABOVE:
            payload, self._buf = self._buf, bytearray()  # hand the buffer over
        else:
            with memoryview(self._buf) as view:  # one copy out of the buffer
                payload = bytes(view[:length])
            del self._buf[:length]
        self._header = None
        if ftype == MSG:
            return self._message(fid, payload)
        return Frame(ftype, fid, payload)  # type: ignore[arg-type]

    def next_frame_from(self, data: bytes) -> Union[Frame, NeedData]:
        """:meth:`feed` ``data``, then :meth:`next_frame`, with the same
        result and errors; faster when nothing is buffered, as a small
        request or its answer, or a run of value chunks, arrives in one
        read: the frames are decoded from ``data`` without passing through
        the buffer (:meth:`_next_from_read`; a one-message read's
        read-to-frame ~1.6 -> ~1.0 us on either end).
        """
        if type(data) is bytes and self._header is None and not self._buf and not self._read:
            self._read, self._at = data, 0
            return self._next_from_read()
        self.feed(data)
        return self.next_frame()

    def _next_from_read(self) -> Union[Frame, NeedData]:
        """The next frame of the read :meth:`next_frame_from` kept, sliced
        out of it: a read of several frames (a value streaming in, 256 KiB
        frames in reads of up to 1 MiB) is not first appended to the buffer
        and then cut out of it again, two copies of every byte; a message is
        now copied once out of the read, a value's chunk not at all. The first
        frame that is not whole in the read, or not as expected, and what
        follows it go to the buffer and the usual path (which says what is
        wrong with a bad one)."""
        data, at = self._read, self._at
        if len(data) - at >= HEADER_SIZE:
            marker, ftype, fid, length = _HEADER.unpack_from(data, at)
            start = at + HEADER_SIZE
            end = start + length
            if (
                end <= len(data)
                and marker == MARKER
                and ftype in FRAME_TYPES
                and length <= (self.max_message if ftype == MSG else self.max_chunk)
                and not (ftype == END and length)
            ):
                if end == len(data):
                    self._read, self._at = b"", 0
                else:
                    self._at = end
                if ftype == MSG:
                    return self._message(fid, data[start:end])
                if ftype == DATA and length >= _SWAP_ABOVE:
                    # a value's chunk: a view, not a copy; it keeps the read (at
                    # most 1 MiB, mostly this and its neighbouring chunks) alive
                    return Frame(ftype, fid, memoryview(data)[start:end])
                return Frame(ftype, fid, data[start:end])
        self._keep_rest()
        return self.next_frame()

    def _keep_rest(self) -> None:
        """Move what is left of the kept read to the buffer."""
        with memoryview(self._read) as view:
            self._buf += view[self._at :]
        self._read, self._at = b"", 0

    def lookup_from(self, data: bytes) -> Optional[Tuple[int, List[str]]]:
        """``(id, keys)`` of a read that is exactly one whole compact
        :data:`LOOKUP_OP` request, nothing being buffered: what
        :meth:`next_frame_from` would decode, without the objects (the
        lookup lane, above). ``None``, with nothing consumed, for anything
        else: then call :meth:`next_frame_from`."""
        if (
            self._header is not None
            or self._buf
            or self._read
            or not data.startswith(_LOOKUP_HEAD, HEADER_SIZE)
        ):
            return None
        marker, ftype, fid, length = _HEADER.unpack_from(data)
        if marker != MARKER or ftype != MSG or length != len(data) - HEADER_SIZE or length > COMPACT_MAX:
            return None
        if length > self.max_message:
            return None
        try:
            keys = data[HEADER_SIZE + len(_LOOKUP_HEAD) :].decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return None  # the generic path says what is wrong
        self.compact_seen = True
        return fid, keys.split("\n")

    def found_from(self, data: bytes, rid: int) -> Optional[List[bool]]:
        """The list of a read that is exactly one whole compact answer of
        booleans to request ``rid``, nothing being buffered: the result of
        the ``Response`` :meth:`next_frame_from` would decode, without the
        objects (the lookup lane, above). ``None``, with nothing consumed,
        for anything else: then call :meth:`next_frame_from`."""
        if self._header is not None or self._buf or self._read or len(data) <= HEADER_SIZE:
            return None
        if data[HEADER_SIZE] != _C_BOOLS:
            return None
        marker, ftype, fid, length = _HEADER.unpack_from(data)
        if fid != rid or marker != MARKER or ftype != MSG or length != len(data) - HEADER_SIZE:
            return None
        if length > COMPACT_MAX or length > self.max_message:
            return None
        try:
            found = [_C_TRUE_FALSE[b] for b in data[HEADER_SIZE + 1 :]]
        except IndexError:
            return None  # the generic path says what is wrong
        self.compact_seen = True
        return found

    def _message(self, fid: int, payload: BytesLike) -> Frame:
        """The frame of a whole MSG payload (compact form or pickle)."""
        if payload and payload[0] < 0x20:  # no pickle opcode is a control byte
            self.compact_seen = True
            return Frame(MSG, fid, b"", decode_compact(payload, fid))
        message = loads_plain(payload) if self.check_budget else loads_plain(payload, None)
        if not isinstance(message, _MESSAGE_TYPES):
            raise ProtocolError(f"MSG frame holds a {type(message).__name__}, expected a message")
        mid = getattr(message, "id", fid)
        if mid != fid:
            raise ProtocolError(f"MSG frame id {fid} does not match its message id {mid}")
        return Frame(MSG, fid, b"", message)
