"""The server: ``python -m fleche_remote serve``, one per client connection.

Design rules:

* It speaks first (banner, then a ``Hello`` carrying ``info``), then
  answers requests until end of input.
* Right after taking fds 0 and 1 as the channel it points fd 1 at
  stderr and fd 0 at /dev/null, so a stray ``print`` in a library or a
  subprocess can never corrupt the stream; stderr is the log.
* Requests are decoded by the restricted decoder and dispatched through
  the allow-list in :mod:`~fleche_remote.remote.handlers`; saved values
  are stored as opaque blobs, never unpickled.
* Pipelining: the main thread reads frames and answers small requests at
  once, in arrival order, so a burst of lookups costs one round trip.
  Work that takes the length of a value is moved off it: requests that
  carry values go to one *upload* thread (in order; their chunks reach it
  through a bounded queue), and answers that stream a large value or many
  pages get a *stream* thread of their own. Frames of different answers
  interleave on the output, one frame at a time under a lock, so a 1 GiB
  download never holds a ``contains`` up for its whole length.
* Replies written by the main thread are flushed when it has no complete
  request left to read, so a pipelined burst leaves as few writes.
* Errors go back as data (type, message, traceback); the connection stays
  in step, because a request's incoming value streams are always drained.
  A frame that breaks the protocol ends the server (the client sees the
  connection close and reports our stderr).
* Nothing a client sends is trusted to have the right shape: a request
  whose id or announced values are malformed ends the connection (the
  stream can no longer be kept in step); a bad operation name or bad
  arguments get an error answer. Either way the server never dies with a
  traceback, and allocates nothing beyond the decoder's limits.
* ``--read-only`` and ``--append-only`` take operations out of the
  dispatch table; the client's own idea of the mode plays no part.

The plumbing under the loop (frames in and out, the queues that carry
uploads, the credits of streamed answers) is
:mod:`~fleche_remote.remote.server_io`.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import sys
import threading
import traceback
from typing import Any, BinaryIO, Dict, List, Optional, Sequence, Tuple

from .. import __version__
from ..caches.base import BaseCache
from ..codec.plain import check_plain
from ..codec.values import Blob
from ..errors import ProtocolError, Rejected
from .handlers import (
    WRITE_HANDLERS,
    Context,
    Handler,
    IncomingBlob,
    Pages,
    Reply,
    handler_table,
    rejected_write,
    server_info,
)
from .protocol import (
    BANNER,
    DATA,
    LOOKUP_OP,
    MSG,
    NEED_DATA,
    PROTOCOL_VERSION,
    BlobHeader,
    ErrorResponse,
    Frame,
    Hello,
    Request,
    Response,
    encode_abort,
    encode_end,
    encode_found,
    encode_message,
    frame_header,
)
from .server_io import EOF, POLL, Input, Output, OutStream, Upload
from .turns import BULK_FRAME

log = logging.getLogger("fleche_remote.server")

#: Environment switch for the test-only ``debug_raise`` operation, which
#: raises a chosen exception on the server to prove the error path.
DEBUG_OPS_ENV = "FLECHE_REMOTE_DEBUG_OPS"

#: Answers whose values add up to at most this are written by the main
#: thread at once; bigger ones get a stream thread.
STREAM_ABOVE = 1 << 20

#: Stream threads at once. A well-behaved client has at most 64 requests in
#: flight; this only stops a hostile one from spawning threads without end.
MAX_STREAMS = 256

#: Requests with values that may wait for the upload thread. A client has
#: at most 64 requests in flight; this only stops a hostile one from
#: announcing values it never sends until the server runs out of memory.
MAX_PENDING_UPLOADS = 256


class _Server:
    def __init__(self, ctx: Context, table: Dict[str, Handler], inp: Input, out: Output) -> None:
        self.ctx = ctx
        self.table = table
        self.inp = inp
        self.out = out
        self.stopping = threading.Event()
        self.uploads: Dict[int, Upload] = {}
        self.receiving: Optional[int] = None  # the upload whose values are arriving
        self.streams: Dict[int, OutStream] = {}
        self.streams_lock = threading.Lock()
        self.stream_threads: List[threading.Thread] = []
        self.upload_jobs: queue.Queue[Any] = queue.Queue()
        self.upload_thread = threading.Thread(target=self._upload_worker, name="fleche-upload", daemon=True)
        self.upload_thread.start()

    # -- the main thread --------------------------------------------------

    def run(self) -> None:
        decoder = self.inp.decoder
        while True:
            frame: Any = decoder.next_frame()
            if frame is NEED_DATA:
                self.out.flush()  # nothing more to answer right now
                frame = self.inp.read_frame()
            if frame is None:
                log.info("client closed the connection")
                return
            if self.out.broken:
                return
            if type(frame) is tuple:  # a lookup read whole (see Input.read_frame)
                self._answer_lookup(*frame)
                continue
            if frame.type == MSG:
                request = frame.message
                if type(request) is Request and request.op == LOOKUP_OP and self._lookup(request):
                    continue
                if not isinstance(request, Request):
                    raise ProtocolError(f"expected a request, got a {type(request).__name__}")
                _check_request(request)
                self._dispatch(request)
            else:
                self._route(frame)

    def _route(self, frame: Frame) -> None:
        upload = self.uploads.get(frame.id)
        if upload is None:
            raise ProtocolError(f"value data for request {frame.id}, which announced no value to come")
        if self.receiving not in (None, frame.id):
            raise ProtocolError(
                f"value data for request {frame.id} while request {self.receiving}'s value is arriving; "
                f"a client sends one value stream at a time"
            )
        self.receiving = frame.id
        upload.route(frame)
        if upload.complete:
            del self.uploads[frame.id]
            self.receiving = None

    def _dispatch(self, request: Request) -> None:
        if request.op == "credit" or request.op == "cancel":
            self._flow_control(request)
            return
        if request.blobs:
            if self.upload_jobs.qsize() >= MAX_PENDING_UPLOADS:
                raise ProtocolError(
                    f"more than {MAX_PENDING_UPLOADS} requests with values are waiting for their data; "
                    f"a client has at most 64 requests in flight"
                )
            upload = Upload(self.stopping, request)
            self.uploads[request.id] = upload
            self.upload_jobs.put((request, upload.blobs))
            return
        try:
            reply = self._call(request, [])
        except Exception as exc:
            self._send_error(request, exc, flush=False)
            return
        if isinstance(reply, Pages):
            self._spawn(request.id, reply.window, self._stream_pages, reply)
        elif sum(blob.size for _, blob in reply.blobs) > STREAM_ABOVE:
            self._spawn(request.id, 0, self._stream_reply, reply)
        else:
            self._write_reply(request.id, reply, None, flush=False)

    def _lookup(self, request: Request) -> bool:
        """Answer the commonest request, a lookup of a few keys, straight
        from the store: the generic path's checks, handler and reply object
        cost more than the store's own answer (server CPU per contains
        12.3 -> 11.4 us, measured with the input and output in memory).
        False, with nothing done, for anything but a plain well-formed
        lookup (the generic path answers it, or says what is wrong)."""
        args, rid = request.args, request.id
        keys = args.get("keys") if type(args) is dict and len(args) == 1 else None
        if type(keys) is not list or not keys or request.blobs != [] or type(rid) is not int:
            return False
        for key in keys:
            if type(key) is not str:
                return False
        self._answer_lookup(rid, keys)
        return True

    def _answer_lookup(self, rid: int, keys: List[str]) -> None:
        """Answer a well-formed lookup (id int, keys a non-empty list of str)."""
        try:
            found = self.ctx.cache.contains_many(keys)
        except Exception as exc:
            self._send_error(Request(rid, LOOKUP_OP, {"keys": keys}), exc, flush=False)
            return
        decoder = self.inp.decoder
        answer = encode_found(rid, found) if decoder.compact_seen else encode_message(Response(rid, found))
        # nothing more has arrived: the answer goes now, not after the next look at the input
        self.out.send([answer], flush=not decoder.buffered)

    def _flow_control(self, request: Request) -> None:
        target = request.args.get("id") if isinstance(request.args, dict) else None
        with self.streams_lock:
            stream = self.streams.get(target) if isinstance(target, int) else None
        if stream is None:
            return  # finished already: nothing to do
        if request.op == "cancel":
            stream.cancel()
        else:
            n = request.args.get("n", 1)
            stream.grant(n if isinstance(n, int) and 0 < n <= 1024 else 1)

    def _call(self, request: Request, blobs: List[IncomingBlob]) -> Any:
        op = getattr(request, "op", None)
        if not isinstance(op, str):
            raise ProtocolError(f"an operation name must be a str, got {type(op).__name__}")
        handler = self.table.get(op)
        if handler is None:
            if op in WRITE_HANDLERS:
                raise rejected_write(op, self.ctx.append_only)
            raise ProtocolError(f"unknown operation {op[:100]!r}; this server knows {sorted(self.table)}")
        args = getattr(request, "args", None)
        if not isinstance(args, dict):
            raise ProtocolError(f"request arguments must be a dict, got {type(args).__name__}")
        return handler(self.ctx, args, blobs)

    def _send_error(self, request: Request, exc: BaseException, flush: bool = True) -> None:
        if not isinstance(exc, (KeyError, Rejected)):
            # repr, cut short: a hostile name or message must not write control bytes into the log
            log.warning("%.80r failed: %s: %.500r", request.op, type(exc).__name__, str(exc))
        self.out.send([encode_message(error_response(request.id, exc))], flush=flush)

    # -- answers ------------------------------------------------------------

    def _write_reply(self, rid: int, reply: Reply, stream: Optional[OutStream], flush: bool) -> None:
        headers = [BlobHeader(b.kind, b.meta, b.size, digest) for digest, b in reply.blobs]
        response = Response(rid, reply.result, headers)
        if not self.out.send([encode_message(response, self.inp.decoder.compact_seen)], flush=flush):
            return
        for _, blob in reply.blobs:
            if not self._send_blob(rid, blob, stream, flush):
                return

    def _send_blob(self, rid: int, blob: Blob, stream: Optional[OutStream], flush: bool) -> bool:
        """Stream one value; False if the client went away or cancelled."""
        sent = 0
        try:
            for chunk in blob.chunks(BULK_FRAME):
                if stream is not None and (stream.cancelled or self.stopping.is_set()):
                    return False
                if not self.out.send([frame_header(DATA, rid, len(chunk)), chunk], flush=flush, bulk=True):
                    return False
                sent += len(chunk)
            if sent != blob.size:
                raise ProtocolError(f"value had {sent} bytes, its header said {blob.size}")
        except Exception as exc:
            log.warning("value stream %d aborted: %s", rid, exc)
            return self.out.send([encode_abort(rid, f"{type(exc).__name__}: {exc}")], flush=flush)
        return self.out.send([encode_end(rid)], flush=flush)

    def _spawn(self, rid: int, credits: int, target: Any, reply: Any) -> None:
        stream = OutStream(credits)
        with self.streams_lock:
            if len(self.streams) >= MAX_STREAMS:
                self.out.send(
                    [encode_message(error_response(rid, RuntimeError("too many answers streaming at once")))]
                )
                return
            self.streams[rid] = stream
        thread = threading.Thread(target=self._run_stream, args=(rid, stream, target, reply), daemon=True)
        self.stream_threads = [t for t in self.stream_threads if t.is_alive()]
        self.stream_threads.append(thread)
        thread.start()

    def _run_stream(self, rid: int, stream: OutStream, target: Any, reply: Any) -> None:
        try:
            target(rid, stream, reply)
        finally:
            with self.streams_lock:
                self.streams.pop(rid, None)

    def _stream_reply(self, rid: int, stream: OutStream, reply: Reply) -> None:
        self._write_reply(rid, reply, stream, flush=True)

    def _stream_pages(self, rid: int, stream: OutStream, pages: Pages) -> None:
        source = iter(pages.pages)
        try:
            page = next(source)
            while True:
                nxt = next(source, EOF)
                last = nxt is EOF
                with stream.cond:
                    while stream.credits <= 0 and not stream.cancelled and not self.stopping.is_set():
                        stream.cond.wait(POLL)
                    if stream.cancelled or self.stopping.is_set():
                        return
                    stream.credits -= 1
                if not self.out.send([encode_message(Response(rid, page, [], more=not last))]):
                    return
                if last:
                    return
                page = nxt
        except Exception as exc:
            log.warning("query %d failed: %s: %s", rid, type(exc).__name__, exc)
            self.out.send([encode_message(error_response(rid, exc))])
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    # -- uploads ------------------------------------------------------------

    def _upload_worker(self) -> None:
        while True:
            job = self.upload_jobs.get()
            if job is None:
                return
            request, blobs = job
            try:
                reply = self._call(request, blobs)
                if not isinstance(reply, Reply) or reply.blobs:
                    raise ProtocolError(f"{request.op!r} cannot take values")
            except Exception as exc:
                for blob in blobs:
                    try:
                        blob.drain()
                    except ProtocolError:
                        break  # the input ended; the server is stopping
                self._send_error(request, exc)
                continue
            self._write_reply(request.id, reply, None, flush=True)

    # -- stopping -------------------------------------------------------------

    def shutdown(self) -> None:
        self.stopping.set()
        for upload in list(self.uploads.values()):
            upload.close_input()
        self.upload_jobs.put(None)
        self.upload_thread.join(30)
        for thread in self.stream_threads:
            thread.join(5)
        self.out.flush()


def _check_request(request: Request) -> None:
    """Refuse a request the server cannot stay in step after answering.

    Its id must be an int (every frame of the answer repeats it) and the
    values it announces must be well-formed headers (the frames that
    follow are checked against them). Anything else about a request (its
    operation, its arguments) is answered with an error instead.

    Raises:
        ProtocolError: the connection has to close.
    """
    rid = getattr(request, "id", None)
    if type(rid) is not int:
        raise ProtocolError(f"a request id must be an int, got {type(rid).__name__}")
    blobs = getattr(request, "blobs", None)
    if not isinstance(blobs, list):
        raise ProtocolError(f"request {rid}: 'blobs' must be a list, got {type(blobs).__name__}")
    for header in blobs:
        size = getattr(header, "size", None)
        if (
            not isinstance(header, BlobHeader)
            or type(size) is not int
            or size < 0
            or not isinstance(getattr(header, "kind", None), str)
            or not isinstance(getattr(header, "meta", None), dict)
            or not isinstance(getattr(header, "digest", None), str)
        ):
            raise ProtocolError(
                f"request {rid}: a value header must be a BlobHeader(kind: str, meta: dict, "
                f"size: int >= 0, digest: str), got {header!r:.200}"
            )


def error_response(rid: int, exc: BaseException) -> ErrorResponse:
    """An exception as data, for the client to rebuild."""
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
    if isinstance(exc, OSError) and exc.filename is not None and len(args) == 2:
        # OSError keeps the file name out of args: put it back, so the
        # client's error names the path as well as the errno
        args = (*args, str(exc.filename))
    tb = "".join(traceback.format_exception(cls, exc, exc.__traceback__))
    return ErrorResponse(rid, tname, str(exc), args, tb)


def serve(
    input_stream: BinaryIO,
    output_stream: BinaryIO,
    cache: BaseCache,
    *,
    cache_name: Optional[str] = None,
    read_only: bool = False,
    append_only: bool = False,
    compute: Any = None,
) -> None:
    """Answer requests from ``input_stream`` on ``output_stream`` until EOF.

    Args:
        input_stream: binary stream of request frames (unbuffered, or one
            with ``read1``, so that a request is answered as soon as it is
            complete).
        output_stream: binary stream for the banner and reply frames.
        cache: the cache requests operate on; it is called from several
            threads at once.
        cache_name: its name in the server's config, reported in ``info``.
        read_only: refuse writes even if ``cache`` allows them.
        append_only: take evict and garbage collection away, and refuse a
            save that would replace an entry stored with another value.
        compute: a :class:`~fleche_remote.compute.jobs.ComputeHost`, to
            run sweeps (``f.map(..., on=...)``); None refuses them.

    Raises:
        ProtocolError: the input is not the fleche-remote protocol (the
            caller should exit; the client will see the connection end).
    """
    read_only = bool(read_only or cache.read_only)
    append_only = bool(append_only and not read_only)
    ctx = Context(cache, cache_name, read_only, append_only)
    ctx.info = server_info(cache, cache_name, read_only, append_only)
    ctx.compute = compute
    table = handler_table(read_only, os.environ.get(DEBUG_OPS_ENV) == "1", append_only)
    out = Output(output_stream)
    out.send([BANNER + encode_message(Hello(PROTOCOL_VERSION, __version__, ctx.info))])
    server = _Server(ctx, table, Input(input_stream), out)
    try:
        server.run()
    finally:
        server.shutdown()


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


#: Free memory the server's heap keeps at its top (see _bound_malloc).
TRIM_THRESHOLD = 8 << 20


def _bound_malloc() -> None:
    """Keep value chunks out of glibc's heap.

    Chunk buffers are allocated by the reading thread and freed by the
    upload thread. With glibc's default, the first freed 1 MiB buffer
    raises the mmap threshold above 1 MiB, later buffers come from the
    heap, and small allocations between them keep the freed space from
    being trimmed: a 4 GiB upload through sshd left the server at 330 MB
    resident. With a fixed threshold (which also switches the dynamic one
    off) every chunk is its own mapping, returned to the system when freed,
    and the server stays near 30 MB whatever the value's size.

    Fixing the threshold also leaves the trim threshold at its default,
    128 KiB: each time more than that is free at the top of the heap, it is
    given back, and the next allocations there fault fresh pages in again.
    The reads and frames of an upload churn through that much many times a
    second; on a VM whose guest pages the host backs on first use, this
    held a 1 GiB upload through sshd to about 500 MB/s, half of what ssh
    carries, and an 8 MiB trim threshold took it to about 1,000 MB/s, the
    medians of interleaved runs (benchmarks/README.md). What stays resident
    for it is those 8 MiB: a 4 GiB upload peaked at 34 MB, as before.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 256 << 10)
        libc.mallopt(m_trim_threshold, TRIM_THRESHOLD)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _serve_as_stored(cache: Any) -> None:
    """Drop the server's own signing keys (a ``secret_key`` in its table or
    ``FLECHE_SECRET_KEY`` in its environment): clients sign what they save
    and check what they load, so the server keeps their bytes as they came.
    Signing again here would refuse every client that uses another key."""
    for layer in getattr(cache, "layers", None) or [cache]:
        if getattr(layer, "signer", None) is not None:
            layer.signer = None
            log.info("the server's secret_key is not used: clients sign and check entries themselves")


def _open_read_only(cache: Any) -> None:
    """``serve --read-only`` over a table that allows writes: its stores are
    opened as a read-only cache's are, before the first request, so that a
    colleague's forced command never creates, upgrades or migrates the
    owner's database (an old one is refused with how to upgrade it)."""
    for layer in getattr(cache, "layers", None) or [cache]:
        for store in (getattr(layer, "values", None), getattr(layer, "calls", None)):
            opener = getattr(store, "open_read_only", None)
            if opener is not None:
                opener()


def _compute_host(args: argparse.Namespace, config: Any) -> Any:
    """How this server runs sweeps: the ``[compute]`` table, and whether a
    forced command started it. sshd sets ``SSH_ORIGINAL_COMMAND`` only
    when an ``authorized_keys`` ``command=`` (or ``ForceCommand``) replaced
    what the client asked for: such a key computes only if the command
    itself says ``--allow-compute``."""
    from ..compute.jobs import ComputeHost
    from ..config.compute import compute_settings

    try:
        settings = compute_settings(config)
    except Exception as exc:  # a broken table refuses sweeps, not reads
        log.warning("[compute] ignored: %s", exc)
        settings = None
    return ComputeHost(
        settings=settings,
        config_path=os.path.abspath(args.config) if args.config else None,
        cache_name=args.cache,
        cwd=os.getcwd(),
        forced="SSH_ORIGINAL_COMMAND" in os.environ,
        allowed=bool(args.allow_compute),
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m fleche_remote serve [--cache NAME] [--config PATH] [--read-only | --append-only]
    [--allow-compute]``."""
    parser = argparse.ArgumentParser(
        prog="fleche-remote serve", description="Serve a cache over stdin/stdout."
    )
    parser.add_argument("--cache", help="cache name in fleche.toml (default: [default] cache)")
    parser.add_argument("--config", help="read this fleche.toml instead of discovering one")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--read-only", action="store_true", help="refuse every write")
    mode.add_argument(
        "--append-only",
        action="store_true",
        help="allow saves of new entries only: no evict, no overwrite, no garbage collection",
    )
    parser.add_argument(
        "--allow-compute",
        action="store_true",
        help="let f.map(..., on=...) run code here although an authorized_keys forced command started "
        "this server (refused otherwise)",
    )
    args = parser.parse_args(argv)
    _bound_malloc()
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
    _serve_as_stored(cache)
    if args.read_only:
        _open_read_only(cache)
    log.info(
        "serving cache %s%s from %s (protocol %d, fleche-remote %s)",
        args.cache or "[default]",
        " read-only" if args.read_only or cache.read_only else " append-only" if args.append_only else "",
        os.getcwd(),
        PROTOCOL_VERSION,
        __version__,
    )
    try:
        serve(
            in_stream,
            out_stream,
            cache,
            cache_name=args.cache,
            read_only=args.read_only,
            append_only=args.append_only,
            compute=_compute_host(args, config),
        )
    except ProtocolError as exc:
        print(f"fleche-remote serve: protocol error, closing: {exc}", file=sys.stderr)
        return 3
    except BrokenPipeError:
        return 0
    except Exception:  # a server bug: say so in one place, with the traceback, and exit non-zero
        log.exception("internal error, closing")
        return 4
    finally:
        cache.close()
    return 0


__all__ = ["DEBUG_OPS_ENV", "error_response", "main", "serve"]
