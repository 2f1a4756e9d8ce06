"""The mistakes of a first hour, each answered on the first line of its
message: what the user wrote (function and parameter, file, table and
key, host), what was expected, and the fix."""

from __future__ import annotations

import io
import socket
import sqlite3
import threading
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import List

import pytest
from test_migrate import FLECHE_SPEC, _run
from test_migrate import fleche_python as fleche_python  # a fixture: fleche 0.22 in a venv

from fleche_remote import (
    Cache,
    CacheStack,
    Call,
    ConfigError,
    RemoteConnectionError,
    StorageError,
    UnpicklableArgumentError,
    UnstableDigestWarning,
    cached,
)
from fleche_remote.caches.void import VoidCache
from fleche_remote.cli import main
from fleche_remote.config import Config, cache_from_config, load_cache, load_config
from fleche_remote.remote.client import SshCache
from fleche_remote.storage.memory import MemoryCallStore, MemoryValueStore
from fleche_remote.storage.sql.db import ForeignTablesWarning
from fleche_remote.storage.sql.stores import SqlCallStore, SqlValueStore


def first_line(err: BaseException) -> str:
    return str(err).splitlines()[0]


def memory() -> Cache:
    return Cache(MemoryValueStore(), MemoryCallStore())


# -- arguments -------------------------------------------------------------------


def test_an_unpicklable_argument_names_the_function_the_parameter_and_ignore() -> None:
    @cached(cache=memory())
    def simulate(x: int, lock: threading.Lock) -> int:
        return x

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnstableDigestWarning)
        with pytest.raises(UnpicklableArgumentError) as info:
            simulate(1, threading.Lock())
    err = info.value
    assert isinstance(err, TypeError)
    assert (err.parameter, err.type_name) == ("lock", "_thread.lock")
    assert err.function.endswith("simulate")
    line = first_line(err)
    assert line.startswith(f"{err.function}: argument 'lock' is a _thread.lock, which cannot be pickled")
    assert "@cached(ignore=['lock'])" in line
    assert err.__suppress_context__  # no 20 frames of pickling underneath


def test_ignore_is_the_fix_it_names() -> None:
    @cached(cache=memory(), ignore=["lock"])
    def simulate(x: int, lock: threading.Lock) -> int:
        return x + 1

    assert simulate(1, threading.Lock()) == 2 and simulate(1, threading.Lock()) == 2


def test_unstable_digest_warning_points_at_the_users_line(tmp_path: Path) -> None:
    (tmp_path / "data.txt").write_text("hi")

    @cached(cache=memory())
    def read(fh: io.TextIOWrapper) -> str:
        return fh.read()

    with open(tmp_path / "data.txt") as fh, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read(fh)
    ours = [w for w in caught if issubclass(w.category, UnstableDigestWarning)]
    assert ours and ours[0].filename == __file__, [(w.filename, w.lineno) for w in ours]


# -- fleche.toml -----------------------------------------------------------------


def test_a_misspelt_key_gets_did_you_mean(tmp_path: Path) -> None:
    path = tmp_path / "fleche.toml"
    path.write_text('[c]\ntempalte = "sql"\nroot = "store"\n')
    with pytest.raises(ConfigError) as info:
        load_cache("c", config=load_config(path))
    line = first_line(info.value)
    assert line.startswith("unknown key 'tempalte'; did you mean 'template'?")
    assert "template with root" in line  # root is valid here, with a template
    assert f"file {path}, table [c], key 'tempalte'" in line
    assert (info.value.table, info.value.key) == ("c", "tempalte")


MISSPELT = [
    ({"template": "cloudpikle", "root": "r"}, "template", "unknown template 'cloudpikle'; did you mean"),
    ({"template": "memory", "read_onyl": True}, "read_onyl", "unknown key 'read_onyl' for template 'memory'"),
    ({"type": "shh", "host": "h"}, "type", "unknown cache type 'shh'; did you mean 'ssh'?"),
    ({"root": "r"}, "root", "root goes with a template, and this table has none: add template ="),
]


@pytest.mark.parametrize(("table", "key", "start"), MISSPELT)
def test_other_misspellings(table: dict, key: str, start: str) -> None:
    with pytest.raises(ConfigError) as info:
        cache_from_config(table, name="t", source="/p/fleche.toml")
    line = first_line(info.value)
    assert line.startswith(start) and info.value.key == key
    if key != "root":
        assert "did you mean" in line


def test_a_misspelt_default_key(tmp_path: Path) -> None:
    path = tmp_path / "fleche.toml"
    path.write_text('[default]\ncahce = "c"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert first_line(info.value).startswith("unknown key 'cahce' in [default]; did you mean 'cache'?")


def test_invalid_toml_gives_the_line_once_and_says_to_quote(tmp_path: Path) -> None:
    path = tmp_path / "fleche.toml"
    path.write_text("[c]\ntemplate = memory\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    line = first_line(info.value)
    assert line.count("line 2") == 1, line
    assert 'strings need quotes: write template = "memory"' in line and str(path) in line


def test_default_naming_no_table_says_where_and_what_to_write(tmp_path: Path) -> None:
    path = tmp_path / "fleche.toml"
    path.write_text('[default]\ncache = "nope"\n[persistent]\ntemplate = "memory"\n')
    with pytest.raises(ConfigError) as info:
        load_cache(config=load_config(path))
    line = first_line(info.value)
    assert line.startswith("[default] cache names 'nope', which is not a table here; add a [nope] table")
    assert "persistent, memory, void" in line
    assert (info.value.file, info.value.table, info.value.key) == (str(path), "default", "cache")


def test_memory_void_and_default_need_no_table() -> None:
    config = Config({"default": {"cache": "memory"}}, {})
    assert isinstance(load_cache("memory", config=config), Cache)
    assert isinstance(load_cache("void", config=config), VoidCache)
    assert isinstance(load_cache("default", config=config), Cache)
    mine = Config({"memory": [{"template": "memory"}]}, {})
    assert isinstance(load_cache("memory", config=mine), CacheStack)  # a table of that name wins


def test_config_command_exits_2_when_a_table_cannot_be_built(tmp_path: Path) -> None:
    path = tmp_path / "fleche.toml"
    path.write_text(
        '[default]\ncache = "c"\n[c]\ntempalte = "sql"\nroot = "store"\n[ok]\ntemplate = "memory"\n'
    )
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["config", "--config", str(path)])
    assert code == 2
    assert 'tempalte = "sql"' in out.getvalue()  # the table is still shown
    lines = err.getvalue().splitlines()
    assert lines == [f"fleche-remote: error: {first_line_of_typo(path)}"]
    assert not (tmp_path / "store").exists()  # checking builds nothing on disk


def first_line_of_typo(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_cache("c", config=load_config(path))
    return first_line(info.value)


# -- an unreachable host ---------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_host_points_to_doctor_and_on_error() -> None:
    port = _closed_port()
    cache = SshCache("127.0.0.1", ssh_options=("-p", str(port), "-o", "BatchMode=yes"), connect_timeout=60)
    try:
        with pytest.raises(RemoteConnectionError) as info:
            cache.contains("0" * 64)
    finally:
        cache.close()
    text = str(info.value)
    line = first_line(info.value)
    assert line.startswith("ssh could not connect to 127.0.0.1: ")
    assert "`fleche-remote doctor 127.0.0.1`" in line and 'on_error = "warn"' in line
    ssh_line = info.value.stderr_tail[-1]
    assert "refused" in ssh_line and text.count(ssh_line) == 1, text


def test_the_command_line_keeps_a_remote_errors_lines_apart(capsys: pytest.CaptureFixture[str]) -> None:
    from fleche_remote.cli import _error

    _error(str(RemoteConnectionError("the server on h exited before its banner", stderr_tail=["a", "b"])))
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "fleche-remote: error: the server on h exited before its banner"
    assert lines[1:] == ["  --- remote stderr (last lines) ---", "  a", "  b"]


# -- one SQLite file, two libraries ------------------------------------------------


def _legacy(path: Path) -> str:
    """A database written before the tables took their prefix, holding one call."""
    url = f"sqlite:///{path}"
    values, calls = SqlValueStore(url), SqlCallStore(url)
    key = Cache(values, calls).save(Call("m.f", {"x": 1}, 42))
    values.close()
    calls.close()
    conn = sqlite3.connect(path)
    conn.executescript(
        "DROP INDEX fr_ix_calls_name;"
        "ALTER TABLE fr_calls RENAME TO calls; ALTER TABLE fr_call_args RENAME TO call_args;"
        "ALTER TABLE fr_blobs RENAME TO blobs; CREATE INDEX ix_calls_name ON calls (name);"
        "DROP TABLE IF EXISTS fr_claims; DROP TABLE IF EXISTS fr_uses;"  # younger than the prefix
    )
    conn.close()
    return str(key)


def _tables(path: Path) -> List[str]:
    conn = sqlite3.connect(path)
    try:
        return sorted(r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
    finally:
        conn.close()


def test_an_old_database_is_renamed_on_open_once_by_concurrent_openers(tmp_path: Path) -> None:
    path = tmp_path / "calls.db"
    key = _legacy(path)
    assert _tables(path) == ["blobs", "call_args", "calls"]
    found: List[object] = []
    start = threading.Barrier(4)

    def open_and_load() -> None:
        start.wait(timeout=60)
        url = f"sqlite:///{path}"
        cache = Cache(SqlValueStore(url), SqlCallStore(url))
        try:
            found.append(cache.load_value(key))
        except Exception as exc:  # reported below, with the others' results
            found.append(exc)
        finally:
            cache.close()

    threads = [threading.Thread(target=open_and_load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert found == [42, 42, 42, 42]
    # renamed once; the tables for claims and last uses are made beside them
    assert _tables(path) == ["fr_blobs", "fr_call_args", "fr_calls", "fr_claims", "fr_uses"]


def test_a_reader_that_cannot_rename_an_old_database_is_told_how(tmp_path: Path) -> None:
    path = tmp_path / "calls.db"
    key = _legacy(path)
    read_only = f"sqlite:///file:{path}?mode=ro&uri=true"
    with pytest.raises(StorageError) as err:
        SqlCallStore(read_only).contains(key)
    message = str(err.value)
    assert "without the fr_ prefix" in message and "fleche-remote ls" in message and str(path) in message
    assert _tables(path) == ["blobs", "call_args", "calls"]  # untouched
    cache = Cache(SqlValueStore(f"sqlite:///{path}"), SqlCallStore(f"sqlite:///{path}"))
    try:
        assert cache.load_value(key) == 42  # a writer renames it, and then the reader reads
    finally:
        cache.close()
    reader = SqlCallStore(read_only)
    try:
        assert reader.contains(key)
    finally:
        reader.close()


def test_a_fleche_table_beside_ours_is_named_in_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "calls.db"
    conn = sqlite3.connect(path)
    # fleche's own table, as fleche.storage.sql creates it (other columns than ours)
    conn.execute("CREATE TABLE calls (id INTEGER PRIMARY KEY, name TEXT, module TEXT, digest TEXT)")
    conn.close()
    with pytest.warns(ForeignTablesWarning, match="fleche-remote import-fleche") as caught:
        cache = Cache(SqlValueStore(f"sqlite:///{path}"), SqlCallStore(f"sqlite:///{path}"))
        key = cache.save(Call("m.f", {"x": 1}, 7))
    assert cache.load_value(key) == 7
    cache.close()
    assert caught[0].filename == __file__
    assert "calls" in _tables(path) and "fr_calls" in _tables(path)


FLECHE_SIDE = """
import sys
from fleche import fleche
import shared_subject as m

double = fleche(m.double)
assert double(21) == 42
double(21)  # a hit, read back from the shared file
print(len(list(__import__("fleche.config").config.load_cache_config().query())))
"""


@pytest.fixture(scope="session")
def fleche_sql_python(fleche_python: str) -> str:
    """That interpreter with fleche's SQL extra (SQLAlchemy), installed once."""
    import subprocess

    if subprocess.run([fleche_python, "-c", "import sqlalchemy"], capture_output=True).returncode:
        argv = [
            fleche_python,
            "-m",
            "pip",
            "install",
            "-q",
            FLECHE_SPEC.replace("fleche", "fleche[sqlalchemy]"),
        ]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout + done.stderr
    return fleche_python


def test_one_sqlite_file_serves_fleche_and_fleche_remote(fleche_sql_python: str, tmp_path: Path) -> None:
    """``calls.url`` of both libraries pointing at one file: each keeps its
    own tables, and neither trips on the other's (``no such column``)."""
    (tmp_path / "shared_subject.py").write_text("def double(x):\n    return 2 * x\n")
    (tmp_path / "fleche.toml").write_text(
        "[default]\ncache = 'theirs'\nroot = true\n"
        "[theirs]\nvalues = { type = 'cloudpickle', root = 'fv' }\n"
        "calls = { type = 'sql', url = 'sqlite:///shared.db' }\n"
        "[ours]\nvalues = { type = 'cloudpickle', root = 'ov' }\n"
        "calls = { type = 'sql', url = 'shared.db' }\n"
    )
    (tmp_path / "fleche_side.py").write_text(FLECHE_SIDE)
    first = _run(fleche_sql_python, tmp_path, "fleche_side.py")
    assert first.returncode == 0, first.stderr
    with pytest.warns(ForeignTablesWarning, match="also holds a fleche cache"):
        ours = load_cache("ours", config=load_config(tmp_path / "fleche.toml"))
        key = ours.save(Call("m.g", {"x": 1}, "mine"))
    assert ours.load_value(key) == "mine"
    ours.close()
    again = _run(fleche_sql_python, tmp_path, "fleche_side.py")  # fleche still reads its own
    assert again.returncode == 0, again.stderr
    assert again.stdout.split()[-1] == "1"
    assert {"calls", "fr_calls"} <= set(_tables(tmp_path / "shared.db"))
