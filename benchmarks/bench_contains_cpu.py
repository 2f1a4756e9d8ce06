"""Where a ``contains`` over loopback ssh spends CPU, against a raw echo.

The median latency of a small request swings with where the scheduler
puts four processes (client, ssh, sshd, server) on two cores, so the
ratio to a raw ssh echo moves from run to run. CPU time does not: this
script runs blocks of ``contains`` and of an 8-byte echo by a Python on
the remote, in turn, through one private sshd, and reads from /proc how
much CPU each process spent per call (the client's own from getrusage,
all its threads). What ours costs beyond the echo is what our code adds;
the rest is ssh's and the kernel's, the same for both.

Run: ``.venv/bin/python benchmarks/bench_contains_cpu.py [--calls 20000]``
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _remote_common import Link, load_average, print_header, setup_workdirs, table
from bench_remote import DEFAULT_CIPHER, PythonEcho

from fleche_remote import Call, SshCache
from fleche_remote.testing import private_sshd

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_by_name() -> Dict[int, tuple]:
    """``{pid: (name, cpu seconds)}`` of this process's descendants (the
    ssh clients, the private sshd, the remote Pythons): on a shared
    machine other users' Pythons would count too."""
    out, parent = {}, {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(pid)] = (name, (int(fields[11]) + int(fields[12])) / TICKS)
        parent[int(pid)] = int(fields[1])

    def ours(pid: int) -> bool:
        while pid > 1:
            pid = parent.get(pid, 0)
            if pid == os.getpid():
                return True
        return False

    return {pid: got for pid, got in out.items() if ours(pid)}


def spent(fn: Callable[[], object], calls: int) -> Dict[str, float]:
    """Microseconds per call: wall, this process's CPU, and each other
    process name's CPU (ssh, sshd, the remote python)."""
    before, r0, t0 = cpu_by_name(), resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(calls):
        fn()
    wall, r1, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF), cpu_by_name()
    out = {"wall": wall, "client": r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime}
    for pid, (name, cpu) in after.items():
        if pid in before and pid != os.getpid() and name in ("ssh", "sshd", "python", "python3"):
            out[name] = out.get(name, 0.0) + cpu - before[pid][1]
    return {k: v / calls * 1e6 for k, v in out.items()}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20000, help="calls per block")
    parser.add_argument("--blocks", type=int, default=2, help="blocks of each, in turn")
    args = parser.parse_args(argv)
    print_header(sys.argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fleche-bench-") as tmp, private_sshd() as server:
        ours_dir, _ = setup_workdirs(Path(tmp))
        link = Link(server, 0.0, ("-c", DEFAULT_CIPHER))
        cache = SshCache(
            server.host, python=sys.executable, ssh_options=link.options, workdir=str(ours_dir), timeout=600
        )
        key = str(cache.save(Call("bench.cpu", {"x": 1}, 1)))
        echo = PythonEcho(link)
        try:
            for _ in range(args.blocks):
                for name, fn in (("python echo", echo), ("contains", lambda: cache.contains(key))):
                    got = spent(fn, args.calls)
                    remote = got.get("python", 0.0) + got.get("python3", 0.0)
                    rows.append(
                        [
                            name,
                            f"{got['wall']:.1f}",
                            f"{got['client']:.1f}",
                            f"{got.get('ssh', 0.0):.1f}",
                            f"{got.get('sshd', 0.0):.1f}",
                            f"{remote:.1f}",
                        ]
                    )
        finally:
            echo.close()
            cache.close()
    print(f"\n{args.calls} calls a block, blocks in turn; µs per call\n")
    print(table(rows, ["work", "wall", "client CPU", "ssh CPU", "sshd CPU", "remote python CPU"]))
    print(f"\n{load_average()} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
