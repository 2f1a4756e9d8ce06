"""Processes killed mid-save, through the real sshd: the server (kill -9 at
random points), the client, and the ssh process between them.

What must hold after each fault: no torn entry (whatever the store says
it has loads, whole, to what was saved), every acknowledged save present,
nothing left behind that garbage collection cannot find and remove, and
an error on the client that carries the server's stderr. After the
client or its ssh dies, the server exits by itself and the next client
works at once.

The server kills go through a bandwidth-capped slow link
(:mod:`fleche_remote.testing.slowlink`), and each kill delay is a seeded
random fraction of the time a whole save has been taking, so kills land
before, during and after the transfer and the writes, on a fast machine
or a loaded one. Every run has a server of its own, started over one
shared ssh connection (ControlMaster), a few runs ahead.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List

import pytest

from fleche_remote import Call, RemoteConnectionError
from fleche_remote.remote.client import SshCache
from fleche_remote.testing import wait_until
from fleche_remote.testing._util import pid_exists

from .support import (
    DEADLINE_S,
    check_entries,
    master_connection,
    open_store,
    reaped,
    remote_stderr_named,
    remote_with_stores,
    stray_files,
)

#: Runs of each kind, alternating between the two stores.
RUNS = 50
STORES = ("files", "sqlite")
LARGE = 8 << 20
#: The link's cap, so that a value takes a while to cross it.
RATE_MBPS = 280.0
BATCH = 200
#: A kill comes after ``f`` times the store's last whole save, ``f`` drawn
#: uniformly from KILL_SPAN, mostly, or from LATE_SPAN every fifth run:
#: most runs are killed, at every point of the save, and some finish first
#: (their kill comes too late), however fast or loaded the machine is.
KILL_SPAN = (0.0, 1.3)
LATE_SPAN = (1.5, 4.0)
#: Servers started ahead of their run.
PREFETCH = 3


def _connect(sshd: Any, remote: Path, options: Any, store: str) -> SshCache:
    cache = SshCache(
        sshd.host,
        cache_name=store,
        workdir=str(remote),
        python=sys.executable,
        ssh_options=options,
        timeout=15,
        connect_timeout=30,
    )
    cache.contains("00" * 32)  # the server is up; its pid came in the handshake
    return cache


def _calls(kind: str, run: int, rng: random.Random) -> List[Call]:
    if kind == "large":
        return [Call("fault.large", {"run": run}, rng.randbytes(LARGE))]
    return [
        Call("fault.small", {"run": run, "i": i}, {"i": i, "pad": rng.randbytes(1000)}) for i in range(BATCH)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["large", "batch"])
def test_kill_9_server_mid_save(sshd, tmp_path: Path, kind: str) -> None:
    rng = random.Random(f"kill-9-{kind}")
    outcomes: Dict[str, int] = {"acknowledged": 0, "killed": 0, "present after a kill": 0}
    slowest_error = 0.0
    with master_connection(sshd, RATE_MBPS) as options:
        whole: Dict[str, float] = {}
        for store in STORES:  # how long a whole save takes now, on this machine
            remote = remote_with_stores(tmp_path / f"{store}-calibration")
            cache = _connect(sshd, remote, options, store)
            start = time.monotonic()
            cache.save_many(_calls(kind, -1, rng))
            whole[store] = time.monotonic() - start
            cache.close()
        # the next runs' servers start while this run saves (a server's start
        # is most of a run's time; the runs themselves stay one at a time)
        pool = ThreadPoolExecutor(PREFETCH)

        def connect(run: int) -> Future[SshCache]:
            store = STORES[run % len(STORES)]
            return pool.submit(_connect, sshd, remote_with_stores(tmp_path / f"run-{run}"), options, store)

        upcoming = [connect(run) for run in range(min(PREFETCH, RUNS))]
        for run in range(RUNS):
            store = STORES[run % len(STORES)]
            remote = tmp_path / f"run-{run}" / "remote"
            calls = _calls(kind, run, rng)
            expected = {str(call.key()): call.result for call in calls}
            cache = upcoming.pop(0).result(DEADLINE_S)
            if run + PREFETCH < RUNS:
                upcoming.append(connect(run + PREFETCH))
            pid = cache.info(refresh=False)["pid"]
            span = LATE_SPAN if run % 5 == 4 else KILL_SPAN
            killed_at: List[float] = []
            killer = threading.Timer(rng.uniform(*span) * whole[store], _kill, (pid, killed_at))
            acknowledged: List[str] = []
            start = time.monotonic()
            killer.start()
            try:
                acknowledged = [str(k) for k in cache.save_many(calls)]
            except RemoteConnectionError as exc:
                problem = remote_stderr_named(exc)
                assert problem is None, problem
                outcomes["killed"] += 1
                slowest_error = max(slowest_error, time.monotonic() - killed_at[0])
            else:
                whole[store] = time.monotonic() - start
                outcomes["acknowledged"] += 1
            finally:
                killer.join()
                cache.close()
            wait_until(lambda: reaped(pid), f"server {pid} gone after kill -9")  # noqa: B023 (called at once)
            local = open_store(remote, store)
            try:
                present, _ = check_entries(local, expected, acknowledged)
                if not acknowledged:
                    outcomes["present after a kill"] += present
                local.collect_garbage()
                stray = stray_files(remote / store)
                assert not stray, f"run {run} ({store}): left behind after garbage collection: {stray}"
                check_entries(local, expected, acknowledged)
            finally:
                local.close()
    print(
        f"kill -9 mid-save ({kind}): {RUNS} runs, {outcomes}, "
        f"slowest error {slowest_error:.2f} s after the kill"
    )
    # the drawn delays must have put kills on both sides of the finish line
    assert outcomes["killed"] >= 10 and outcomes["acknowledged"] >= 3, outcomes


def _kill(pid: int, when: List[float]) -> None:
    when.append(time.monotonic())
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


CLIENT = """
import sys, os
from fleche_remote import Call
from fleche_remote.remote.client import SshCache
remote, store, options = sys.argv[1], sys.argv[2], sys.argv[3:]
cache = SshCache(os.environ["SSH_HOST"], cache_name=store, workdir=remote, python=sys.executable,
                 ssh_options=options, timeout=30)
cache.contains("00" * 32)
print(cache.info(refresh=False)["pid"], flush=True)
cache.save(Call("fault.client", {"n": 1}, os.urandom(64 << 20)))
print("saved", flush=True)
"""


def _temp_files(root: Path) -> List[Path]:
    return [p for p in root.rglob(".*.tmp")]


@pytest.mark.slow
@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("victim", ["client", "ssh"])
def test_killed_client_or_ssh_ends_the_server_and_frees_the_store(
    sshd, tmp_path: Path, store: str, victim: str
) -> None:
    """A 64 MiB save over a slow link; once the server is writing it, kill -9
    the client process (its ssh then closes the channel) or the ssh process
    itself. The server exits on its own, removes its temp file, holds no
    lock, and a new client saves and loads at once."""
    remote = remote_with_stores(tmp_path)
    options = sshd.slow_ssh_options(delay_ms=1, rate_mbps=200.0)
    proc = subprocess.Popen(
        [sys.executable, "-c", CLIENT, str(remote), store, *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "SSH_HOST": sshd.host},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert proc.stderr is not None
        assert line.strip().isdigit(), f"the client did not connect: {line!r} {proc.stderr.read()}"
        server = int(line)
        wait_until(lambda: _temp_files(remote / store), "the server writing the value")
        if victim == "client":
            proc.kill()
        else:
            ssh = _child_ssh(proc.pid)
            os.kill(ssh, signal.SIGKILL)
        took = wait_until(lambda: not pid_exists(server), f"server {server} exits after its {victim} died")
        proc.wait(DEADLINE_S)
        if victim == "ssh":
            assert proc.returncode != 0 and "RemoteConnectionError" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not _temp_files(remote / store), "the server left its temp file"
    print(f"{victim} killed ({store}): server gone in {took:.2f} s")
    # nothing held: the next client saves and loads at once
    start = time.monotonic()
    cache = SshCache(
        sshd.host, cache_name=store, workdir=str(remote), python=sys.executable,
        ssh_options=sshd.ssh_options, timeout=10,
    )  # fmt: skip
    try:
        key = cache.save(Call("fault.after", {"victim": victim}, b"next"))
        assert cache.load_value(key) == b"next"
        assert not cache.contains(str(Call("fault.client", {"n": 1}).key()))
    finally:
        cache.close()
    assert time.monotonic() - start < 10, "the next client waited (a lock left behind?)"
    assert stray_files(remote / store) == []


def _child_ssh(parent: int) -> int:
    """The ssh process the client started (a direct child of it)."""
    found: List[int] = []

    def look() -> bool:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmd = (entry / "cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if int(stat[1]) == parent and cmd.endswith(b"ssh"):
                found.append(int(entry.name))
                return True
        return False

    wait_until(look, "the client's ssh process")
    return found[0]
