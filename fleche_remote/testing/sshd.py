"""A private ``sshd`` on loopback, for tests and benchmarks.

:func:`private_sshd` starts ``/usr/sbin/sshd`` on ``127.0.0.1`` with a
fresh host key and a fresh client key in a temp dir, and hands back the
``ssh`` options that reach it and nothing else (the user's
``~/.ssh/config``, agent and known_hosts are all ignored).
:meth:`SshServer.slow_ssh_options` puts a delaying relay
(:mod:`fleche_remote.testing.slowlink`) between ``ssh`` and that sshd, so
that the round trips a user on a distant cluster pays can be measured and
tested on one machine.

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
import site
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from ._util import (
    PORT_ATTEMPTS,
    free_port,
    kill_pids,
    new_temp_dir,
    pids_with_env,
    port_open,
    stop_process,
    tail,
    tool,
    user_name,
)

#: How long :func:`private_sshd` waits for ``ssh ... true`` to succeed. sshd
#: itself is up in ~50 ms; the margin is for a loaded CI machine.
SSHD_START_TIMEOUT = 15.0

#: Set in the environment of every remote session, so that the sessions a
#: test left running can be found and ended when the server stops.
_SESSION_MARKER = "FLECHE_TEST_SSHD"

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

__all__ = ["SSHD_START_TIMEOUT", "SshServer", "private_sshd"]


def _default_remote_env() -> Dict[str, str]:
    env = {
        "PATH": os.pathsep.join([os.path.dirname(sys.executable), "/usr/local/bin", "/usr/bin", "/bin"]),
        "LANG": "C.UTF-8",
    }
    # fleche_remote/testing/sshd.py -> the directory that holds fleche_remote/
    checkout = Path(__file__).resolve().parent.parent.parent
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
        self.host = f"{user_name()}@127.0.0.1"
        self.port = 0
        self.pid = 0
        self.ssh_executable = tool("ssh", "/usr/bin/ssh")
        self.log_path = directory / "sshd.log"
        self._keygen = tool("ssh-keygen", "/usr/bin/ssh-keygen")
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

    def slow_ssh_options(
        self,
        delay_ms: float = 10.0,
        rate_mbps: Optional[float] = None,
        *,
        options: Optional[Sequence[str]] = None,
    ) -> Tuple[str, ...]:
        """``ssh`` options that reach this server through a slow link.

        The link is :mod:`fleche_remote.testing.slowlink` run as ssh's
        ``ProxyCommand``: every byte arrives ``delay_ms`` after it was sent,
        each way, and pipelined bytes are not held up behind each other.
        Each ssh process gets a relay of its own, which ends with it.

        Args:
            delay_ms: added one-way delay; ``10`` makes a 20 ms round trip,
                a cluster in the same country. ``0`` still goes through
                the relay (to measure the relay itself).
            rate_mbps: cap on each direction, in megabits (10^6 bits) per
                second; None for none.
            options: the options to slow down (default :attr:`ssh_options`;
                pass what :meth:`add_key` returned for another key).

        Returns:
            ``options`` plus ``-o ProxyCommand=...``; use them wherever
            :attr:`ssh_options` go (``SshCache(ssh_options=...)``, an ``ssh``
            argv before the host).
        """
        from . import slowlink

        base = tuple(self.ssh_options if options is None else options)
        if any(o.lower().startswith("proxycommand=") for o in base):
            # ssh keeps the first value it is given, so ours would be ignored
            raise ValueError("options already set a ProxyCommand")
        argv = slowlink.command("127.0.0.1", self.port, delay_ms, rate_mbps)
        # ssh runs the command with `$SHELL -c`, after expanding %-tokens
        proxy = " ".join(shlex.quote(a) for a in argv).replace("%", "%%")
        return (*base, "-o", f"ProxyCommand={proxy}")

    def slow_ssh_command(
        self, *remote_args: str, delay_ms: float = 10.0, rate_mbps: Optional[float] = None
    ) -> List[str]:
        """Like :meth:`ssh_command`, through :meth:`slow_ssh_options`."""
        return [self.ssh_executable, *self.slow_ssh_options(delay_ms, rate_mbps), self.host, *remote_args]

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
            # sshd sets SSH_ORIGINAL_COMMAND only for a forced command; this
            # key stands for an unrestricted one, so its command must not see it
            lines.append("fleche_command=$SSH_ORIGINAL_COMMAND; unset SSH_ORIGINAL_COMMAND")
            lines.append('exec "${SHELL:-/bin/sh}" -c "$fleche_command"')
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
                f"AllowUsers {user_name()}",
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
        sshd = tool("sshd", "/usr/sbin/sshd", "/usr/local/sbin/sshd")
        if os.geteuid() == 0:
            # sshd running as root refuses to start without its privilege-
            # separation directory, which only a running system sshd creates
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self._new_key(d / "host_ed25519", "fleche-test-host")
        self.ssh_options = self.add_key()
        host_pub = (d / "host_ed25519.pub").read_text().split()
        deadline = time.monotonic() + timeout
        for _attempt in range(PORT_ATTEMPTS):
            self.port = free_port()
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
            stop_process(self._proc)
            if "Address already in use" not in log_text:
                break
        raise RuntimeError(
            f"private sshd did not accept `ssh ... true` within {timeout:.0f} s "
            f"(exit code {self._proc.returncode if self._proc else None}); sshd said:\n{tail(self.log_path)}"
        )

    def _wait_ready(self, deadline: float) -> bool:
        assert self._proc is not None
        last = ""
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            if port_open(self.port):
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
            stop_process(self._proc)
        # sessions outlive the listening sshd; end the ones a test left behind
        kill_pids(pids_with_env(_SESSION_MARKER, str(self.directory)))


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
    directory = new_temp_dir("fleche-sshd-")
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
