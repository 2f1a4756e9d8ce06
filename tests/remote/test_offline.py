"""Offline fallback: ``on_error = "warn"`` on an ssh layer of a stack.

The laptop leaves the network (or the cluster goes down): calls go on,
computed and saved locally, with one warning; nothing is lost; when the
cluster is back it is used again, after ``reconnect()`` or by itself with
``retry_after``. The "network" here is a loopback relay in front of the
test sshd that can be shut (new connections refused, open ones cut) and
opened again on the same port; ssh and sshd are the real ones.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, List, Tuple

import pytest

from fleche_remote import CacheStack, Call, RemoteConnectionError, cached
from fleche_remote.config import cache_from_config
from fleche_remote.remote.client import SshCache

from .helpers import remote_dir, ssh_cache

DEADLINE = 30.0


class Gate:
    """A TCP relay on a fixed loopback port to ``target_port``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        probe = socket.create_server(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.accepted = 0
        self._stop = threading.Event()
        self._threads: List[threading.Thread] = []
        self._listener: socket.socket
        self.open()

    def open(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        listener.settimeout(0.05)
        self._listener = listener
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, args=(listener, self._stop), daemon=True)]
        self._threads[0].start()

    def shut(self) -> None:
        """Refuse new connections and cut the open ones; returns once done."""
        self._stop.set()
        for thread in list(self._threads):
            thread.join(DEADLINE)
        self._listener.close()

    def _accept(self, listener: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except socket.timeout:
                continue
            self.accepted += 1
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            pump = threading.Thread(target=self._pump, args=(client, upstream, stop), daemon=True)
            self._threads.append(pump)
            pump.start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket, stop: threading.Event) -> None:
        peer = {a: b, b: a}
        try:
            while not stop.is_set():
                ready, _, _ = select.select([a, b], [], [], 0.05)
                for sock in ready:
                    data = sock.recv(1 << 16)
                    if not data:
                        return
                    peer[sock].sendall(data)
        except OSError:
            return
        finally:
            for sock in (a, b):
                sock.close()

    def options(self, base: Tuple[str, ...], known_hosts: Path, batch_mode: bool = True) -> Tuple[str, ...]:
        """``base`` (the sshd's options) pointed at this gate."""
        out: List[str] = []
        items = list(base)
        i = 0
        while i < len(items):
            item = items[i]
            if item == "-p":
                out += ["-p", str(self.port)]
                i += 2
                continue
            if item == "-o" and items[i + 1].startswith("UserKnownHostsFile="):
                out += ["-o", f"UserKnownHostsFile={known_hosts}"]
                i += 2
                continue
            if item == "-o" and items[i + 1] == "BatchMode=yes" and not batch_mode:
                i += 2
                continue
            out.append(item)
            i += 1
        return tuple(out)


@pytest.fixture
def gate(sshd, tmp_path) -> Iterator[Gate]:
    g = Gate(sshd.port)
    try:
        yield g
    finally:
        g.shut()


def _known_hosts(sshd, gate: Gate, tmp_path: Path) -> Path:
    """The sshd's host key, filed under the gate's port."""
    kind, key = (sshd.directory / "host_ed25519.pub").read_text().split()[:2]
    path = tmp_path / "known_hosts"
    path.write_text(f"[127.0.0.1]:{gate.port} {kind} {key}\n")
    return path


def _through_gate(sshd, gate: Gate, tmp_path: Path, batch_mode: bool = True, **kwargs) -> SshCache:
    options = gate.options(sshd.ssh_options, _known_hosts(sshd, gate, tmp_path), batch_mode)
    return ssh_cache(sshd, remote_dir(tmp_path), ssh_options=options, **kwargs)


def _local(tmp_path: Path):
    return cache_from_config({"template": "cloudpickle", "root": str(tmp_path / "laptop")})


def _on_cluster(sshd, tmp_path: Path, *calls: Call) -> list:
    """Save ``calls`` straight into the cluster's cache (not through the gate)."""
    direct = ssh_cache(sshd, remote_dir(tmp_path))
    try:
        return [direct.save(call) for call in calls]
    finally:
        direct.close()


def _warnings(caplog) -> List[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith("fleche_remote")
    ]


def _eventually(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {DEADLINE:g} s: {what}")
        time.sleep(0.05)


def test_unreachable_remote_computes_locally_with_one_warning_until_reconnect(sshd, gate, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fleche_remote")
    (cluster_key,) = _on_cluster(sshd, tmp_path, Call("sim.run", {"n": 1}, "from the cluster"))
    gate.shut()
    local = _local(tmp_path)
    layer = _through_gate(sshd, gate, tmp_path, on_error="warn")
    stack = CacheStack([local, layer])
    computed: List[int] = []

    @cached(cache=stack)
    def square(x: int) -> int:
        computed.append(x)
        return x * x

    try:
        assert [square(2), square(3), square(2)] == [4, 9, 4]
        assert square.map([4, 5, 2]) == [16, 25, 4]
        assert computed == [2, 3, 4, 5]  # each computed once, then served locally
        assert all(local.contains(square.key(x)) for x in (2, 3, 4, 5))
        with pytest.raises(KeyError):
            stack.load_value(cluster_key)  # the cluster is skipped, not waited for
        assert not layer.connected
        warned = _warnings(caplog)
        assert len(warned) == 1, warned
        assert "unavailable" in warned[0] and "on_error = 'warn'" in warned[0]

        gate.open()
        layer.reconnect()
        assert stack.load_value(cluster_key) == "from the cluster"  # the cluster is used again
        assert local.contains(cluster_key)  # and back-filled
        assert len(_warnings(caplog)) == 1
    finally:
        stack.close()


def test_a_remote_lost_mid_session_comes_back_by_itself_after_retry_after(sshd, gate, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fleche_remote")
    first, later = _on_cluster(sshd, tmp_path, Call("sim.run", {"n": 1}, 1), Call("sim.run", {"n": 2}, 2))
    local = _local(tmp_path)
    layer = _through_gate(sshd, gate, tmp_path, on_error="warn", retry_after=0.2)
    stack = CacheStack([local, layer])
    try:
        assert stack.load_value(first) == 1
        assert layer.connected
        gate.shut()  # the link drops under an open connection
        stack.evict(first)  # only the local copy is reachable to evict now
        with pytest.raises(KeyError):
            stack.load_value(first)
        key = stack.save(Call("local.only", {}, "saved"))
        assert local.contains(key)
        assert len(_warnings(caplog)) == 1

        gate.open()
        # no reconnect(): BatchMode means no prompt, so the layer retries by itself
        _eventually(lambda: stack.contains(later), "the remote is used again after retry_after")
        assert stack.load_value(later) == 2
        assert layer.connected
        assert any("reachable again" in r.getMessage() for r in caplog.records)
        assert len(_warnings(caplog)) == 1  # one outage, one warning
    finally:
        stack.close()


def test_no_retry_by_itself_when_ssh_could_prompt(sshd, gate, tmp_path):
    local = _local(tmp_path)
    layer = _through_gate(sshd, gate, tmp_path, batch_mode=False, on_error="warn", retry_after=0.2)
    stack = CacheStack([local, layer])
    try:
        gate.shut()
        assert stack.contains("ab" * 32) is False  # fails over, marks the outage
        failed_at = time.monotonic()
        gate.open()
        dialled = gate.accepted
        _eventually(lambda: time.monotonic() - failed_at > 0.4, "twice retry_after passes")
        assert stack.contains("ab" * 32) is False
        assert gate.accepted == dialled  # no new ssh connection: it could have prompted
        layer.reconnect()
        assert layer.is_alive(DEADLINE)
        assert gate.accepted == dialled + 1
    finally:
        stack.close()


def test_the_default_still_raises(sshd, gate, tmp_path):
    gate.shut()
    stack = CacheStack([_local(tmp_path), _through_gate(sshd, gate, tmp_path)])

    @cached(cache=stack)
    def double(x: int) -> int:
        return 2 * x

    try:
        with pytest.raises(RemoteConnectionError, match="ssh could not connect"):
            double(1)
    finally:
        stack.close()


def test_a_save_the_remote_could_not_take_stays_pending(sshd, gate, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    gate.shut()
    local = _local(tmp_path)
    layer = _through_gate(sshd, gate, tmp_path, on_error="warn")
    stack = CacheStack([local, layer], write_behind=[layer])
    try:
        key = stack.save(Call("sweep.point", {"i": 7}, 49))
        assert local.contains(key)
        assert stack.flush(DEADLINE) is False  # the push failed ...
        assert stack.pending() == [key]  # ... and is remembered
        with pytest.raises(RemoteConnectionError):
            layer.save(Call("direct", {}, 1))  # a save is never skipped silently

        gate.open()
        layer.reconnect()
        assert stack.push_pending() == 1
        assert stack.pending() == []
    finally:
        stack.close()
    direct = ssh_cache(sshd, tmp_path / "remote")
    try:
        assert direct.load_value(key) == 49
    finally:
        direct.close()
