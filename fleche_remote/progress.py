"""Progress bars for large transfers (ssh streams, ``pull``/``push``).

A 1 GiB value takes seconds over ssh; without a bar that time looks like a
hang. The policy, in one place:

* a bar is shown when the setting is ``True``, or when it is ``None``
  (the default: "auto") and stderr is a terminal; ``False`` never shows one.
  The setting is ``SshCache(progress=...)``, ``progress = true`` in an ssh
  table of fleche.toml, or ``--progress`` on the command line;
* only transfers of at least :data:`PROGRESS_MIN_BYTES` get a bar, so that
  a sweep of small results does not flood the terminal;
* bars count bytes and go to stderr, never stdout (which may be data:
  ``fleche-remote ls --json``).

tqdm draws the bar when it is importable (it is a dependency of the
client). A bootstrapped or trimmed installation without it falls back to
a plain line every :data:`PLAIN_EVERY` seconds, so the policy never
depends on an optional import. Nothing here runs on the server.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, TextIO, Tuple

from .codec.values import CHUNK_SIZE, Blob, BytesLike

#: Transfers smaller than this get no bar: at ssh speeds they last well
#: under a second, and a sweep moves thousands of them.
PROGRESS_MIN_BYTES = 8 << 20

#: Seconds between two lines of the plain (no tqdm) reporter.
PLAIN_EVERY = 2.0


def wanted(setting: Optional[bool], stream: Optional[TextIO] = None) -> bool:
    """Whether to show bars: ``setting`` if given, else whether ``stream``
    (default stderr) is a terminal."""
    if setting is not None:
        return bool(setting)
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced stream
        return False


_UNITS = {1024: ("B", "KiB", "MiB", "GiB", "TiB"), 1000: ("B", "kB", "MB", "GB", "TB")}


def human_bytes(n: float, base: int = 1024) -> str:
    """``1536`` -> ``'1.5 KiB'``: sizes as a reader wants them; ``base=1000``
    gives powers of 1000 (``1234567`` -> ``'1.2 MB'``, as ``du -h --si``)."""
    units = _UNITS[base]
    for unit in units:
        if abs(n) < base or unit == units[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= base
    raise AssertionError("unreachable")


class ByteBar:
    """One bar counting ``total`` bytes on ``stream`` (default stderr).

    Use as a context manager, or call :meth:`close`. ``update`` is cheap
    enough to call once per 1 MiB chunk.
    """

    def __init__(self, total: int, label: str, stream: Optional[TextIO] = None) -> None:
        self.total = int(total)
        self.label = label
        self.done = 0
        self._stream = sys.stderr if stream is None else stream
        self._started = self._last = time.monotonic()
        self._bar: Any = None
        try:
            from tqdm import tqdm
        except ImportError:
            self._line("started")
        else:
            self._bar = tqdm(
                total=self.total,
                desc=label,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=self._stream,
                leave=True,
                dynamic_ncols=True,
            )

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= PLAIN_EVERY:
            self._last = now
            self._line(f"{100.0 * self.done / max(1, self.total):.0f}%")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._stream is not None:
            elapsed = max(1e-9, time.monotonic() - self._started)
            self._line(f"done in {elapsed:.1f} s ({human_bytes(self.done / elapsed)}/s)")
            self._stream = None  # type: ignore[assignment]

    def _line(self, what: str) -> None:
        done, total = human_bytes(self.done), human_bytes(self.total)
        self._stream.write(f"{self.label}: {done} of {total} {what}\n")
        self._stream.flush()

    def __enter__(self) -> ByteBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def counted(chunks: Iterable[BytesLike], bar: ByteBar) -> Iterator[BytesLike]:
    """``chunks``, counted on ``bar`` as they pass."""
    for chunk in chunks:
        bar.update(len(chunk))
        yield chunk


class CountingBlob(Blob):
    """A blob whose body is counted on a bar as it is read.

    ``inner`` is the wrapped blob, which is what a store drains when it
    did not need to read a one-shot stream.
    """

    def __init__(self, inner: Blob, bar: ByteBar) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.meta = inner.meta
        self.size = inner.size
        self._bar = bar

    def chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[BytesLike]:
        return counted(self.inner.chunks(chunk_size), self._bar)


Streams = List[Tuple[Any, Iterator[Any]]]


def downloads(
    consume: Callable[[Any, Streams], Any], setting: Optional[bool], label: str
) -> Callable[[Any, Streams], Any]:
    """Wrap a reply consumer of :meth:`Connection.request` so that the value
    streams it reads are counted on one bar (when wanted and large)."""

    def consume_with_bar(result: Any, streams: Streams) -> Any:
        total = sum(int(header.size) for header, _ in streams)
        if total < PROGRESS_MIN_BYTES or not wanted(setting):
            return consume(result, streams)
        with ByteBar(total, f"{label} <-") as bar:
            return consume(result, [(header, counted(chunks, bar)) for header, chunks in streams])

    return consume_with_bar


def uploads(
    blobs: Sequence[Tuple[Any, Blob]], setting: Optional[bool], label: str
) -> Tuple[List[Tuple[Any, Blob]], Optional[ByteBar]]:
    """``blobs`` to send, counted on a bar when wanted and large; close the
    returned bar (if any) once the request is answered."""
    total = sum(blob.size for _, blob in blobs)
    if total < PROGRESS_MIN_BYTES or not wanted(setting):
        return list(blobs), None
    bar = ByteBar(total, f"{label} ->")
    return [(header, CountingBlob(blob, bar)) for header, blob in blobs], bar


__all__ = [
    "PROGRESS_MIN_BYTES",
    "ByteBar",
    "CountingBlob",
    "counted",
    "downloads",
    "human_bytes",
    "uploads",
    "wanted",
]
