"""Private servers for tests: an ``sshd`` and a PostgreSQL, on loopback only.

fleche-remote promises that every remote feature works through real
``ssh`` to a real ``sshd``, and that the SQL backend works on a real
PostgreSQL. These helpers start both as throwaway processes owned by the
test run, so that anyone (us, CI, a user checking their own set-up) can
prove it without touching the machine's own servers, keys or config:

* :func:`private_sshd` starts ``/usr/sbin/sshd`` on ``127.0.0.1`` with a
  fresh host key and a fresh client key in a temp dir, and hands back the
  ``ssh`` options that reach it and nothing else (the user's
  ``~/.ssh/config``, agent and known_hosts are all ignored).
* :func:`private_postgres` runs ``initdb`` into a temp dir and starts a
  postmaster on a free loopback port with trust authentication.

Both are context managers that stop their server and delete its files on
exit, and every wait in them is bounded. The pytest fixtures
:func:`sshd_server` and :func:`postgres_server` (session scope) wrap them;
import them into a ``conftest.py``::

    from fleche_remote.testing import postgres_server, sshd_server  # noqa: F401

Only the fixtures need pytest; ``import fleche_remote.testing`` works
without it. Nothing else in the package imports this module.

How the remote side of :func:`private_sshd` looks
-------------------------------------------------
Each client key is installed with an ``authorized_keys`` ``command=``
that runs a small generated ``/bin/sh`` script, the *login wrapper*, in
place of the client's command. The wrapper plays the part of a login on
a cluster, in this order:

1. prints ``login_shell_noise`` to stdout (the motd, ``conda activate``
   and ``module load`` chatter that a real login shell can emit before the
   command runs, which a client must skip);
2. exports the remote environment (see below);
3. ``cd``-s into ``workdir``;
4. runs the client's command (``$SSH_ORIGINAL_COMMAND``) with the user's
   shell, ``$SHELL -c``, exactly as sshd would have, or, for a key added
   with ``forced_command``, runs that command instead, as an
   ``authorized_keys`` restriction on a real server would.

Going through ``command=`` rather than the user's ``~/.bashrc`` makes the
noise and the environment independent of the user's shell and of what is
in their home directory. ``$HOME`` is a fresh directory inside the
server's temp dir (set with sshd's ``SetEnv``, so even the shell's own
start-up files come from there): a test can put a ``fleche.toml`` or a
``.bashrc`` into :attr:`SshServer.home` without touching the real home.

The remote environment, unless ``env`` overrides an entry:

``PATH``
    the directory of the interpreter running the tests first (so that a
    remote ``python3`` is the same virtualenv, as if it were activated on
    the cluster), then ``/usr/local/bin:/usr/bin:/bin``.
``PYTHONPATH``
    the source checkout that ``fleche_remote`` was imported from, when it
    was not imported from an installed ``site-packages``; that lets any
    remote interpreter that has ``cloudpickle`` run this very checkout.
``LANG``
    ``C.UTF-8``, so remote tools don't depend on the caller's locale.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import site
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

try:
    import pytest
except ImportError:  # the fixtures need pytest; the context managers don't
    pytest = None  # type: ignore[assignment]

#: How long :func:`private_sshd` waits for ``ssh ... true`` to succeed. sshd
#: itself is up in ~50 ms; the margin is for a loaded CI machine.
SSHD_START_TIMEOUT = 15.0

#: How long :func:`private_postgres` waits for initdb plus the first start.
#: initdb with ``--no-sync`` takes 1-3 s on a laptop; 2 cores under load, more.
POSTGRES_START_TIMEOUT = 90.0

#: How long a stop may take before the process is killed.
STOP_TIMEOUT = 10.0

#: Set in the environment of every remote session, so that the sessions a
#: test left running can be found and ended when the server stops.
_SESSION_MARKER = "FLECHE_TEST_SSHD"

#: Port races (another process takes the free port between our probe and
#: the server's bind) are retried this many times.
_PORT_ATTEMPTS = 3

__all__ = ["PostgresServer", "SshServer", "private_postgres", "private_sshd"]

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DB_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


# -- shared helpers -----------------------------------------------------------


def _free_port() -> int:
    """A loopback port that is free now (the caller retries if it is taken
    before the server binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _user_name() -> str:
    """The effective user: who a private sshd can log in. Not ``$USER``,
    which ``sudo`` or a CI runner may leave pointing at someone else."""
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def _tool(name: str, *fallbacks: str) -> str:
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


def _temp_dir(prefix: str, *, for_other_user: bool = False) -> Path:
    """A fresh temp dir under ``$TMPDIR``, or under ``/tmp`` when ``$TMPDIR``
    won't do: sshd_config and ``ssh -o`` split paths on whitespace, and a
    server run as another user (postgres, by root) must be able to reach it."""
    base = Path(tempfile.gettempdir())
    if any(c.isspace() for c in str(base)) or (
        for_other_user and not all(os.stat(p).st_mode & 0o001 for p in [base, *base.parents])
    ):
        base = Path("/tmp")
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Signal ``proc``, wait a bounded time, then kill it; always reaps it."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)


def _pids_with_env(name: str, value: str) -> List[int]:
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


def _kill_pids(pids: Sequence[int]) -> None:
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
            alive = [pid for pid in alive if _exists(pid)]
            time.sleep(0.05)
        pids = alive
        if not pids:
            return


def _exists(pid: int) -> bool:
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


# -- sshd ---------------------------------------------------------------------


def _default_remote_env() -> Dict[str, str]:
    env = {
        "PATH": os.pathsep.join([os.path.dirname(sys.executable), "/usr/local/bin", "/usr/bin", "/bin"]),
        "LANG": "C.UTF-8",
    }
    checkout = Path(__file__).resolve().parent.parent
    installed = {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]}
    if checkout not in installed:
        env["PYTHONPATH"] = str(checkout)
    return env


class SshServer:
    """A running private sshd (made by :func:`private_sshd`).

    Attributes:
        host: ``user@127.0.0.1`` for the user running the tests.
        port: the loopback port sshd listens on.
        ssh_options: everything ``ssh`` needs before the host to reach this
            server with the default key, and nothing from the user's own
            ssh set-up; pass it as ``SshCache(..., ssh_options=...)``.
        home: ``$HOME`` of every remote session, an empty directory in the
            server's temp dir.
        workdir: where remote commands start.
        directory: the server's temp dir (keys, config, log); removed on exit.
        pid: sshd's process id.
    """

    def __init__(
        self, directory: Path, home: Path, workdir: Path, noise: Optional[str], env: Dict[str, str]
    ) -> None:
        self.directory = directory
        self.home = home
        self.workdir = workdir
        self.host = f"{_user_name()}@127.0.0.1"
        self.port = 0
        self.pid = 0
        self.ssh_executable = _tool("ssh", "/usr/bin/ssh")
        self.log_path = directory / "sshd.log"
        self._keygen = _tool("ssh-keygen", "/usr/bin/ssh-keygen")
        self._noise = noise
        self._env = env
        self._keys = 0
        self._proc: Optional[subprocess.Popen[bytes]] = None
        self.ssh_options: Tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"<SshServer {self.host} port {self.port} pid {self.pid}>"

    def ssh_command(self, *remote_args: str) -> List[str]:
        """``ssh`` argv that runs ``remote_args`` on this server.

        Like plain ``ssh``, the arguments are joined with spaces and given to
        the remote shell, so quote them for it (``shlex.join``) if needed.
        """
        return [self.ssh_executable, *self.ssh_options, self.host, *remote_args]

    def run(
        self, *remote_args: str, timeout: float = 60.0, input: Optional[str] = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a remote command and capture its output as text (no check)."""
        return subprocess.run(
            self.ssh_command(*remote_args),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=None if input is not None else subprocess.DEVNULL,
        )

    def add_key(self, *, forced_command: Optional[str] = None) -> Tuple[str, ...]:
        """Authorize one more client key and return ``ssh`` options that use it.

        Args:
            forced_command: run this instead of whatever the client asks for,
                as an ``authorized_keys`` ``command="..."`` does on a real
                server (the client's command stays in
                ``$SSH_ORIGINAL_COMMAND``). This is how a colleague's key is
                restricted to ``python -m fleche_remote serve --read-only``.

        Returns:
            Options for ``ssh`` (like :attr:`ssh_options`) with the new key.
        """
        self._keys += 1
        name = f"client{self._keys}"
        key = self.directory / name
        self._new_key(key, f"fleche-test-{name}")
        wrapper = self.directory / f"login-{name}.sh"
        wrapper.write_text(self._wrapper_script(forced_command))
        wrapper.chmod(0o755)
        pub = (self.directory / f"{name}.pub").read_text().strip()
        line = f'command="{wrapper}",no-agent-forwarding,no-X11-forwarding {pub}\n'
        with open(self.directory / "authorized_keys", "a") as fh:
            fh.write(line)
        return self._options_for(key)

    def log(self) -> str:
        """What sshd has logged so far (connections, authentication errors)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- internals --------------------------------------------------------

    def _new_key(self, path: Path, comment: str) -> None:
        argv = [self._keygen, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)]
        subprocess.run(argv, check=True, capture_output=True, timeout=30)

    def _wrapper_script(self, forced_command: Optional[str]) -> str:
        q = shlex.quote
        lines = [
            "#!/bin/sh",
            "# Generated by fleche_remote.testing.private_sshd: the login of a test key.",
            f"{_SESSION_MARKER}={q(str(self.directory))}; export {_SESSION_MARKER}",
        ]
        if self._noise:
            noise_file = self.directory / "login-noise.txt"
            noise_file.write_text(self._noise)
            lines.append(f"cat {q(str(noise_file))}")
        for name, value in sorted(self._env.items()):
            lines.append(f"{name}={q(value)}; export {name}")
        lines.append(f"cd {q(str(self.workdir))} || exit 1")
        if forced_command is not None:
            lines.append(f'exec "${{SHELL:-/bin/sh}}" -c {q(forced_command)}')
        else:
            lines.append('if [ -z "${SSH_ORIGINAL_COMMAND:-}" ]; then exec "${SHELL:-/bin/sh}" -l; fi')
            lines.append('exec "${SHELL:-/bin/sh}" -c "$SSH_ORIGINAL_COMMAND"')
        return "\n".join(lines) + "\n"

    def _options_for(self, key: Path) -> Tuple[str, ...]:
        return (
            "-F", "/dev/null",  # neither ~/.ssh/config nor /etc/ssh/ssh_config
            "-p", str(self.port),
            "-i", str(key),
            "-o", "IdentitiesOnly=yes",
            "-o", "IdentityAgent=none",
            "-o", f"UserKnownHostsFile={self.directory / 'known_hosts'}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=10",
            "-o", "ControlMaster=no",
            "-o", "ControlPath=none",
            "-o", "LogLevel=ERROR",
        )  # fmt: skip

    def _config(self, extra_config: str) -> str:
        d = self.directory
        return "\n".join(
            [
                f"Port {self.port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {d / 'host_ed25519'}",
                f"PidFile {d / 'sshd.pid'}",
                f"AuthorizedKeysFile {d / 'authorized_keys'}",
                "AuthenticationMethods publickey",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "PermitRootLogin prohibit-password",  # so that it works when tests run as root
                f"AllowUsers {_user_name()}",
                "StrictModes no",  # the temp dir's modes are not the point of these tests
                "PermitUserEnvironment no",
                "PermitUserRC no",  # ~/.ssh/rc of the real home must not run
                "PrintMotd no",
                "PrintLastLog no",
                "UseDNS no",
                "X11Forwarding no",
                "AllowAgentForwarding no",
                # many parallel connections (concurrent-writer tests) must not be dropped
                "MaxStartups 200",
                "MaxSessions 200",
                f"SetEnv HOME={self.home}",
                "LogLevel INFO",
                extra_config,
                "",
            ]
        )

    def _start(self, extra_config: str, timeout: float) -> None:
        d = self.directory
        sshd = _tool("sshd", "/usr/sbin/sshd", "/usr/local/sbin/sshd")
        if os.geteuid() == 0:
            # sshd running as root refuses to start without its privilege-
            # separation directory, which only a running system sshd creates
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self._new_key(d / "host_ed25519", "fleche-test-host")
        self.ssh_options = self.add_key()
        host_pub = (d / "host_ed25519.pub").read_text().split()
        deadline = time.monotonic() + timeout
        for _attempt in range(_PORT_ATTEMPTS):
            self.port = _free_port()
            self.ssh_options = self._options_for(d / "client1")
            (d / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
            (d / "sshd_config").write_text(self._config(extra_config))
            with open(self.log_path, "wb") as log:
                # a file, not a pipe: nobody reads sshd's stderr while it runs,
                # and a full pipe would block every session
                self._proc = subprocess.Popen(
                    [sshd, "-D", "-e", "-f", str(d / "sshd_config")],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,  # a Ctrl-C in the test run is not sshd's business
                )
            self.pid = self._proc.pid
            if self._wait_ready(deadline):
                return
            log_text = self.log()
            _stop_process(self._proc)
            if "Address already in use" not in log_text:
                break
        raise RuntimeError(
            f"private sshd did not accept `ssh ... true` within {timeout:.0f} s "
            f"(exit code {self._proc.returncode if self._proc else None}); sshd said:\n{_tail(self.log_path)}"
        )

    def _wait_ready(self, deadline: float) -> bool:
        assert self._proc is not None
        last = ""
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            if _port_open(self.port):
                try:
                    probe = subprocess.run(
                        self.ssh_command("true"),
                        stdin=subprocess.DEVNULL,
                        capture_output=True,
                        timeout=max(1.0, min(10.0, deadline - time.monotonic())),
                    )
                except subprocess.TimeoutExpired:
                    continue
                if probe.returncode == 0:
                    return True
                last = probe.stderr.decode(errors="replace")
            time.sleep(0.05)
        if last:
            with open(self.log_path, "a") as fh:
                fh.write(f"\n[ssh client] {last}")
        return False

    def _stop(self) -> None:
        if self._proc is not None:
            _stop_process(self._proc)
        # sessions outlive the listening sshd; end the ones a test left behind
        _kill_pids(_pids_with_env(_SESSION_MARKER, str(self.directory)))


@contextlib.contextmanager
def private_sshd(
    *,
    workdir: Optional[str | os.PathLike[str]] = None,
    login_shell_noise: Optional[str] = None,
    env: Optional[Mapping[str, Optional[str]]] = None,
    extra_config: str = "",
    start_timeout: float = SSHD_START_TIMEOUT,
) -> Iterator[SshServer]:
    """Run a throwaway sshd on ``127.0.0.1`` for the current user.

    It works as root and as an ordinary user, needs ``sshd``, ``ssh`` and
    ``ssh-keygen`` (Debian: ``openssh-server``, ``openssh-client``) and
    never reads or writes the user's ``~/.ssh``.

    Args:
        workdir: the directory remote commands start in (created if
            missing); default :attr:`SshServer.home`.
        login_shell_noise: text printed on stdout before every remote
            command, to stand for a chatty login shell.
        env: variables for remote sessions, on top of (and overriding) the
            defaults described in the module docstring; a ``None`` value
            removes a default (``{"PYTHONPATH": None}``).
        extra_config: more ``sshd_config`` lines, appended last.
        start_timeout: seconds to wait for ``ssh ... true`` to succeed.

    Yields:
        The running :class:`SshServer`. On exit sshd is stopped, every
        session still running under it is ended, and the temp dir goes.

    Raises:
        RuntimeError: sshd did not come up; the message has its log.
    """
    remote_env = _default_remote_env()
    for name, value in (env or {}).items():
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"env names must be shell identifiers, got {name!r}")
        if value is None:
            remote_env.pop(name, None)
        else:
            remote_env[name] = str(value)
    directory = _temp_dir("fleche-sshd-")
    try:
        home = directory / "home"
        home.mkdir()
        start_dir = Path(workdir).absolute() if workdir is not None else home
        start_dir.mkdir(parents=True, exist_ok=True)
        server = SshServer(directory, home, start_dir, login_shell_noise, remote_env)
        try:
            server._start(extra_config, start_timeout)
            yield server
        finally:
            server._stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# -- PostgreSQL ---------------------------------------------------------------


def _postgres_bindir() -> Path:
    """Where ``initdb`` and ``pg_ctl`` are: ``$FLECHE_REMOTE_PG_BINDIR``,
    ``pg_config --bindir``, the newest ``/usr/lib/postgresql/*/bin``
    (Debian keeps them off ``$PATH``), then ``$PATH``."""
    candidates: List[Path] = []
    if os.environ.get("FLECHE_REMOTE_PG_BINDIR"):
        candidates.append(Path(os.environ["FLECHE_REMOTE_PG_BINDIR"]))
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10)
            if out.returncode == 0:
                candidates.append(Path(out.stdout.strip()))
        except (OSError, subprocess.TimeoutExpired):
            pass

    def version(p: Path) -> Tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", p.parent.name)) or (0,)

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).parent)
    for bindir in candidates:
        if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
            return bindir
    raise RuntimeError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found via $FLECHE_REMOTE_PG_BINDIR, "
        "pg_config, /usr/lib/postgresql/*/bin or PATH; install them (Debian: apt-get install postgresql)"
    )


def _client_env() -> Dict[str, str]:
    # PGHOST, PGSERVICE and friends from the caller must not redirect our clients
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


class PostgresServer:
    """A running private PostgreSQL (made by :func:`private_postgres`).

    Attributes:
        url: SQLAlchemy URL of the ``postgres`` database, as the superuser
            ``postgres`` (trust authentication: no password).
        port: the loopback port it listens on.
        data_dir: the cluster's data directory; removed on exit.
    """

    user = "postgres"

    def __init__(self, bindir: Path, directory: Path, run_as: Sequence[str]) -> None:
        self.bindir = bindir
        self.directory = directory
        self.data_dir = directory / "data"
        self.log_path = directory / "postgres.log"
        self.port = 0
        self._run_as = list(run_as)
        self._started = False

    @property
    def url(self) -> str:
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        """SQLAlchemy URL (psycopg 3 driver) of ``database`` on this server."""
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def __repr__(self) -> str:
        return f"<PostgresServer 127.0.0.1:{self.port} data={self.data_dir}>"

    def new_database(self, name: Optional[str] = None) -> str:
        """Create an empty database and return its SQLAlchemy URL.

        Args:
            name: lower-case identifier; default a fresh random one, so each
                test can have a database of its own.
        """
        name = name or f"t_{uuid.uuid4().hex[:16]}"
        if not _DB_NAME.fullmatch(name):
            raise ValueError(f"database names here are lower-case identifiers, got {name!r}")
        self._run(
            [
                str(self.bindir / "createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                self.user,
                "-w",
                name,
            ],
            as_server=False,
            what=f"createdb {name}",
        )
        return self.url_for(name)

    def _run(self, argv: List[str], *, as_server: bool, what: str, timeout: float = 60.0) -> str:
        full = [*self._run_as, *argv] if as_server else argv
        try:
            out = subprocess.run(
                full,
                cwd=self.directory,  # runuser keeps the cwd, which must be readable by postgres
                env=_client_env(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(
                f"{what} did not finish within {timeout:.0f} s; log:\n{_tail(self.log_path)}"
            ) from exc
        if out.returncode != 0:
            raise RuntimeError(
                f"{what} failed with exit code {out.returncode}:\n{out.stdout}{out.stderr}"
                f"\n--- postgres log ---\n{_tail(self.log_path)}"
            )
        return out.stdout

    def _start(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pg = self.bindir
        self._run(
            [str(pg / "initdb"), "-D", str(self.data_dir), "-U", self.user, "-E", "UTF8", "--locale=C",
             "--auth=trust", "--no-sync"],
            as_server=True,
            what="initdb",
            timeout=timeout,
        )  # fmt: skip
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write(
                "\n# fleche_remote.testing: a throwaway cluster on loopback\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.directory}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                # many concurrent writers, each with a small pool
                "max_connections = 300\n"
            )
        for _attempt in range(_PORT_ATTEMPTS):
            self.port = _free_port()
            remaining = max(5, int(deadline - time.monotonic()))
            try:
                self._run(
                    [str(pg / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_path), "-w",
                     "-t", str(remaining), "-o", f"-p {self.port}", "start"],
                    as_server=True,
                    what="pg_ctl start",
                    timeout=remaining + 10,
                )  # fmt: skip
            except RuntimeError:
                if "already in use" in _tail(self.log_path, 10):
                    continue
                raise
            self._started = True
            return
        raise RuntimeError(
            f"no free port for PostgreSQL after {_PORT_ATTEMPTS} tries:\n{_tail(self.log_path)}"
        )

    def _stop(self) -> None:
        if not (self.data_dir / "postmaster.pid").exists():
            return
        try:
            self._run(
                [str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "stop", "-m", "fast", "-w",
                 "-t", str(int(STOP_TIMEOUT))],
                as_server=True,
                what="pg_ctl stop",
                timeout=STOP_TIMEOUT + 10,
            )  # fmt: skip
        except RuntimeError:
            # the postmaster did not stop in time: quit it the hard way
            try:
                pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                return
            _kill_pids([pid])


@contextlib.contextmanager
def private_postgres(
    *, bindir: Optional[str | os.PathLike[str]] = None, start_timeout: float = POSTGRES_START_TIMEOUT
) -> Iterator[PostgresServer]:
    """Run a throwaway PostgreSQL cluster on ``127.0.0.1``.

    PostgreSQL refuses to run as root, so as root its programs run as the
    ``postgres`` system user (``runuser -u postgres --``, which the Debian
    package creates) in a temp dir handed to that user. Durability is off
    (``fsync``, ``synchronous_commit``): the cluster lives for one test run.

    Args:
        bindir: where ``initdb`` / ``pg_ctl`` live; default found as
            :func:`_postgres_bindir` says.
        start_timeout: seconds for initdb plus start-up together.

    Yields:
        The running :class:`PostgresServer`; stopped (``pg_ctl stop -m
        fast``) and deleted on exit.

    Raises:
        RuntimeError: a binary is missing, or the cluster did not start;
            the message has the server's log.
    """
    bin_path = Path(bindir) if bindir is not None else _postgres_bindir()
    run_as: List[str] = []
    owner: Optional[Tuple[int, int]] = None
    if os.geteuid() == 0:
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError(
                "running as root, and PostgreSQL refuses to: it needs a 'postgres' system user "
                "to run as (the Debian postgresql package creates it)"
            ) from None
        run_as = [_tool("runuser", "/usr/sbin/runuser", "/sbin/runuser"), "-u", "postgres", "--"]
        owner = (pw.pw_uid, pw.pw_gid)
    directory = _temp_dir("fleche-pg-", for_other_user=owner is not None)
    try:
        if owner is not None:
            os.chown(directory, *owner)
        server = PostgresServer(bin_path, directory, run_as)
        try:
            server._start(start_timeout)
            yield server
        finally:
            server._stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# -- pytest fixtures ----------------------------------------------------------

if pytest is not None:

    @pytest.fixture(scope="session")
    def sshd_server() -> Iterator[SshServer]:
        """A :func:`private_sshd` shared by the whole test session."""
        with private_sshd() as server:
            yield server

    @pytest.fixture(scope="session")
    def postgres_server() -> Iterator[PostgresServer]:
        """A :func:`private_postgres` shared by the whole test session; use
        ``postgres_server.new_database()`` for a database per test."""
        with private_postgres() as server:
            yield server

    __all__ += ["postgres_server", "sshd_server"]
