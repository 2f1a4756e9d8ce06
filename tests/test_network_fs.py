"""Caches on network and parallel file systems, and what killed writers leave.

SQLite and HDF5 stores refuse a path on NFS, Lustre, GPFS and the like
(found in the mount table) unless the user opts in; file stores are safe
there. The mount table is injectable (``FLECHE_REMOTE_MOUNT_TABLE``), which
is how a test puts a directory "on Lustre"; a real tmpfs mounted in a
private mount namespace checks the reading of the real table, and the
refusal is also proven through the real sshd. File stores name their temp
files after host and pid, and ``collect_garbage`` removes those of dead
writers, never a live one's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from remote.helpers import SQL_TOML, remote_dir, ssh_cache

from fleche_remote import Call
from fleche_remote.config import cache_from_config
from fleche_remote.errors import ConfigError
from fleche_remote.storage import fs as _fs
from fleche_remote.storage.fs import Mount, mount_of, network_mount, parse_mount_table

MOUNTINFO = r"""22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
60 27 0:50 / /scratch rw,relatime shared:1 - lustre 10.0.0.1@o2ib:/scratch rw,flock
61 27 0:51 / /scratch2 rw,relatime - xfs /dev/vdb rw
62 27 0:52 / /home rw - nfs4 nas:/home rw,vers=4.2
63 62 0:53 / /home/me/local\040disk rw - ext4 /dev/vdc rw
64 27 0:54 / /gpfs rw - gpfs fs0 rw
65 64 0:55 / /gpfs rw - tmpfs none rw
"""

PROC_MOUNTS = """/dev/vda / ext4 rw 0 0
nas:/data /data nfs rw,vers=3 0 0
/dev/vdb /data/my\\040scratch ext4 rw 0 0
"""


def test_mountinfo_longest_prefix_wins_with_escapes_and_stacked_mounts(tmp_path):
    table = tmp_path / "mountinfo"
    table.write_text(MOUNTINFO)
    assert mount_of("/scratch/proj/calls.db", str(table)) == Mount("/scratch", "lustre")
    assert mount_of("/scratch", str(table)) == Mount("/scratch", "lustre")
    assert mount_of("/scratch2/x", str(table)) == Mount("/scratch2", "xfs")  # not a prefix of /scratch2
    assert mount_of("/home/me/cache.h5", str(table)) == Mount("/home", "nfs4")
    assert mount_of("/home/me/local disk/cache.h5", str(table)) == Mount("/home/me/local disk", "ext4")
    assert mount_of("/gpfs/p/x", str(table)) == Mount("/gpfs", "tmpfs")  # the later mount hides the first
    assert mount_of("/opt/x", str(table)) == Mount("/", "ext4")
    assert network_mount("/home/me/x.db", str(table)) == Mount("/home", "nfs4")
    assert network_mount("/home/me/local disk/x.db", str(table)) is None


def test_proc_mounts_format_is_read_too():
    mounts = parse_mount_table(PROC_MOUNTS)
    assert mounts == [Mount("/", "ext4"), Mount("/data", "nfs"), Mount("/data/my scratch", "ext4")]


def test_symlinks_are_followed_into_the_mount(tmp_path):
    real = tmp_path / "lustre-mount"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    table = tmp_path / "mountinfo"
    table.write_text(f"27 1 254:0 / / rw - ext4 /dev/vda rw\n60 27 0:50 / {real} rw - lustre fs rw\n")
    # the path does not exist yet: its existing part is resolved, the rest appended
    assert network_mount(tmp_path / "link" / "new" / "calls.db", str(table)) == Mount(str(real), "lustre")


def _on(tmp_path: Path, fstype: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory that the (injected) mount table puts on ``fstype``."""
    where = tmp_path / "mnt"
    where.mkdir()
    table = tmp_path / "mountinfo"
    table.write_text(f"27 1 254:0 / / rw - ext4 /dev/vda rw\n70 27 0:60 / {where} rw - {fstype} srv:/x rw\n")
    monkeypatch.setenv(_fs.ENV_MOUNT_TABLE, str(table))
    monkeypatch.delenv(_fs.ENV_ALLOW, raising=False)
    return where


@pytest.mark.parametrize(
    "fstype", ["nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "ceph", "fuse.sshfs", "9p"]
)
def test_sqlite_and_hdf5_refuse_network_file_systems_and_name_the_fix(tmp_path, monkeypatch, fstype):
    where = _on(tmp_path, fstype, monkeypatch)
    with pytest.raises(ConfigError) as info:
        cache_from_config({"template": "sql", "root": str(where / "c")})
    message = str(info.value)
    assert f"({fstype}, mounted at {where})" in message
    assert "PostgreSQL" in message and "per-writer layout" in message
    assert "allow_network_fs = true" in message and _fs.ENV_ALLOW in message
    assert info.value.key == "calls.allow_network_fs"

    with pytest.raises(ConfigError, match="HDF5 file.*per-writer layout.*allow_network_fs = true"):
        cache_from_config({"template": "hdf5", "root": str(where / "c")})
    with pytest.raises(ConfigError, match="SQLite database"):
        cache_from_config(
            {"values": {"type": "memory"}, "calls": {"type": "sql", "url": f"sqlite:///{where}/calls.db"}}
        )
    assert not (where / "c").exists()  # refused before anything was created


@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs", "zfs", "tmpfs", "overlay"])
def test_local_file_systems_are_accepted(tmp_path, monkeypatch, fstype):
    where = _on(tmp_path, fstype, monkeypatch)
    for template in ("sql", "hdf5"):
        cache = cache_from_config({"template": template, "root": str(where / template)})
        key = cache.save(Call("f", {"x": 1}, result=2))
        assert cache.load_value(key) == 2
        cache.close()


def test_file_stores_need_no_opt_in(tmp_path, monkeypatch):
    where = _on(tmp_path, "lustre", monkeypatch)
    cache = cache_from_config({"template": "cloudpickle", "root": str(where / "c")})
    assert cache.load_value(cache.save(Call("f", {"x": 1}, result=3))) == 3


def test_opting_in_by_table_or_environment(tmp_path, monkeypatch):
    where = _on(tmp_path, "nfs4", monkeypatch)
    toml = tmp_path / "fleche.toml"
    toml.write_text(
        f"""
[sql_here]
template = "sql"
root = "{where}/sql"
allow_network_fs = true

[arrays]
values = {{ type = "hdf5", path = "{where}/v.h5", allow_network_fs = true }}
calls = {{ type = "hdf5", path = "{where}/c.h5", allow_network_fs = true }}
"""
    )
    from fleche_remote.config import cache_to_config, load_config

    config = load_config(toml)
    for name in ("sql_here", "arrays"):
        cache = cache_from_config(config[name], name=name, source=toml)
        assert cache.load_value(cache.save(Call("f", {"x": name}, result=name))) == name
        assert cache_to_config(cache)["calls"]["allow_network_fs"] is True  # type: ignore[index,call-overload]
        cache.close()

    monkeypatch.setenv(_fs.ENV_ALLOW, "1")
    cache = cache_from_config({"template": "hdf5", "root": str(where / "env")})
    assert cache.load_value(cache.save(Call("f", {"x": 1}, result=5))) == 5
    monkeypatch.setenv(_fs.ENV_ALLOW, "0")
    with pytest.raises(ConfigError, match="HDF5"):
        cache_from_config({"template": "hdf5", "root": str(where / "env")})
    with pytest.raises(ConfigError, match="allow_network_fs must be true or false, got 'yes'"):
        cache_from_config({"template": "sql", "root": str(where / "x"), "allow_network_fs": "yes"})


def test_real_tmpfs_in_a_private_mount_namespace(tmp_path):
    """Mount two nested tmpfs for real (in a mount namespace of their own,
    so nothing leaks) and read the real /proc/self/mountinfo."""
    outer = tmp_path / "outer"
    inner = outer / "inner"
    sibling = tmp_path / "outer2"
    for d in (outer, sibling):
        d.mkdir()
    script = f"""
import json, os
from fleche_remote.storage.fs import mount_of, network_mount
from fleche_remote.config import cache_from_config
from fleche_remote import Call
os.mkdir({str(inner)!r})
os.system("mount -t tmpfs -o size=4m fleche-inner {inner}")
cache = cache_from_config({{"template": "sql", "root": {str(inner / "c")!r}}})
key = cache.save(Call("f", {{"x": 1}}, result="on tmpfs"))
print(json.dumps({{
    "outer": mount_of({str(outer / "a" / "calls.db")!r}),
    "inner": mount_of({str(inner / "c" / "calls.db")!r}),
    "sibling": mount_of({str(sibling / "x")!r}),
    "network": network_mount({str(inner)!r}),
    "loaded": cache.load_value(key),
}}))
"""
    env = {k: v for k, v in os.environ.items() if k not in (_fs.ENV_MOUNT_TABLE, _fs.ENV_ALLOW)}
    proc = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            'mount -t tmpfs -o size=4m fleche-outer "$1" && exec "$2" -c "$3"',
            "sh",
            str(outer),
            sys.executable,
            script,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["outer"] == [str(outer), "tmpfs"]
    assert found["inner"] == [str(inner), "tmpfs"]
    assert found["sibling"][0] != str(outer)
    assert found["network"] is None
    assert found["loaded"] == "on tmpfs"
    assert not any(outer.iterdir())  # the mounts were private to that namespace


def test_server_refuses_a_sqlite_cache_on_lustre_through_ssh(sshd, tmp_path):
    remote = remote_dir(tmp_path, SQL_TOML)
    table = tmp_path / "mountinfo"
    table.write_text(f"27 1 254:0 / / rw - ext4 /dev/vda rw\n70 27 0:60 / {remote} rw - lustre fs rw\n")
    export = f"export {_fs.ENV_MOUNT_TABLE}={table}"
    cache = ssh_cache(sshd, remote, setup_commands=[export])
    try:
        with pytest.raises(Exception) as info:
            cache.save(Call("f", {"x": 1}, result=1))
        message = str(info.value)
        assert "lustre" in message and "PostgreSQL" in message and "allow_network_fs" in message, message
    finally:
        cache.close()
    assert not (remote / "store").exists()

    cache = ssh_cache(sshd, remote, setup_commands=[export, f"export {_fs.ENV_ALLOW}=1"])
    try:
        assert cache.load_value(cache.save(Call("f", {"x": 1}, result=1))) == 1
    finally:
        cache.close()


# -- temp files of killed writers --------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_collect_garbage_removes_dead_writers_temp_files_only(tmp_path):
    cache = cache_from_config({"template": "cloudpickle", "root": str(tmp_path / "c")})
    key = cache.save(Call("f", {"x": 1}, result="kept"))
    shard = next((tmp_path / "c" / "values").iterdir())
    name = "ab" * 32
    day_ago = time.time() - 2 * 24 * 3600
    files = {
        "dead": f".{name}.{_fs.HOST}.{_dead_pid()}.0a1b2c3d.tmp",
        "live": f".{name}.{_fs.HOST}.{os.getpid()}.0a1b2c3d.tmp",
        "foreign_new": f".{name}.othernode-17.4242.0a1b2c3d.tmp",
        "foreign_old": f".{name}.othernode-17.4243.0a1b2c3d.tmp",
        "unknown_new": f".{name}.k2j3h4g5.tmp",  # a temp name of an older version
        "unknown_old": f".{name}.z9y8x7w6.tmp",
    }
    for label, fname in files.items():
        (shard / fname).write_bytes(b"partial")
        if label.endswith("_old"):
            os.utime(shard / fname, (day_ago, day_ago))

    assert cache.collect_garbage() == 3
    left = {label for label, fname in files.items() if (shard / fname).exists()}
    assert left == {"live", "foreign_new", "unknown_new"}
    assert cache.load_value(key) == "kept"
    assert [k for k in cache.calls.keys()] == [key]  # type: ignore[attr-defined]


WRITER = """
import sys, time
from fleche_remote.storage.file import FileValueStore
from fleche_remote.codec.values import StreamBlob

def body():
    yield b"x" * 65536
    print("writing", flush=True)
    time.sleep(600)
    yield b"x"

FileValueStore(sys.argv[1]).put("cd" * 32, StreamBlob("bytes", {}, 65537, body()))
"""


def test_a_killed_writers_temp_file_is_collected_but_never_a_live_ones(tmp_path):
    root = tmp_path / "c" / "values"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "writing"  # mid-write, temp file open
        temps = list((root / "cd").glob(".*.tmp"))
        assert [t.name.split(".")[3] for t in temps] == [str(writer.pid)]
        assert _fs.temp_owner(temps[0].name) == (_fs.HOST, writer.pid)
        cache = cache_from_config({"template": "cloudpickle", "root": str(tmp_path / "c")})
        assert cache.collect_garbage() == 0  # the writer is alive: its file stays
        assert temps[0].exists()
        assert not cache.values.contains("cd" * 32)  # type: ignore[attr-defined]

        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=60)
        assert temps[0].exists()  # what kill -9 leaves behind
        assert cache.collect_garbage() == 1
        assert not list((root / "cd").iterdir())
        assert not cache.values.contains("cd" * 32)  # type: ignore[attr-defined]
    finally:
        writer.kill()
        writer.wait(timeout=60)
