"""A slow link on one machine: a relay that adds latency, and optionally a
bandwidth cap, between ``ssh`` and a server on loopback.

Our users' clusters are tens of milliseconds away, and there round trips,
not CPU, are what they feel. This relay lets a test or a benchmark pay
those round trips against the private sshd of :mod:`.sshd`. It runs as
ssh's ``ProxyCommand`` (:meth:`SshServer.slow_ssh_options
<fleche_remote.testing.sshd.SshServer.slow_ssh_options>` builds the
option)::

    python -m fleche_remote.testing.slowlink --delay-ms 10 [--rate-mbps N] 127.0.0.1 PORT

It copies stdin to a TCP connection and that connection to stdout. Design
rules:

* **A pipe with latency, not a sleep per chunk.** Each chunk is stamped
  when it arrives and written once ``delay`` has passed since then; reading
  goes on meanwhile. So a request costs ``2 x delay`` for its round trip,
  while a thousand pipelined requests cost about the same, as on a real
  long link. ``--delay-ms 10`` is a 20 ms round-trip time.
* **The cap is a token bucket on what is read**, per direction (a link is
  full duplex). Reading stops while the bucket is empty, so back-pressure
  reaches the sender the way a slow link's full buffers would.
* **Connecting costs one round trip** (sleeping ``2 x delay`` first), as
  TCP's handshake does over a real link.
* **Bounded.** At most :data:`MAX_IN_FLIGHT` bytes wait per direction
  (reading pauses beyond that); every wait is at most :data:`MAX_WAIT`
  seconds. The relay exits as soon as either side closes (once what it
  had read from that side has been delivered), when a write finds the
  other end gone, or when its parent (ssh) is gone.
* **Loopback only**: it refuses any host but a 127.0.0.0/8 address.

This module uses nothing but the standard library, so it also runs as a
plain script (``python -I .../slowlink.py``), which skips importing
fleche_remote on every ssh connection.
"""

from __future__ import annotations

import argparse
import collections
import ipaddress
import os
import select
import socket
import sys
import time
from typing import Deque, List, Optional, Sequence, Tuple

#: Bytes read at once. Large enough for ~1 GB/s through Python; small
#: enough that a capped link releases bytes smoothly.
READ_SIZE = 256 << 10

#: Bytes held per direction before reading pauses: the bandwidth-delay
#: product this relay can carry (32 MiB over 10 ms is 3.2 GB/s, more than
#: ssh moves on loopback), and the bound on its memory.
MAX_IN_FLIGHT = 32 << 20

#: Longest single wait, so a gone parent is noticed within this time.
MAX_WAIT = 1.0

#: How long connecting to the server may take.
CONNECT_TIMEOUT = 10.0

#: The bucket holds this much time's worth of tokens (and at least
#: :data:`MIN_BURST` bytes): small, so a cap holds over short transfers too.
BURST_SECONDS = 0.005
MIN_BURST = 16 << 10

__all__ = ["Direction", "command", "main", "relay"]


class Direction:
    """One way of the link: bytes read from ``src`` wait in a queue until
    ``delay`` after they arrived, then go to ``dst``."""

    def __init__(self, src: int, dst: int, delay: float, rate: Optional[float]) -> None:
        self.src = src
        self.dst = dst
        self.delay = delay
        self.rate = rate  # bytes per second, None for no cap
        self.burst = max(float(MIN_BURST), rate * BURST_SECONDS) if rate else 0.0
        self.tokens = self.burst
        self.refilled = time.monotonic()
        self.queue: Deque[Tuple[float, memoryview]] = collections.deque()
        self.queued = 0
        self.eof_at: Optional[float] = None  # when src closed
        self.write_blocked = False  # dst said EAGAIN: wait until it is writable

    # -- state ------------------------------------------------------------

    def refill(self, now: float) -> None:
        if self.rate:
            self.tokens = min(self.burst, self.tokens + (now - self.refilled) * self.rate)
        self.refilled = now

    def read_budget(self) -> int:
        """How many bytes may be read now (0: pause reading)."""
        if self.eof_at is not None or self.queued >= MAX_IN_FLIGHT:
            return 0
        if not self.rate:
            return READ_SIZE
        return min(READ_SIZE, int(self.tokens))

    def done(self, now: float) -> bool:
        """src has closed and everything it sent has been delivered."""
        return self.eof_at is not None and not self.queue and now >= self.eof_at + self.delay

    def next_event(self, now: float) -> float:
        """Seconds until this direction has something to do without I/O
        readiness: a chunk falling due, tokens enough to read, EOF due."""
        waits = [MAX_WAIT]
        if self.queue and not self.write_blocked:
            waits.append(self.queue[0][0] - now)
        if self.eof_at is not None and not self.queue:
            waits.append(self.eof_at + self.delay - now)
        if self.rate and self.eof_at is None and self.queued < MAX_IN_FLIGHT:
            need = min(float(READ_SIZE), self.burst / 2)
            if self.tokens < need:
                waits.append((need - self.tokens) / self.rate)
        return max(0.0, min(waits))

    # -- I/O ----------------------------------------------------------------

    def read(self, now: float) -> None:
        budget = self.read_budget()
        if budget <= 0:
            return
        try:
            data = os.read(self.src, budget)
        except BlockingIOError:
            return
        except OSError:  # a reset connection is a close
            data = b""
        if not data:
            self.eof_at = now
            return
        if self.rate:
            self.tokens -= len(data)
        self.queue.append((now + self.delay, memoryview(data)))
        self.queued += len(data)

    def flush(self, now: float) -> None:
        """Write every chunk that is due, until ``dst`` would block.

        Raises:
            OSError: ``dst`` is gone (``BrokenPipeError``, a reset).
        """
        self.write_blocked = False
        while self.queue and self.queue[0][0] <= now:
            due, chunk = self.queue[0]
            try:
                n = os.write(self.dst, chunk)
            except BlockingIOError:
                self.write_blocked = True
                return
            self.queued -= n
            if n == len(chunk):
                self.queue.popleft()
            else:
                self.queue[0] = (due, chunk[n:])


def relay(in_fd: int, out_fd: int, sock: socket.socket, delay: float, rate: Optional[float] = None) -> None:
    """Copy ``in_fd`` to ``sock`` and ``sock`` to ``out_fd``, each chunk
    ``delay`` seconds after it arrived, until either side closes.

    Args:
        in_fd, out_fd: the client side (ssh's pipes: our stdin and stdout).
        sock: the connected server side.
        delay: seconds each way.
        rate: bytes per second each way, or None for no cap.
    """
    for fd in (in_fd, out_fd, sock.fileno()):
        os.set_blocking(fd, False)
    up = Direction(in_fd, sock.fileno(), delay, rate)
    down = Direction(sock.fileno(), out_fd, delay, rate)
    parent = os.getppid()
    while True:
        now = time.monotonic()
        for d in (up, down):
            d.refill(now)
            try:
                d.flush(now)
            except OSError:
                return  # the receiving side is gone
        if up.done(now) or down.done(now) or os.getppid() != parent:
            return
        readers: List[int] = [d.src for d in (up, down) if d.read_budget() > 0]
        writers: List[int] = [d.dst for d in (up, down) if d.write_blocked]
        timeout = min(up.next_event(now), down.next_event(now))
        ready_r, _, _ = select.select(readers, writers, [], timeout)
        now = time.monotonic()
        for d in (up, down):
            if d.src in ready_r:
                d.read(now)


def command(
    host: str,
    port: int,
    delay_ms: float,
    rate_mbps: Optional[float] = None,
    *,
    python: str = sys.executable,
) -> List[str]:
    """The argv that runs this relay as a plain script (no package import).

    Args:
        host: a loopback address.
        port: the server's port.
        delay_ms: added delay each way, in milliseconds.
        rate_mbps: cap each way, in megabits (10^6 bits) per second.
        python: the interpreter to run it with.
    """
    argv = [python, "-I", os.path.abspath(__file__), "--delay-ms", repr(float(delay_ms))]
    if rate_mbps is not None:
        argv += ["--rate-mbps", repr(float(rate_mbps))]
    return [*argv, host, str(int(port))]


def _loopback(host: str) -> str:
    try:
        if ipaddress.ip_address(host).is_loopback and ipaddress.ip_address(host).version == 4:
            return host
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"the slow link only reaches 127.0.0.0/8 addresses, not {host!r}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fleche_remote.testing.slowlink",
        description="Relay stdin/stdout to HOST:PORT with added delay (and an optional rate cap); "
        "meant as ssh's ProxyCommand.",
    )
    parser.add_argument("--delay-ms", type=float, default=10.0, help="delay each way (default 10 ms)")
    parser.add_argument("--rate-mbps", type=float, default=None, help="cap each way, megabits/s")
    parser.add_argument("host", type=_loopback)
    parser.add_argument("port", type=int)
    args = parser.parse_args(argv)
    if args.delay_ms < 0 or (args.rate_mbps is not None and args.rate_mbps <= 0):
        parser.error("--delay-ms must be >= 0 and --rate-mbps > 0")
    delay = args.delay_ms / 1000.0
    time.sleep(2 * delay)  # TCP's handshake: one round trip before the first byte
    try:
        sock = socket.create_connection((args.host, args.port), timeout=CONNECT_TIMEOUT)
    except OSError as exc:
        print(f"slowlink: cannot connect to {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # the delay is ours to add, not Nagle's
    rate = args.rate_mbps * 1e6 / 8 if args.rate_mbps else None
    try:
        relay(sys.stdin.fileno(), sys.stdout.fileno(), sock, delay, rate)
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
