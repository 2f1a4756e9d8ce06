"""Login output before the server's banner: skipped, reported once, loud
only when it reads like an error.

A ``module load`` on a cluster prints whatever it likes on stdout before
the server starts, and the user often cannot remove it; a warning on every
connection of every process would teach them to ignore warnings. The
setup commands below print through the real remote shell, before the
server's banner, exactly as a login script would.
"""

from __future__ import annotations

import logging

import pytest

from fleche_remote import Call
from fleche_remote.remote import health
from fleche_remote.remote.health import looks_like_error

from .helpers import remote_dir, ssh_cache

GREETING = "Welcome to the cluster. Module python/3.11 loaded."
FAILED_MODULE = "Lmod has detected the following error: The following module(s) are unknown: python/9.9"


@pytest.fixture
def fresh_reports(caplog):
    """Forget what this process already reported, and capture INFO."""
    health._noise_reported.clear()
    caplog.set_level(logging.INFO, logger="fleche_remote.client")
    yield caplog
    health._noise_reported.clear()


def _noise_records(caplog):
    return [r for r in caplog.records if "login output" in r.getMessage() and r.levelno >= logging.INFO]


def test_greeting_is_reported_once_at_info_and_shown_by_info(sshd, tmp_path, fresh_reports):
    remote = remote_dir(tmp_path)
    first = ssh_cache(sshd, remote, setup_commands=[f"echo '{GREETING}'"])
    second = ssh_cache(sshd, remote, setup_commands=[f"echo '{GREETING}'"])
    try:
        key = first.save(Call("f", {"x": 1}, "ok"))
        assert second.load_value(key) == "ok"  # a second connection to the same host
        assert GREETING.encode() in first.login_noise
        assert GREETING in second.info()["login_noise"]
        assert GREETING in second.info(refresh=False)["login_noise"]
    finally:
        first.close()
        second.close()
    records = _noise_records(fresh_reports)
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].levelno == logging.INFO
    assert "Welcome to the cluster" in records[0].getMessage()


def test_noise_that_reads_like_an_error_is_a_warning(sshd, tmp_path, fresh_reports):
    cache = ssh_cache(sshd, remote_dir(tmp_path), setup_commands=[f"echo '{FAILED_MODULE}'"])
    try:
        assert cache.contains("ab" * 32) is False  # the server works despite the noise
        assert FAILED_MODULE in cache.info()["login_noise"]
    finally:
        cache.close()
    again = ssh_cache(sshd, remote_dir(tmp_path), setup_commands=[f"echo '{FAILED_MODULE}'"])
    try:
        assert again.contains("ab" * 32) is False
    finally:
        again.close()
    records = _noise_records(fresh_reports)
    assert [r.levelno for r in records] == [logging.WARNING]  # once per host and process
    assert "look like an error" in records[0].getMessage()
    assert "module(s) are unknown" in records[0].getMessage()


def test_a_quiet_login_reports_nothing(sshd, tmp_path, fresh_reports):
    cache = ssh_cache(sshd, remote_dir(tmp_path))
    try:
        assert cache.contains("ab" * 32) is False
        assert cache.login_noise == b""
        assert cache.info()["login_noise"] == ""
    finally:
        cache.close()
    assert _noise_records(fresh_reports) == []


@pytest.mark.parametrize(
    "text, errorish",
    [
        ("Welcome to HPC!\nModule python/3.11 loaded\n", False),
        ("(base) \x1b[0m", False),
        ("Last login: Mon Nov 23 09:00:01 2026 from 10.0.0.1", False),
        ("bash: module: command not found", True),
        ("source: /opt/venv/bin/activate: No such file or directory", True),
        ("ERROR: Unable to locate a modulefile for 'python/9'", True),
        ("/home/me/.bashrc: line 3: /opt/x: Permission denied", True),
    ],
)
def test_what_reads_like_an_error(text, errorish):
    assert looks_like_error(text.encode()) is errorish
