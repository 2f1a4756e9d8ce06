"""Every cache the conformance suite runs against, by name.

A *factory* takes the test's ``tmp_path`` and pytest ``request`` and
returns a :class:`CacheUnderTest`. It may ask for fixtures it needs with
``request.getfixturevalue`` (``postgres_url``, ``sshd``, ...), which
is how a factory for a remote cache gets a real sshd without the suite
knowing about ssh at all.

A new cache type is done when it passes the suite; adding it is one
function here::

    @register("hdf5")
    def _hdf5(tmp_path: Path, request: pytest.FixtureRequest) -> CacheUnderTest:
        path = tmp_path / "cache.h5"
        return CacheUnderTest(Cache(Hdf5ValueStore(path), Hdf5CallStore(path)))

``tags`` opt a factory into extra, type-specific tests: ``"stack"`` for a
:class:`~fleche_remote.CacheStack` whose first two layers are writable
(the back-fill tests write into ``layers[1]`` directly); ``"ssh"`` for one
that goes through the real sshd, whose value round trips run over
``SSH_VALUE_CASES`` (in test_conformance.py) only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Optional, Sequence

import pytest

from fleche_remote import BaseCache, Cache, CacheStack
from fleche_remote.storage.file import FileCallStore, FileValueStore
from fleche_remote.storage.memory import MemoryCallStore, MemoryValueStore


class CacheUnderTest:
    """What a factory hands the suite.

    Attributes:
        cache: the cache whose behaviour is checked.
        writer: a writable cache over the same storage, used to put entries
            in place; the cache itself unless that one is read-only.
        expect_read_only: what ``cache.read_only`` must say.
        cleanups: run (last first) by :meth:`close`, after both caches are
            closed; for servers or connections a factory started.
        owned: whether :meth:`close` closes the caches; False for a
            connection shared with other tests (see :class:`SharedRemotes`).
    """

    def __init__(
        self,
        cache: BaseCache,
        writer: Optional[BaseCache] = None,
        *,
        expect_read_only: bool = False,
        cleanups: Iterable[Callable[[], None]] = (),
        owned: bool = True,
    ) -> None:
        self.cache = cache
        self.writer: BaseCache = writer if writer is not None else cache
        self.expect_read_only = expect_read_only
        self.cleanups: List[Callable[[], None]] = list(cleanups)
        self.owned = owned

    def close(self) -> None:
        if self.owned:
            self.cache.close()
            if self.writer is not self.cache:
                self.writer.close()
        for cleanup in reversed(self.cleanups):
            cleanup()


Factory = Callable[[Path, pytest.FixtureRequest], CacheUnderTest]


@dataclass(frozen=True)
class Entry:
    name: str
    make: Factory
    marks: Sequence[Any] = ()
    tags: FrozenSet[str] = frozenset()


#: name -> factory, in registration order (which is the order of test ids).
FACTORIES: Dict[str, Entry] = {}


def register(
    name: str, *, marks: Sequence[Any] = (), tags: Iterable[str] = ()
) -> Callable[[Factory], Factory]:
    """Add a factory under ``name`` (a test id, so keep it short)."""

    def add(make: Factory) -> Factory:
        if name in FACTORIES:
            raise ValueError(f"a conformance factory named {name!r} is already registered")
        FACTORIES[name] = Entry(name, make, tuple(marks), frozenset(tags))
        return make

    return add


def params(tag: Optional[str] = None) -> List[Any]:
    """``pytest.param`` s for the registered factories (only those tagged ``tag``)."""
    return [
        pytest.param(e.name, marks=list(e.marks), id=e.name)
        for e in FACTORIES.values()
        if tag is None or tag in e.tags
    ]


def params_with(cases: Sequence[str], ssh_cases: Sequence[str]) -> List[Any]:
    """``pytest.param`` s of (factory, case) for every factory: all ``cases``,
    or ``ssh_cases`` only for a factory tagged ``"ssh"`` (its in-process
    twin runs all of them)."""
    return [
        pytest.param(e.name, case, marks=list(e.marks), id=f"{e.name}-{case}")
        for e in FACTORIES.values()
        for case in (ssh_cases if "ssh" in e.tags else cases)
    ]


def file_cache(root: Path, *, compress: bool = False, read_only: bool = False) -> Cache:
    """A pickle-file cache: values and calls in sibling directories."""
    return Cache(
        FileValueStore(root / "values", compress=compress),
        FileCallStore(root / "calls", compress=compress),
        read_only=read_only,
    )


# -- local caches -----------------------------------------------------------


@register("memory")
def _memory(tmp_path: Path, request: pytest.FixtureRequest) -> CacheUnderTest:
    return CacheUnderTest(Cache(MemoryValueStore(), MemoryCallStore()))


@register("file")
def _file(tmp_path: Path, request: pytest.FixtureRequest) -> CacheUnderTest:
    return CacheUnderTest(file_cache(tmp_path / "cache"))


@register("file-compressed")
def _file_compressed(tmp_path: Path, request: pytest.FixtureRequest) -> CacheUnderTest:
    return CacheUnderTest(file_cache(tmp_path / "cache", compress=True))


@register("file+sqlite")
def _file_sqlite(tmp_path: Path, request: pytest.FixtureRequest) -> CacheUnderTest:
    from fleche_remote.storage.sql.stores import SqlCallStore

    calls = SqlCallStore(f"sqlite:///{tmp_path / 'calls.sqlite'}")
    return CacheUnderTest(Cache(FileValueStore(tmp_path / "values"), calls))


@register("file+postgres")
def _file_postgres(tmp_path: Path, request: pytest.FixtureRequest) -> CacheUnderTest:
    from fleche_remote.storage.sql.stores import SqlCallStore

    calls = SqlCallStore(_shared(request).emptied_database("file+postgres"))
    return CacheUnderTest(Cache(FileValueStore(tmp_path / "values"), calls))


@register("hdf5")
def _hdf5(tmp_path: Path, request: pytest.FixtureRequest) -> CacheUnderTest:
    from fleche_remote.storage.hdf5 import Hdf5CallStore, Hdf5ValueStore

    # values and calls in one file, as the HDF5 backend allows
    path = tmp_path / "cache.h5"
    return CacheUnderTest(Cache(Hdf5ValueStore(path), Hdf5CallStore(path)))


@register("read-only")
def _read_only(tmp_path: Path, request: pytest.FixtureRequest) -> CacheUnderTest:
    return CacheUnderTest(
        file_cache(tmp_path / "cache", read_only=True),
        writer=file_cache(tmp_path / "cache"),
        expect_read_only=True,
    )


#: Keys of the signed variants (hex, as in fleche.toml).
SIGNING_KEY = "5e" * 32
OTHER_SIGNING_KEY = "a7" * 32


@register("signed")
def _signed(tmp_path: Path, request: pytest.FixtureRequest) -> CacheUnderTest:
    from fleche_remote.storage.sql.stores import SqlCallStore

    # small values inline in SQLite, big ones in files: both signed
    calls = SqlCallStore(f"sqlite:///{tmp_path / 'calls.sqlite'}")
    return CacheUnderTest(Cache(FileValueStore(tmp_path / "values"), calls, secret_key=SIGNING_KEY))


@register("signed-stack", tags=["stack"])
def _signed_stack(tmp_path: Path, request: pytest.FixtureRequest) -> CacheUnderTest:
    # each layer its own key: a back-fill is checked with one and signed with the other
    top = Cache(MemoryValueStore(), MemoryCallStore(), secret_key=SIGNING_KEY)
    lower = Cache(
        FileValueStore(tmp_path / "cache" / "values"),
        FileCallStore(tmp_path / "cache" / "calls"),
        secret_key=OTHER_SIGNING_KEY,
    )
    return CacheUnderTest(CacheStack([top, lower]))


@register("stack", tags=["stack"])
def _stack(tmp_path: Path, request: pytest.FixtureRequest) -> CacheUnderTest:
    return CacheUnderTest(
        CacheStack([Cache(MemoryValueStore(), MemoryCallStore()), file_cache(tmp_path / "cache")])
    )


# -- the same caches behind SshCache ------------------------------------------
#
# Each remote backend is served two ways, from the same fleche.toml table:
#
# * ``inproc-*``: the server loop runs on a thread of this process, over OS
#   pipes (``SshCache.in_process``), on a fresh store per test. Same client,
#   protocol, server and storage code as over ssh, at a fraction of the cost,
#   so every conformance case runs here.
# * ``ssh-*``: the real ``ssh`` to the session's private sshd, running
#   ``python -m fleche_remote serve`` in a directory of its own. Logging in
#   costs about a second, so one connection per backend serves the whole
#   module (see :class:`SharedRemotes`); it is emptied, and checked empty,
#   before each test. Every test runs here too, the value round trips over
#   a representative subset (``SSH_VALUE_CASES`` in test_conformance.py).

#: The remote's ``[main]`` table for each backend ({url}: a PostgreSQL URL).
REMOTE_TABLES: Dict[str, str] = {
    "file": 'template = "cloudpickle"\nroot = "store"',
    "sqlite": 'values = {type = "cloudpickle", root = "values"}\ncalls = {type = "sql", url = "sqlite:///calls.db"}',
    "postgres": 'values = {type = "cloudpickle", root = "values"}\ncalls = {type = "sql", url = "{url}"}',
    "hdf5": 'values = {type = "hdf5", path = "cache.h5"}\ncalls = {type = "hdf5", path = "cache.h5"}',
    "read-only": 'template = "cloudpickle"\nroot = "store"\nread_only = true',
}


def remote_dir(root: Path, backend: str, postgres_url: str = "") -> Path:
    """``root/remote`` with a fleche.toml whose ``[main]`` is ``backend``'s
    table: the directory a remote server is started in."""
    remote = root / "remote"
    remote.mkdir(parents=True)
    table = REMOTE_TABLES[backend].replace("{url}", postgres_url)
    (remote / "fleche.toml").write_text(f'[default]\ncache = "main"\nroot = true\n\n[main]\n{table}\n')
    return remote


def _served_in_process(remote: Path, **kwargs: Any) -> CacheUnderTest:
    """An SshCache talking to a server thread that serves ``remote``'s
    fleche.toml, built as ``fleche-remote serve`` builds it there."""
    from fleche_remote import SshCache
    from fleche_remote.config import load_cache, load_config

    served = load_cache(None, config=load_config(remote / "fleche.toml"))
    return CacheUnderTest(SshCache.in_process(served, timeout=60, **kwargs), cleanups=[served.close])


def _over_ssh(remote: Path, sshd: Any, **kwargs: Any) -> Any:
    """An SshCache whose server runs in ``remote`` through the session's sshd."""
    import sys

    from fleche_remote import SshCache

    return SshCache(
        sshd.host,
        python=sys.executable,
        ssh_options=sshd.ssh_options,
        workdir=str(remote),
        timeout=60,
        connect_timeout=60,
        **kwargs,
    )


class SharedRemotes:
    """The module's ssh connections, one per backend, opened on first use,
    and its PostgreSQL databases (:meth:`emptied_database`).

    A test gets the connection emptied: every entry is evicted and the
    garbage collected (through the writer, which for a read-only remote is
    its store opened on disk, whose values all go), and the remote is asked
    to list what it holds, which must be nothing. So no test sees another's
    entries, without a login per test. (Through ssh, values younger than
    the collector's grace period stay, unreferenced, as after any eviction;
    no test can reach them through the API.)
    """

    def __init__(self, base: Path, request: pytest.FixtureRequest) -> None:
        self._base = base
        self._request = request
        self._open: Dict[str, Any] = {}
        self._databases: Dict[str, Any] = {}

    def get(self, name: str, open_remote: Callable[[Path], Any]) -> Any:
        """The connection named ``name``, emptied; ``open_remote(directory)``
        makes it (returning ``(cache, writer)``) the first time."""
        if name not in self._open:
            directory = self._base / name
            directory.mkdir()
            self._open[name] = open_remote(directory)
        cache, writer = self._open[name]
        for entry in list(writer.query()):
            writer.evict(entry.key)
        if isinstance(writer, Cache):  # the store itself, on disk: empty it altogether
            writer.values.collect_temporaries()
            for digest in list(writer.values.digests()):
                writer.values.delete(digest)
        writer.collect_garbage()  # what a test collects is then its own garbage
        left = [e.key[:12] for e in cache.query()]
        assert not left, f"{name}: entries of an earlier test are still there after evicting all: {left}"
        return cache, writer

    def emptied_database(self, name: str) -> str:
        """URL of the module's PostgreSQL database ``name``, every table in
        it emptied (TRUNCATE): as empty as a new one, for a fraction of the
        cost (a database is hundreds of files to create, and to delete)."""
        import sqlalchemy

        if name not in self._databases:
            url = self.postgres_url()
            self._databases[name] = (url, sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool))
            return url
        url, engine = self._databases[name]
        with engine.begin() as conn:
            # a connection a test left open in a transaction fails this, not hangs it
            conn.exec_driver_sql("SET LOCAL lock_timeout = '30s'")
            tables = [row[0] for row in conn.exec_driver_sql(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]  # fmt: skip
            if tables:
                conn.exec_driver_sql("TRUNCATE " + ", ".join(f'"{t}"' for t in tables))
        return str(url)

    def sshd(self) -> Any:
        return self._request.getfixturevalue("sshd")

    def postgres_url(self) -> str:
        return str(self._request.getfixturevalue("postgres_server").new_database())

    def close(self) -> None:
        for cache, writer in self._open.values():
            cache.close()
            if writer is not cache:
                writer.close()
        self._open.clear()
        for _, engine in self._databases.values():
            engine.dispose()
        self._databases.clear()


def _shared(request: pytest.FixtureRequest) -> SharedRemotes:
    shared = request.getfixturevalue("shared_remotes")
    assert isinstance(shared, SharedRemotes)
    return shared


def _ssh_backend(name: str, backend: str, **kwargs: Any) -> Callable[[Path, pytest.FixtureRequest], Any]:
    """A maker of the shared ``(SshCache, writer)`` of ``backend``."""

    def make(tmp_path: Path, request: pytest.FixtureRequest) -> Any:
        shared = _shared(request)

        def open_remote(directory: Path) -> Any:
            url = shared.postgres_url() if backend == "postgres" else ""
            remote = remote_dir(directory, backend, url)
            cache = _over_ssh(remote, shared.sshd(), **kwargs)
            # the server's template puts values and calls under store/, as file_cache does
            writer = file_cache(remote / "store") if backend == "read-only" else cache
            return cache, writer

        return shared.get(name, open_remote)

    return make


def _in_process(backend: str, **kwargs: Any) -> Factory:
    def make(tmp_path: Path, request: pytest.FixtureRequest) -> CacheUnderTest:
        url = _shared(request).emptied_database("inproc-postgres") if backend == "postgres" else ""
        remote = remote_dir(tmp_path, backend, url)
        subject = _served_in_process(remote, **kwargs)
        if backend == "read-only":
            subject.writer = file_cache(remote / "store")
            subject.expect_read_only = True
        return subject

    return make


def _ssh(name: str, backend: str, **kwargs: Any) -> Factory:
    shared = _ssh_backend(name, backend, **kwargs)

    def make(tmp_path: Path, request: pytest.FixtureRequest) -> CacheUnderTest:
        cache, writer = shared(tmp_path, request)
        return CacheUnderTest(cache, writer, expect_read_only=backend == "read-only", owned=False)

    return make


#: name -> (backend, SshCache keyword arguments); signed: on the client, the
#: server stores the signed bytes without the key.
_REMOTES: Dict[str, Any] = {
    "file": ("file", {}),
    "sqlite": ("sqlite", {}),
    "postgres": ("postgres", {}),
    "hdf5": ("hdf5", {}),
    "signed": ("file", {"secret_key": SIGNING_KEY}),
    "read-only": ("read-only", {}),
}

for _name, (_backend, _kwargs) in _REMOTES.items():
    register(f"inproc-{_name}", tags=["remote"])(_in_process(_backend, **_kwargs))
for _name, (_backend, _kwargs) in _REMOTES.items():
    register(f"ssh-{_name}", tags=["remote", "ssh"])(_ssh(f"ssh-{_name}", _backend, **_kwargs))


@register("inproc-stack", tags=["stack", "remote"])
def _inproc_stack(tmp_path: Path, request: pytest.FixtureRequest) -> CacheUnderTest:
    remote = _served_in_process(remote_dir(tmp_path, "file"))
    top = Cache(MemoryValueStore(), MemoryCallStore())
    return CacheUnderTest(CacheStack([top, remote.cache]), cleanups=remote.cleanups)


_ssh_stack_remote = _ssh_backend("ssh-stack", "file")


@register("ssh-stack", tags=["stack", "remote", "ssh"])
def _ssh_stack(tmp_path: Path, request: pytest.FixtureRequest) -> CacheUnderTest:
    # a fresh top layer per test, over the shared connection
    remote, _ = _ssh_stack_remote(tmp_path, request)
    return CacheUnderTest(CacheStack([Cache(MemoryValueStore(), MemoryCallStore()), remote]), owned=False)
