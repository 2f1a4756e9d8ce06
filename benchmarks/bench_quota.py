"""What a limit costs: the sql template's small save and load with and
without ``max_bytes``, in one run, rounds interleaved; and ``du`` (one
aggregate query) on a large cache.

Run: .venv/bin/python benchmarks/bench_quota.py [--calls 1000] [--du-entries 1000000]

Goal: under 10 % on the small save and load; ``du`` under 2 s on a
million entries. Building a million entries takes minutes on a loaded
machine; ``--du-entries`` builds fewer (inserted in one transaction) and
the report extrapolates linearly, saying so.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

from fleche_remote import Call
from fleche_remote.config import cache_from_config


def one_round(root: Path, limited: bool, n: int) -> Dict[str, float]:
    cfg: Dict[str, Any] = {"template": "sql", "root": str(root)}
    if limited:
        cfg["max_bytes"] = "1 GB"  # a limit that holds: the cost of keeping it, not of evicting
    cache = cache_from_config(cfg)
    calls = [Call("f", {"i": i}, [float(i)] * 10) for i in range(n)]
    started = time.perf_counter()
    keys = [cache.save(c) for c in calls]
    save = time.perf_counter() - started
    cache.close()
    cache = cache_from_config(cfg)
    started = time.perf_counter()
    for k in keys:
        cache.load_value(k)
    load = time.perf_counter() - started
    cache.close()
    return {"save": n / save, "load": n / load}


def bench_du(entries: int) -> Dict[str, float]:
    from fleche_remote.storage.sql.rows import CALL_COLUMNS

    root = Path(tempfile.mkdtemp(prefix="bench-quota-du-"))
    cache = cache_from_config({"template": "sql", "root": str(root)})
    cache.save(Call("seed", {"i": -1}, 0))  # creates the schema
    cache.close()
    conn = sqlite3.connect(root / "calls.db")
    marks = ", ".join("?" * len(CALL_COLUMNS))
    now = time.time()
    started = time.perf_counter()
    with conn:
        conn.executemany(
            f"INSERT INTO fr_calls ({', '.join(CALL_COLUMNS)}) VALUES ({marks})",
            (
                (
                    i.to_bytes(32, "big"),  # keys are stored as the bytes they spell
                    f"fn{i % 50}",
                    None,
                    b"x" * 40,
                    "{}",
                    "{}",
                    i.to_bytes(32, "big"),
                    "pickle",
                    1000,
                    None,
                    now,
                )
                for i in range(entries)
            ),
        )
    conn.close()
    built = time.perf_counter() - started
    cache = cache_from_config({"template": "sql", "root": str(root)})
    started = time.perf_counter()
    usage = cache.usage()
    elapsed = time.perf_counter() - started
    cache.close()
    assert usage.calls == entries + 1
    return {"entries": entries, "du_s": elapsed, "build_s": built}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--du-entries", type=int, default=1_000_000)
    args = parser.parse_args()
    print(f"load average (1 min) before {os.getloadavg()[0]:.2f}")
    best: Dict[str, Dict[str, float]] = {"plain": {}, "max_bytes": {}}
    for _ in range(args.rounds):
        for label, limited in (("plain", False), ("max_bytes", True)):
            with tempfile.TemporaryDirectory(prefix="bench-quota-") as tmp:
                got = one_round(Path(tmp), limited, args.calls)
            for k, v in got.items():
                best[label][k] = max(best[label].get(k, 0.0), v)
    rows: List[str] = ["| sql template | small save/s | small load/s |", "|---|---:|---:|"]
    for label in best:
        rows.append(f"| {label} | {best[label]['save']:,.0f} | {best[label]['load']:,.0f} |")
    cost_save = 1 - best["max_bytes"]["save"] / best["plain"]["save"]
    cost_load = 1 - best["max_bytes"]["load"] / best["plain"]["load"]
    rows.append(f"| cost of the limit | {100 * cost_save:.1f} % | {100 * cost_load:.1f} % |")
    print("\n".join(rows))
    du = bench_du(args.du_entries)
    per_million = du["du_s"] * 1_000_000 / du["entries"]
    print(
        f"du: {du['entries']:,} entries in {du['du_s']:.2f} s "
        f"({per_million:.2f} s per million{'' if du['entries'] >= 1_000_000 else ', extrapolated'}); "
        f"built in {du['build_s']:.1f} s"
    )
    print(f"load average (1 min) after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
