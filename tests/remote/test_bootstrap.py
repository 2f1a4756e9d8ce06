"""Zero-install remotes, through the real sshd: a Python 3.9 with nothing
but its standard library serves a file cache with code the client sends
once; the next start finds it cached by hash.

Every connection here sets ``XDG_CACHE_HOME`` to a directory of the test,
so "first start" really is one, and ``unset PYTHONPATH`` so the remote
cannot import this checkout behind the test's back.
"""

from __future__ import annotations

import os
import stat
import sys
import threading
from pathlib import Path
from typing import Any, List

import numpy as np
import pytest

from fleche_remote import Call, RemoteConnectionError, RemoteError
from fleche_remote.config import load_cache, load_config
from fleche_remote.remote.bootstrap import REPLAY_MAX, code_bundle
from fleche_remote.remote.client import SshCache

from .bare import bare_python
from .helpers import remote_dir, ssh_cache


@pytest.fixture(scope="module")
def bare39() -> str:
    return bare_python()


def _bare_cache(sshd: Any, workdir: Path, xdg: Path, python: str, *setup: str, **kwargs: Any) -> SshCache:
    steps = ["unset PYTHONPATH", f"export XDG_CACHE_HOME={xdg}", *setup]
    return ssh_cache(sshd, workdir, python=python, setup_commands=steps, **kwargs)


def _code_dir(xdg: Path) -> Path:
    return xdg / "fleche-remote" / "code" / code_bundle().sha256


def test_file_cache_on_a_bare_python_and_the_code_is_sent_once(sshd, tmp_path, bare39):
    workdir, xdg = remote_dir(tmp_path), tmp_path / "xdg"
    first = _bare_cache(sshd, workdir, xdg, bare39, "umask 027")
    try:
        array = np.arange(12.0).reshape(3, 4)
        k1 = first.save(Call("sim.run", {"n": 3}, {"answer": 42, "tags": ["a", "b"]}))
        k2 = first.save(Call("sim.grid", {"n": 4}, array))
        assert first.load_value(k1) == {"answer": 42, "tags": ["a", "b"]}
        np.testing.assert_array_equal(first.load_value(k2), array)
        assert first.bootstrap_status == "sent"
        assert first._conn.transport.code_bytes_sent == len(code_bundle().payload())
        info = first.info()
        assert info["python"] == bare39
        assert info["versions"]["python"].startswith("3.9.")
        assert info["versions"]["cloudpickle"] is None  # never imported on the server
        assert any((workdir / "store" / "calls").rglob("*"))  # stored where its fleche.toml says
    finally:
        first.close()

    code = _code_dir(xdg)
    assert (code / "fleche_remote" / "remote" / "server.py").is_file()
    assert (code / "tomli" / "__init__.py").is_file()  # Python 3.9 has no tomllib
    # writable by its owner alone, whatever the remote's umask (027 here)
    assert stat.S_IMODE(code.stat().st_mode) == 0o700
    assert stat.S_IMODE((code / "fleche_remote" / "__init__.py").stat().st_mode) == 0o600
    assert not [p for p in code.parent.iterdir() if p.name.startswith(".tmp-")]

    second = _bare_cache(sshd, workdir, xdg, bare39)
    try:
        assert second.load_value(k1) == {"answer": 42, "tags": ["a", "b"]}
        assert second.bootstrap_status == "cached"
        assert second._conn.transport.code_bytes_sent == 0
    finally:
        second.close()


def test_pipelined_first_requests_survive_the_code_transfer(sshd, tmp_path, bare39):
    workdir, xdg = remote_dir(tmp_path), tmp_path / "xdg"
    seed = _bare_cache(sshd, workdir, xdg / "seed", bare39)
    keys = [seed.save(Call("f", {"i": i}, i * i)) for i in range(8)]
    seed.close()

    cache = _bare_cache(sshd, workdir, xdg / "fresh", bare39)
    results: List[Any] = [None] * len(keys)
    errors: List[BaseException] = []

    def load(i: int) -> None:
        try:
            results[i] = cache.load_value(keys[i])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(len(keys))]
    try:
        for t in threads:  # all before the remote has said it needs the code
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert results == [i * i for i in range(8)]
        assert cache.bootstrap_status == "sent"
    finally:
        cache.close()


def test_a_first_request_bigger_than_the_replay_buffer_waits_for_the_status(sshd, tmp_path, bare39):
    workdir, xdg = remote_dir(tmp_path), tmp_path / "xdg"
    value = os.urandom(REPLAY_MAX + (100 << 10))  # streamed, yet under the 1 MiB XXH3 threshold
    cache = _bare_cache(sshd, workdir, xdg, bare39)
    try:
        key = cache.save(Call("blob", {}, value))
        assert cache.bootstrap_status == "sent"
        assert cache.load_value(key) == value
    finally:
        cache.close()


def test_big_values_need_xxhash_to_be_saved_but_load_without_it(sshd, tmp_path, bare39):
    workdir, xdg = remote_dir(tmp_path), tmp_path / "xdg"
    big = os.urandom((1 << 20) + 5)  # hashed with XXH3-128 by the digest scheme
    # filed on the remote by a process that has xxhash (a job on the cluster)
    local = load_cache(config=load_config(workdir / "fleche.toml"))
    stored = local.save(Call("job.out", {"seed": 1}, big))
    local.close()

    cache = _bare_cache(sshd, workdir, xdg, bare39)
    try:
        assert cache.load_value(stored) == big  # reading needs no hashing
        call = Call("laptop.out", {"seed": 2}, os.urandom(len(big)))  # a new digest: checked
        with pytest.raises(RemoteError, match=r"pip install 'xxhash>=3'"):
            cache.save(call)
        assert not cache.contains(call.key())  # refused whole: nothing stored
        small = cache.save(Call("laptop.small", {}, b"x" * 1000))  # the connection goes on
        assert cache.load_value(small) == b"x" * 1000
    finally:
        cache.close()


#: Never connected to: the server fails at its first import of SQLAlchemy.
PG_URL = "postgresql://nobody@127.0.0.1:1/none"


def test_sqlite_store_works_on_a_bare_python(sshd, tmp_path, bare39):
    toml = '[default]\ncache = "main"\nroot = true\n\n[main]\ntemplate = "sql"\nroot = "store"\n'
    workdir = remote_dir(tmp_path, toml)
    cache = _bare_cache(sshd, workdir, tmp_path / "xdg", bare39)
    try:
        key = cache.save(Call("f", {"x": 1}, [1, 2]))
        assert cache.load_value(key) == [1, 2]
        assert [r.key for r in cache.query_records("f")] == [key]
    finally:
        cache.close()
    assert (workdir / "store" / "calls.db").is_file()


@pytest.mark.parametrize(
    ("table", "package", "extra"),
    [
        (f'template = "sql"\nroot = "store"\nurl = "{PG_URL}"', "SQLAlchemy", "postgres"),
        ('template = "hdf5"\nroot = "store"', "h5py", "hdf5"),
    ],
    ids=["postgresql", "hdf5"],
)
def test_a_store_needing_a_missing_library_names_the_package(sshd, tmp_path, bare39, table, package, extra):
    toml = f'[default]\ncache = "main"\nroot = true\n\n[main]\n{table}\n'
    cache = _bare_cache(sshd, remote_dir(tmp_path, toml), tmp_path / "xdg", bare39)
    try:
        with pytest.raises(RemoteConnectionError) as info:
            cache.contains("ab" * 32)
        text = str(info.value)
        assert f"lacks the package {package!r}" in text
        assert f"pip install '{package}'" in text
        assert f"--extras {extra}" in text  # or fleche-remote install with the extra
    finally:
        cache.close()


def test_never_requires_an_installed_server_and_says_how_to_install(sshd, tmp_path, bare39):
    cache = _bare_cache(sshd, remote_dir(tmp_path), tmp_path / "xdg", bare39, bootstrap="never")
    try:
        with pytest.raises(RemoteConnectionError) as info:
            cache.contains("ab" * 32)
        text = str(info.value)
        assert "fleche_remote is not installed" in text
        assert f"fleche-remote install {sshd.host}" in text
        assert "bootstrap = 'auto'" in text
    finally:
        cache.close()
    assert not (tmp_path / "xdg").exists()  # nothing was sent


def test_auto_uses_an_installed_server_of_the_same_version(sshd, tmp_path):
    # the sshd's PYTHONPATH makes this checkout importable for the test's own Python
    cache = ssh_cache(sshd, remote_dir(tmp_path), setup_commands=[f"export XDG_CACHE_HOME={tmp_path}/xdg"])
    try:
        assert cache.contains("ab" * 32) is False
        assert cache.bootstrap_status == "installed"
        assert cache._conn.transport.code_bytes_sent == 0
    finally:
        cache.close()
    assert not (tmp_path / "xdg").exists()


def test_auto_replaces_an_installed_server_of_another_version(sshd, tmp_path, bare39):
    workdir = remote_dir(tmp_path)
    old = workdir / "fleche_remote"  # importable from the server's cwd, as `python -c` allows
    old.mkdir()
    (old / "__init__.py").write_text('__version__ = "0.0.1"\nraise SystemExit("the old version ran")\n')
    cache = _bare_cache(sshd, workdir, tmp_path / "xdg", bare39)
    try:
        key = cache.save(Call("f", {}, 1))
        assert cache.load_value(key) == 1
        assert cache.bootstrap_status == "sent"
        assert cache.info()["versions"]["library"] == code_bundle().version
    finally:
        cache.close()


def test_always_sends_even_when_one_is_installed_and_to_config_keeps_it(sshd, tmp_path):
    xdg = tmp_path / "xdg"
    cache = ssh_cache(
        sshd, remote_dir(tmp_path), setup_commands=[f"export XDG_CACHE_HOME={xdg}"], bootstrap="always"
    )
    try:
        assert cache.contains("ab" * 32) is False
        assert cache.bootstrap_status == "sent"
        assert cache.info()["python"] == sys.executable
        assert cache.to_config()["bootstrap"] == "always"
        assert SshCache.from_config(cache.to_config()).bootstrap == "always"
    finally:
        cache.close()
    assert _code_dir(xdg).is_dir()


def test_an_unwritable_code_cache_still_starts_from_a_temp_dir(sshd, tmp_path, bare39):
    # /dev/null is no directory: makedirs fails even for root
    cache = _bare_cache(sshd, remote_dir(tmp_path), Path("/dev/null/cache"), bare39)
    try:
        key = cache.save(Call("f", {}, "ok"))
        assert cache.load_value(key) == "ok"
        assert cache.bootstrap_status == "sent"
        log = cache._conn.transport.diagnose()[1]
        assert any("cannot cache the server code" in line for line in log), log
    finally:
        cache.close()


def test_concurrent_first_starts_share_one_cache_entry(sshd, tmp_path, bare39):
    workdir, xdg = remote_dir(tmp_path), tmp_path / "xdg"
    caches = [_bare_cache(sshd, workdir, xdg, bare39) for _ in range(3)]
    errors: List[BaseException] = []

    def start(cache: SshCache) -> None:
        try:
            cache.contains("ab" * 32)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(c,)) for c in caches]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert {c.bootstrap_status for c in caches} <= {"sent", "cached"}
    finally:
        for c in caches:
            c.close()
    assert [p.name for p in _code_dir(xdg).parent.iterdir()] == [code_bundle().sha256]


def test_bad_bootstrap_setting_is_a_config_error():
    from fleche_remote.errors import ConfigError

    with pytest.raises(ConfigError, match="bootstrap must be one of 'auto', 'never', 'always'"):
        SshCache.from_config({"type": "ssh", "host": "h", "bootstrap": "sometimes"})


class _ScriptedPipe:
    """The wrapped side of a BootstrapTransport: hands out ``incoming`` in
    pieces of ``step`` bytes and records what is written."""

    def __init__(self, incoming: bytes, step: int) -> None:
        self.pieces = [incoming[i : i + step] for i in range(0, len(incoming), step)]
        self.written = bytearray()
        self.alive = True

    def write(self, data: Any, timeout: float) -> None:
        self.written += data

    def read_ready(self) -> Any:
        return self.pieces.pop(0) if self.pieces else b""

    def wait_readable(self, timeout: float) -> None:
        pass

    def readinto_ready(self, into: memoryview) -> Any:
        raise AssertionError("not used before the banner")

    def close(self) -> None:
        pass

    def diagnose(self) -> Any:
        return 0, []


def _read_all(transport: Any) -> bytes:
    out = bytearray()
    while True:
        transport.wait_readable(1.0)
        data = transport.read_ready()
        if data is None:
            continue
        if not data:
            return bytes(out)
        out += data


@pytest.mark.parametrize("step", [1, 2, 7, 64, 1 << 20])
@pytest.mark.parametrize("state", ["need", "cached", "installed"])
def test_the_status_line_is_found_wherever_the_reads_split_it(step, state):
    from fleche_remote.remote.bootstrap import BootstrapTransport
    from fleche_remote.remote.protocol import BANNER

    bundle = code_bundle()
    noise, after = b"Welcome to the cluster\n", BANNER + b"frames..."
    pipe = _ScriptedPipe(noise + bundle.marker + state.encode() + b"\n" + after, step)
    transport = BootstrapTransport(pipe, bundle)
    transport.write(b"first request", 1.0)  # leaves before the status is known
    assert _read_all(transport) == noise + after  # the status line alone is taken out
    assert transport.status == ("sent" if state == "need" else state)
    if state == "need":  # the stub drops what came before the separator: sent again after the code
        assert (
            bytes(pipe.written) == b"first request" + bundle.separator + bundle.payload() + b"first request"
        )
    else:
        assert bytes(pipe.written) == b"first request"
    transport.write(b"later", 1.0)
    assert bytes(pipe.written).endswith(b"later")


@pytest.mark.parametrize("step", [1, 5, 1 << 20])
def test_a_server_started_without_the_stub_passes_straight_through(step):
    from fleche_remote.remote.bootstrap import BootstrapTransport
    from fleche_remote.remote.protocol import BANNER

    stream = b"motd\n" + BANNER + b"hello frames"
    pipe = _ScriptedPipe(stream, step)
    transport = BootstrapTransport(pipe, code_bundle())
    transport.write(b"req", 1.0)
    assert _read_all(transport) == stream
    assert transport.status is None
    assert bytes(pipe.written) == b"req"
