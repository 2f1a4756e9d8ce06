"""The Python a ``contains`` costs on each end, with no I/O at all.

Through ssh, every number moves by a third between minutes (where the
scheduler puts four processes on two cores). What our code adds is
measured here where it is deterministic: the client's
``SshCache.contains`` over a transport that hands back prepared answers
(no syscalls; the fake's own ~0.5 us is included), and the server's
``serve()`` fed compact lookups from memory into a null output, with the
benchmark's SQLite store and with a memory store. CPU time per call, best
of ``--repeat`` passes, and Python function calls per call (cProfile).

Run: ``.venv/bin/python benchmarks/bench_contains_python.py``
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _remote_common import print_header, setup_workdirs, table

from fleche_remote import Call, SshCache, __version__
from fleche_remote.config import cache_from_config, load_cache
from fleche_remote.remote.protocol import (
    BANNER,
    COMPACT_FEATURE,
    PROTOCOL_VERSION,
    Hello,
    Request,
    Response,
    encode_message,
)
from fleche_remote.remote.server import serve

KEY = "ab" * 32


class PreparedAnswers:
    """A transport whose every request is answered at once with a found key."""

    def __init__(self, calls: int) -> None:
        info = {"features": [COMPACT_FEATURE], "read_only": False, "pid": 0}
        self.out = [BANNER + encode_message(Hello(PROTOCOL_VERSION, __version__, info))]
        self.answers = [encode_message(Response(i, [True]), True) for i in range(calls + 2)]
        self.sent = 0
        self.alive = True

    def write(self, data: Any, timeout: float) -> None:
        self.write_atomic(data)

    def write_atomic(self, data: bytes) -> bool:
        self.sent += 1
        self.out.append(self.answers[self.sent])
        return True

    def wait_readable(self, timeout: float) -> None:
        pass

    def read_ready(self) -> Optional[bytes]:
        return self.out.pop(0) if self.out else None

    def readinto_ready(self, into: memoryview) -> Optional[int]:
        raise AssertionError("a small answer is never read into a buffer")

    def close(self) -> None:
        pass

    def diagnose(self) -> Tuple[Optional[int], List[str]]:
        return None, []


class Lookups:
    """The server's input: one compact lookup per read, as a pipe delivers it."""

    def __init__(self, frames: List[bytes]) -> None:
        self.frames, self.i = frames, 0

    def read(self, n: int) -> bytes:
        raise AssertionError("the server reads into its own buffer")

    def readinto(self, buf: Any) -> int:
        if self.i >= len(self.frames):
            return 0
        frame = self.frames[self.i]
        self.i += 1
        buf[: len(frame)] = frame
        return len(frame)


class Discard:
    def write(self, data: bytes) -> int:
        return len(data)

    def flush(self) -> None:
        pass


def measured(run: Callable[[], Any], calls: int, repeat: int) -> Tuple[float, float]:
    """(best CPU us per call, Python function calls per call) of ``run()``."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        run()
        best = min(best, (time.process_time() - t0) / calls * 1e6)
    prof = cProfile.Profile()
    prof.enable()
    run()
    prof.disable()
    return best, pstats.Stats(prof).total_calls / calls  # type: ignore[attr-defined]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20000, help="calls per pass")
    parser.add_argument("--repeat", type=int, default=7, help="passes; the best counts")
    args = parser.parse_args(argv)
    print_header(sys.argv)
    n = args.calls
    rows = []

    cache = SshCache("prepared", _transport_factory=lambda: PreparedAnswers(n * (args.repeat + 2)))
    assert cache.contains(KEY)

    def client() -> None:
        for _ in range(n):
            cache.contains(KEY)

    us, calls = measured(client, n, args.repeat)
    rows.append(["client: SshCache.contains, prepared answers", f"{us:.2f}", f"{calls:.0f}"])

    old = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="fleche-bench-") as tmp:
        ours, _ = setup_workdirs(Path(tmp))
        os.chdir(ours)
        try:
            for name, store in (
                ("sql template", load_cache()),
                ("memory", cache_from_config({"template": "memory"})),
            ):
                key = str(store.save(Call("bench.python", {"x": 1}, 1)))
                frames = [
                    encode_message(Request(i, "contains_many", {"keys": [key]}), True)
                    for i in range(1, n + 1)
                ]
                us, calls = measured(
                    lambda s=store, f=frames: serve(Lookups(f), Discard(), s), n, args.repeat
                )
                rows.append([f"server: serve(), {name} store", f"{us:.2f}", f"{calls:.0f}"])
        finally:
            os.chdir(old)
    print(f"\n{n} calls a pass, best of {args.repeat}\n")
    print(table(rows, ["work", "CPU µs per contains", "Python calls per contains"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
