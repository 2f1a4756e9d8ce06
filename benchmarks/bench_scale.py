"""Does a cache stay fast, and small on disk, at a million entries?

Fills one cache with small results (a list of ten floats each, as in
bench_local.py) through the public API, ``cache.save_many`` in batches of
``--batch``, and at each checkpoint (1 k, 100 k, 1 M entries by default,
up to ``--entries``) measures, on ``--samples`` keys drawn at random from
everything saved so far:

* ``contains(key)``;
* ``load_value(key)``: the record and its value;
* ``expand(key[:12])``: a unique prefix to the full key;
* ``query(name, i=...)``: the one call with a given argument, by its index;

each as the mean latency of one call in microseconds (the best of
``--rounds`` passes over the same keys), plus the number of
files under the cache's directory and its size on disk. The subjects are
the ``sql`` template's layout, values as files and calls in SQLite (small
values then live inline in the database), and the same with calls in a
private PostgreSQL (``fleche_remote.testing.private_postgres``).

The database stays in the OS page cache at these sizes (~1 GB at 1 M), so
the latencies measure the software and the B-tree depth, not the disk.

Run: ``.venv/bin/python benchmarks/bench_scale.py [--entries 1000000]
[--backends sqlite postgres] [--samples 2000] [--rounds 5] [--batch 1000]``
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import shlex
import shutil
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import fleche_remote
from fleche_remote import Cache, Call, cache_from_config

NAME = "bench.scale"
SMALL_LEN = 10
CHECKPOINTS = (1_000, 100_000, 1_000_000)


def small_result(i: int) -> List[float]:
    """Distinct per ``i``, so content addressing cannot share values."""
    return [i + k / SMALL_LEN for k in range(SMALL_LEN)]


@dataclass
class Row:
    entries: int
    latency_us: Dict[str, float] = field(default_factory=dict)
    files: int = 0
    disk_mb: float = 0.0
    fill_per_s: float = 0.0


def du(root: Path) -> tuple[int, float]:
    """(files, MB) under ``root``."""
    files, size = 0, 0
    for d, _, names in os.walk(root):
        for n in names:
            files += 1
            with contextlib.suppress(OSError):
                size += os.stat(os.path.join(d, n)).st_size
    return files, size / 1e6


def mean_us(fn: Callable[[str], Any], keys: Sequence[str]) -> float:
    t0 = time.perf_counter()
    for key in keys:
        fn(key)
    return (time.perf_counter() - t0) / len(keys) * 1e6


def measure(cache: Cache, keys: List[str], samples: int, rng: random.Random, rounds: int) -> Dict[str, float]:
    """Mean µs per operation over ``samples`` random keys: the best of
    ``rounds`` passes over the same keys, so that a burst of load from
    the rest of a shared machine does not land in one size's number."""
    best: Dict[str, float] = {}
    picks = [rng.randrange(len(keys)) for _ in range(samples)]
    for _ in range(rounds):
        for op, us in _one_pass(cache, keys, picks).items():
            best[op] = min(us, best.get(op, float("inf")))
    return best


def _one_pass(cache: Cache, keys: List[str], picks: List[int]) -> Dict[str, float]:
    samples = len(picks)
    chosen = [keys[i] for i in picks]

    def check_contains(key: str) -> None:
        if not cache.contains(key):
            raise RuntimeError(f"lost {key}")

    def query(key: str) -> None:
        i = picks[lookup[key]]
        found = list(cache.query(NAME, i=i))
        if len(found) != 1 or found[0].key != key:
            raise RuntimeError(f"query for i={i} found {len(found)} calls")

    lookup = {k: n for n, k in enumerate(chosen)}
    for key in chosen[:50]:  # warm the connection and the statement cache
        cache.load_value(key)
    return {
        "contains": mean_us(check_contains, chosen),
        "load": mean_us(cache.load_value, chosen),
        "expand": mean_us(lambda k: cache.expand(k[:12]), chosen),
        "query": mean_us(query, chosen[: max(1, samples // 4)]),
    }


def run(label: str, cache: Cache, root: Path, targets: Sequence[int], args: argparse.Namespace) -> List[Row]:
    rng = random.Random(1)
    keys: List[str] = []
    rows = []
    for target in targets:
        t0 = time.perf_counter()
        start = len(keys)
        while len(keys) < target:
            n = min(args.batch, target - len(keys))
            base = len(keys)
            batch = [Call(NAME, {"i": i}, small_result(i)) for i in range(base, base + n)]
            keys.extend(str(k) for k in cache.save_many(batch))
        fill = (len(keys) - start) / max(time.perf_counter() - t0, 1e-9)
        row = Row(target, fill_per_s=fill)
        row.latency_us = measure(cache, keys, args.samples, rng, args.rounds)
        row.files, row.disk_mb = du(root)
        rows.append(row)
        lat = ", ".join(f"{k} {v:.1f} us" for k, v in row.latency_us.items())
        print(
            f"  {label:<16} {target:>9,} entries: {lat}; {row.files} files, {row.disk_mb:.0f} MB; "
            f"filled at {fill:,.0f} saves/s",
            file=sys.stderr,
            flush=True,
        )
    return rows


def report(results: Dict[str, List[Row]], info: List[str]) -> None:
    for line in info:
        print(line)
    print()
    header = [
        "backend",
        "entries",
        "contains µs",
        "load µs",
        "expand µs",
        "query µs",
        "files",
        "disk MB",
        "fill saves/s",
    ]
    lines = []
    for label, rows in results.items():
        for r in rows:
            lat = r.latency_us
            lines.append(
                [label, f"{r.entries:,}", *(f"{lat[k]:.1f}" for k in ("contains", "load", "expand", "query")),
                 f"{r.files}", f"{r.disk_mb:,.0f}", f"{r.fill_per_s:,.0f}"]
            )  # fmt: skip
    print(table(header, lines))
    print()
    print("latency at the largest size / at the smallest (1.0: flat)")
    print()
    ratio_lines = []
    for label, rows in results.items():
        if len(rows) > 1:
            lo, hi = rows[0], rows[-1]
            ratio_lines.append(
                [label, f"{hi.entries:,} / {lo.entries:,}"]
                + [
                    f"{hi.latency_us[k] / lo.latency_us[k]:.2f}"
                    for k in ("contains", "load", "expand", "query")
                ]
            )
    if ratio_lines:
        print(table(["backend", "sizes", "contains", "load", "expand", "query"], ratio_lines))


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
            + " |"
        )

    sep = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except (AttributeError, OSError):
        return "?"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entries", type=int, default=1_000_000, help="largest size (default 1000000)")
    p.add_argument("--backends", nargs="+", default=["sqlite", "postgres"], choices=["sqlite", "postgres"])
    p.add_argument("--samples", type=int, default=2000, help="lookups per measurement (default 2000)")
    p.add_argument(
        "--rounds", type=int, default=5, help="passes per measurement; the best counts (default 5)"
    )
    p.add_argument("--batch", type=int, default=1000, help="calls per save_many (default 1000)")
    p.add_argument("--tmp", default=None, help="where to make the cache (default: the system temp dir)")
    args = p.parse_args(argv)
    targets = [c for c in CHECKPOINTS if c < args.entries] + [args.entries]
    given = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join([os.path.relpath(sys.executable), os.path.relpath(__file__), *given])
    started = time.perf_counter()
    load_before = load_average()
    results: Dict[str, List[Row]] = {}
    with contextlib.ExitStack() as stack:
        base = Path(tempfile.mkdtemp(prefix="fleche-bench-scale-", dir=args.tmp))
        stack.callback(shutil.rmtree, base, ignore_errors=True)
        pg_version = ""
        for backend in args.backends:
            root = base / backend
            cfg: Dict[str, Any] = {"template": "sql", "root": str(root)}
            if backend == "postgres":
                from fleche_remote.testing import private_postgres

                print("starting a private PostgreSQL ...", file=sys.stderr, flush=True)
                pg = stack.enter_context(private_postgres())
                cfg["url"] = pg.new_database()
            cache = cache_from_config(cfg)
            assert isinstance(cache, Cache)
            try:
                results[f"file+{'sqlite' if backend == 'sqlite' else 'postgres'}"] = run(
                    f"file+{backend}", cache, root, targets, args
                )
                if backend == "postgres":
                    row = cache.calls._db.first("SHOW server_version")  # type: ignore[attr-defined]
                    pg_version = f"postgresql {row[0] if row else '?'} (private, fsync off, 127.0.0.1)"
            finally:
                cache.close()
    elapsed = time.perf_counter() - started
    info = [
        f"command: {command}",
        f"python {platform.python_version()} on {platform.platform()}, {os.cpu_count()} cpus; "
        f"fleche_remote {fleche_remote.__version__}; sqlite {sqlite3.sqlite_version}",
        *([pg_version] if pg_version else []),
        f"work: small results (a list of {SMALL_LEN} floats), saved with save_many in batches of "
        f"{args.batch}; {args.samples} random lookups per measurement (query: a quarter of that), "
        f"best of {args.rounds} passes",
        f"files: everything under the cache's root (PostgreSQL's own files not counted); "
        f"total {elapsed:.0f} s",
        f"load average (1, 5, 15 min) before {load_before}, after {load_average()}",
    ]
    report(results, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
