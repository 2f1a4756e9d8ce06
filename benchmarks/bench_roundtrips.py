"""How many round trips does a remote cache cost? Ours against the ``fleche``
package, straight to a private sshd and through a 20 ms RTT slow link.

On a cluster tens of milliseconds away, time is round trips. Each row is
timed and also expressed in RTTs (time divided by the median raw ssh
ping-pong over the same link), next to the goal:

* 400 calls of a ``@cached`` function whose results the cluster already
  has, on a laptop stack (an empty local file layer + the ssh layer): as a
  plain loop, and through ``f.map(args)``; goal <= 10 RTTs via ``f.map``;
* 8 threads x 40 ``contains`` on one SshCache against the same 320
  serially; goal >= 5x faster than serial;
* 1000 small ``save_many`` into the remote; goal <= 10 RTTs;
* the first result of a fresh cache, minus a bare ``ssh host true``;
  goal <= 1 RTT + 150 ms;

and the server's start-up: time from spawning ``python -m fleche_remote
serve`` to its banner, against a bare ``python -c pass``, plus the
slowest imports (``-X importtime``).

APIs that are not there yet (``CachedFunction.map``,
``SshCache.request_count``) show as ``n/a``.

Run: ``.venv/bin/python benchmarks/bench_roundtrips.py [--delays 0,10] [--no-fleche]``
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _remote_common import (
    Link,
    bare_ssh_true,
    fleche_python,
    fleche_version,
    fmt_rtts,
    fmt_time,
    load_average,
    print_header,
    run_fleche,
    setup_workdirs,
    table,
    timed,
)

from fleche_remote import CacheStack, Call, SshCache, cached
from fleche_remote.config import cache_from_config
from fleche_remote.remote.protocol import MAGIC
from fleche_remote.testing import private_sshd


def square(x: int) -> int:
    return x * x


def ours(link: Link, workdir: Path) -> SshCache:
    return SshCache(
        link.server.host, python=sys.executable, ssh_options=link.options, workdir=str(workdir), timeout=600
    )


def requests(cache: SshCache) -> Optional[int]:
    count = getattr(cache, "request_count", None)
    return count if isinstance(count, int) else None


def cell(seconds: Optional[float], rtt: float, reqs: Optional[int] = None, note: str = "") -> str:
    if seconds is None:
        return note or "n/a"
    text = f"{fmt_time(seconds)} = {fmt_rtts(seconds, rtt)}"
    if reqs is not None:
        text += f", {reqs} req"
    return text + (f" {note}" if note else "")


def fleche_cell(answer: Dict[str, Any], work: str, field: str, rtt: float, rpcs: str = "") -> str:
    entry = answer.get(work, answer)
    if "error" in entry and field not in entry:
        return "failed: " + str(entry["error"])[:80]
    if field not in entry:
        return "n/a"
    reqs = entry.get(rpcs) if rpcs else None
    return cell(entry[field], rtt, reqs)


# -- our side -------------------------------------------------------------------


def decorated_calls(link: Link, workdir: Path, n: int) -> Dict[str, Any]:
    """n calls of a @cached function the remote already has, through an empty
    local layer + the ssh layer: a plain loop, then ``f.map``."""
    direct = cache_from_config({"template": "sql", "root": str(workdir / "store")})
    populate = cached(cache=direct)(square)
    for i in range(n):
        populate(i)
    out: Dict[str, Any] = {}
    remote = ours(link, workdir)
    try:
        remote.ping()  # connected: the start-up is a row of its own
        for variant in ("loop", "map"):
            with tempfile.TemporaryDirectory(prefix="fleche-bench-local-") as local_dir:
                local = cache_from_config({"template": "sql", "root": local_dir})
                f = cached(cache=CacheStack([local, remote]))(square)
                before = requests(remote)
                try:
                    t0 = time.perf_counter()
                    if variant == "loop":
                        got = [f(i) for i in range(n)]
                    else:
                        got = list(f.map(list(range(n))))  # type: ignore[attr-defined]
                    took = time.perf_counter() - t0
                except (AttributeError, NotImplementedError) as exc:
                    out[variant] = {"error": f"{type(exc).__name__}"}
                    continue
                assert got == [square(i) for i in range(n)], variant
                after = requests(remote)
                reqs = after - before if after is not None and before is not None else None
                out[variant] = {"time": took, "reqs": reqs}
    finally:
        remote.close()
    return out


def threaded_contains(link: Link, workdir: Path, n_threads: int, per: int) -> Dict[str, Any]:
    remote = ours(link, workdir)
    try:
        key = remote.save(Call("bench.small", {"x": 1}, 1.0))
        t0 = time.perf_counter()
        for _ in range(n_threads * per):
            remote.contains(key)
        serial = time.perf_counter() - t0

        def worker() -> None:
            for _ in range(per):
                remote.contains(key)

        threads = [threading.Thread(target=worker) for _ in range(n_threads)]
        before = requests(remote)
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        threaded = time.perf_counter() - t0
        after = requests(remote)
        return {
            "serial": serial,
            "threaded": threaded,
            "reqs": after - before if after is not None and before is not None else None,
        }
    finally:
        remote.close()


def small_saves(link: Link, workdir: Path, n: int, tag: str) -> Dict[str, Any]:
    remote = ours(link, workdir)
    try:
        remote.ping()
        calls = [Call("bench.small_many", {"i": i, "tag": tag}, [float(i)] * 10) for i in range(n)]
        before = requests(remote)
        t0 = time.perf_counter()
        remote.save_many(calls)
        took = time.perf_counter() - t0
        after = requests(remote)
        return {"time": took, "reqs": after - before if after is not None and before is not None else None}
    finally:
        remote.close()


def obvious_loop(link: Link, workdir: Path, n: int, tag: str) -> Dict[str, Any]:
    """``[c.result for c in cache.load_many(keys)]`` over what small_saves stored:
    the loop a user writes, with no flag asking for results up front."""
    remote = ours(link, workdir)
    try:
        remote.ping()
        keys = [Call("bench.small_many", {"i": i, "tag": tag}).key() for i in range(n)]
        before = requests(remote)
        t0 = time.perf_counter()
        got = [c.result for c in remote.load_many(keys) if c is not None]
        took = time.perf_counter() - t0
        after = requests(remote)
        assert len(got) == n, f"found {len(got)} of {n}"
        return {"time": took, "reqs": after - before if after is not None and before is not None else None}
    finally:
        remote.close()


def first_result(link: Link, workdir: Path, starts: int) -> Tuple[float, float]:
    """Median time to the first result of a fresh cache, and of ``ssh true``."""
    warm = ours(link, workdir)
    key = warm.save(Call("bench.small", {"x": 1}, 1.0))
    warm.close()

    def once() -> None:
        fresh = ours(link, workdir)
        assert fresh.load_value(key) == 1.0
        fresh.close()

    return statistics.median(timed(once, starts)), bare_ssh_true(link, starts)


def server_startup(workdir: Path, rounds: int) -> Dict[str, Any]:
    """Local spawn of ``python -m fleche_remote serve`` to its banner, against
    ``python -c pass``; and the slowest imports of the server."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}

    def banner() -> None:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fleche_remote", "serve"],
            cwd=str(workdir),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        assert proc.stdout is not None and proc.stdin is not None
        seen = b""
        while MAGIC not in seen:
            data = os.read(proc.stdout.fileno(), 4096)
            if not data:
                break
            seen += data
        proc.stdin.close()
        proc.wait(30)

    bare = statistics.median(
        timed(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True, env=env), rounds)
    )
    to_banner = statistics.median(timed(banner, rounds))
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "fleche_remote", "serve", "--help"],
        capture_output=True,
        text=True,
        cwd=str(workdir),
        timeout=60,
        env=env,
    )
    # "import time: self [us] | cumulative | imported package"; top level = no indentation
    top: List[Tuple[int, str]] = []
    for line in out.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (\S.*)$", line)
        if m and not m.group(3).startswith(" "):
            top.append((int(m.group(2)), m.group(3)))
    top.sort(reverse=True)
    return {"bare": bare, "banner": to_banner, "top": top[:6]}


# -- the report ---------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--delays", default="0,10", help="one-way delays in ms, comma-separated (0 = direct)")
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--per-thread", type=int, default=40)
    parser.add_argument("--saves", type=int, default=1000)
    parser.add_argument("--starts", type=int, default=5, help="cold starts for the start-up medians")
    parser.add_argument("--rtt-rounds", type=int, default=200)
    parser.add_argument("--no-fleche", action="store_true", help="skip the fleche package")
    args = parser.parse_args(argv)
    print_header(sys.argv)
    flpy, why = fleche_python(args.no_fleche)
    print(f"fleche package: {fleche_version(flpy)} ({flpy or why})")
    began = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="fleche-bench-") as tmp, private_sshd() as server:
        ours_dir, fleche_dir = setup_workdirs(Path(tmp))
        for delay in (float(d) for d in args.delays.split(",")):
            link = Link(server, delay)
            link.measure_rtt(args.rtt_rounds if delay == 0 else max(20, args.rtt_rounds // 10))
            rtt = link.rtt
            print(f"\n### {link.label}: raw ssh ping-pong median {fmt_time(rtt)} (= 1 RTT below)\n")
            tag = f"d{delay:g}"
            calls = decorated_calls(link, ours_dir, args.calls)
            threads = threaded_contains(link, ours_dir, args.threads, args.per_thread)
            saves = small_saves(link, ours_dir, args.saves, tag)
            loop = obvious_loop(link, ours_dir, args.saves, tag)
            first, bare = first_result(link, ours_dir, args.starts)
            theirs = run_fleche(
                flpy,
                link,
                fleche_dir,
                {
                    "decorated": {"n": args.calls},
                    "threads": {"threads": args.threads, "per_thread": args.per_thread},
                    "small": {"n": args.saves, "tag": tag},
                    "first": {"starts": args.starts},
                },
            )

            def ours_calls(entry: Dict[str, Any], rtt: float) -> str:
                if "error" in entry:
                    return f"n/a ({entry['error']})"
                return cell(entry["time"], rtt, entry["reqs"])

            th = theirs.get("threads", theirs)
            if "serial" in th:
                fl_threads = (
                    f"{cell(th['threaded'], rtt)}; serial {fmt_time(th['serial'])}: "
                    f"{th['serial'] / th['threaded']:.1f}x"
                )
            else:
                fl_threads = "failed: " + str(th.get("error", "?"))[:80]
            fl_first = theirs.get("first", theirs)
            n_total = args.threads * args.per_thread
            rows = [
                [
                    f"{args.calls} cached calls, plain loop",
                    ours_calls(calls["loop"], rtt),
                    fleche_cell(theirs, "decorated", "loop", rtt, "loop_rpcs"),
                    "",
                ],
                [
                    f"{args.calls} cached calls via f.map",
                    ours_calls(calls["map"], rtt),
                    "n/a (no map)",
                    f"<= 10 RTT ({fmt_time(10 * rtt)})",
                ],
                [
                    f"{args.threads} threads x {args.per_thread} contains",
                    f"{cell(threads['threaded'], rtt, threads['reqs'])}; serial "
                    f"{fmt_time(threads['serial'])}: {threads['serial'] / threads['threaded']:.1f}x",
                    fl_threads,
                    f">= 5x faster than {n_total} serial",
                ],
                [
                    f"{args.saves} small save_many",
                    cell(saves["time"], rtt, saves["reqs"]),
                    fleche_cell(theirs, "small", "save", rtt, "save_rpcs") + " (a loop of save)",
                    f"<= 10 RTT ({fmt_time(10 * rtt)})",
                ],
                [
                    f"[c.result for c in load_many({args.saves} keys)]",
                    cell(loop["time"], rtt, loop["reqs"]),
                    "",
                    f"<= 10 RTT ({fmt_time(10 * rtt)})",
                ],
                [
                    "first result - bare ssh true",
                    f"{fmt_time(first - bare)} = {fmt_rtts(first - bare, rtt)} "
                    f"({fmt_time(first)} - {fmt_time(bare)})",
                    (
                        f"{fmt_time(fl_first['median'] - bare)} = {fmt_rtts(fl_first['median'] - bare, rtt)}"
                        if "median" in fl_first
                        else "failed: " + str(fl_first.get("error", "?"))[:80]
                    ),
                    f"<= 1 RTT + 150 ms ({fmt_time(rtt + 0.150)})",
                ],
            ]
            print(table(rows, ["work", "fleche-remote", "fleche package", "goal"]))
            print(f"\n{load_average()} after this link")

        startup = server_startup(ours_dir, args.starts)
        fl_import = run_fleche(flpy, Link(server, 0), fleche_dir, {"import": {"rounds": args.starts}})
        print("\n### server start-up (local spawn, no ssh)\n")
        print(
            f"fleche-remote: `python -m fleche_remote serve` to banner {fmt_time(startup['banner'])}, "
            f"bare `python -c pass` {fmt_time(startup['bare'])}: "
            f"{fmt_time(startup['banner'] - startup['bare'])} of imports and set-up"
        )
        print(
            "  slowest top-level imports (-X importtime, cumulative): "
            + ", ".join(f"{name} {us / 1000:.1f} ms" for us, name in startup["top"])
        )
        imp = fl_import.get("import", fl_import)
        if "server" in imp:
            print(
                f"fleche package: `import fleche.remote, fleche.config` {fmt_time(imp['server'])}, "
                f"bare {fmt_time(imp['bare'])}: {fmt_time(imp['server'] - imp['bare'])} of imports"
            )
        else:
            print(f"fleche package: import time failed: {imp.get('error')}")
    print(f"\ntotal {time.perf_counter() - began:.0f} s; {load_average()} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
