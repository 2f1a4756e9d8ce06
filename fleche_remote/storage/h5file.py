"""One HDF5 file, opened only under its lock (for :mod:`.hdf5`'s stores).

Concurrency. HDF5 itself has no concurrent writers (SWMR allows one
writer and readers that opened earlier, and cannot add objects
safely). So every operation takes an ``fcntl.flock`` on a lock file beside
the data (``<path>.lock``): exclusive to write, shared to read. Under the
lock the HDF5 file is opened, used and closed again, so each operation
sees what other processes committed before it, and no process ever holds
the file open while another writes it. A new entry is written under a
temporary name (``.incoming``) and moved to its real name as the last step,
so an entry whose body fails half-way (a truncated stream, a digest that
does not verify) is deleted, never visible.

Threads. A flock belongs to an open file description, and h5py must not
open one file twice in a process, so within a process every operation on
a file also holds a per-file ``threading.Lock`` (shared by every store on
that path, as values and calls may share a file) around the flock: threads
of one process take turns, processes take turns through the flock. The
locks are renewed in a fork child, where a thread of the parent may have
held one.

The kernel drops a flock when its holder dies, so a crashed process
leaves no stale lock. Writers wait at most ``lock_timeout`` seconds, then
raise. A program that keeps the .h5 open outside this store (an h5py
session, HDFView) makes writers fail at once with a StorageError, as
HDF5's own file lock refuses them: close it first.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, Optional

import h5py

from ..errors import StorageError
from .fs import DEFAULT_FS, FsPolicy, permission_error

# one lock per file (by real path) per process; see "Threads" above
_THREAD_LOCKS: Dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


def _thread_lock(path: Path) -> threading.Lock:
    key = os.path.realpath(path)
    with _THREAD_LOCKS_GUARD:
        lock = _THREAD_LOCKS.get(key)
        if lock is None:
            lock = _THREAD_LOCKS[key] = threading.Lock()
        return lock


def _renew_locks_after_fork() -> None:
    global _THREAD_LOCKS_GUARD
    _THREAD_LOCKS_GUARD = threading.Lock()
    _THREAD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_locks_after_fork)


class H5File:
    """One HDF5 file guarded by ``<path>.lock``; see the module docstring."""

    def __init__(self, path: Path, lock_timeout: float, fs: FsPolicy = DEFAULT_FS) -> None:
        self.path = path
        self.lock_path = Path(str(path) + ".lock")
        self.lock_timeout = lock_timeout
        self.fs = fs

    @contextmanager
    def _this_process(self) -> Iterator[None]:
        """This file's lock among the threads of this process."""
        lock = _thread_lock(self.path)
        if not lock.acquire(timeout=self.lock_timeout):
            raise StorageError(
                errno.ETIMEDOUT,
                f"another thread kept {self.path} busy for {self.lock_timeout:g} s; "
                f"expected it to finish its operation",
            )
        try:
            yield
        finally:
            lock.release()

    def _lock(self, fd: int, exclusive: bool) -> None:
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.0005
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            if time.monotonic() >= deadline:
                raise StorageError(
                    errno.ETIMEDOUT,
                    f"could not lock {self.lock_path} ({'exclusive' if exclusive else 'shared'}) "
                    f"within {self.lock_timeout:g} s; expected the process holding it to finish",
                )
            # polling rather than a blocking flock, so that the wait can time
            # out without signals (which would not be thread-safe)
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def _open_lock_fd(self, exclusive: bool) -> Optional[int]:
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        if exclusive:
            try:
                self.fs.make_dirs(self.path.parent)
                fd = os.open(self.lock_path, flags, 0o666)
                self.fs.fix_path(self.lock_path)
                return fd
            except OSError as exc:
                raise StorageError(
                    exc.errno, f"cannot create the lock file {self.lock_path} to write {self.path}: {exc}"
                ) from exc
        try:
            return os.open(self.lock_path, flags, 0o666)
        except OSError:
            try:  # a read-only share: lock if the file is there, else no one writes
                return os.open(self.lock_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                return None

    @contextmanager
    def open(self, write: bool) -> Iterator[Optional[h5py.File]]:
        """The file, open under the lock; ``None`` when reading a file that doesn't exist."""
        with self._this_process(), self._open_locked(write) as f:
            yield f

    @contextmanager
    def _open_locked(self, write: bool) -> Iterator[Optional[h5py.File]]:
        fd = self._open_lock_fd(write)
        try:
            if fd is not None:
                self._lock(fd, write)
            if not write and not self._exists():
                yield None
                return
            try:
                f = h5py.File(self.path, "a" if write else "r")
            except OSError as exc:
                if not os.access(self.path, os.R_OK):
                    raise permission_error(self.path, "the HDF5 file") from None
                raise StorageError(
                    f"cannot open {self.path} as an HDF5 file ({'a' if write else 'r'}): {exc}"
                )
            if write:
                self.fs.fix_path(self.path)
            try:
                yield f
            finally:
                f.close()  # before the lock goes: the next holder must see our writes
        finally:
            if fd is not None:
                os.close(fd)  # releases the flock

    def _exists(self) -> bool:
        try:
            os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except PermissionError:
            raise permission_error(self.path, "the HDF5 file") from None
        return True
