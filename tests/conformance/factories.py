"""Every cache the conformance suite runs against, by name.

A *factory* takes the test's ``tmp_path`` and pytest ``request`` and
returns a :class:`CacheUnderTest`. It may ask for fixtures it needs with
``request.getfixturevalue`` (``postgres_url``, ``sshd``, ...), which
is how a factory for a remote cache gets a real sshd without the suite
knowing about ssh at all.

A new cache type is done when it passes the suite; adding it is one
function here::

    @register("ssh-file", marks=[pytest.mark.slow])
    def _ssh_file(tmp_path: Path, request: pytest.FixtureRequest) -> CacheUnderTest:
        sshd = request.getfixturevalue("sshd")
        cache = SshCache(sshd.host, ssh_options=sshd.ssh_options, ...)
        return CacheUnderTest(cache)

``tags`` opt a factory into extra, type-specific tests: ``"stack"`` for a
:class:`~fleche_remote.CacheStack` whose first two layers are writable
(the back-fill tests write into ``layers[1]`` directly).
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
    """

    def __init__(
        self,
        cache: BaseCache,
        writer: Optional[BaseCache] = None,
        *,
        expect_read_only: bool = False,
        cleanups: Iterable[Callable[[], None]] = (),
    ) -> None:
        self.cache = cache
        self.writer: BaseCache = writer if writer is not None else cache
        self.expect_read_only = expect_read_only
        self.cleanups: List[Callable[[], None]] = list(cleanups)

    def close(self) -> None:
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

    calls = SqlCallStore(request.getfixturevalue("postgres_url"))
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


# -- the same caches behind SshCache, through the real ssh and sshd -----------


def _remote(tmp_path: Path, request: pytest.FixtureRequest, cache_table: str, **kwargs: Any) -> Any:
    """An SshCache whose server runs ``[main]`` = ``cache_table`` from its own
    fleche.toml, in a directory of this test, through the session's sshd."""
    import sys

    from fleche_remote import SshCache

    sshd = request.getfixturevalue("sshd")
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "fleche.toml").write_text(f'[default]\ncache = "main"\nroot = true\n\n[main]\n{cache_table}\n')
    return SshCache(
        sshd.host,
        python=sys.executable,
        ssh_options=sshd.ssh_options,
        workdir=str(remote),
        timeout=60,
        connect_timeout=60,
        **kwargs,
    )


@register("ssh-file")
def _ssh_file(tmp_path: Path, request: pytest.FixtureRequest) -> CacheUnderTest:
    return CacheUnderTest(_remote(tmp_path, request, 'template = "cloudpickle"\nroot = "store"'))


@register("ssh-sqlite")
def _ssh_sqlite(tmp_path: Path, request: pytest.FixtureRequest) -> CacheUnderTest:
    table = (
        'values = {type = "cloudpickle", root = "values"}\ncalls = {type = "sql", url = "sqlite:///calls.db"}'
    )
    return CacheUnderTest(_remote(tmp_path, request, table))


@register("ssh-postgres")
def _ssh_postgres(tmp_path: Path, request: pytest.FixtureRequest) -> CacheUnderTest:
    url = request.getfixturevalue("postgres_url")
    table = f'values = {{type = "cloudpickle", root = "values"}}\ncalls = {{type = "sql", url = "{url}"}}'
    return CacheUnderTest(_remote(tmp_path, request, table))


@register("ssh-hdf5")
def _ssh_hdf5(tmp_path: Path, request: pytest.FixtureRequest) -> CacheUnderTest:
    table = 'values = {type = "hdf5", path = "cache.h5"}\ncalls = {type = "hdf5", path = "cache.h5"}'
    return CacheUnderTest(_remote(tmp_path, request, table))


@register("ssh-signed")
def _ssh_signed(tmp_path: Path, request: pytest.FixtureRequest) -> CacheUnderTest:
    # signed on the client; the server stores the signed bytes without the key
    table = 'template = "cloudpickle"\nroot = "store"'
    return CacheUnderTest(_remote(tmp_path, request, table, secret_key=SIGNING_KEY))


@register("ssh-read-only")
def _ssh_read_only(tmp_path: Path, request: pytest.FixtureRequest) -> CacheUnderTest:
    cache = _remote(tmp_path, request, 'template = "cloudpickle"\nroot = "store"\nread_only = true')
    # the server's template puts values and calls under store/, as file_cache does
    return CacheUnderTest(cache, writer=file_cache(tmp_path / "remote" / "store"), expect_read_only=True)


@register("ssh-stack", tags=["stack"])
def _ssh_stack(tmp_path: Path, request: pytest.FixtureRequest) -> CacheUnderTest:
    remote = _remote(tmp_path, request, 'template = "cloudpickle"\nroot = "store"')
    return CacheUnderTest(CacheStack([Cache(MemoryValueStore(), MemoryCallStore()), remote]))
