"""The write-behind journal: which saves a slow layer has yet to receive.

The journal is ``$XDG_STATE_HOME/fleche-remote/write-behind/<id>.journal``
(``~/.local/state/...`` by default), ``<id>`` a hash of the two layers'
configs, so every process pairing the same local layer with the same
remote shares it. A first layer in memory dies with the process, so its
journal is kept in memory too.

The journal decides what is pushed, so it must be ours alone: its
directory is made 0700 whatever the umask, and it is opened without
following a symlink and without blocking (a FIFO), then must be a regular
file owned by the user and writable by nobody else. Anything else is a
:class:`~fleche_remote.errors.ConfigError` when write-behind starts, before
anything is saved.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
import threading
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

from ..errors import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: one process per journal
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("fleche_remote.writebehind")

#: Rewrite the journal with only its live keys once it is this big (about
#: 15,000 lines), checked by every process after it strikes keys out: a
#: journal shared by many short jobs, none of which writes much, must still
#: be compacted. Rewriting is reading and writing ~1 MiB, under the lock.
COMPACT_BYTES = 1 << 20

_KEY_CHARS = frozenset("0123456789abcdef")

#: Opening the journal never follows a symlink (whose target compaction
#: would replace) and never waits on a FIFO (with no writer it blocks).
_OPEN_FLAGS = (
    os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
)


def default_journal_dir() -> Path:
    """Where journals live unless a path is given: the XDG state directory,
    because a journal is state to keep (a cache directory may be wiped)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "fleche-remote" / "write-behind"


def _replay(data: bytes, where: object = "journal") -> List[str]:
    """The live keys of a journal's bytes. Lines edited by hand or on
    another system (CRLF, upper-case hex) count; a line that still cannot
    be read (one a crash tore, or garbage) is reported and skipped."""
    live: Dict[str, None] = {}
    for number, raw in enumerate(data.split(b"\n"), 1):
        line = raw.rstrip(b"\r").decode("ascii", "replace").strip()
        if not line or line.startswith("#"):
            continue  # the header
        sign, key = line[0], line[1:].lower()
        if sign not in "+-" or len(key) != 64 or not set(key) <= _KEY_CHARS:
            log.warning(
                "write-behind journal %s, line %d: %r is not +KEY or -KEY (a crash can tear the line it "
                "was writing); skipped",
                where,
                number,
                line[:80],
            )
        elif sign == "+":
            live[key] = None
        else:
            live.pop(key, None)
    return list(live)


def _make_private_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents with mode 0700, whatever the
    umask (``mkdir(parents=True)`` gives parents the umask's modes)."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
        else:
            os.chmod(directory, 0o700)  # mkdir's mode went through the umask


def _what(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _open_journal(path: Path) -> int:
    """An fd on the journal at ``path``, created if missing; only a regular
    file owned by this user and writable by nobody else.

    Raises:
        ConfigError: anything else is at ``path`` (what, and the fix).
    """
    _make_private_dirs(path.parent)
    fix = "move it away (a new journal is then made), or give write_behind another journal path"
    try:
        fd = os.open(path, _OPEN_FLAGS | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError as exc:
        found = os.lstat(path).st_mode if os.path.lexists(path) else None
        what = _what(found) if found is not None else exc.strerror
        raise ConfigError(
            f"the write-behind journal {path} must be a regular file, and it is {what}: {fix}", key="journal"
        ) from None
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = f"it is {_what(st.st_mode)}"
    elif st.st_uid != os.geteuid():
        problem = f"it is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    elif st.st_mode & 0o022:
        mode = stat.S_IMODE(st.st_mode)
        problem = f"it is writable by group or others (mode {mode:03o}), who decide what is pushed"
        fix = f"if all of it is yours, `chmod 600 {path}`; else {fix}"
    if problem is not None:
        os.close(fd)
        raise ConfigError(
            f"the write-behind journal {path} must be a regular file that only this user can write, "
            f"and {problem}: {fix}",
            key="journal",
        )
    return fd


@contextlib.contextmanager
def _flocked(fd: int, exclusive: bool) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover
        yield
        return
    fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    parts, offset = [], 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        parts.append(chunk)
        offset += len(chunk)
    return b"".join(parts)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Journal:
    """Keys saved locally and not yet pushed, in a small append-only file.

    Lines are ``+KEY`` (queued) and ``-KEY`` (arrived); the live keys are
    the replay. Every write holds an exclusive ``flock``, so processes
    sharing a journal interleave whole lines. Compaction, under the same
    lock, writes the live keys to a temp file and renames it over the
    journal (a kill mid-way leaves the old one whole, where rewriting in
    place could leave it empty); so whoever takes the lock checks first
    that its fd is still the file at the path, and reopens it if not.

    Args:
        path: the file (created on first write); None keeps it in memory.
        header: a comment line naming what the journal is for.
    """

    def __init__(self, path: Optional[Path], header: str = "") -> None:
        self.path = path
        self._header = f"# {header}\n".encode() if header else b""
        self._lock = threading.Lock()
        self._fd: Optional[int] = None
        self._memory: Dict[str, None] = {}

    def __repr__(self) -> str:
        return f"Journal({str(self.path) if self.path else 'in memory'})"

    def open(self) -> None:
        """Open (and create) the file now, so that a journal that cannot
        be trusted fails before anything is saved.

        Raises:
            ConfigError: the path holds something other than a regular
                file that only this user can write.
        """
        with self._lock:
            if self.path is not None:
                self._open()

    def _open(self) -> int:
        if self._fd is None:
            assert self.path is not None
            self._fd = _open_journal(self.path)
        return self._fd

    def _is_current(self, fd: int) -> bool:
        assert self.path is not None
        try:
            now = os.lstat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)

    @contextlib.contextmanager
    def _locked(self, exclusive: bool) -> Iterator[int]:
        """The journal's fd, under its flock, once it is the file at the
        path (another process's compaction may have replaced it)."""
        while True:
            fd = self._open()
            with _flocked(fd, exclusive):
                if self._is_current(fd):
                    yield fd
                    return
            os.close(fd)
            self._fd = None

    def add(self, keys: Sequence[str]) -> None:
        """Record ``keys`` as saved and not yet pushed."""
        self._append("+", keys)

    def remove(self, keys: Sequence[str]) -> None:
        """Record ``keys`` as pushed (or as nothing left to push)."""
        self._append("-", keys)

    def _append(self, sign: str, keys: Sequence[str]) -> None:
        if not keys:
            return
        with self._lock:
            if self.path is None:
                for key in keys:
                    if sign == "+":
                        self._memory[str(key)] = None
                    else:
                        self._memory.pop(str(key), None)
                return
            data = "".join(f"{sign}{key}\n" for key in keys).encode("ascii")
            with self._locked(exclusive=True) as fd:
                size = os.fstat(fd).st_size
                if size == 0:
                    data = self._header + data
                elif os.pread(fd, 1, size - 1) != b"\n":
                    data = b"\n" + data  # a crash tore the last line: start afresh
                _write_all(fd, data)
                if sign == "-" and size + len(data) >= COMPACT_BYTES:
                    self._compact_locked(fd)

    def _compact_locked(self, fd: int) -> None:
        assert self.path is not None
        live = _replay(_read_all(fd), self.path)
        # a temp file next to it, renamed over it: os.replace swaps the
        # name and never writes through a symlink that appeared there
        tmp_fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            _write_all(tmp_fd, self._header + "".join(f"+{key}\n" for key in live).encode("ascii"))
            os.fsync(tmp_fd)
            os.replace(tmp, self.path)
        except BaseException:
            os.close(tmp_fd)
            os.unlink(tmp)
            raise
        os.close(tmp_fd)
        # ours stays locked until the caller lets go; the next use of the
        # journal sees that it is no longer the file at the path, and reopens

    def live(self) -> List[str]:
        """Keys added and not removed, oldest first."""
        with self._lock:
            if self.path is None:
                return list(self._memory)
            if self._fd is None and not os.path.lexists(self.path):
                return []
            with self._locked(exclusive=False) as fd:
                return _replay(_read_all(fd), self.path)

    def compact(self) -> None:
        """Rewrite the file with only its live keys."""
        with self._lock:
            if self.path is None or (self._fd is None and not os.path.lexists(self.path)):
                return
            with self._locked(exclusive=True) as fd:
                self._compact_locked(fd)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
