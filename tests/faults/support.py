"""What the fault tests share: a remote with a file store and an SQLite
store, ssh options that reuse one connection, and checks on what a store
holds after a fault.

Every check opens the store directly (no server), so it sees exactly what
is on disk.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from fleche_remote.caches import Cache
from fleche_remote.config import load_cache, load_config
from fleche_remote.testing.waiting import DEFAULT_DEADLINE_S

#: The remote's fleche.toml: one cache per backend under test.
FAULT_TOML = """\
[default]
cache = "files"

[files]
template = "cloudpickle"
root = "files"

[sqlite]
template = "sql"
root = "sqlite"
"""

#: Files a healthy store may hold: values and call records under their
#: two-character shards, and SQLite's database with its WAL and index.
_STORE_FILE = re.compile(r"(?:[0-9a-f]{2}/[0-9a-f]{8,128}(?:\.call)?|[^/]+\.db(?:-wal|-shm)?)")


def remote_with_stores(tmp_path: Path, toml: str = FAULT_TOML) -> Path:
    path = tmp_path / "remote"
    path.mkdir(parents=True, exist_ok=True)
    (path / "fleche.toml").write_text(toml)
    return path


def open_store(remote: Path, name: str) -> Cache:
    """The named cache of the remote, opened here, straight from disk."""
    cache = load_cache(name, config=load_config(remote / "fleche.toml"))
    assert isinstance(cache, Cache)
    return cache


def stray_files(root: Path) -> List[str]:
    """Files under ``root`` that are neither an entry nor a database (temp
    files, half-written anything), relative to ``root``."""
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            rel = path.relative_to(root).as_posix()
            if not _STORE_FILE.fullmatch(rel.split("/", 1)[-1] if rel.count("/") > 1 else rel):
                found.append(rel)
    return sorted(found)


@contextlib.contextmanager
def master_connection(sshd: Any, rate_mbps: Optional[float] = None) -> Iterator[Tuple[str, ...]]:
    """Options for ssh clients that share one connection to ``sshd``.

    A master ssh (``-f -N``, owned by no client, so killing a client's ssh
    leaves it alone) is started first, through a slow link capped at
    ``rate_mbps`` if given; each new SshCache then starts its server over
    it in ~0.1 s instead of a key exchange's ~0.4 s. The master is stopped
    on exit. Its socket lives in a short temp dir: a Unix socket path has
    ~100 bytes at most.
    """
    directory = Path(tempfile.mkdtemp(prefix="frcm-", dir="/tmp"))
    base = list(sshd.ssh_options)
    base[base.index("ControlPath=none")] = f"ControlPath={directory}/cm"
    client = tuple(base)  # ControlMaster=no: use the master, never become one
    master = list(base)
    master[master.index("ControlMaster=no")] = "ControlMaster=yes"
    if rate_mbps is not None:
        master = list(sshd.slow_ssh_options(delay_ms=1, rate_mbps=rate_mbps, options=master))
    subprocess.run(
        [sshd.ssh_executable, *master, "-o", "ControlPersist=300", "-f", "-N", sshd.host],
        check=True,
        capture_output=True,
        timeout=DEADLINE_S,
        stdin=subprocess.DEVNULL,
    )
    try:
        yield client
    finally:
        subprocess.run(
            [sshd.ssh_executable, *client, "-O", "exit", sshd.host],
            capture_output=True,
            timeout=DEADLINE_S,
            stdin=subprocess.DEVNULL,
        )
        shutil.rmtree(directory, ignore_errors=True)


def reaped(pid: int) -> bool:
    """Gone altogether, not even a zombie: garbage collection counts a
    zombie's temp files as a live writer's (its pid still answers)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


#: Generous: the machine running the tests may be loaded.
DEADLINE_S = DEFAULT_DEADLINE_S


def check_entries(cache: Cache, expected: Dict[str, Any], acknowledged: List[str]) -> Tuple[int, int]:
    """No torn entry, no lost acknowledged save.

    Every key of ``expected`` that the store says it has must load, whole,
    to its expected result; every acknowledged key must be there. Returns
    (how many are present, how many acknowledged).
    """
    keys = list(expected)
    present = cache.contains_many(keys)
    for key in acknowledged:
        assert present[keys.index(key)], f"acknowledged save {key[:16]} is missing"
    for key, there in zip(keys, present):
        if there:
            got = cache.load_value(key)
            assert got == expected[key], f"entry {key[:16]} is torn: it loads, but not to what was saved"
    return sum(present), len(acknowledged)


def remote_stderr_named(exc: BaseException) -> Optional[str]:
    """Why ``exc`` does not carry the server's stderr, or None if it does."""
    tail = getattr(exc, "stderr_tail", ())
    if not any("fleche-remote serve" in line for line in tail):
        return f"{type(exc).__name__} without the server's stderr: {exc}"
    return None


def restricted_key(sshd: Any, tmp_path: Path, remote: Path, mode: str) -> Tuple[str, ...]:
    """A new key whose authorized_keys line forces ``serve --<mode>`` in
    ``remote``, with ``restrict`` (no pty, no forwarding of any kind), and
    the ssh options that use it."""
    key = tmp_path / f"key-{mode}"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"colleague-{mode}", "-f", str(key)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    checkout = Path(__file__).resolve().parents[2]
    # the marker lets the private sshd end this key's sessions when it stops
    command = (
        f"FLECHE_TEST_SSHD={shlex.quote(str(sshd.directory))} PYTHONPATH={shlex.quote(str(checkout))} "
        f"&& export FLECHE_TEST_SSHD PYTHONPATH && cd {shlex.quote(str(remote))} "
        f"&& exec {shlex.quote(sys.executable)} -m fleche_remote serve --{mode}"
    )
    line = f'command="{command}",restrict {(tmp_path / f"key-{mode}.pub").read_text().strip()}\n'
    with open(sshd.directory / "authorized_keys", "a") as fh:
        fh.write(line)
    options = list(sshd.ssh_options)
    options[options.index("-i") + 1] = str(key)
    return tuple(options)
