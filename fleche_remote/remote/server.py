"""The server: ``python -m fleche_remote serve``, one per client connection.

Design rules:

* It speaks first (banner, then a ``Hello`` carrying ``info``), then
  answers requests in order until end of input.
* Right after taking fds 0 and 1 as the channel it points fd 1 at
  stderr and fd 0 at /dev/null, so a stray ``print`` in a library or a
  subprocess can never corrupt the stream; stderr is the log.
* Requests are decoded by the restricted decoder; dispatch goes through
  the explicit ``_HANDLERS`` table, never ``getattr`` on a received name.
  Read-only servers use a table with every write removed.
* Saved values arrive as opaque blobs and are stored as they are, after
  checking that their bytes hash to the digest they claim; the server
  never unpickles them (it does not even need NumPy to store an array).
* Errors go back as data (type, message, traceback); the connection stays
  in step, because a request's incoming value streams are always drained.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import traceback
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from .. import __version__
from ..caches.base import BaseCache
from ..call import CallRecord
from ..errors import ProtocolError, Rejected
from ..plain import check_plain
from ..values import CHUNK_SIZE, Blob, StreamBlob, VerifyingBlob
from .protocol import (
    BANNER,
    DATA,
    END,
    MSG,
    NEED_DATA,
    PROTOCOL_VERSION,
    BlobHeader,
    ErrorResponse,
    Frame,
    FrameDecoder,
    Hello,
    Request,
    Response,
    encode_abort,
    encode_end,
    encode_message,
    frame_header,
)

log = logging.getLogger("fleche_remote.server")

#: Environment switch for the test-only ``debug_raise`` operation, which
#: raises a chosen exception on the server to prove the error path.
DEBUG_OPS_ENV = "FLECHE_REMOTE_DEBUG_OPS"

#: Read size: one chunk frame plus its header in a single call.
_READ_SIZE = CHUNK_SIZE + 64


class _Channel:
    """Blocking frame I/O over the server's two streams."""

    def __init__(self, input_stream: BinaryIO, output_stream: BinaryIO) -> None:
        self._in = input_stream
        self._out = output_stream
        self._read = getattr(input_stream, "read1", None) or input_stream.read
        self._decoder = FrameDecoder()

    def next_frame(self) -> Optional[Frame]:
        while True:
            frame = self._decoder.next_frame()
            if frame is not NEED_DATA:
                return frame  # type: ignore[return-value]
            data = self._read(_READ_SIZE)
            if not data:
                if self._decoder.buffered:
                    raise ProtocolError(
                        f"input ended inside a frame ({self._decoder.buffered} bytes buffered)"
                    )
                return None
            self._decoder.feed(data)

    def write(self, data: bytes) -> None:
        self._out.write(data)

    def flush(self) -> None:
        self._out.flush()

    def send_blob(self, fid: int, blob: Blob) -> None:
        sent = 0
        try:
            for chunk in blob.chunks(CHUNK_SIZE):
                self._out.write(frame_header(DATA, fid, len(chunk)))
                self._out.write(chunk)
                sent += len(chunk)
            if sent != blob.size:
                raise ProtocolError(f"value had {sent} bytes, its header said {blob.size}")
        except Exception as exc:
            log.warning("value stream %d aborted: %s", fid, exc)
            self._out.write(encode_abort(fid, f"{type(exc).__name__}: {exc}"))
            return
        self._out.write(encode_end(fid))


class _IncomingBlob(StreamBlob):
    """A value arriving as DATA frames; knows whether it was read to END."""

    def __init__(self, channel: _Channel, fid: int, header: BlobHeader) -> None:
        self.done = False
        self.header = header
        super().__init__(header.kind, header.meta, header.size, self._frames(channel, fid))

    def _frames(self, channel: _Channel, fid: int) -> Iterator[bytes]:
        received = 0
        while True:
            frame = channel.next_frame()
            if frame is None:
                raise ProtocolError("input ended in the middle of a value")
            if frame.id != fid or frame.type == MSG:
                raise ProtocolError(f"expected value data for request {fid}, got a frame for {frame.id}")
            if frame.type == DATA:
                received += len(frame.payload)
                if received > self.size:
                    raise ProtocolError(f"value longer than the announced {self.size} bytes")
                yield frame.payload
            elif frame.type == END:
                self.done = True
                if received != self.size:
                    raise ProtocolError(f"value ended after {received} of {self.size} bytes")
                return
            else:  # ABORT: the client could not produce the value
                self.done = True
                raise ValueError(f"the client aborted the value: {frame.payload.decode('utf-8', 'replace')}")

    def drain(self) -> None:
        if not self.done:
            try:
                for _ in self._source if self._started else self.chunks():
                    pass
            except ValueError:
                pass


class _Context:
    def __init__(self, cache: BaseCache, cache_name: Optional[str], read_only: bool, info: Dict[str, Any]):
        self.cache = cache
        self.cache_name = cache_name
        self.read_only = read_only
        self.info = info


Result = Tuple[Any, List[Blob]]
Handler = Callable[[_Context, Dict[str, Any], List[_IncomingBlob]], Result]


def _h_ping(ctx: _Context, args: Dict[str, Any], blobs: List[_IncomingBlob]) -> Result:
    return None, []


def _h_info(ctx: _Context, args: Dict[str, Any], blobs: List[_IncomingBlob]) -> Result:
    ctx.info = server_info(ctx.cache, ctx.cache_name, ctx.read_only)
    return ctx.info, []


def _h_contains_many(ctx: _Context, args: Dict[str, Any], blobs: List[_IncomingBlob]) -> Result:
    return ctx.cache.contains_many(_str_list(args, "keys")), []


def _h_load_records(ctx: _Context, args: Dict[str, Any], blobs: List[_IncomingBlob]) -> Result:
    return ctx.cache.load_records(_str_list(args, "keys")), []


def _h_expand(ctx: _Context, args: Dict[str, Any], blobs: List[_IncomingBlob]) -> Result:
    return str(ctx.cache.expand(_str(args, "prefix"))), []


def _h_query_records(ctx: _Context, args: Dict[str, Any], blobs: List[_IncomingBlob]) -> Result:
    name = args.get("name")
    records = list(ctx.cache.query_records(name, args.get("arg_digests"), args.get("metadata")))
    return records, []


def _h_load_blob(ctx: _Context, args: Dict[str, Any], blobs: List[_IncomingBlob]) -> Result:
    return None, [ctx.cache.load_blob(_str(args, "digest"))]


def _h_load_value(ctx: _Context, args: Dict[str, Any], blobs: List[_IncomingBlob]) -> Result:
    key = _str(args, "key")
    record = ctx.cache.load_records([ctx.cache._full_key(key)])[0]
    if record is None:
        raise KeyError(key)
    return record, [ctx.cache.load_blob(record.value)]


def _h_save_records(ctx: _Context, args: Dict[str, Any], blobs: List[_IncomingBlob]) -> Result:
    records = args.get("records")
    if not isinstance(records, list) or len(records) != len(blobs):
        raise ProtocolError("save_records needs one value stream per record")
    for record, blob in zip(records, blobs):
        if not isinstance(record, CallRecord):
            raise ProtocolError(f"save_records got a {type(record).__name__}, expected CallRecord")
        if blob.header.digest != record.value:
            raise ProtocolError("a value stream's digest does not match its record")
        ctx.cache.save_records([(record, VerifyingBlob(blob, record.value))])
        blob.drain()
    return None, []


def _h_evict(ctx: _Context, args: Dict[str, Any], blobs: List[_IncomingBlob]) -> Result:
    ctx.cache.evict(_str(args, "key"))
    return None, []


def _h_collect_garbage(ctx: _Context, args: Dict[str, Any], blobs: List[_IncomingBlob]) -> Result:
    return ctx.cache.collect_garbage(), []


_SAFE_EXCEPTIONS = {
    "KeyError": KeyError,
    "ValueError": ValueError,
    "OSError": OSError,
    "RuntimeError": RuntimeError,
}


def _h_debug_raise(ctx: _Context, args: Dict[str, Any], blobs: List[_IncomingBlob]) -> Result:
    exc_type = _SAFE_EXCEPTIONS.get(_str(args, "type"))
    if exc_type is None:
        raise type("InjectedError", (Exception,), {})(args.get("message", ""))
    raise exc_type(args.get("message", ""))


_READ_HANDLERS: Dict[str, Handler] = {
    "ping": _h_ping,
    "info": _h_info,
    "contains_many": _h_contains_many,
    "load_records": _h_load_records,
    "expand": _h_expand,
    "query_records": _h_query_records,
    "load_blob": _h_load_blob,
    "load_value": _h_load_value,
}
_WRITE_HANDLERS: Dict[str, Handler] = {
    "save_records": _h_save_records,
    "evict": _h_evict,
    "collect_garbage": _h_collect_garbage,
}


def handler_table(read_only: bool, debug_ops: bool = False) -> Dict[str, Handler]:
    """The operations a server answers; a read-only one has no write entries."""
    table = dict(_READ_HANDLERS)
    if not read_only:
        table.update(_WRITE_HANDLERS)
    if debug_ops:
        table["debug_raise"] = _h_debug_raise
    return table


def _str(args: Dict[str, Any], name: str) -> str:
    value = args.get(name)
    if not isinstance(value, str):
        raise ProtocolError(f"argument {name!r} must be a str, got {type(value).__name__}")
    return value


def _str_list(args: Dict[str, Any], name: str) -> List[str]:
    value = args.get(name)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ProtocolError(f"argument {name!r} must be a list of str")
    return value


def _error_response(rid: int, exc: BaseException) -> ErrorResponse:
    cls = type(exc)
    if cls.__module__ == "builtins":
        tname = cls.__qualname__
    else:
        tname = f"{cls.__module__}.{cls.__qualname__}"
    args: Tuple[Any, ...] = ()
    try:
        check_plain(list(exc.args))
        args = tuple(exc.args)
    except TypeError:
        pass
    return ErrorResponse(rid, tname, str(exc), args, traceback.format_exc())


def server_info(cache: BaseCache, cache_name: Optional[str], read_only: bool) -> Dict[str, Any]:
    """What ``SshCache.info()`` reports: the cache (credentials redacted),
    versions, and where and as what the server runs."""
    import cloudpickle

    try:
        from ..config import cache_to_config, redact

        described: Any = redact(cache_to_config(cache))
    except Exception:  # a cache the config layer can't express
        described = cache.describe()
    return {
        "cache": described,
        "cache_name": cache_name,
        "read_only": bool(read_only or cache.read_only),
        "versions": {
            "library": __version__,
            "protocol": PROTOCOL_VERSION,
            "cloudpickle": cloudpickle.__version__,
            "python": sys.version.split()[0],
        },
        "cwd": os.getcwd(),
        "hostname": socket.gethostname(),
        "python": sys.executable,
        "pid": os.getpid(),
        "peak_rss_bytes": _peak_rss(),
    }


def _peak_rss() -> Optional[int]:
    """The server's peak resident memory, so a client can check that a huge
    value really streamed through in bounded memory."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def serve(
    input_stream: BinaryIO,
    output_stream: BinaryIO,
    cache: BaseCache,
    *,
    cache_name: Optional[str] = None,
    read_only: bool = False,
) -> None:
    """Answer requests from ``input_stream`` on ``output_stream`` until EOF.

    Args:
        input_stream: binary stream of request frames (unbuffered, or one
            with ``read1``, so that a request is answered as soon as it is
            complete).
        output_stream: binary stream for the banner and reply frames.
        cache: the cache requests operate on.
        cache_name: its name in the server's config, reported in ``info``.
        read_only: refuse writes even if ``cache`` allows them.

    Raises:
        ProtocolError: the input is not the fleche-remote protocol (the
            caller should exit; the client will see the connection end).
    """
    read_only = bool(read_only or cache.read_only)
    info = server_info(cache, cache_name, read_only)
    ctx = _Context(cache, cache_name, read_only, info)
    table = handler_table(read_only, os.environ.get(DEBUG_OPS_ENV) == "1")
    channel = _Channel(input_stream, output_stream)
    channel.write(BANNER + encode_message(Hello(PROTOCOL_VERSION, __version__, info)))
    channel.flush()
    while True:
        frame = channel.next_frame()
        if frame is None:
            log.info("client closed the connection")
            return
        if frame.type != MSG or not isinstance(frame.message, Request):
            raise ProtocolError(f"expected a request, got a {frame.type} frame for id {frame.id}")
        _answer(ctx, table, channel, frame.message)


def _answer(ctx: _Context, table: Dict[str, Handler], channel: _Channel, request: Request) -> None:
    incoming = [_IncomingBlob(channel, request.id, h) for h in request.blobs]
    try:
        handler = table.get(request.op)
        if handler is None:
            if request.op in _WRITE_HANDLERS:
                raise Rejected(f"this server is read-only: {request.op!r} is not allowed")
            raise ProtocolError(f"unknown operation {request.op!r}; this server knows {sorted(table)}")
        if not isinstance(request.args, dict):
            raise ProtocolError("request arguments must be a dict")
        result, outgoing = handler(ctx, request.args, incoming)
    except Exception as exc:
        if not isinstance(exc, (KeyError, Rejected)):
            log.warning("%s failed: %s: %s", request.op, type(exc).__name__, exc)
        for blob in incoming:
            blob.drain()
        channel.write(encode_message(_error_response(request.id, exc)))
        channel.flush()
        return
    digest = str(request.args.get("digest") or getattr(result, "value", ""))
    headers = [BlobHeader(b.kind, b.meta, b.size, digest) for b in outgoing]
    channel.write(encode_message(Response(request.id, result, headers)))
    for out in outgoing:
        channel.send_blob(request.id, out)
    channel.flush()


def _take_channel() -> Tuple[BinaryIO, BinaryIO]:
    """Claim fds 0/1 for the protocol and make stray output harmless."""
    in_fd = os.dup(0)
    out_fd = os.dup(1)
    from .transport import enlarge_pipe

    enlarge_pipe(in_fd)
    enlarge_pipe(out_fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)  # prints from anything, even C code or children, go to the log
    sys.stdout = sys.stderr
    return os.fdopen(in_fd, "rb", buffering=0), os.fdopen(out_fd, "wb", buffering=1 << 20)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m fleche_remote serve [--cache NAME] [--config PATH] [--read-only]``."""
    parser = argparse.ArgumentParser(
        prog="fleche-remote serve", description="Serve a cache over stdin/stdout."
    )
    parser.add_argument("--cache", help="cache name in fleche.toml (default: [default] cache)")
    parser.add_argument("--config", help="read this fleche.toml instead of discovering one")
    parser.add_argument("--read-only", action="store_true", help="refuse every write")
    args = parser.parse_args(argv)
    in_stream, out_stream = _take_channel()
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format=f"fleche-remote serve[{os.getpid()}] %(levelname)s %(message)s",
    )
    try:
        from ..config import load_cache, load_config

        config = load_config(args.config) if args.config else load_config()
        cache = load_cache(args.cache, config=config)
    except Exception as exc:
        print(f"fleche-remote serve: cannot open the cache: {exc}", file=sys.stderr)
        return 2
    log.info(
        "serving cache %s%s from %s (protocol %d, fleche-remote %s)",
        args.cache or "[default]",
        " read-only" if args.read_only or cache.read_only else "",
        os.getcwd(),
        PROTOCOL_VERSION,
        __version__,
    )
    try:
        serve(in_stream, out_stream, cache, cache_name=args.cache, read_only=args.read_only)
    except ProtocolError as exc:
        print(f"fleche-remote serve: protocol error, closing: {exc}", file=sys.stderr)
        return 3
    except BrokenPipeError:
        return 0
    finally:
        cache.close()
    return 0
