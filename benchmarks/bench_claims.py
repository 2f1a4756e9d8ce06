"""What claiming a miss costs: per store, and over ssh at 20 ms RTT.

A ``@cached`` miss claims its key before computing (see
``fleche_remote/claiming.py``). This measures, for each local store, the
time of a miss with claims on and off (a trivial function, so the cache is
all that is timed), and for an ssh cache the round trips and time of one
miss and of ``f.map`` over 400 misses, with claims on and off, straight to
the private sshd and through a link with 10 ms added each way.

Goal: over ssh, a miss costs no extra round trip (its lookup takes the
claim in the same request; the release goes out in the background), and
``f.map`` of 400 misses at most one (its claim of the misses, as a batch).

    .venv/bin/python benchmarks/bench_claims.py [--delays 0,10] [--misses 200]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from _remote_common import OURS_TOML, Link, fmt_time, print_header, table

from fleche_remote import cached
from fleche_remote.config import cache_from_config
from fleche_remote.remote.client import SshCache
from fleche_remote.testing import private_sshd

_serial = itertools.count()


def work(x: int) -> int:
    return x + 1


def local_tables(tmp: Path) -> Dict[str, Any]:
    return {
        "memory": {"template": "memory"},
        "file": {"template": "cloudpickle", "root": str(tmp / "file")},
        "sql (SQLite)": {"template": "sql", "root": str(tmp / "sql")},
        "hdf5": {"template": "hdf5", "root": str(tmp / "hdf5")},
    }


def per_miss(cache: Any, claims: bool, n: int) -> float:
    """Seconds per miss: ``n`` fresh calls, each a miss."""
    f = cached(cache=cache, claims=claims, version=f"bench-{next(_serial)}")(work)
    start = time.perf_counter()
    for i in range(n):
        f(i)
    return (time.perf_counter() - start) / n


def ssh_row(link: Link, workdir: Path, claims: bool, n_map: int) -> Dict[str, Any]:
    remote = SshCache(
        link.server.host, python=sys.executable, ssh_options=link.options, workdir=str(workdir), timeout=60
    )
    try:
        remote.ping()
        f = cached(cache=remote, claims=claims, version=f"bench-{next(_serial)}")(work)
        before = remote.request_count
        start = time.perf_counter()
        f(-1)
        one = time.perf_counter() - start
        one_reqs = remote.request_count - before
        before = remote.request_count
        start = time.perf_counter()
        f.map(range(n_map))
        sweep = time.perf_counter() - start
        sweep_reqs = remote.request_count - before
        time.sleep(0.5)  # background releases land before the connection closes
        return {"one": one, "one_reqs": one_reqs, "map": sweep, "map_reqs": sweep_reqs}
    finally:
        remote.close()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--delays", default="0,10", help="one-way delays in ms, comma-separated (0 = direct)")
    parser.add_argument("--misses", type=int, default=200, help="misses timed per local store")
    parser.add_argument("--map", type=int, default=400, help="misses in the f.map sweep over ssh")
    args = parser.parse_args(argv)
    print_header(sys.argv)
    with tempfile.TemporaryDirectory(prefix="fleche-bench-claims-") as tmp_name:
        tmp = Path(tmp_name)
        rows = []
        for name, cfg in local_tables(tmp).items():
            cache = cache_from_config(cfg)
            off = per_miss(cache, False, args.misses)
            on = per_miss(cache, True, args.misses)
            rows.append([name, fmt_time(off), fmt_time(on), fmt_time(on - off)])
        print(f"\nlocal stores: one miss of a trivial function, mean of {args.misses}\n")
        print(table(rows, ["store", "miss, no claims", "miss, claimed", "claim costs"]))

        workdir = tmp / "remote"
        workdir.mkdir()
        (workdir / "fleche.toml").write_text(OURS_TOML)
        with private_sshd() as server:
            rows = []
            for delay in (float(d) for d in args.delays.split(",")):
                link = Link(server, delay)
                link.measure_rtt(20)
                for claims in (False, True):
                    r = ssh_row(link, workdir, claims, args.map)
                    rows.append(
                        [
                            f"{link.label} (RTT {fmt_time(link.rtt)})",
                            "on" if claims else "off",
                            f"{fmt_time(r['one'])} ({r['one_reqs']} req)",
                            f"{fmt_time(r['map'])} ({r['map_reqs']} req)",
                        ]
                    )
            print(f"\nssh (server store: template sql): one miss, and f.map of {args.map} misses\n")
            print(table(rows, ["link", "claims", "one miss", f"map of {args.map}"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
