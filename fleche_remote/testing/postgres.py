"""A private PostgreSQL on loopback, for the SQL backend's tests.

:func:`private_postgres` runs ``initdb`` into a temp dir and starts a
postmaster on a free loopback port with trust authentication and
durability off; it is stopped and deleted when the context exits.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from ._util import PORT_ATTEMPTS, STOP_TIMEOUT, free_port, kill_pids, new_temp_dir, tail, tool

#: How long :func:`private_postgres` waits for initdb plus the first start.
#: initdb with ``--no-sync`` takes 1-3 s on a laptop; 2 cores under load, more.
POSTGRES_START_TIMEOUT = 90.0

_DB_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")

__all__ = ["POSTGRES_START_TIMEOUT", "PostgresServer", "private_postgres"]


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
                f"{what} did not finish within {timeout:.0f} s; log:\n{tail(self.log_path)}"
            ) from exc
        if out.returncode != 0:
            raise RuntimeError(
                f"{what} failed with exit code {out.returncode}:\n{out.stdout}{out.stderr}"
                f"\n--- postgres log ---\n{tail(self.log_path)}"
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
        for _attempt in range(PORT_ATTEMPTS):
            self.port = free_port()
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
                if "already in use" in tail(self.log_path, 10):
                    continue
                raise
            self._started = True
            return
        raise RuntimeError(f"no free port for PostgreSQL after {PORT_ATTEMPTS} tries:\n{tail(self.log_path)}")

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
            kill_pids([pid])


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
        run_as = [tool("runuser", "/usr/sbin/runuser", "/sbin/runuser"), "-u", "postgres", "--"]
        owner = (pw.pw_uid, pw.pw_gid)
    directory = new_temp_dir("fleche-pg-", for_other_user=owner is not None)
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
