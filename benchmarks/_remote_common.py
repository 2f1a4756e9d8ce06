"""What the remote benchmarks share: the links they measure through, raw
ssh baselines, the remote set-up, and the ``fleche`` package's side.

Every remote figure is measured twice: straight to the private sshd (zero
added delay) and through :meth:`SshServer.slow_ssh_options` with 10 ms each
way (a 20 ms round trip, a cluster in the same country), because there
round trips, not CPU, are what users feel.

The ``fleche`` package is measured in a virtualenv of its own
(``benchmarks/setup_fleche.sh``): it needs Python >= 3.11 and is never our
dependency. :func:`run_fleche` runs ``benchmarks/fleche_driver.py`` with
that venv's python and reads the JSON it prints; a failure comes back as
an ``error`` entry for the table, never as an exception.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from fleche_remote import __version__
from fleche_remote.testing import SshServer

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

#: Our remote's fleche.toml: under ``store`` in the workdir, values as
#: cloudpickle files (small ones inline) and calls in SQLite, the layout
#: we recommend for a cluster.
OURS_TOML = """\
[default]
cache = "main"
root = true

[main]
template = "sql"
root = "store"
"""

#: The fleche package's remote fleche.toml (its own format and directory).
FLECHE_TOML = """\
[default]
cache = "main"

[main]
template = "cloudpickle"
root = "store"
"""

#: One-way delays measured, in ms: 0 is the direct connection, 10 a 20 ms RTT.
DEFAULT_DELAYS = (0.0, 10.0)


class Link:
    """One way to reach the private sshd: its ssh options and measured RTT."""

    def __init__(self, server: SshServer, delay_ms: float, extra: Sequence[str] = ()) -> None:
        self.server = server
        self.delay_ms = delay_ms
        base = (*server.ssh_options, *extra)
        self.options: Tuple[str, ...] = (
            base if delay_ms == 0 else server.slow_ssh_options(delay_ms, options=base)
        )
        self.rtt = 0.0  # seconds, median of a raw ssh ping-pong; set by measure_rtt()

    @property
    def label(self) -> str:
        return "direct (0 ms added)" if self.delay_ms == 0 else f"{2 * self.delay_ms:g} ms RTT"

    def ssh(self, *remote: str) -> List[str]:
        return [self.server.ssh_executable, *self.options, self.server.host, *remote]

    def measure_rtt(self, rounds: int) -> List[float]:
        samples = raw_ping_pong(self, rounds)
        self.rtt = statistics.median(samples)
        return samples


def timed(fn: Callable[[], object], rounds: int) -> List[float]:
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def raw_ping_pong(link: Link, rounds: int) -> List[float]:
    """One byte echoed by a remote ``cat``, ``rounds`` times."""
    proc = subprocess.Popen(link.ssh("cat"), stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
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
    proc.wait(30)
    return samples


def _wait_ready(stdout: Any) -> None:
    """Read the ``ready`` line a raw command prints once ssh has logged in,
    so that the timing that follows leaves the login out, as ours does."""
    line = stdout.readline()
    assert line == b"ready\n", line


def raw_upload(link: Link, payload: memoryview, dest: str = "/dev/null") -> float:
    """Seconds to push ``payload`` into a remote ``cat > DEST``, login excluded
    (``/dev/null``: the link alone; a file: the link and the remote's disk,
    which a cache writing the value has to pay too)."""
    proc = subprocess.Popen(
        link.ssh(f"echo ready; cat > {shlex.quote(dest)}"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        bufsize=0,
    )
    assert proc.stdin is not None and proc.stdout is not None
    _wait_ready(proc.stdout)
    t0 = time.perf_counter()
    step = 1 << 20
    for i in range(0, payload.nbytes, step):
        proc.stdin.write(payload[i : i + step])
    proc.stdin.close()
    proc.wait(1200)
    return time.perf_counter() - t0


def local_write(payload: memoryview, dest: Path) -> float:
    """Seconds to write ``payload`` to a new file ``dest`` with no ssh at all,
    1 MiB at a time as ``cat`` does, and close it (no fsync, as a cache's
    save does not). What the disk and the page cache alone cost: on a VM
    whose guest pages are backed on first use, this alone can take longer
    than pushing the same bytes through ssh into ``/dev/null``."""
    t0 = time.perf_counter()
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        step = 1 << 20
        for i in range(0, payload.nbytes, step):
            piece = payload[i : i + step]
            done = 0
            while done < piece.nbytes:
                done += os.write(fd, piece[done:])
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def raw_download(link: Link, path: Path, nbytes: int) -> float:
    """Seconds to read ``path`` from a remote ``cat`` into new memory of its
    size, login excluded: loading a value has to land it somewhere too, and
    fresh pages cost as much as the link on a VM that backs them on first
    touch (read into one reused buffer, this ran at twice what any load of
    a new array can)."""
    proc = subprocess.Popen(
        link.ssh(f"echo ready; read go; cat {shlex.quote(str(path))}"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        bufsize=0,
    )
    assert proc.stdin is not None and proc.stdout is not None
    _wait_ready(proc.stdout)
    t0 = time.perf_counter()
    proc.stdin.write(b"go\n")
    size = path.stat().st_size  # the server is this machine: same file
    into = memoryview(bytearray(size))
    got = 0
    while got < size:
        n = proc.stdout.readinto(into[got : got + (4 << 20)])
        if not n:
            break
        got += n
    proc.stdin.close()
    proc.wait(1200)
    assert got == size >= nbytes, (got, size, nbytes)
    return time.perf_counter() - t0


def bare_ssh_true(link: Link, rounds: int) -> float:
    return statistics.median(timed(lambda: subprocess.run(link.ssh("true"), check=True), rounds))


def setup_workdirs(root: Path) -> Tuple[Path, Path]:
    """Remote working directories for us and for the fleche package."""
    ours, theirs = root / "ours", root / "fleche"
    for path, toml in ((ours, OURS_TOML), (theirs, FLECHE_TOML)):
        path.mkdir(parents=True)
        (path / "fleche.toml").write_text(toml)
    return ours, theirs


# -- the fleche package -----------------------------------------------------


def fleche_python(skip: bool) -> Tuple[Optional[str], str]:
    """The side venv's python (built on first use), or None and why not."""
    if skip:
        return None, "skipped (--no-fleche)"
    given = os.environ.get("FLECHE_BENCH_PYTHON")
    if given:
        return given, ""
    try:
        out = subprocess.run(
            ["bash", str(HERE / "setup_fleche.sh")], capture_output=True, text=True, timeout=1200
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"setup_fleche.sh failed: {exc}"
    if out.returncode != 0:
        return None, f"setup_fleche.sh failed: {out.stderr.strip()[-300:]}"
    return out.stdout.strip().splitlines()[-1], ""


def fleche_version(python: Optional[str]) -> str:
    if python is None:
        return "n/a"
    out = subprocess.run(
        [python, "-c", "import fleche; print(fleche.__version__)"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return out.stdout.strip() or "unknown"


def run_fleche(
    python: Optional[str], link: Link, workdir: Path, work: Dict[str, Any], timeout: float = 3600
) -> Dict[str, Any]:
    """Run ``work`` through the fleche package's SshCache over ``link``.

    Returns:
        The driver's JSON answer (one entry per piece of work, each with
        its timings or an ``error``), or ``{"error": ...}`` when the driver
        itself could not run.
    """
    if python is None:
        return {"error": "fleche package not available"}
    spec = {
        "host": link.server.host,
        "ssh_options": list(link.options),
        "python": python,  # the remote's interpreter: the same side venv
        "workdir": str(workdir),
        **work,
    }
    try:
        out = subprocess.run(
            [python, str(HERE / "fleche_driver.py"), json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=str(workdir),
        )
    except subprocess.TimeoutExpired:
        return {"error": f"fleche driver took more than {timeout:.0f} s"}
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        return {"error": f"fleche driver exit {out.returncode}: {out.stderr.strip()[-300:]}"}
    result: Dict[str, Any] = json.loads(lines[-1])
    return result


# -- reporting --------------------------------------------------------------


def load_average() -> str:
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "load average unknown"
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min)"


def git_revision() -> str:
    """The checkout's revision (``$FLECHE_BENCH_REVISION`` for a copy that
    is not a git work tree)."""
    if os.environ.get("FLECHE_BENCH_REVISION"):
        return os.environ["FLECHE_BENCH_REVISION"]
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def print_header(argv: Sequence[str]) -> None:
    print(f"command: {' '.join([os.path.relpath(sys.executable, REPO), *argv])}")
    print(
        f"python {platform.python_version()}, fleche-remote {__version__} (git {git_revision()}), "
        f"{platform.platform()}, {os.cpu_count()} cores"
    )
    print(f"{load_average()} at start: other processes on the machine skew every number")


def fmt_time(seconds: Optional[float]) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds:.2f} s"


def fmt_rtts(seconds: Optional[float], rtt: float) -> str:
    if seconds is None or rtt <= 0:
        return "n/a"
    return f"{seconds / rtt:,.1f} RTT"


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """A Markdown table, columns padded to line up in a terminal too."""
    cells = [list(header), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
