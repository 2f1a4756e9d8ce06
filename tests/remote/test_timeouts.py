"""Time-outs by default: a host that never answers fails in seconds.

OpenSSH on its own waits for the operating system's TCP time-out on a host
that accepts the connection and then says nothing (a wedged login node, a
firewall that swallows packets after the handshake). Unless the user's ssh
options or config say otherwise, ``SshCache`` passes ``ConnectTimeout``
and ``ServerAliveInterval``/``ServerAliveCountMax``.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Iterator, List, Tuple

import pytest

from fleche_remote import RemoteConnectionError
from fleche_remote.remote.client import SshCache
from fleche_remote.remote.ssh_options import timeout_options

#: What the README promises for a silent host, with the defaults.
SILENT_HOST_BOUND = 15.0


class SilentHost:
    """A loopback TCP listener that accepts every connection and never
    sends a byte: what ssh sees of a host that hangs after the TCP
    handshake."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)  # so that the accept loop sees close()
        self.port = self.listener.getsockname()[1]
        self.accepted: List[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.accepted.append(conn)  # held open, never written to

    def close(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self.listener.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def silent_host() -> Iterator[SilentHost]:
    host = SilentHost()
    try:
        yield host
    finally:
        host.close()


def _options(port: int, *extra: str) -> Tuple[str, ...]:
    # no config files: what a user without ~/.ssh/config gets
    return ("-F", "/dev/null", "-p", str(port), "-o", "BatchMode=yes", *extra)


def test_silent_host_fails_within_15_s_by_default(silent_host):
    cache = SshCache("nobody@127.0.0.1", ssh_options=_options(silent_host.port))
    assert "ConnectTimeout=10" in cache.argv()
    start = time.monotonic()
    with pytest.raises(RemoteConnectionError, match="ssh could not connect to nobody@127.0.0.1") as info:
        cache.contains("ab" * 32)
    elapsed = time.monotonic() - start
    cache.close()
    assert elapsed <= SILENT_HOST_BOUND, f"a silent host took {elapsed:.1f} s to fail"
    assert silent_host.accepted, "ssh never reached the silent host"
    assert info.value.returncode == 255
    assert any("timed out" in line for line in info.value.stderr_tail), info.value.stderr_tail


def test_the_users_connect_timeout_wins(silent_host):
    cache = SshCache("nobody@127.0.0.1", ssh_options=_options(silent_host.port, "-o", "ConnectTimeout=2"))
    argv = cache.argv()
    assert "ConnectTimeout=10" not in argv
    assert "ServerAliveInterval=5" in argv  # the ones the user left alone still come
    start = time.monotonic()
    with pytest.raises(RemoteConnectionError, match="ssh could not connect"):
        cache.contains("ab" * 32)
    cache.close()
    assert time.monotonic() - start < 10  # their 2 s, not our 10 s


def test_timeouts_from_the_users_ssh_config_are_respected(tmp_path):
    config = tmp_path / "ssh_config"
    config.write_text("Host *\n    ServerAliveInterval 30\n    ConnectTimeout 4\n")
    chosen = timeout_options("ssh", ("-F", str(config)), "someone@example.invalid")
    assert chosen == ("-o", "ServerAliveCountMax=3")
    # BatchMode's own default interval (300 s) is not a choice of the user's
    batch = timeout_options("ssh", ("-F", "/dev/null", "-o", "BatchMode=yes"), "someone@example.invalid")
    assert "ServerAliveInterval=5" in batch
    defaults = timeout_options("ssh", ("-F", "/dev/null"), "someone@example.invalid")
    assert defaults == (
        "-o",
        "ConnectTimeout=10",
        "-o",
        "ServerAliveInterval=5",
        "-o",
        "ServerAliveCountMax=3",
    )


def test_timeout_options_come_after_the_users_own():
    """ssh keeps the first value it is given, so the user's must come first."""
    cache = SshCache("nobody@127.0.0.1", ssh_options=("-F", "/dev/null", "-p", "2222"))
    argv = cache.argv()
    assert argv.index("2222") < argv.index("ConnectTimeout=10") < argv.index("nobody@127.0.0.1")


def test_a_command_gets_no_ssh_options():
    cache = SshCache("local", command=["python3", "-m", "fleche_remote", "serve"])
    assert cache.argv() == ["python3", "-m", "fleche_remote", "serve"]


def test_doctor_probes_with_the_caches_own_ssh_command_line(tmp_path) -> None:
    # doctor used to build its own argv and had lost the time-out options:
    # a silent host then hung it for ssh's default of minutes
    from fleche_remote.cli.info import _ssh_argv

    layer = SshCache("somewhere.invalid", ssh_options=["-F", "/dev/null"], workdir="~/work dir")
    probe = _ssh_argv(layer, "python3 -c pass")
    assert probe[: probe.index("--")] == layer.argv()[: layer.argv().index("--")]
    assert "ConnectTimeout=10" in probe and "ServerAliveInterval=5" in probe
    assert probe[-1] == "cd ~/'work dir' && python3 -c pass"
