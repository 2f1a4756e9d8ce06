"""Transports: the byte pipes an ``SshCache`` talks through.

The client depends only on the small :class:`Transport` protocol; the
ssh subprocess (what users run), a local subprocess, and an in-process
pipe to a server thread (fast unit tests) implement it. All of them are
file-descriptor pairs driven with ``select`` and non-blocking I/O, so
every read and write has a deadline and a hung peer can never hang us.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Deque, List, Optional, Protocol, Sequence, Tuple, Union

from ..errors import RemoteConnectionError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("fleche_remote.transport")

BytesLike = Union[bytes, bytearray, memoryview]

#: How many lines of the remote's stderr an error message carries.
STDERR_TAIL_LINES = 20
_READ_SIZE = (1 << 20) + 64
#: poll() takes milliseconds in a C int: a longer wait is cut to this (24 days)
_POLL_MAX_S = 2_000_000.0


def enlarge_pipe(fd: int, size: int = 1 << 20) -> None:
    """Grow a Linux pipe's buffer from 64 KiB to a whole chunk frame.

    With the default size a 1 MiB chunk crosses the pipe in 16 wake-ups of
    each side; one is enough. Not a pipe, not Linux, or over the system's
    limit: nothing happens.
    """
    setpipe = getattr(fcntl, "F_SETPIPE_SZ", 1031) if fcntl is not None else None
    if setpipe is None or not sys.platform.startswith("linux"):
        return
    try:
        fcntl.fcntl(fd, setpipe, size)
    except OSError:
        pass


class TransportTimeout(RemoteConnectionError):
    """No progress within the deadline (the peer is hung or stopped)."""


class Transport(Protocol):
    """What the client needs from a byte pipe to a server."""

    def write(self, data: BytesLike, timeout: float) -> None:
        """Write all of ``data``; :class:`TransportTimeout` if no progress for
        ``timeout`` seconds, :class:`RemoteConnectionError` if the peer is gone."""

    def write_atomic(self, data: bytes) -> bool:
        """Write all of a small ``data`` in one go, or nothing: False when
        it can't (then :meth:`write` it), and nothing was written."""

    def wait_readable(self, timeout: float) -> None:
        """Wait until :meth:`read_ready` has something; :class:`TransportTimeout`
        after ``timeout`` seconds. Interrupting this wait loses nothing."""

    def read_ready(self) -> Optional[bytes]:
        """Read without waiting: bytes, ``b""`` at end, ``None`` if nothing."""

    def readinto_ready(self, into: memoryview) -> Optional[int]:
        """Read into ``into`` without waiting: count, ``0`` at end, ``None``."""

    def close(self) -> None:
        """Ask the peer to stop (end of input), then make sure it does."""

    def diagnose(self) -> Tuple[Optional[int], List[str]]:
        """The peer's exit status (``None`` if running) and last stderr lines."""

    @property
    def alive(self) -> bool:
        """Whether the pipe can still carry a request."""


class FdTransport:
    """A transport over a (read fd, write fd) pair; subclasses own the peer."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self._rfd = read_fd
        self._wfd = write_fd
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        for fd in (read_fd, write_fd):
            enlarge_pipe(fd)
        self._closed = False
        # a pipe takes a write of up to PIPE_BUF bytes whole or not at all
        # (POSIX); a socket promises no such thing
        self._atomic_max = select.PIPE_BUF if stat.S_ISFIFO(os.fstat(write_fd).st_mode) else 0
        # reads land here first: os.read(fd, 1 MiB) maps, shrinks and unmaps
        # a fresh 1 MiB buffer every call (three syscalls and page faults
        # for a 20-byte answer); copying what arrived out of a warm one is cheaper
        self._scratch = bytearray(_READ_SIZE)
        self._scratch_view = memoryview(self._scratch)
        # a poll object registered once: half the cost of a select() per wait
        self._poll = select.poll() if hasattr(select, "poll") else None
        if self._poll is not None:
            self._poll.register(read_fd, select.POLLIN)

    @property
    def alive(self) -> bool:
        return not self._closed

    def write(self, data: BytesLike, timeout: float) -> None:
        if self._closed:
            raise RemoteConnectionError("connection is closed")
        view = memoryview(data).cast("B")  # lengths in bytes, whatever the item size
        try:  # a request fits the pipe: no need to ask select() first (one syscall less)
            n = os.write(self._wfd, view[: 1 << 20])
        except BlockingIOError:
            n = 0
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise RemoteConnectionError(f"the remote closed the connection ({exc.strerror})") from None
        view = view[n:]
        while view.nbytes:
            if self._closed:
                raise RemoteConnectionError("connection is closed")
            _, ready, _ = select.select([], [self._wfd], [], timeout)
            if not ready:
                raise TransportTimeout(f"the remote accepted no data for {timeout:g} s (hung or stopped?)")
            try:
                n = os.write(self._wfd, view[: 1 << 20])
            except BlockingIOError:
                continue
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise RemoteConnectionError(f"the remote closed the connection ({exc.strerror})") from None
            view = view[n:]

    def write_atomic(self, data: bytes) -> bool:
        """One ``write`` call that takes all of ``data`` or nothing.

        Into a pipe, a write of at most ``PIPE_BUF`` bytes is never split
        (POSIX), so an interrupt before, during or after it leaves whole
        frames on the wire, and the caller needs no Ctrl-C deferral (two
        ``signal.signal`` calls, a fifth of a small request's client time).
        False, with nothing written: too big, not a pipe, or the pipe is
        full (then :meth:`write`, which waits).
        """
        if self._closed or len(data) > self._atomic_max:
            return False
        try:
            return os.write(self._wfd, data) == len(data)  # all: the pipe splits nothing this small
        except BlockingIOError:
            return False
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise RemoteConnectionError(f"the remote closed the connection ({exc.strerror})") from None

    def wait_readable(self, timeout: float) -> None:
        """Block until there is something to read (or end of stream);
        :class:`TransportTimeout` after ``timeout`` seconds. Interrupting
        this wait loses nothing."""
        if self._closed:
            raise RemoteConnectionError("connection is closed")
        ready: Any = None
        if self._poll is not None:
            try:
                ready = self._poll.poll(min(max(0.0, timeout), _POLL_MAX_S) * 1000)
            except RuntimeError:  # another thread polls it (a start-up reading its status line)
                pass
        if ready is None:
            ready, _, _ = select.select([self._rfd], [], [], max(0.0, timeout))
        if not ready:
            raise TransportTimeout(f"no reply from the remote within {timeout:g} s (hung or stopped?)")

    def read_ready(self) -> Optional[bytes]:
        """Read what is there without waiting: bytes (``b""`` at end of
        stream), or ``None`` if nothing was there after all."""
        if self._closed:
            raise RemoteConnectionError("connection is closed")
        try:
            n = os.readv(self._rfd, [self._scratch])
            return self._scratch_view[:n].tobytes()
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in (errno.ECONNRESET, errno.EIO):
                return b""
            raise

    def readinto_ready(self, into: memoryview) -> Optional[int]:
        """Like :meth:`read_ready`, into ``into`` (no copy): the count
        stored, ``0`` at end of stream, ``None`` if nothing was there."""
        if self._closed:
            raise RemoteConnectionError("connection is closed")
        try:
            return os.readv(self._rfd, [into])
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in (errno.ECONNRESET, errno.EIO):
                return 0
            raise

    def _drain(self, deadline: float) -> bool:
        """Read and drop what the peer still sends, until it ends its output
        (True) or ``deadline`` (``time.monotonic()``) passes (False).

        Used on close: a peer blocked writing a value nobody reads (after
        Ctrl-C, say) cannot notice the end of its input and exit; once its
        writes go through, it does, in a fraction of a second.
        """
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            ready, _, _ = select.select([self._rfd], [], [], remaining)
            if not ready:
                return False
            try:
                if not os.read(self._rfd, _READ_SIZE):
                    return True
            except BlockingIOError:
                continue
            except OSError:
                return True

    def _close_fds(self) -> None:
        for fd in (self._wfd, self._rfd):
            try:
                os.close(fd)
            except OSError:
                pass


class _StderrTail:
    """Drains a stderr pipe in a thread, keeping the last lines for errors
    and passing each line to the log (so the pipe never fills up)."""

    def __init__(self, stream: Any, label: str) -> None:
        self.lines: Deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._stream = stream
        self._label = label
        self._thread = threading.Thread(target=self._run, name=f"stderr-{label}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for raw in iter(self._stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            self.lines.append(line)
            log.debug("[%s] %s", self._label, line)
        self._stream.close()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


class SubprocessTransport(FdTransport):
    """A child process whose stdin/stdout are the channel (ssh, or a local
    ``python -m fleche_remote serve``).

    The child runs in its own session, so a Ctrl-C in the user's terminal
    interrupts the user's Python but never kills the child mid-frame.
    """

    def __init__(self, argv: Sequence[str], *, env: Optional[dict] = None, label: str = "remote") -> None:
        self.argv = list(argv)
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,
                bufsize=0,
            )
        except OSError as exc:
            raise RemoteConnectionError(f"cannot start {self.argv[0]!r}: {exc.strerror}") from None
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._stderr = _StderrTail(self.proc.stderr, label)
        super().__init__(self.proc.stdout.fileno(), self.proc.stdin.fileno())

    def diagnose(self) -> Tuple[Optional[int], List[str]]:
        code = self.proc.poll()
        if code is None:
            try:  # a peer that just closed its pipe is usually about to exit
                code = self.proc.wait(0.5)
            except subprocess.TimeoutExpired:
                code = None
        if code is not None:
            self._stderr.join(1.0)
        return code, list(self._stderr.lines)

    def close(self, grace: float = 2.0) -> None:
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + grace
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # EOF: the server finishes and exits
        except OSError:
            pass
        try:
            self._drain(deadline)  # a server stuck writing to us can't see the EOF
            self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self._kill()
        except BaseException:  # Ctrl-C while closing: don't leave the child behind
            self._kill()
            raise
        try:
            assert self.proc.stdout is not None
            self.proc.stdout.close()
        except OSError:
            pass
        self._stderr.join(1.0)

    def kill(self) -> None:
        """Stop the child at once (after a timeout or an interrupted write)."""
        if not self._closed:
            self._closed = True
            self._kill()
            for pipe in (self.proc.stdin, self.proc.stdout):
                try:
                    if pipe is not None:
                        pipe.close()
                except OSError:
                    pass
            self._stderr.join(1.0)

    def _kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:  # pragma: no cover - unkillable child
            log.warning("remote process %d did not exit after SIGKILL", self.proc.pid)


class PipeTransport(FdTransport):
    """An in-process server on a thread, over two OS pipes.

    Exercises exactly the same client and server code as ssh without a
    process boundary; used where many connections make ssh too slow.
    """

    def __init__(self, run_server: Callable[[Any, Any], None]) -> None:
        c2s_r, c2s_w = os.pipe()
        s2c_r, s2c_w = os.pipe()
        self._server_in = os.fdopen(c2s_r, "rb", buffering=0)
        self._server_out = os.fdopen(s2c_w, "wb", buffering=0)
        self._error: List[str] = []

        def target() -> None:
            try:
                run_server(self._server_in, self._server_out)
            except Exception as exc:  # reported through diagnose()
                self._error.append(f"{type(exc).__name__}: {exc}")
            finally:
                for f in (self._server_out, self._server_in):
                    try:
                        f.close()
                    except OSError:
                        pass

        self._thread = threading.Thread(target=target, name="fleche-remote-inproc-server", daemon=True)
        self._thread.start()
        super().__init__(s2c_r, c2s_w)

    def diagnose(self) -> Tuple[Optional[int], List[str]]:
        done = not self._thread.is_alive()
        return (1 if self._error else 0) if done else None, list(self._error)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            os.close(self._wfd)
        except OSError:
            pass
        self._drain(time.monotonic() + 5)  # unblocks a server thread writing to us
        self._thread.join(5)
        try:
            os.close(self._rfd)
        except OSError:
            pass

    kill = close
