"""The private servers of ``fleche_remote.testing`` are real, isolated, and
gone when their context exits."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict

import pytest
import sqlalchemy as sa

from fleche_remote.testing import PostgresServer, SshServer, private_postgres, private_sshd


def _port_closed(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _gone(pid: int) -> bool:
    """True once ``pid`` has exited: no such process, or a zombie that its
    parent (init, for a daemon such as the postmaster) has yet to reap."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


# -- sshd -----------------------------------------------------------------------


def test_runs_a_command_over_real_ssh(sshd: SshServer) -> None:
    out = subprocess.run(sshd.ssh_command("echo", "hi"), capture_output=True, text=True, timeout=30)
    assert (out.returncode, out.stdout, out.stderr) == (0, "hi\n", "")
    assert "Accepted publickey" in sshd.log()


def test_exit_status_and_stdin_travel(sshd: SshServer) -> None:
    out = sshd.run("cat; exit 3", input="piped through\n")
    assert (out.returncode, out.stdout) == (3, "piped through\n")


def test_remote_env_runs_this_checkout(sshd: SshServer) -> None:
    code = "import fleche_remote, sys; print(sys.executable); print(fleche_remote.__file__)"
    out = sshd.run("python3", "-c", shlex.quote(code))
    assert out.returncode == 0, out.stderr
    executable, module = out.stdout.split()
    assert Path(executable).parent == Path(sys.executable).parent
    assert (
        Path(module).resolve() == (Path(__file__).parent.parent / "fleche_remote" / "__init__.py").resolve()
    )


def test_other_pythons_run_this_checkout_over_ssh(sshd: SshServer, other_pythons: Dict[str, str]) -> None:
    assert set(other_pythons) == {"3.9", "3.13"}
    for version, python in other_pythons.items():
        code = "import sys, fleche_remote, cloudpickle, numpy; print('%d.%d' % sys.version_info[:2])"
        out = sshd.run(shlex.quote(python), "-c", shlex.quote(code))
        assert (out.returncode, out.stdout) == (0, f"{version}\n"), out.stderr


def test_sessions_start_in_a_private_home(sshd: SshServer) -> None:
    out = sshd.run('echo "$HOME"; pwd')
    assert out.stdout.split() == [str(sshd.home), str(sshd.workdir)]
    assert sshd.home.is_relative_to(sshd.directory)
    assert sshd.home != Path.home()


def test_only_the_throwaway_key_is_accepted(sshd: SshServer, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True, timeout=30
    )
    options = list(sshd.ssh_options)
    options[options.index("-i") + 1] = str(stranger)
    out = subprocess.run([sshd.ssh_executable, *options, sshd.host, "true"], capture_output=True, timeout=30)
    assert out.returncode == 255  # ssh's own failure, not the command's


def test_forced_command_replaces_what_the_client_asks(sshd: SshServer) -> None:
    options = sshd.add_key(forced_command='echo "forced, asked for: $SSH_ORIGINAL_COMMAND"')
    out = subprocess.run(
        [sshd.ssh_executable, *options, sshd.host, "rm", "-rf", "/nonexistent"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.stdout == "forced, asked for: rm -rf /nonexistent\n"
    assert sshd.run("echo", "free").stdout == "free\n"  # the first key is not restricted


def test_login_noise_env_and_workdir(tmp_path: Path) -> None:
    noise = "Welcome to the cluster!\n(base) conda activated\nmodule: loaded python/3.11\n"
    workdir = tmp_path / "jobs"
    with private_sshd(
        login_shell_noise=noise, workdir=workdir, env={"ODD": "a b 'c' $HOME", "PYTHONPATH": None}
    ) as server:
        out = server.run('printf "%s|%s|%s\\n" "$ODD" "${PYTHONPATH-unset}" "$(pwd)"')
        assert out.returncode == 0, out.stderr
        assert out.stdout == noise + f"a b 'c' $HOME|unset|{workdir}\n"
        assert out.stdout.index(noise) == 0  # the noise comes before any output of the command
        assert out.stderr == ""


def test_everything_stops_and_is_removed_on_exit() -> None:
    with private_sshd() as server:
        port, pid, directory = server.port, server.pid, server.directory
        # a session a test forgot: it must not outlive the server
        forgotten = subprocess.Popen(
            server.ssh_command("echo started; exec sleep 300"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert forgotten.stdout is not None
        assert forgotten.stdout.readline() == "started\n"
        assert not _port_closed(port)
    try:
        assert forgotten.wait(timeout=15) == 255  # the connection was closed under it
    finally:
        if forgotten.poll() is None:
            forgotten.kill()
            forgotten.wait()
    assert _port_closed(port)
    assert _gone(pid)
    assert not directory.exists()


def test_start_failure_raises_with_sshds_own_message() -> None:
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="NoSuchOption"):
        with private_sshd(extra_config="NoSuchOption yes"):
            pass  # pragma: no cover
    assert time.monotonic() - started < 30


def test_env_names_are_checked() -> None:
    with pytest.raises(ValueError, match="identifier"):
        with private_sshd(env={"BAD NAME": "x"}):
            pass  # pragma: no cover


# -- PostgreSQL -----------------------------------------------------------------


def _scalar(url: str, sql: str) -> object:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(sql)).scalar()
    finally:
        engine.dispose()


def test_postgres_accepts_sqlalchemy(postgres_server: PostgresServer) -> None:
    assert postgres_server.url.startswith("postgresql+psycopg://postgres@127.0.0.1:")
    assert str(_scalar(postgres_server.url, "select version()")).startswith("PostgreSQL")
    assert _scalar(postgres_server.url, "show fsync") == "off"
    assert _scalar(postgres_server.url, "show listen_addresses") == "127.0.0.1"


def test_new_databases_are_fresh_and_separate(postgres_server: PostgresServer) -> None:
    first = postgres_server.new_database()
    second = postgres_server.new_database("named_db")
    assert first != second and second.endswith("/named_db")
    engine = sa.create_engine(first)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("create table t (x int)"))
            conn.execute(sa.text("insert into t values (41), (1)"))
    finally:
        engine.dispose()
    assert _scalar(first, "select sum(x) from t") == 42
    assert _scalar(second, "select count(*) from information_schema.tables where table_name = 't'") == 0
    with pytest.raises(RuntimeError, match="already exists"):
        postgres_server.new_database("named_db")
    with pytest.raises(ValueError):
        postgres_server.new_database("Robert'); drop table students;--")


def test_postgres_url_fixture_gives_an_empty_database(postgres_url: str) -> None:
    assert (
        _scalar(postgres_url, "select count(*) from information_schema.tables where table_schema = 'public'")
        == 0
    )


def test_postgres_stops_and_is_removed_on_exit() -> None:
    with private_postgres() as server:
        port, data = server.port, server.data_dir
        pid = int((data / "postmaster.pid").read_text().split()[0])
        assert _scalar(server.url, "select 1") == 1
    assert _port_closed(port)
    deadline = time.monotonic() + 10
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(pid)
    assert not data.exists()
