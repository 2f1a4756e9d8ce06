"""SshCache through the real ssh client and a real sshd on 127.0.0.1.

Each test says what a user would see: a result that comes back, or an
error that arrives quickly and says what is wrong.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fleche_remote import Call, Rejected, RemoteConnectionError, RemoteError
from fleche_remote.config import load_cache
from fleche_remote.errors import StorageError
from fleche_remote.remote.client import SshCache
from fleche_remote.testing import private_sshd, wait_until
from fleche_remote.testing._util import pid_exists

from .helpers import SQL_TOML, remote_dir, ssh_cache


def test_round_trip_and_info(sshd, tmp_path):
    cache = ssh_cache(sshd, remote_dir(tmp_path))
    try:
        key = cache.save(Call("mod.f", {"x": 1}, {"answer": 42}, {"host": "laptop"}))
        assert cache.load_value(key) == {"answer": 42}
        assert cache.load(key).metadata["host"] == "laptop"
        info = cache.info()
        assert info["cache_name"] is None
        assert info["read_only"] is False
        assert info["cwd"] == str(tmp_path / "remote")
        assert info["versions"]["python"] == sys.version.split()[0]
        assert info["cache"]["values"]["root"] == str(tmp_path / "remote" / "store" / "values")
        assert cache.info(refresh=False)["pid"] == info["pid"]
        # the server really stored it where its own fleche.toml says
        assert any((tmp_path / "remote" / "store" / "calls").rglob("*.call"))
    finally:
        cache.close()


def test_missing_key_raises_keyerror_with_remote_traceback(sshd, tmp_path):
    cache = ssh_cache(sshd, remote_dir(tmp_path))
    try:
        with pytest.raises(KeyError) as info:
            cache.load_value("ab" * 32)
        assert "Traceback" in info.value.remote_traceback
        assert cache.contains("ab" * 32) is False  # still usable afterwards
    finally:
        cache.close()


def test_unknown_remote_exception_becomes_remote_error(sshd, tmp_path):
    cache = ssh_cache(sshd, remote_dir(tmp_path), setup_commands=["export FLECHE_REMOTE_DEBUG_OPS=1"])
    try:
        with pytest.raises(RemoteError, match="InjectedError: boom") as info:
            cache._request("debug_raise", {"type": "Custom", "message": "boom"})
        assert "_h_debug_raise" in str(info.value)  # the remote traceback is attached
        with pytest.raises(ValueError, match="bad value"):
            cache._request("debug_raise", {"type": "ValueError", "message": "bad value"})
        assert cache.contains("ab" * 32) is False
    finally:
        cache.close()


def test_debug_ops_are_absent_by_default(sshd, tmp_path):
    from fleche_remote.errors import ProtocolError

    cache = ssh_cache(sshd, remote_dir(tmp_path))
    try:
        with pytest.raises(ProtocolError, match="unknown operation 'debug_raise'"):
            cache._request("debug_raise", {"type": "ValueError", "message": "x"})
    finally:
        cache.close()


def test_stack_from_fleche_toml_backfills_and_then_works_offline(sshd, tmp_path, monkeypatch):
    remote = remote_dir(tmp_path)
    server_side = ssh_cache(sshd, remote)
    key = server_side.save(Call("sim.run", {"n": 3}, np.arange(6.0)))
    server_side.close()

    laptop = tmp_path / "laptop"
    laptop.mkdir()
    options = ", ".join(f'"{o}"' for o in sshd.ssh_options)
    (laptop / "fleche.toml").write_text(
        f"""
[default]
cache = "shared"
root = true

[[shared]]
template = "cloudpickle"
root = "local"

[[shared]]
type = "ssh"
host = "{sshd.host}"
python = "{sys.executable}"
workdir = "{remote}"
ssh_options = [{options}]
timeout = 15
"""
    )
    monkeypatch.chdir(laptop)
    stack = load_cache()
    try:
        assert type(stack.layers[1]) is SshCache
        np.testing.assert_array_equal(stack.load_value(key), np.arange(6.0))
        assert stack.layers[0].contains(key)  # back-filled
    finally:
        stack.close()

    # offline: the ssh layer now points at a port where nothing listens
    text = (laptop / "fleche.toml").read_text().replace(f'"{sshd.port}"', '"1"')
    (laptop / "fleche.toml").write_text(text)
    offline = load_cache()
    try:
        np.testing.assert_array_equal(offline.load_value(key), np.arange(6.0))
        assert not offline.layers[1].connected  # never even dialled
    finally:
        offline.close()


def test_unreachable_host_says_ssh_could_not_connect(tmp_path):
    cache = SshCache(
        "nobody@127.0.0.1",
        ssh_options=("-p", "1", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-F", "/dev/null"),
        connect_timeout=20,
    )
    start = time.monotonic()
    with pytest.raises(RemoteConnectionError, match="ssh could not connect to nobody@127.0.0.1") as info:
        cache.contains("ab" * 32)
    assert time.monotonic() - start < 15
    assert info.value.returncode == 255
    assert any("refused" in line.lower() for line in info.value.stderr_tail)


def test_failing_setup_command_is_reported(sshd, tmp_path):
    cache = ssh_cache(
        sshd, remote_dir(tmp_path), setup_commands=["echo 'module: no such module' >&2", "false"]
    )
    with pytest.raises(RemoteConnectionError, match="setup_commands") as info:
        cache.contains("ab" * 32)
    assert info.value.returncode == 1
    assert "module: no such module" in info.value.stderr_tail


def test_missing_remote_python(sshd, tmp_path):
    cache = ssh_cache(sshd, remote_dir(tmp_path), python="/opt/no/such/python3")
    with pytest.raises(RemoteConnectionError, match="exit 127.*/opt/no/such/python3") as info:
        cache.contains("ab" * 32)
    assert info.value.returncode == 127


def test_missing_remote_package(sshd, tmp_path):
    bare = tmp_path / "bare-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    cache = ssh_cache(
        sshd,
        remote_dir(tmp_path),
        python=str(bare / "bin" / "python"),
        setup_commands=["unset PYTHONPATH"],
        bootstrap="never",  # "auto" would send the code instead
    )
    with pytest.raises(RemoteConnectionError, match="fleche_remote is not installed") as info:
        cache.contains("ab" * 32)
    assert info.value.returncode == 1


def test_server_without_config_says_where_it_looked(sshd, tmp_path):
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    cache = ssh_cache(sshd, empty)
    with pytest.raises(RemoteConnectionError) as info:
        cache.contains("ab" * 32)
    text = str(info.value)
    assert "fleche.toml" in text
    assert str(empty) in text  # it names the places it looked


def test_chatty_login_shell_is_skipped_and_reported(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fleche_remote.client")
    noise = "Welcome to HPC!\nModule python/3.11 loaded\n(base) \x1b[0m"
    with private_sshd(login_shell_noise=noise) as server:
        cache = ssh_cache(server, remote_dir(tmp_path))
        try:
            key = cache.save(Call("f", {"x": 1}, "ok"))
            assert cache.load_value(key) == "ok"
            assert noise.encode() in cache.login_noise
        finally:
            cache.close()
    assert any("skipped" in r.message and "Welcome to HPC" in r.message for r in caplog.records)


def test_no_banner_times_out_with_what_arrived(tmp_path):
    cache = SshCache("fake", command=["sh", "-c", "echo 'Password expired'; sleep 30"], connect_timeout=2)
    start = time.monotonic()
    with pytest.raises(RemoteConnectionError, match="no fleche-remote banner.*Password expired"):
        cache.contains("ab" * 32)
    assert time.monotonic() - start < 6
    cache.close()


def test_stopped_server_times_out_then_reconnect_works(sshd, tmp_path):
    cache = ssh_cache(sshd, remote_dir(tmp_path), timeout=2)
    key = cache.save(Call("f", {"x": 1}, 1))
    pid = cache.info()["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(RemoteConnectionError, match="no reply .* within 2 s"):
            cache.contains(key)
        assert time.monotonic() - start < 6
        with pytest.raises(RemoteConnectionError, match="call reconnect"):
            cache.contains(key)  # no silent reconnect
    finally:
        os.kill(pid, signal.SIGCONT)
    cache.reconnect()
    assert cache.load_value(key) == 1
    assert cache.info()["pid"] != pid
    cache.close()


def test_killed_server_reports_and_reconnects(sshd, tmp_path):
    cache = ssh_cache(sshd, remote_dir(tmp_path))
    key = cache.save(Call("f", {"x": 2}, 2))
    pid = cache.info()["pid"]
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(RemoteConnectionError, match="closed the connection") as info:
        cache.load_value(key)
    assert info.value.returncode is not None
    assert any("fleche-remote serve" in line for line in info.value.stderr_tail)
    cache.reconnect()
    assert cache.load_value(key) == 2
    cache.close()


def test_read_only_cache_rejects_locally_without_a_round_trip(sshd, tmp_path):
    remote = remote_dir(tmp_path)
    writer = ssh_cache(sshd, remote)
    key = writer.save(Call("f", {"x": 3}, 3))
    writer.close()
    cache = ssh_cache(sshd, remote, cache_name="ro", timeout=2)
    try:
        assert cache.read_only
        assert cache.load_value(key) == 3
        pid = cache.info()["pid"]
        os.kill(pid, signal.SIGSTOP)  # any round trip would now time out
        try:
            with pytest.raises(Rejected):
                cache.save(Call("f", {"x": 4}, 4))
            with pytest.raises(Rejected):
                cache.evict(key)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert cache.contains(key)
    finally:
        cache.close()


def test_forced_read_only_command_protects_the_host(sshd, tmp_path):
    """A colleague's key forced to ``serve --read-only``: even a client that
    skips its own check cannot write, evict or reach other operations."""
    remote = remote_dir(tmp_path)
    writer = ssh_cache(sshd, remote)
    key = writer.save(Call("f", {"x": 5}, 5))
    writer.close()
    options = sshd.add_key(
        forced_command=f"cd {remote} && exec {sys.executable} -m fleche_remote serve --read-only"
    )
    colleague = SshCache(sshd.host, ssh_options=options, command=None, timeout=15, python="ignored")
    try:
        assert colleague.read_only
        assert colleague.load_value(key) == 5
        with pytest.raises(Rejected, match="read-only"):
            colleague._request("evict", {"key": str(key)})  # straight to the server
        with pytest.raises(Rejected, match="read-only"):
            colleague._request("collect_garbage")
        assert colleague.contains(key)
    finally:
        colleague.close()


def test_forced_read_only_command_leaves_an_old_database_as_it_is(sshd, tmp_path):
    """The owner's table allows writes, the colleague's key is forced to
    ``serve --read-only``: the colleague's first request must not migrate
    the owner's text-keyed database, and is told how it gets upgraded."""
    remote = remote_dir(tmp_path, SQL_TOML)
    (remote / "store").mkdir()
    db = remote / "store" / "calls.db"
    shutil.copyfile(Path(__file__).parent.parent / "data" / "sql_text_keys.db", db)
    before = db.read_bytes()
    options = sshd.add_key(
        forced_command=f"cd {remote} && exec {sys.executable} -m fleche_remote serve --read-only"
    )
    colleague = SshCache(sshd.host, ssh_options=options, command=None, timeout=15, python="ignored")
    try:
        with pytest.raises(StorageError, match="keys stored as text") as caught:
            colleague.contains("ab" * 32)
        assert "read_only = true" in str(caught.value)
    finally:
        colleague.close()
    assert db.read_bytes() == before  # not migrated
    owner = ssh_cache(sshd, remote)
    try:
        assert not owner.contains("ab" * 32)  # the owner's first use migrates it
    finally:
        owner.close()
    assert db.read_bytes() != before


def test_threads_share_one_connection(sshd, tmp_path):
    cache = ssh_cache(sshd, remote_dir(tmp_path))
    errors = []

    def work(t: int) -> None:
        try:
            for i in range(30):
                key = cache.save(Call("f", {"t": t, "i": i}, (t, i)))
                assert cache.load_value(key) == (t, i)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    try:
        assert not errors
        assert len(list(cache.query("f"))) == 180
    finally:
        cache.close()


def _interrupt_main() -> None:
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


class _Tripwire:
    """Presses Ctrl-C (SIGINT to the main thread) at a chosen point of a
    transfer, by watching the real transport's calls: the point is an
    event of the transfer, not a delay that a loaded machine would shift.

    ``at`` is ``"sent"`` (the request is written), ``"waiting"`` (the
    first wait for the reply; sent from another thread, so it interrupts
    the wait itself), ``("waiting", n)`` (the first wait after ``n`` bytes
    arrived) or a number of bytes received (``size``: after the last one).
    """

    def __init__(self, transport: object, at: object) -> None:
        self.transport = transport
        self.at = at
        self.received = 0
        self.fired_at = None
        self._saved = {}
        for name in ("write", "write_atomic", "wait_readable", "read_ready", "readinto_ready"):
            real = getattr(transport, name)
            self._saved[name] = real
            setattr(transport, name, getattr(self, f"_{name}")(real))

    def remove(self) -> None:
        for name in self._saved:
            delattr(self.transport, name)

    def _fire(self, from_thread: bool = False) -> None:
        if self.fired_at is None:
            self.fired_at = time.monotonic()
            if from_thread:
                threading.Thread(target=_interrupt_main).start()
            else:
                _interrupt_main()

    def _write(self, real):
        def write(data, timeout):
            real(data, timeout)
            if self.at == "sent":
                self._fire()

        return write

    def _write_atomic(self, real):
        def write_atomic(data):
            whole = real(data)
            if whole and self.at == "sent":
                self._fire()  # right after the frame left, where no deferral covers it
            return whole

        return write_atomic

    def _wait_readable(self, real):
        def wait_readable(timeout):
            here = self.at == "waiting" or (
                isinstance(self.at, tuple) and self.at[0] == "waiting" and self.received >= self.at[1]
            )
            if here and self.fired_at is None:
                self._fire(from_thread=True)
                real(timeout)
                while True:  # the data came first: take the interrupt here, still "in the wait"
                    time.sleep(0.01)
            return real(timeout)

        return wait_readable

    def _count(self, n):
        if n:
            self.received += n
            if isinstance(self.at, int) and self.received >= self.at:
                self._fire()

    def _read_ready(self, real):
        def read_ready():
            data = real()
            self._count(len(data or b""))
            return data

        return read_ready

    def _readinto_ready(self, real):
        def readinto_ready(into):
            n = real(into)
            self._count(n or 0)
            return n

        return readinto_ready


class _Wedged(Exception):
    pass


def _within(seconds: float, what, *args):
    """``what(*args)``, or :class:`_Wedged` if it has not returned after
    ``seconds`` (a hang would otherwise stall the whole run)."""

    def alarm(signum, frame):
        raise _Wedged(f"no return within {seconds} s: the connection is wedged")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return what(*args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_ctrl_c_mid_transfer_leaves_connection_usable_or_closed(sshd, tmp_path):
    """Ctrl-C at every stage of a 64 MiB load returns at once, and leaves
    the connection usable (the next answer is the right one, never a
    stale one) or closed (the next call says so; reconnect() works)."""
    size = 64 << 20
    cache = ssh_cache(sshd, remote_dir(tmp_path), bootstrap="never")
    big = cache.save(Call("big", {}, np.ones(size, dtype=np.uint8)))
    small = cache.save(Call("small", {}, "fine"))
    points = ["sent", "waiting", ("waiting", size // 2), 1, 1 << 20, size // 2, size - (1 << 20), size]
    outcomes = {}
    latencies = []
    try:
        for at in points:
            assert cache.load_value(small) == "fine"  # connected, nothing in flight
            trip = _Tripwire(cache._conn.transport, at)
            interrupted = False
            try:
                _within(120, cache.load_value, big)
            except KeyboardInterrupt:
                interrupted = True
                latencies.append(time.monotonic() - trip.fired_at)
            finally:
                trip.remove()
            assert trip.fired_at is not None, f"the load finished before reaching {at!r}"
            assert interrupted, f"Ctrl-C at {at!r} was swallowed"
            try:
                assert _within(120, cache.load_value, small) == "fine"  # never a stale answer
                outcomes[at] = "usable"
            except RemoteConnectionError:
                outcomes[at] = "closed"
                cache.reconnect()
                assert _within(120, cache.load_value, small) == "fine"
        assert set(outcomes) == set(points)  # each stage ended in one of the two allowed states
        assert outcomes["sent"] == outcomes["waiting"] == "usable"  # nothing half-read: no reason to close
        # Ctrl-C returns at once (well under 0.5 s when idle; bounded generously for a loaded machine)
        assert max(latencies) < 5.0, latencies
    finally:
        cache.close()


def test_ctrl_c_in_the_narrowest_windows_never_wedges_the_connection(sshd, tmp_path):
    """The two states a Ctrl-C can leave behind in a few bytecodes, made on
    purpose: a request sent whose answer nobody will read (interrupted
    between sending it and starting to read), and a "someone is reading"
    flag its thread never cleared. Either way the next call answers or
    fails within ``timeout``: it never hangs."""
    cache = ssh_cache(sshd, remote_dir(tmp_path), bootstrap="never", timeout=2)
    try:
        big = cache.save(Call("big", {}, np.ones(64 << 20, dtype=np.uint8)))  # > MAX_QUEUED_BYTES
        small = cache.save(Call("small", {}, "fine"))
        conn = cache._conn
        conn.exchange("load_value", {"key": str(big)})  # never entered, never exited
        # small answers go on while the abandoned value fills the queue; once
        # it is full, the next call fails after `timeout` instead of hanging
        deadline = time.monotonic() + 60
        with pytest.raises(RemoteConnectionError, match="nobody took them"):
            while time.monotonic() < deadline:
                assert _within(60, cache.load_value, small) == "fine"
        cache.reconnect()
        assert cache.load_value(small) == "fine"

        conn = cache._conn
        conn._leading, conn._leader = True, threading.get_ident()  # left set by an interrupt
        assert _within(60, cache.load_value, small) == "fine"
    finally:
        cache.close()


def test_close_with_an_abandoned_value_lets_the_server_exit_by_itself(sshd, tmp_path):
    """After Ctrl-C mid-load the server may be blocked writing the abandoned
    value when the process exits. close() drains it, so the server sees the
    end of its input and exits (ssh with status 0) at once, rather than
    being killed when close()'s grace time runs out."""
    cache = ssh_cache(sshd, remote_dir(tmp_path), bootstrap="never")
    big = cache.save(Call("big", {}, np.ones(64 << 20, dtype=np.uint8)))
    conn = cache._conn
    with conn.exchange("load_value", {"key": str(big)}) as reply:
        assert reply.first().blobs  # the value's 64 MiB follow, unread: abandoned
    start = time.monotonic()
    _within(120, conn.transport.close, 60.0)
    assert conn.transport.proc.returncode == 0, "ssh was killed instead of exiting"
    assert time.monotonic() - start < 30
    cache.close()


def test_subprocess_is_closed_when_the_cache_is_collected(sshd, tmp_path):
    cache = ssh_cache(sshd, remote_dir(tmp_path))
    pid = cache.info()["pid"]
    ssh_pid = cache._conn.transport.proc.pid
    del cache
    gc.collect()
    wait_until(lambda: not pid_exists(pid), f"the server {pid} to exit once its cache was collected")
    wait_until(lambda: not pid_exists(ssh_pid), f"ssh {ssh_pid} to exit once its cache was collected")


def test_client_313_against_server_39(sshd, tmp_path, other_pythons):
    client_code = f"""
import sys, numpy as np
from fleche_remote import Call
from fleche_remote.remote.client import SshCache
c = SshCache({sshd.host!r}, python={other_pythons["3.9"]!r}, ssh_options={tuple(sshd.ssh_options)!r},
             workdir={str(remote_dir(tmp_path))!r}, timeout=15)
k = c.save(Call("f", {{"a": np.arange(3)}}, {{"arr": np.eye(3), "s": "x"}}))
out = c.load_value(k)
assert out["s"] == "x" and (out["arr"] == np.eye(3)).all()
arr = c.save(Call("g", {{}}, np.arange(10, dtype=np.int32)))
assert (c.load_value(arr) == np.arange(10)).all()
print(sys.version_info[:2], c.info()["versions"]["python"])
c.close()
"""
    done = subprocess.run(
        [other_pythons["3.13"], "-c", client_code], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[:2] == ["(3,", "13)"]
    assert done.stdout.split()[2].startswith("3.9.")
