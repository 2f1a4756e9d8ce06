"""A cache written by one Unix user and read (or written) by another.

Two real users: the one running the tests (root, as the test command runs)
writes, and ``fleche-peer`` (created by scripts/test.sh) reads, in a
process of its own. That process starts as root and drops to the peer's
uid and gid before it touches the cache: the checkout's interpreter lives
under /root, which the peer may not enter, so it imports everything it
needs first, and then every file access is checked against the peer, as
for a colleague on a shared machine.

Each test covers the three kinds of files a cache keeps: value and call
files (template "cloudpickle"), an SQLite database with its -wal and -shm
(template "sql", big values as files beside it), and HDF5 files.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

from fleche_remote import Call
from fleche_remote.config import cache_from_config

PEER = "fleche-peer"

#: Run first in every helper process: imports, then the drop to the user
#: and umask given on the command line.
PRELUDE = """
import json, os, sys
import gzip, pwd, secrets, socket, sqlite3, stat, urllib.parse
import cloudpickle, h5py, numpy
import fleche_remote.config, fleche_remote.storage.file, fleche_remote.storage.hdf5
import fleche_remote.storage.sql.stores, fleche_remote.storage.sql.sqlite
from fleche_remote import Call
from fleche_remote.config import cache_from_config
uid, gid, umask = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3], 8)
configs = json.loads(sys.argv[4])
if uid != os.getuid():
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
os.umask(umask)
"""

#: Saves two results into each cache (a small one, inline in SQLite, and
#: a 100 kB one, a file even beside SQLite) and prints their keys.
WRITE = """
out = {}
for name, cfg in configs.items():
    cache = cache_from_config(cfg)
    who = pwd.getpwuid(os.getuid()).pw_name
    out[name] = [
        cache.save(Call("f", {"x": 1, "who": who}, result=[1, 2, 3])),
        cache.save(Call("f", {"x": 2, "who": who}, result=b"z" * 100_000)),
    ]
    cache.close()
print(json.dumps(out))
"""

#: Loads what WRITE saved (keys in argv[5]); prints, per cache, what it
#: found or the error it met.
READ = """
keys = json.loads(sys.argv[5])
out = {}
for name, cfg in configs.items():
    try:
        cache = cache_from_config({**cfg, "read_only": True})
        small, big = keys[name]
        out[name] = {
            "contains": cache.contains_many([small, big, "ab" * 32]),
            "values_ok": [cache.load_value(small) == [1, 2, 3], cache.load_value(big) == b"z" * 100_000],
            "queried": len(list(cache.query("f"))),
        }
        cache.close()
    except Exception as exc:
        out[name] = {"error": type(exc).__name__, "message": str(exc)}
print(json.dumps(out))
"""


def _run(user: str, umask: str, configs: Dict[str, Any], script: str, *args: str) -> Dict[str, Any]:
    pw = pwd.getpwnam(user)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            PRELUDE + script,
            str(pw.pw_uid),
            str(pw.pw_gid),
            umask,
            json.dumps(configs),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"{user}'s process failed:\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.fixture
def peer() -> pwd.struct_passwd:
    """The second user; the tests need root to act as it."""
    if os.geteuid() != 0:
        pytest.fail(
            "tests/test_sharing.py acts as a second user and must run as root (as scripts/test.sh does)"
        )
    try:
        return pwd.getpwnam(PEER)
    except KeyError:
        pytest.fail(f"no user {PEER!r}: scripts/test.sh creates it (useradd --system --user-group {PEER})")


@pytest.fixture
def project() -> Iterator[Path]:
    """A directory both users may enter, as a project directory on a cluster
    (pytest's own tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="fleche-sharing-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _configs(project: Path, **extra: Any) -> Dict[str, Any]:
    return {
        "files": {"template": "cloudpickle", "root": str(project / "files"), **extra},
        "sql": {"template": "sql", "root": str(project / "sql"), **extra},
        "hdf5": {"template": "hdf5", "root": str(project / "hdf5"), **extra},
    }


def _modes(root: Path) -> Dict[str, List[str]]:
    """Every mode under ``root``, by kind, to compare with what a umask gives."""
    seen: Dict[str, set] = {"dirs": set(), "files": set()}
    for path in [root, *root.rglob("*")]:
        st = path.stat()
        seen["dirs" if path.is_dir() else "files"].add(stat.filemode(st.st_mode))
    return {kind: sorted(modes) for kind, modes in seen.items()}


def _all_found(result: Dict[str, Any]) -> Dict[str, Any]:
    return {"contains": [True, True, False], "values_ok": [True, True], "queried": 2}


def test_default_umask_022_lets_a_colleague_read_every_store(peer, project):
    configs = _configs(project)
    keys = _run("root", "022", configs, WRITE)

    for name in configs:
        assert _modes(project / name) == {"dirs": ["drwxr-xr-x"], "files": ["-rw-r--r--"]}, name
    # the writers have closed: SQLite has removed its -wal and -shm, which the
    # colleague may not create in the writer's directory
    assert not list((project / "sql").glob("calls.db-*"))

    found = _run(PEER, "022", configs, READ, json.dumps(keys))
    for name in configs:
        assert found[name] == _all_found(found[name]), name


def test_colleague_reads_a_sqlite_cache_while_it_is_written(peer, project):
    """The reader starts while no one writes (the database alone, read as a
    snapshot), then a writer adds an entry and keeps its connection, so the
    entry is only in the -wal: the reader must see it."""
    configs = {"sql": _configs(project)["sql"]}
    first = _run("root", "022", configs, WRITE)["sql"]
    pw = peer
    script = (
        PRELUDE
        + """
cache = cache_from_config({**configs["sql"], "read_only": True})
keys = json.loads(sys.argv[5])
print(json.dumps(cache.contains_many(keys)), flush=True)
new = sys.stdin.readline().strip()
print(json.dumps([cache.contains(new), cache.load_value(new)]), flush=True)
"""
    )
    reader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            script,
            str(pw.pw_uid),
            str(pw.pw_gid),
            "022",
            json.dumps(configs),
            json.dumps(first),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    writer: Optional[Any] = None
    try:
        assert reader.stdout is not None and reader.stdin is not None
        line = reader.stdout.readline()
        assert json.loads(line) == [True, True], reader.stderr.read() if reader.stderr else line
        writer = cache_from_config(configs["sql"])
        new = writer.save(Call("g", {"y": 7}, result="written meanwhile"))
        assert (project / "sql" / "calls.db-wal").stat().st_size > 0  # in the WAL, not yet in the file
        reader.stdin.write(new + "\n")
        reader.stdin.flush()
        line = reader.stdout.readline()
        assert json.loads(line) == [True, "written meanwhile"], (
            reader.stderr.read() if reader.stderr else line
        )
    finally:
        if writer is not None:
            writer.close()
        reader.kill()
        reader.communicate(timeout=60)


def test_umask_077_keeps_others_out_with_a_clear_permission_error(peer, project):
    configs = _configs(project)
    keys = _run("root", "077", configs, WRITE)

    for name in configs:
        assert _modes(project / name) == {"dirs": ["drwx------"], "files": ["-rw-------"]}, name

    found = _run(PEER, "022", configs, READ, json.dumps(keys))
    for name in configs:
        assert found[name]["error"] == "PermissionError", (name, found[name])
        message = found[name]["message"]
        # which directory is in the way, whose it is, and what its owner can do
        assert f"{project / name} is drwx------ root, which user {PEER} may not enter" in message, message
        assert 'shared = "group"' in message and "umask of 022" in message, message


def test_shared_group_lets_the_group_read_and_write_whatever_the_umask(peer, project):
    # a project directory of the peer's group, setgid, as on a cluster
    os.chown(project, 0, peer.pw_gid)
    project.chmod(0o2775)
    configs = _configs(project, shared="group")
    keys = _run("root", "077", configs, WRITE)

    group = grp.getgrgid(peer.pw_gid).gr_name
    for name in configs:
        assert _modes(project / name) == {"dirs": ["drwxrws---"], "files": ["-rw-rw----"]}, name
        assert {grp.getgrgid(p.stat().st_gid).gr_name for p in (project / name).rglob("*")} == {group}

    # the group reads everything the owner wrote...
    found = _run(PEER, "077", configs, READ, json.dumps(keys))
    for name in configs:
        assert found[name] == _all_found(found[name]), name

    # ...and writes too (the peer's umask is 077 as well)
    theirs = _run(PEER, "077", configs, WRITE)
    for name in configs:
        assert _modes(project / name) == {"dirs": ["drwxrws---"], "files": ["-rw-rw----"]}, name
        owners = {pwd.getpwuid(p.stat().st_uid).pw_name for p in (project / name).rglob("*") if p.is_file()}
        if name == "files":  # a file per entry: some are the peer's now
            assert owners == {"root", PEER}, owners
        cache = cache_from_config(configs[name])
        assert cache.load_value(theirs[name][1]) == b"z" * 100_000
        assert len(list(cache.query("f"))) == 4  # two of each user (the same calls differ by "who")
        cache.close()


def test_shared_is_kept_by_cache_to_config_and_refuses_unknown_values(project):
    from fleche_remote.config import cache_to_config
    from fleche_remote.errors import ConfigError

    cache = cache_from_config(_configs(project, shared="all")["sql"])
    cfg = cache_to_config(cache)
    assert cfg["values"]["shared"] == cfg["calls"]["shared"] == "all"  # type: ignore[index,call-overload]
    with pytest.raises(ConfigError, match=r"shared must be one of 'umask', 'group', 'all', got 'world'"):
        cache_from_config(
            {
                "values": {"type": "cloudpickle", "root": str(project), "shared": "world"},
                "calls": {"type": "memory"},
            }
        )
