"""File modes and file-system checks for the stores that keep files.

Two things matter once a cache lives where other users or other machines
reach it, and both are store options in fleche.toml:

``shared`` (modes). Stored files and directories are created with the
process's umask applied, as any other file (a umask of 022 lets everyone
read, 077 nobody but the owner). ``shared = "group"`` sets group read and
write on every file and directory a store creates, whatever the umask,
and the setgid bit on directories so that new files take the directory's
group: git's ``core.sharedRepository = group``, for a project group on a
cluster. ``shared = "all"`` also lets everyone read. The bits are added to
what the umask gives, never taken away. Files created by a library
(SQLite's database, its -wal and -shm; an HDF5 file and its lock) get the
same bits.

``allow_network_fs`` (where). SQLite's locking is unreliable on NFS, and
on Lustre, GPFS and other parallel or network file systems ``flock`` may
succeed for every process at once (unless mounted with cluster-wide
locking), while WAL's shared memory never reaches another node. Jobs on
several nodes writing one SQLite or HDF5 cache there corrupt it without an
error. So those stores refuse a path on such a file system (found in the
mount table: the longest mount point that is a prefix of the path, and
its type) unless the user opts in with ``allow_network_fs = true`` or
:data:`ENV_ALLOW`. File stores need no opt-in: each write is a temp file
named after its host and process, then an ``os.replace``, which is atomic
there too.

This module imports nothing beyond the standard library.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import socket
import stat
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from ..errors import ConfigError

#: ``shared`` values and the permission bits each adds to files and to
#: directories (2000 is setgid: files created inside take the directory's
#: group, so the whole tree stays in the project group).
SHARED_BITS: Dict[str, Tuple[int, int]] = {
    "umask": (0, 0),
    "group": (0o660, 0o2770),
    "all": (0o664, 0o2775),
}

#: The table keys every file-backed store understands.
FS_KEYS = ("shared", "allow_network_fs")

#: Set to 1 (or true, yes) to allow SQLite and HDF5 stores on network and
#: parallel file systems for every store of the process (see the module
#: docstring), as ``allow_network_fs = true`` does for one.
ENV_ALLOW = "FLECHE_REMOTE_ALLOW_NETWORK_FS"

#: A mount table to read instead of /proc/self/mountinfo: for tests, and
#: for containers whose /proc shows another namespace's mounts.
ENV_MOUNT_TABLE = "FLECHE_REMOTE_MOUNT_TABLE"

#: Where the kernel lists mounts; the first is preferred (it escapes
#: mount points the same way, and survives chroots better).
MOUNT_TABLES = ("/proc/self/mountinfo", "/proc/mounts")

#: File-system types (as the mount table names them) where locks or shared
#: memory do not coordinate processes on different machines: network file
#: systems (NFS, SMB, 9p, sshfs, ...) and parallel ones (Lustre, GPFS,
#: BeeGFS, Ceph, ...). Any type starting with "nfs" counts too.
NETWORK_FS_TYPES = frozenset(
    {
        "9p",
        "afs",
        "beegfs",
        "ceph",
        "cifs",
        "davfs",
        "fuse.beegfs",
        "fuse.ceph-fuse",
        "fuse.cephfs",
        "fuse.gcsfuse",
        "fuse.glusterfs",
        "fuse.juicefs",
        "fuse.lizardfs",
        "fuse.moosefs",
        "fuse.rclone",
        "fuse.s3fs",
        "fuse.sshfs",
        "gfs2",
        "glusterfs",
        "gpfs",
        "lustre",
        "ncpfs",
        "ocfs2",
        "orangefs",
        "panfs",
        "pvfs2",
        "quobyte",
        "smb3",
        "smbfs",
        "wekafs",
    }
)

#: A temp file of another host is removed by garbage collection once it is
#: this old (its mtime; a live writer keeps touching it as it writes). No
#: process on this host can tell whether a writer over there is alive, and a
#: day is far beyond any single write and any clock skew between nodes.
FOREIGN_TEMP_AGE_S = 24 * 3600.0


def _host_tag() -> str:
    # dots separate the fields of a temp name, so the host name has none
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:64] or "host"


HOST = _host_tag()


class FsPolicy(NamedTuple):
    """A store's ``shared`` and ``allow_network_fs`` options.

    Args:
        shared: "umask" (the default: modes as the umask gives), "group"
            or "all"; see the module docstring.
        allow_network_fs: let an SQLite or HDF5 store live on a network
            or parallel file system.
    """

    shared: str = "umask"
    allow_network_fs: bool = False

    @classmethod
    def from_table(cls, table: Dict[str, Any], where: str) -> FsPolicy:
        """The options of a store's config table (its other keys are ignored here)."""
        shared = table.get("shared", "umask")
        if shared not in SHARED_BITS:
            raise ConfigError(
                f"{where}: shared must be one of {', '.join(repr(s) for s in SHARED_BITS)}, got {shared!r}",
                key="shared",
            )
        allow = table.get("allow_network_fs", False)
        if not isinstance(allow, bool):
            raise ConfigError(
                f"{where}: allow_network_fs must be true or false, got {allow!r}", key="allow_network_fs"
            )
        return cls(shared, allow)

    def check(self) -> FsPolicy:
        """``self``, after refusing a ``shared`` value it does not know."""
        if self.shared not in SHARED_BITS:
            raise ConfigError(
                f"shared must be one of {', '.join(repr(s) for s in SHARED_BITS)}, got {self.shared!r}",
                key="shared",
            )
        return self

    def to_config(self) -> Dict[str, Any]:
        """The keys that differ from the defaults, for a store's ``to_config``."""
        cfg: Dict[str, Any] = {}
        if self.shared != "umask":
            cfg["shared"] = self.shared
        if self.allow_network_fs:
            cfg["allow_network_fs"] = True
        return cfg

    # -- modes ------------------------------------------------------------------------

    def fix_fd(self, fd: int) -> None:
        """Add the shared bits to a file this process just created."""
        bits = SHARED_BITS[self.shared][0]
        if bits:
            mode = os.fstat(fd).st_mode & 0o7777
            if mode | bits != mode:
                os.fchmod(fd, mode | bits)

    def fix_path(self, path: str | os.PathLike[str]) -> None:
        """Add the shared bits to a file a library created (SQLite, HDF5).

        Only a file this user owns is changed: another member of the group
        made theirs with the same option already.
        """
        bits = SHARED_BITS[self.shared][0]
        if not bits:
            return
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return
        mode = st.st_mode & 0o7777
        if mode | bits != mode and st.st_uid == os.geteuid():
            os.chmod(path, mode | bits)

    def make_dirs(self, path: str | os.PathLike[str]) -> None:
        """``mkdir -p path``, giving each directory it creates the shared bits."""
        try:
            os.mkdir(path, 0o777)
        except FileExistsError:
            return
        except FileNotFoundError:
            parent = os.path.dirname(os.fspath(path))
            if not parent or parent == os.fspath(path):
                raise
            self.make_dirs(parent)
            try:
                os.mkdir(path, 0o777)
            except FileExistsError:
                return
        bits = SHARED_BITS[self.shared][1]
        if bits:
            mode = os.stat(path).st_mode & 0o7777
            if mode | bits != mode:
                os.chmod(path, mode | bits)

    def create(self, path: str | os.PathLike[str]) -> bool:
        """Create ``path`` empty (with its directories) if it does not exist,
        with the umask and the shared bits; whether this call created it.

        SQLite makes a new database 0644 whatever the umask, and its -wal
        and -shm copy the database's mode; creating the file first is how
        the umask and ``shared`` reach all three.
        """
        self.make_dirs(os.path.dirname(os.fspath(path)) or ".")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            return False
        try:
            self.fix_fd(fd)
        finally:
            os.close(fd)
        return True

    # -- where ------------------------------------------------------------------------

    def check_local(self, path: str | os.PathLike[str], what: str, fix: str) -> None:
        """Refuse ``path`` on a network or parallel file system, unless allowed.

        Args:
            path: the file the store will keep (it need not exist yet).
            what: what the file is, for the message ("an SQLite database").
            fix: what to use instead, for the message.

        Raises:
            ConfigError: the path is on such a file system and neither
                ``allow_network_fs`` nor :data:`ENV_ALLOW` allows it.
        """
        if self.allow_network_fs or _env_allows():
            return
        mount = network_mount(path)
        if mount is not None:
            raise ConfigError(
                f"refusing to keep {what} at {os.fspath(path)}: it is on a network or parallel file "
                f"system ({mount.fstype}, mounted at {mount.point}), where locks do not keep writers on "
                f"different machines "
                f"apart, so concurrent jobs could corrupt it without an error. {fix} "
                f"If only processes of one machine ever write it, set allow_network_fs = true in "
                f"the store's table (or {ENV_ALLOW}=1 in the environment).",
                key="allow_network_fs",
            )


#: The defaults: modes as the umask gives, no network file systems.
DEFAULT_FS = FsPolicy()


def _env_allows() -> bool:
    return os.environ.get(ENV_ALLOW, "").strip().lower() in ("1", "true", "yes", "on")


# -- the mount table -------------------------------------------------------------------


class Mount(NamedTuple):
    """One line of the mount table: where, and which file-system type."""

    point: str
    fstype: str


def _unescape(field: str) -> str:
    # the kernel writes space, tab, newline and backslash as \040 \011 \012 \134
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mount_table(text: str) -> List[Mount]:
    """Mounts from /proc/self/mountinfo or /proc/mounts text (either format)."""
    mounts: List[Mount] = []
    for line in text.splitlines():
        if " - " in line:  # mountinfo: ID PARENT MAJ:MIN ROOT POINT OPTS [TAGS...] - TYPE SOURCE OPTS
            left, _, right = line.partition(" - ")
            fields, rest = left.split(), right.split()
            if len(fields) >= 5 and rest:
                mounts.append(Mount(_unescape(fields[4]), rest[0]))
        else:  # mounts / fstab: SOURCE POINT TYPE OPTS ...
            fields = line.split()
            if len(fields) >= 3 and not fields[0].startswith("#"):
                mounts.append(Mount(_unescape(fields[1]), fields[2]))
    return mounts


def read_mount_table(table: Optional[str] = None) -> List[Mount]:
    """The mounts of this process: ``table``, else :data:`ENV_MOUNT_TABLE`,
    else the first readable of :data:`MOUNT_TABLES`; empty when none is."""
    chosen = table or os.environ.get(ENV_MOUNT_TABLE)
    for candidate in (chosen,) if chosen else MOUNT_TABLES:
        try:
            with open(candidate, encoding="utf-8", errors="surrogateescape") as fh:
                return parse_mount_table(fh.read())
        except OSError:
            continue
    return []


def _real(path: str | os.PathLike[str]) -> str:
    """``path`` with symlinks resolved as far as it exists (it may not yet)."""
    path = os.path.abspath(os.fspath(path))
    missing: List[str] = []
    while not os.path.lexists(path):
        head, tail = os.path.split(path)
        if head == path:
            break
        missing.append(tail)
        path = head
    return os.path.join(os.path.realpath(path), *reversed(missing))


def mount_of(path: str | os.PathLike[str], table: Optional[str] = None) -> Optional[Mount]:
    """The mount that holds ``path``: the longest mount point that is a
    prefix of its real path (the last listed, when one is mounted over another)."""
    real = _real(path)
    best: Optional[Mount] = None
    for mount in read_mount_table(table):
        point = mount.point.rstrip("/") or "/"
        if point == "/" or real == point or real.startswith(point + "/"):
            if best is None or len(point) >= len(best.point.rstrip("/") or "/"):
                best = mount
    return best


def is_network_fs(fstype: str) -> bool:
    """Whether a file-system type is one of :data:`NETWORK_FS_TYPES`."""
    fstype = fstype.lower()
    return fstype in NETWORK_FS_TYPES or fstype.startswith("nfs")


def network_mount(path: str | os.PathLike[str], table: Optional[str] = None) -> Optional[Mount]:
    """The mount holding ``path`` if it is a network or parallel file system."""
    mount = mount_of(path, table)
    return mount if mount is not None and is_network_fs(mount.fstype) else None


# -- temp files ------------------------------------------------------------------------


def temp_name(final: str) -> str:
    """A hidden temp name beside ``final``: ``.FINAL.HOST.PID.RANDOM.tmp``.

    Host and pid say who is writing, so that garbage collection can remove
    what a dead writer left and never touch a live writer's file; the
    random part keeps two threads of one process apart.
    """
    return f".{final}.{HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def temp_owner(name: str) -> Optional[Tuple[str, int]]:
    """(host, pid) of a temp file named by :func:`temp_name`, else ``None``."""
    if not name.startswith(".") or not name.endswith(".tmp"):
        return None
    parts = name.rsplit(".", 4)
    if len(parts) != 5 or not parts[2].isdigit() or not re.fullmatch(r"[A-Za-z0-9_-]+", parts[1]):
        return None
    return parts[1], int(parts[2])


def temp_is_stale(name: str, mtime: float, now: float, foreign_age: float = FOREIGN_TEMP_AGE_S) -> bool:
    """Whether a temp file may be removed: its writer, on this host, is
    dead; or it is another host's (or of unknown origin) and older than
    ``foreign_age`` seconds. A live writer's file on this host is never stale."""
    owner = temp_owner(name)
    if owner is not None and owner[0] == HOST:
        return not _alive(owner[1])
    return now - mtime > foreign_age


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


# -- permission errors -----------------------------------------------------------------


def permission_error(path: str | os.PathLike[str], what: str) -> PermissionError:
    """A PermissionError that says which part of ``path`` this user cannot
    reach, whose it is, and how the owner can share the cache."""
    target = Path(os.path.abspath(os.fspath(path)))
    blocked, need = target, "read"
    for part in [*reversed(target.parents), target]:
        try:
            st = os.stat(part)
        except PermissionError:
            continue  # its parent is the one that blocks, reported below
        except OSError:
            break
        if stat.S_ISDIR(st.st_mode):
            if part != target and not os.access(part, os.X_OK):
                blocked, need = part, "enter"
                break
            if part == target and not os.access(part, os.R_OK | os.X_OK):
                blocked, need = part, "list"
                break
        elif not os.access(part, os.R_OK):
            blocked, need = part, "read"
            break
    me = _user_name(os.geteuid())
    try:
        st = os.stat(blocked)
        detail = (
            f"{blocked} is {stat.filemode(st.st_mode)} {_user_name(st.st_uid)}, "
            f"which user {me} may not {need}"
        )
    except OSError:
        detail = f"user {me} may not reach {blocked}"
    return PermissionError(
        errno.EACCES,
        f"cannot read {what} {os.fspath(path)}: {detail}. The cache's owner can share it with "
        f'shared = "group" (or "all") in the store\'s table, or by writing it under a umask '
        f"of 022 (or 002); for what is already written, chmod -R g+rX (or a+rX) the directory",
        os.fspath(path),
    )


def _user_name(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return f"uid {uid}"
