"""The private servers of ``fleche_remote.testing`` are real, isolated, and
gone when their context exits; its slow link delays without serializing."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest
import sqlalchemy as sa

from fleche_remote.testing import PostgresServer, SshServer, private_postgres, private_sshd, slowlink


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


# -- the slow link ------------------------------------------------------------------
#
# Timings are asserted as lower bounds wherever a loaded machine could only
# make things slower; the one upper bound (pipelining) has a 4x margin over
# what a relay that serialized its chunks could reach at best.


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A TCP echo server on 127.0.0.1 (one thread per connection, each
    ending when its client closes or after 60 s of silence)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def echo(conn: socket.socket) -> None:
        conn.settimeout(60)
        with conn:
            try:
                while True:
                    data = conn.recv(1 << 16)
                    if not data:
                        return
                    conn.sendall(data)
            except OSError:
                return

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def _relay(port: int, delay_ms: float, rate_mbps: Optional[float] = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        slowlink.command("127.0.0.1", port, delay_ms, rate_mbps),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        bufsize=0,
    )


def _read_exactly(proc: subprocess.Popen[bytes], n: int) -> bytes:
    assert proc.stdout is not None
    parts: List[bytes] = []
    while n > 0:
        data = proc.stdout.read(n)
        assert data, "the relay closed early"
        parts.append(data)
        n -= len(data)
    return b"".join(parts)


def _ping(proc: subprocess.Popen[bytes], payload: bytes = b"x") -> float:
    assert proc.stdin is not None
    started = time.perf_counter()
    proc.stdin.write(payload)
    assert _read_exactly(proc, len(payload)) == payload
    return time.perf_counter() - started


def _finish(proc: subprocess.Popen[bytes]) -> Optional[int]:
    """Close our ends and wait (bounded) for the relay to exit."""
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()
    try:
        return proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        return None


def test_each_round_trip_through_the_slow_link_takes_twice_the_delay(echo_port: int) -> None:
    delay = 0.025
    proc = _relay(echo_port, delay * 1000)
    try:
        round_trips = [_ping(proc) for _ in range(6)]
    finally:
        assert _finish(proc) == 0
    assert min(round_trips) >= 2 * delay, round_trips


def test_the_slow_link_pipelines(echo_port: int) -> None:
    """50 messages sent 4 ms apart through a 80 ms round trip all come back
    in about 50 x 4 + 80 ms; a relay that held each chunk for the delay
    before reading the next would need 50 x 40 ms at least."""
    delay, n, gap = 0.040, 50, 0.004
    proc = _relay(echo_port, delay * 1000)
    try:
        _ping(proc)  # connected
        assert proc.stdin is not None
        messages = [b"%04d" % i + b"." * 96 for i in range(n)]

        def send() -> None:
            assert proc.stdin is not None
            for message in messages:
                proc.stdin.write(message)
                time.sleep(gap)

        started = time.perf_counter()
        writer = threading.Thread(target=send)
        writer.start()
        got = _read_exactly(proc, 100 * n)
        took = time.perf_counter() - started
        writer.join(10)
    finally:
        assert _finish(proc) == 0
    assert got == b"".join(messages)  # in order, intact
    assert 2 * delay <= took < n * 2 * delay / 4, took


def test_the_rate_cap_limits_a_transfer(echo_port: int) -> None:
    """400 kB each way at 8 Mbit/s (1 MB/s) take at least 0.4 s, less the
    bucket's burst."""
    nbytes, rate_mbps = 400_000, 8.0
    proc = _relay(echo_port, 1, rate_mbps)
    payload = os.urandom(nbytes)
    try:
        _ping(proc)
        assert proc.stdin is not None

        def send() -> None:
            assert proc.stdin is not None
            proc.stdin.write(payload)

        started = time.perf_counter()
        writer = threading.Thread(target=send)
        writer.start()
        got = _read_exactly(proc, nbytes)
        took = time.perf_counter() - started
        writer.join(10)
    finally:
        assert _finish(proc) == 0
    assert got == payload
    burst = max(slowlink.MIN_BURST, rate_mbps * 1e6 / 8 * slowlink.BURST_SECONDS)
    assert took >= (nbytes - burst) / (rate_mbps * 1e6 / 8), took


def test_the_relay_exits_when_the_client_goes_away(echo_port: int) -> None:
    proc = _relay(echo_port, 5)
    _ping(proc)
    started = time.perf_counter()
    assert _finish(proc) == 0
    assert time.perf_counter() - started < 5


def test_the_relay_exits_when_the_server_closes() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        proc = _relay(int(listener.getsockname()[1]), 5)
        try:
            conn, _ = listener.accept()
            conn.sendall(b"bye")
            conn.close()
            assert _read_exactly(proc, 3) == b"bye"  # delivered before the close
            assert proc.wait(10) == 0
        finally:
            _finish(proc)


def test_the_relay_reports_a_refused_connection_and_reaches_only_loopback() -> None:
    port = _unused_port()
    out = subprocess.run(slowlink.command("127.0.0.1", port, 0), capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "cannot connect" in out.stderr
    with pytest.raises(SystemExit):
        slowlink.main(["--delay-ms", "1", "192.0.2.1", "22"])  # refused before any traffic


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_ssh_through_the_slow_link(sshd: SshServer) -> None:
    """Real ssh to the private sshd: a one-byte echo by a remote ``cat``
    costs at least the link's round trip, and the relay ends with ssh."""
    delay = 0.020
    options = sshd.slow_ssh_options(delay_ms=delay * 1000)
    assert options[: len(sshd.ssh_options)] == sshd.ssh_options
    assert "slowlink" in options[-1] and options[-1].startswith("ProxyCommand=")
    proc = subprocess.Popen(
        [sshd.ssh_executable, *options, sshd.host, "cat"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        bufsize=0,
    )
    try:
        _ping(proc)  # logged in
        round_trips = [_ping(proc) for _ in range(5)]
    finally:
        assert _finish(proc) == 0
    assert min(round_trips) >= 2 * delay, round_trips
    assert _relays_for(sshd.port) == []
    assert sshd.run("echo", "still direct").stdout == "still direct\n"


def _relays_for(port: int) -> List[Tuple[int, str]]:
    """Relay processes still running for ``port`` (waiting up to 5 s)."""
    found: List[Tuple[int, str]] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(a.endswith(b"slowlink.py") for a in argv) and str(port).encode() in argv:
                found.append((int(entry.name), " ".join(a.decode(errors="replace") for a in argv)))
        if not found:
            break
        time.sleep(0.1)
    return found


def test_slow_ssh_options_refuse_a_second_proxy_command(sshd: SshServer) -> None:
    with pytest.raises(ValueError, match="ProxyCommand"):
        sshd.slow_ssh_options(options=(*sshd.ssh_options, "-o", "ProxyCommand=nc %h %p"))
