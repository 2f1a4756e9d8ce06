"""Private servers for tests: an ``sshd`` and a PostgreSQL, on loopback only,
and a slow link to put between ssh and that sshd.

fleche-remote promises that every remote feature works through real
``ssh`` to a real ``sshd``, and that the SQL backend works on a real
PostgreSQL. These helpers start both as throwaway processes owned by the
test run, so that anyone (us, CI, a user checking their own set-up) can
prove it without touching the machine's own servers, keys or config:

* :func:`private_sshd` (module :mod:`.sshd`) starts ``/usr/sbin/sshd`` on
  ``127.0.0.1`` with a fresh host key and a fresh client key in a temp
  dir, and hands back the ``ssh`` options that reach it and nothing else
  (the user's ``~/.ssh/config``, agent and known_hosts are all ignored).
* :meth:`SshServer.slow_ssh_options` reaches the same sshd through
  :mod:`.slowlink`, a relay run as ssh's ``ProxyCommand`` that adds a
  delay each way (and optionally a bandwidth cap), so that tests and
  benchmarks pay the round trips of a cluster tens of milliseconds away::

      options = server.slow_ssh_options(delay_ms=10)    # a 20 ms round trip
      cache = SshCache(server.host, ssh_options=options)

* :func:`private_postgres` (module :mod:`.postgres`) runs ``initdb`` into
  a temp dir and starts a postmaster on a free loopback port with trust
  authentication.
* :func:`wait_until` (module :mod:`.waiting`) polls a condition until it
  holds, failing the test with a clear message after a generous deadline.

Both servers come from context managers that stop them and delete their
files on exit, and every wait in them is bounded. The pytest fixtures
:func:`sshd_server` and :func:`postgres_server` (session scope) wrap them;
import them into a ``conftest.py``::

    from fleche_remote.testing import postgres_server, sshd_server  # noqa: F401

Only the fixtures need pytest; ``import fleche_remote.testing`` works
without it. Nothing else in the package imports this one.
"""

from __future__ import annotations

from typing import Iterator

from .postgres import PostgresServer, private_postgres
from .sshd import SshServer, private_sshd
from .waiting import wait_until

try:
    import pytest
except ImportError:  # the fixtures need pytest; the context managers don't
    pytest = None  # type: ignore[assignment]

__all__ = ["PostgresServer", "SshServer", "private_postgres", "private_sshd", "wait_until"]

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
