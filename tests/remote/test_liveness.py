"""Liveness: ``is_alive``, ``idle_timeout`` and ``error_callback``, through
the real sshd, plus the config keys that set them."""

from __future__ import annotations

import os
import signal
import time
from typing import Callable, List

import pytest

from fleche_remote import Call, RemoteConnectionError
from fleche_remote.errors import ConfigError
from fleche_remote.remote.client import SshCache
from fleche_remote.testing._util import pid_exists

from .helpers import remote_dir, ssh_cache

DEADLINE = 30.0


def _eventually(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {DEADLINE:g} s: {what}")
        time.sleep(0.05)


def test_is_alive_answers_without_raising_and_without_breaking_a_slow_connection(sshd, tmp_path):
    cache = ssh_cache(sshd, remote_dir(tmp_path))
    try:
        assert cache.is_alive(DEADLINE)  # opens the connection
        key = cache.save(Call("f", {"x": 1}, 1))
        pid = cache.info()["pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            assert cache.is_alive(0.5) is False  # the deadline, not the 15 s request timeout
            assert time.monotonic() - start < 0.5 + 5  # generous for a loaded machine
        finally:
            os.kill(pid, signal.SIGCONT)
        # the late answer was not waited for, and the connection was left alone
        _eventually(lambda: cache.is_alive(DEADLINE), "the resumed server answers")
        assert cache.info()["pid"] == pid
        assert cache.load_value(key) == 1
    finally:
        cache.close()


def test_is_alive_is_false_for_an_unreachable_host():
    options = ("-F", "/dev/null", "-p", "1", "-o", "BatchMode=yes")
    cache = SshCache("nobody@127.0.0.1", ssh_options=options, bootstrap="never")
    try:
        assert cache.is_alive(DEADLINE) is False
    finally:
        cache.close()


def test_idle_connection_is_closed_and_reopened_transparently(sshd, tmp_path):
    cache = ssh_cache(sshd, remote_dir(tmp_path), idle_timeout=0.3)
    try:
        key = cache.save(Call("f", {"x": 2}, 2))
        pid = cache.info()["pid"]
        ssh = cache._conn.transport
        _eventually(lambda: not cache.connected, "the idle connection is closed")
        _eventually(lambda: not pid_exists(pid), f"server {pid} exits")
        assert not ssh.alive
        assert cache.load_value(key) == 2  # reopened for this call, no reconnect() needed
        assert cache.info()["pid"] != pid
    finally:
        cache.close()


def test_no_idle_close_while_a_request_is_in_flight(sshd, tmp_path):
    """A stopped server holds a request in flight far past idle_timeout:
    the connection is not closed under it (only the request's own timeout
    may end it)."""
    cache = ssh_cache(sshd, remote_dir(tmp_path), idle_timeout=0.2, timeout=DEADLINE)
    try:
        pid = cache.info()["pid"]
        conn = cache._conn
        with conn.exchange("ping") as reply:
            os.kill(pid, signal.SIGSTOP)
            try:
                stopped = time.monotonic()
                _eventually(lambda: time.monotonic() - stopped > 1.0, "five idle periods pass")
                assert cache._conn is conn and cache.connected
            finally:
                os.kill(pid, signal.SIGCONT)
            reply.first()
    finally:
        cache.close()


def test_error_callback_is_called_once_per_outage(sshd, tmp_path):
    seen: List[BaseException] = []
    cache = ssh_cache(sshd, remote_dir(tmp_path), error_callback=seen.append)
    try:
        key = cache.save(Call("f", {"x": 3}, 3))
        os.kill(cache.info()["pid"], signal.SIGKILL)
        for _ in range(3):
            with pytest.raises(RemoteConnectionError):
                cache.load_value(key)
        assert len(seen) == 1 and isinstance(seen[0], RemoteConnectionError)
        assert "closed the connection" in str(seen[0])
        cache.reconnect()
        assert cache.load_value(key) == 3  # the outage is over ...
        os.kill(cache.info()["pid"], signal.SIGKILL)
        with pytest.raises(RemoteConnectionError):
            cache.load_value(key)
        assert len(seen) == 2  # ... and the next one is reported again
    finally:
        cache.close()


def test_config_keys_round_trip():
    table = {
        "type": "ssh",
        "host": "me@cluster",
        "on_error": "warn",
        "retry_after": 30,
        "idle_timeout": 600,
        "connect_timeout": 20,
        "timeout": 45,
    }
    cache = SshCache.from_config(table)
    assert (cache.on_error, cache.retry_after, cache.idle_timeout) == ("warn", 30.0, 600.0)
    assert (cache.connect_timeout, cache.timeout) == (20.0, 45.0)
    assert SshCache.from_config(cache.to_config()).to_config() == cache.to_config()
    assert "on_error" not in SshCache("me@cluster").to_config()  # defaults stay out


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("on_error", "ignore", "on_error must be one of"),
        ("retry_after", 0, "retry_after must be a positive number"),
        ("idle_timeout", -5, "idle_timeout must be a positive number"),
        ("idle_timeout", "10", "idle_timeout"),
    ],
)
def test_bad_config_values_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message) as info:
        SshCache.from_config({"type": "ssh", "host": "me@cluster", key: value})
    assert info.value.key == key
