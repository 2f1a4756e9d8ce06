"""How fast is SshCache against raw ssh (and the ``fleche`` package's SshCache)?

Everything is measured in one run, through one private sshd on 127.0.0.1
(:func:`fleche_remote.testing.private_sshd`), so the ratios compare like
with like on the same machine:

* latency: the median round trip of ``contains`` against a raw ssh
  ping-pong (one byte echoed by ``cat`` on the remote);
* throughput: MB/s of saving and loading one large NumPy array against
  ``ssh host 'cat > /dev/null'`` (upload) and ``ssh host cat FILE``
  (download) of the same number of bytes;
* start-up: time to the first result of a fresh cache against a bare
  ``ssh host true``.

Run: ``.venv/bin/python benchmarks/bench_remote.py [--mb 1024] [--rounds 500]``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np

from fleche_remote import Call, __version__
from fleche_remote.remote.client import SshCache
from fleche_remote.testing import SshServer, private_sshd

REMOTE_TOML = """\
[default]
cache = "main"
root = true

[main]
template = "cloudpickle"
root = "store"
"""


def median_ms(samples: List[float]) -> float:
    return statistics.median(samples) * 1000


def timed(fn: Callable[[], object], rounds: int) -> List[float]:
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def raw_ping_pong(server: SshServer, rounds: int) -> List[float]:
    proc = subprocess.Popen(
        server.ssh_command("cat"), stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
    )
    assert proc.stdin is not None and proc.stdout is not None
    fd_in, fd_out = proc.stdin.fileno(), proc.stdout.fileno()
    os.write(fd_in, b"x")
    os.read(fd_out, 1)  # connection established
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        os.write(fd_in, b"x")
        os.read(fd_out, 1)
        samples.append(time.perf_counter() - t0)
    proc.stdin.close()
    proc.wait(10)
    return samples


def raw_upload(server: SshServer, payload: memoryview) -> float:
    t0 = time.perf_counter()
    proc = subprocess.Popen(server.ssh_command("cat > /dev/null"), stdin=subprocess.PIPE, bufsize=0)
    assert proc.stdin is not None
    step = 1 << 20
    for i in range(0, payload.nbytes, step):
        proc.stdin.write(payload[i : i + step])
    proc.stdin.close()
    proc.wait(600)
    return time.perf_counter() - t0


def raw_download(server: SshServer, path: Path, nbytes: int) -> float:
    t0 = time.perf_counter()
    proc = subprocess.Popen(server.ssh_command("cat", str(path)), stdout=subprocess.PIPE, bufsize=0)
    assert proc.stdout is not None
    got = 0
    while True:
        data = proc.stdout.read(4 << 20)
        if not data:
            break
        got += len(data)
    proc.wait(600)
    assert got >= nbytes, (got, nbytes)
    return time.perf_counter() - t0


def ours(server: SshServer, workdir: Path) -> SshCache:
    return SshCache(
        server.host, python=sys.executable, ssh_options=server.ssh_options, workdir=str(workdir), timeout=300
    )


def fleche_cache(server: SshServer, workdir: Path) -> Optional[object]:
    try:
        from fleche.remote import SshCache as FlecheSshCache
    except Exception:
        return None
    return FlecheSshCache(
        server.host, python=sys.executable, ssh_options=tuple(server.ssh_options), workdir=str(workdir)
    )


def row(
    name: str, ours_value: float, base_name: str, base_value: float, unit: str, higher_is_better: bool
) -> None:
    ratio = ours_value / base_value if higher_is_better else base_value / ours_value
    print(
        f"  {name:<34} {ours_value:10.2f} {unit:<5} vs {base_name:<22} {base_value:10.2f} {unit:<5}"
        f"  -> {ratio:5.2f}x {'(>1: we are faster)'}"
    )


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=1024, help="size of the large value (MB)")
    parser.add_argument("--rounds", type=int, default=500, help="round trips for the latency median")
    parser.add_argument("--starts", type=int, default=5, help="cold starts for the start-up median")
    parser.add_argument("--no-fleche", action="store_true", help="skip the fleche package comparison")
    args = parser.parse_args(argv)
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(
        f"python {platform.python_version()}, fleche-remote {__version__}, {platform.platform()}, "
        f"{os.cpu_count()} cores"
    )

    with tempfile.TemporaryDirectory(prefix="fleche-bench-") as tmp, private_sshd() as server:
        workdir = Path(tmp) / "remote"
        workdir.mkdir()
        (workdir / "fleche.toml").write_text(REMOTE_TOML)
        cache = ours(server, workdir)
        key = cache.save(Call("bench.small", {"x": 1}, 1.0))

        print(f"\nlatency (median of {args.rounds} round trips)")
        raw = median_ms(raw_ping_pong(server, args.rounds))
        ours_rtt = median_ms(timed(lambda: cache.contains(key), args.rounds))
        row("fleche-remote contains", ours_rtt, "raw ssh ping-pong", raw, "ms", False)
        batch = [key] * 100
        ours_batch = median_ms(timed(lambda: cache.contains_many(batch), max(10, args.rounds // 10)))
        print(f"  {'contains_many(100 keys)':<34} {ours_batch:10.2f} ms    (one round trip for 100 keys)")

        flc = None if args.no_fleche else fleche_cache(server, workdir)
        if flc is not None:
            from fleche.call import Call as FlecheCall

            fkey = flc.save(FlecheCall("bench.small", {"x": 1}, result=1.0))
            fl_rtt = median_ms(timed(lambda: flc.contains(fkey), args.rounds))
            row("fleche-remote contains", ours_rtt, "fleche SshCache", fl_rtt, "ms", False)
        else:
            print("  (fleche package not installed or skipped: no comparison with its SshCache)")

        nbytes = args.mb << 20
        arr = np.random.default_rng(0).integers(0, 255, size=nbytes, dtype=np.uint8)
        print(f"\nthroughput ({args.mb} MB value, MB/s)")
        up_raw = nbytes / raw_upload(server, memoryview(arr)) / 1e6
        t0 = time.perf_counter()
        big = cache.save(Call("bench.big", {"mb": args.mb}, arr))
        up_ours = nbytes / (time.perf_counter() - t0) / 1e6
        row("fleche-remote save (upload)", up_ours, "ssh 'cat > /dev/null'", up_raw, "MB/s", True)
        stored = max(
            (p for p in (workdir / "store" / "values").rglob("*") if p.is_file()),
            key=lambda p: p.stat().st_size,
        )
        down_raw = nbytes / raw_download(server, stored, nbytes) / 1e6
        t0 = time.perf_counter()
        back = cache.load_value(big)
        down_ours = nbytes / (time.perf_counter() - t0) / 1e6
        assert back.nbytes == nbytes
        del back
        row("fleche-remote load (download)", down_ours, "ssh cat FILE", down_raw, "MB/s", True)
        if flc is not None:
            from fleche.call import Call as FlecheCall

            try:
                t0 = time.perf_counter()
                fbig = flc.save(FlecheCall("bench.big", {"mb": args.mb}, result=arr))
                up_fl = nbytes / (time.perf_counter() - t0) / 1e6
                row("fleche-remote save (upload)", up_ours, "fleche SshCache save", up_fl, "MB/s", True)
                t0 = time.perf_counter()
                fback = flc.load_value(fbig)
                down_fl = nbytes / (time.perf_counter() - t0) / 1e6
                del fback
                row("fleche-remote load (download)", down_ours, "fleche SshCache load", down_fl, "MB/s", True)
            except Exception as exc:  # the comparison must not hide our own numbers
                print(f"  fleche SshCache failed on the large value: {type(exc).__name__}: {str(exc)[:200]}")
                flc.close()  # type: ignore[attr-defined]
                flc = fleche_cache(server, workdir)
        del arr
        cache.close()

        print(f"\nstart-up (median of {args.starts} cold starts, ms)")
        bare = median_ms(timed(lambda: subprocess.run(server.ssh_command("true"), check=True), args.starts))

        def first_result() -> None:
            fresh = ours(server, workdir)
            assert fresh.load_value(key) == 1.0
            fresh.close()

        first = median_ms(timed(first_result, args.starts))
        row("fleche-remote first result", first, "ssh host true", bare, "ms", False)
        if flc is not None:

            def fleche_first() -> None:
                fresh = fleche_cache(server, workdir)
                assert fresh.load_value(fkey) == 1.0  # type: ignore[union-attr]
                fresh.close()  # type: ignore[union-attr]

            try:
                fl_first = median_ms(timed(fleche_first, args.starts))
                row("fleche-remote first result", first, "fleche SshCache first", fl_first, "ms", False)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {str(exc)[:120]}"
                print(f"  fleche SshCache failed to load its own result: {reason}")
            flc.close()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main())
