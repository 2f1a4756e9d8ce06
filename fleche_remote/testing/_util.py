"""Helpers shared by the private servers: free ports, tools, temp dirs,
bounded process stops.

Every wait here is bounded, so a server that will not stop costs a test
run seconds, never a hang.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import List, Sequence

#: How long a stop may take before the process is killed.
STOP_TIMEOUT = 10.0

#: Port races (another process takes the free port between our probe and
#: the server's bind) are retried this many times.
PORT_ATTEMPTS = 3


def free_port() -> int:
    """A loopback port that is free now (the caller retries if it is taken
    before the server binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def user_name() -> str:
    """The effective user: who a private sshd can log in. Not ``$USER``,
    which ``sudo`` or a CI runner may leave pointing at someone else."""
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def tool(name: str, *fallbacks: str) -> str:
    """Absolute path of a program, looking beyond ``$PATH`` (``sshd`` is in
    ``/usr/sbin``, which a non-root ``$PATH`` often lacks)."""
    found = shutil.which(name)
    if found:
        return found
    for path in fallbacks:
        if os.access(path, os.X_OK):
            return path
    raise RuntimeError(
        f"{name} not found on PATH or in {', '.join(fallbacks) or '(nowhere else)'}; "
        "install it (Debian: apt-get install openssh-server openssh-client postgresql)"
    )


def new_temp_dir(prefix: str, *, for_other_user: bool = False) -> Path:
    """A fresh temp dir under ``$TMPDIR``, or under ``/tmp`` when ``$TMPDIR``
    won't do: sshd_config and ``ssh -o`` split paths on whitespace, and a
    server run as another user (postgres, by root) must be able to reach it."""
    base = Path(tempfile.gettempdir())
    if any(c.isspace() for c in str(base)) or (
        for_other_user and not all(os.stat(p).st_mode & 0o001 for p in [base, *base.parents])
    ):
        base = Path("/tmp")
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Signal ``proc``, wait a bounded time, then kill it; always reaps it."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)


def pids_with_env(name: str, value: str) -> List[int]:
    """Processes whose environment has ``name=value`` (only those we may read)."""
    needle = f"{name}={value}".encode()
    found: List[int] = []
    if os.path.isdir("/proc"):
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as fh:
                    if needle in fh.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                continue
        return found
    try:  # not Linux: psutil, when it is there, reads environments portably
        import psutil
    except ImportError:
        return found
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get(name) == value:
                found.append(proc.pid)
        except (psutil.Error, OSError):
            continue
    return found


def kill_pids(pids: Sequence[int]) -> None:
    """SIGTERM, a bounded wait, then SIGKILL for whatever is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except (ProcessLookupError, PermissionError):
                continue
        deadline = time.monotonic() + 3.0
        while alive and time.monotonic() < deadline:
            alive = [pid for pid in alive if pid_exists(pid)]
            time.sleep(0.05)
        pids = alive
        if not pids:
            return


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (dead, not yet reaped by its parent) is as good as gone
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True
