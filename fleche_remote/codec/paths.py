"""``pathlib.Path`` arguments keyed by what they name, not by their spelling.

A function that reads ``data.csv`` must not return last week's result after
the file changed, so a concrete :class:`pathlib.Path` argument enters a call
key as its final name plus the digest of the bytes it names:

* a **file**: its content, hashed under the same body rule as every other
  byte string (SHA-256 below :data:`~fleche_remote.codec.bodyhash.BULK_THRESHOLD`,
  XXH3-128 from there on), read in 1 MiB chunks;
* a **directory**: its whole tree, every entry's path relative to it, its
  kind, and each file's content, in sorted order (hidden entries included;
  symbolic links to directories are recorded by their target text, not
  followed, so a tree with a link cycle still hashes);
* **anything else** (a path that does not exist yet, such as an output a
  function is about to write, a socket, a FIFO that reading would block
  on): keyed by its path, exactly as a :class:`~pathlib.PurePath` is. The
  encodings differ by tag, so such a key never equals a content key.

The directory a file sits in is not part of the key: the same data at
``/scratch/me/run1/data.csv`` on the cluster and ``~/run1/data.csv`` on the
laptop is the same argument. Its *name* is: a function that parses by
suffix would otherwise mistake ``a.json`` for ``a.csv`` of equal bytes.
:class:`~pathlib.PurePath` objects name no file and stay keyed by their
spelling.

Re-hashing a 10 GiB file on every call would cost seconds, so digests are
remembered per file, keyed by ``(absolute path, device, inode, size,
mtime_ns, ctime_ns)``: any write changes the size or a timestamp, and a
replaced file (``os.replace``) has another inode. A file modified within
:data:`RACY_SECONDS` of the lookup is not remembered, because a second
write in the same timestamp tick would leave every field equal (git's
"racily clean" problem); such a file is simply hashed again next time.

Keys are computed by the client. Over ssh this is a local question: the
server never sees a path, and never reads a file on the client's behalf.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Tuple

from .bodyhash import DIGEST_SCHEME, BodyHasher

log = logging.getLogger("fleche_remote.paths")

#: Files modified less than this long before a lookup are hashed again on
#: the next lookup instead of being remembered. Two seconds covers the
#: coarsest timestamps in use (FAT's 2 s; NFS servers may round to 1 s).
RACY_SECONDS = 2.0

#: File digests remembered at most (least recently used dropped first).
#: An entry is ~200 bytes, so the table stays well under a megabyte.
STAT_CACHE_SIZE = 4096

#: Bytes read from a file at a time while hashing it.
READ_CHUNK = 1 << 20

#: Attempts at hashing a file that keeps changing while it is read.
_READ_ATTEMPTS = 3

_FILE_PREFIX = hashlib.sha256(DIGEST_SCHEME + b"path-file\x00")
_TREE_PREFIX = hashlib.sha256(DIGEST_SCHEME + b"path-tree\x00")

_StatKey = Tuple[str, int, int, int, int, int]


class PathCacheInfo(NamedTuple):
    """How the file-digest memory has served so far (as ``lru_cache`` reports).

    Attributes:
        hits: file digests answered from memory, without reading the file.
        misses: files read and hashed.
        entries: digests held now.
    """

    hits: int
    misses: int
    entries: int


class _StatCache:
    """File digests by ``(path, dev, inode, size, mtime_ns, ctime_ns)``, LRU-bounded."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[_StatKey, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: _StatKey) -> Optional[bytes]:
        with self._lock:
            found = self._data.get(key)
            if found is not None:
                self._data.move_to_end(key)
                self.hits += 1
            return found

    def put(self, key: _StatKey, digest: bytes) -> None:
        with self._lock:
            self._data[key] = digest
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def info(self) -> PathCacheInfo:
        with self._lock:
            return PathCacheInfo(self.hits, self.misses, len(self._data))

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.hits = self.misses = 0


_memory = _StatCache(STAT_CACHE_SIZE)


def path_cache_info() -> PathCacheInfo:
    """Hits, misses and size of this process's memory of file digests."""
    return _memory.info()


def clear_path_cache() -> None:
    """Forget every remembered file digest (and reset the counters)."""
    _memory.clear()


def _stat_key(path: str, st: os.stat_result) -> _StatKey:
    return (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_digest(path: str, st: Optional[os.stat_result] = None) -> bytes:
    """The 32-byte content digest of the regular file at ``path``.

    Args:
        path: an absolute path.
        st: its ``os.stat`` result, if the caller has it already.

    Raises:
        OSError: the file cannot be read (the message names it).
    """
    if st is None:
        st = os.stat(path)
    key = _stat_key(path, st)
    found = _memory.get(key)
    if found is not None:
        return found
    for _ in range(_READ_ATTEMPTS):
        digest = _hash_file(path)
        after = os.stat(path)
        if _stat_key(path, after) == key:
            break
        key = _stat_key(path, after)  # written while we read: read it again
    else:
        log.warning("%s kept changing while it was hashed; its key reflects one of its states", path)
        return digest
    with _memory._lock:
        _memory.misses += 1
    if time.time() - st.st_mtime_ns / 1e9 > RACY_SECONDS:
        _memory.put(key, digest)
    return digest


def _hash_file(path: str) -> bytes:
    body = BodyHasher()
    try:
        with open(path, "rb") as f:
            while True:
                chunk = f.read(READ_CHUNK)
                if not chunk:
                    break
                body.update(chunk)
    except OSError as exc:
        raise type(exc)(
            exc.errno, f"cannot read {path} to key a Path argument by its content: {exc.strerror}"
        ) from exc
    h = _FILE_PREFIX.copy()
    body.finish(h.update)
    return h.digest()


def tree_digest(root: str) -> bytes:
    """The 32-byte digest of the directory tree at ``root`` (an absolute path).

    Raises:
        OSError: a directory or file in the tree cannot be read.
    """
    h = _TREE_PREFIX.copy()

    def entry(kind: bytes, rel: str, payload: bytes = b"") -> None:
        name = rel.encode("utf-8", "surrogateescape")
        h.update(kind + len(name).to_bytes(4, "big") + name + len(payload).to_bytes(4, "big") + payload)

    def fail(exc: OSError) -> None:
        raise type(exc)(
            exc.errno, f"cannot list {exc.filename} to key a Path argument by its content: {exc.strerror}"
        )

    for dirpath, dirnames, filenames in os.walk(root, onerror=fail):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        prefix = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        entry(b"d", prefix)
        for name in list(dirnames):
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                # os.walk does not descend into it; record where it points
                entry(b"l", prefix + name, os.readlink(full).encode("utf-8", "surrogateescape"))
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full)
            except FileNotFoundError:
                # a dangling link, or removed since the listing
                target = os.readlink(full) if os.path.islink(full) else ""
                entry(b"x", prefix + name, target.encode("utf-8", "surrogateescape"))
                continue
            if stat.S_ISREG(st.st_mode):
                entry(b"f", prefix + name, file_digest(full, st))
            else:
                entry(b"s", prefix + name)  # a socket or FIFO: its name only
    return h.digest()


def encode_path(path: Path, update: Callable[[bytes], None], by_spelling: Callable[[], None]) -> None:
    """Feed a concrete path's key to ``update`` (see the module notes).

    ``by_spelling`` feeds the path-as-spelled encoding, for a path that
    names no file or directory.
    """
    absolute = os.path.abspath(path)
    try:
        st = os.stat(absolute)
    except (FileNotFoundError, NotADirectoryError):
        log.debug("%s does not exist; keyed by its path", path)
        by_spelling()
        return
    name = os.path.basename(absolute).encode("utf-8", "surrogateescape")
    if stat.S_ISREG(st.st_mode):
        tag, digest = b"h", file_digest(absolute, st)
    elif stat.S_ISDIR(st.st_mode):
        tag, digest = b"H", tree_digest(absolute)
    else:
        log.debug("%s is neither a file nor a directory; keyed by its path", path)
        by_spelling()
        return
    update(tag + len(name).to_bytes(4, "big") + name + digest)


__all__ = [
    "PathCacheInfo",
    "clear_path_cache",
    "encode_path",
    "file_digest",
    "path_cache_info",
    "tree_digest",
]
