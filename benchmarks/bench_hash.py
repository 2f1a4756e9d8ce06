"""Hash throughput and per-call overhead: the numbers behind digest.py's choice.

Measures, in one run on one machine:

* bulk throughput of SHA-256, BLAKE2b, BLAKE3 (one thread and
  ``max_threads=AUTO``), XXH3-128 and XXH3-64 over one large buffer (1 GiB
  by default), whole and in 1 MiB updates (how values stream);
* per-call time for small inputs (new hasher, one update, digest), since a
  key hashes many small items, and where each bulk hash overtakes SHA-256;
* what the library does with it: the key of a call whose argument is the
  large array, its value digest, and the key of an ordinary small call.

Usage: ``python benchmarks/bench_hash.py [--mib 1024] [--repeat 3]``.
Each number is the best of ``--repeat`` runs; other processes on the machine
only ever make a number worse, so the best run is the least disturbed one.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import time
import timeit
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

MiB = 1 << 20


def _algorithms() -> Dict[str, Callable[[], Any]]:
    algos: Dict[str, Callable[[], Any]] = {
        "sha256": hashlib.sha256,
        "blake2b": hashlib.blake2b,
    }
    try:
        import blake3

        algos["blake3 (1 thread)"] = blake3.blake3
        algos["blake3 (AUTO threads)"] = lambda: blake3.blake3(max_threads=blake3.blake3.AUTO)
    except ImportError:
        print("blake3 not installed: skipped", file=sys.stderr)
    try:
        import xxhash

        algos["xxh3_128"] = xxhash.xxh3_128
        algos["xxh3_64"] = xxhash.xxh3_64
    except ImportError:
        print("xxhash not installed: skipped", file=sys.stderr)
    return algos


def _best(fn: Callable[[], Any], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _whole(new: Callable[[], Any], view: memoryview) -> Callable[[], Any]:
    def run() -> Any:
        h = new()
        h.update(view)
        return h.digest()

    return run


def _chunked(new: Callable[[], Any], view: memoryview, step: int = MiB) -> Callable[[], Any]:
    def run() -> Any:
        h = new()
        for start in range(0, len(view), step):
            h.update(view[start : start + step])
        return h.digest()

    return run


def _per_call_us(new: Callable[[], Any], data: bytes) -> float:
    def one() -> Any:
        h = new()
        h.update(data)
        return h.digest()

    timer = timeit.Timer(one)
    number, _ = timer.autorange()
    return min(timer.repeat(3, number)) / number * 1e6


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    wanted = ("sha_ni", "avx2", "avx512f", "avx512vl")
                    return " ".join(f"{f}={'yes' if f in flags else 'no'}" for f in wanted)
    except OSError:
        pass
    return "unknown"


def _library(arr: np.ndarray, repeat: int) -> List[Tuple[str, float]]:
    from fleche_remote.codec.digest import call_digest
    from fleche_remote.codec.values import blob_digest, encode_value

    rows = [
        ("key of f(x=<array>)", _best(lambda: call_digest("m.f", {"x": arr}), repeat)),
        ("value digest of <array>", _best(lambda: blob_digest(encode_value(arr)), repeat)),
    ]
    parts = {f"a{i}": arr[i::4] for i in range(4)}  # strided: gathered in bounded slabs
    rows.append(("key of f(x=<array>[::4] x4, strided)", _best(lambda: call_digest("m.f", parts), 1)))
    return rows


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="size of the large buffer in MiB")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best is kept")
    opts = parser.parse_args(argv)

    import fleche_remote

    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    print(f"command: python benchmarks/bench_hash.py --mib {opts.mib} --repeat {opts.repeat}")
    print(f"python {platform.python_version()} on {platform.platform()}, {os.cpu_count()} cpus")
    print(f"cpu: {platform.processor() or platform.machine()}; {_cpu_flags()}")
    print(f"fleche_remote {fleche_remote.__version__}, numpy {np.__version__}", end="")
    for mod in ("blake3", "xxhash"):
        try:
            module = __import__(mod)
            version = getattr(module, "__version__", getattr(module, "VERSION", "?"))
            print(f", {mod} {version}", end="")
        except ImportError:
            pass
    print()

    size = opts.mib * MiB
    arr = np.random.default_rng(0).integers(0, 2**63, size // 8, dtype=np.int64)
    view = memoryview(arr).cast("B")
    algos = _algorithms()

    print(f"\nbulk: one {opts.mib} MiB buffer, best of {opts.repeat}\n")
    print(f"| {'hash':22} | {'whole s':>8} | {'GB/s':>6} | {'1 MiB updates s':>15} | {'GB/s':>6} |")
    print(f"|{'-' * 24}|{'-' * 9}:|{'-' * 7}:|{'-' * 16}:|{'-' * 7}:|")
    for name, new in algos.items():
        whole = _best(_whole(new, view), opts.repeat)
        chunked = _best(_chunked(new, view), opts.repeat)
        print(
            f"| {name:22} | {whole:8.3f} | {size / whole / 1e9:6.2f} | {chunked:15.3f} | "
            f"{size / chunked / 1e9:6.2f} |"
        )

    sizes = [16, 64, 1024, 16 << 10, 64 << 10, 256 << 10, MiB]
    print("\nper call (new hasher, one update, digest), microseconds\n")
    print("| hash                   | " + " | ".join(f"{_fmt_size(n):>8}" for n in sizes) + " |")
    print("|" + "-" * 24 + "|" + "|".join("-" * 9 + ":" for _ in sizes) + "|")
    for name, new in algos.items():
        cells = [_per_call_us(new, os.urandom(n)) for n in sizes]
        print(f"| {name:22} | " + " | ".join(f"{c:8.2f}" for c in cells) + " |")

    print("\nthe library (scheme fleche-remote/2)\n")
    print(f"| {'operation':40} | {'seconds':>8} |")
    print(f"|{'-' * 42}|{'-' * 9}:|")
    for label, seconds in _library(arr, opts.repeat):
        print(f"| {label:40} | {seconds:8.3f} |")
    from fleche_remote.codec.digest import call_digest

    small = {"x": 3, "y": [1.5] * 10, "name": "run-7", "opts": {"tol": 1e-6, "n": 100}}
    timer = timeit.Timer(lambda: call_digest("m.f", small))
    number, _ = timer.autorange()
    per = min(timer.repeat(3, number)) / number * 1e6
    print(f"| {'key of a small call (4 arguments)':40} | {per:6.1f}us |")
    print(
        f"\nload average (1 min) before {load_before:.2f}, after {os.getloadavg()[0]:.2f}; "
        f"total {time.perf_counter() - started:.0f} s"
    )


def _fmt_size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= MiB else f"{n >> 10} KiB" if n >= 1024 else f"{n} B"


if __name__ == "__main__":
    main()
