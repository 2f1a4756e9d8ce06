"""Files under a root directory: one file per value and per call record.

Layout: ``root/ab/abcdef...`` (values) and ``root/ab/abcdef....call``
(calls), sharded on the first two hex characters so that no directory
holds more than ~1/256 of the entries and prefix expansion reads one
directory.

Every write goes to a temp file in the same directory and is then
``os.replace``-d into place, so a reader (in any process, on any node of
a shared file system with POSIX rename) sees a whole file or none, and two
writers of the same content both succeed. A failed write (full disk,
quota) removes its temp file and raises; nothing half-written is left.
Temp names carry the writer's host and pid (``.KEY.HOST.PID.RAND.tmp``),
so that :meth:`collect_temporaries` can remove what a killed writer left
behind while never touching a live writer's file; that, and needing no
lock, is why file stores are the safe choice on NFS, Lustre and GPFS.

Files are created with the umask applied (0666 & ~umask) and directories
likewise, plus group (or world) bits with ``shared``; see :mod:`._fs`.
A reader that may not enter the cache gets a PermissionError that names
the directory in the way, never an empty cache.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import re
import struct
import time
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, Optional, Sequence

from ..call import MAX_RECORD_BYTES, CallRecord, check_record
from ..codec.plain import dumps_plain, loads_plain
from ..codec.values import Blob, FileBlob
from ..errors import CorruptEntryError, StorageError
from .base import CallStore, ValueStore
from .claims import Claims, FileClaims, KeptClaims
from .fs import DEFAULT_FS, FS_KEYS, FsPolicy, permission_error, temp_is_stale, temp_name
from .options import check_keys, resolve_path, typed
from .quota import LoggedUses, UsesLog

#: The side log of last-used times, in the call store's root (a dot name:
#: walks skip it).
USES_FILE = ".uses"

_VALUE_MAGIC = b"FRV1\n"
_CALL_MAGIC = b"FRC1\n"
_LEN = struct.Struct(">I")

#: A value file's JSON header at most (kind, meta, size: a few hundred bytes).
MAX_HEADER_BYTES = 1 << 20
#: zlib never expands by more than about 1032:1; a compressed value that
#: claims more than this per stored byte is lying about its size.
_GZIP_MAX_RATIO = 1100


def _gunzip(body: bytes, limit: int, path: Path) -> bytes:
    """``body`` decompressed, refused past ``limit`` bytes (never inflated beyond)."""
    inflater = zlib.decompressobj(wbits=31)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise CorruptEntryError(f"{path} is not valid gzip: {exc}") from None
    if len(out) > limit:
        raise CorruptEntryError(f"{path} inflates to more than {limit} bytes; refused")
    if not inflater.eof:
        raise CorruptEntryError(f"{path} is a truncated gzip stream")
    return out


def _shard(root: Path, key: str) -> Path:
    return root / key[:2]


_OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


def _open_temp(path: Path, fs: FsPolicy) -> tuple[int, str]:
    """A new temp file beside ``path`` (see :func:`._fs.temp_name`), made
    with mode 0666 so that the umask applies, then the shared bits."""
    while True:
        tmp = os.path.join(path.parent, temp_name(path.name))
        try:
            fd = os.open(tmp, _OPEN_NEW, 0o666)
        except FileExistsError:  # the random part collided: draw again
            continue
        except FileNotFoundError:  # a new shard: create it, then retry
            fs.make_dirs(path.parent)
            fd = os.open(tmp, _OPEN_NEW, 0o666)
        try:
            fs.fix_fd(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        return fd, tmp


def _atomic_write(path: Path, write: Callable[[BinaryIO], None], fs: FsPolicy) -> None:
    """Write via ``write(fh)`` to a temp file beside ``path``, then rename."""
    fd, tmp = _open_temp(path, fs)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageError(exc.errno, f"no space left writing {path}: {exc.strerror}") from exc
        raise


_HEX_KEY = re.compile(r"[0-9a-f]{1,128}")


def _check_key(key: str) -> str:
    # keys become file names: refuse anything that could escape the root
    if not isinstance(key, str) or not _HEX_KEY.fullmatch(key):
        raise KeyError(key)
    return key


def _file_options(table: Dict[str, Any], base_dir: Optional[Path], where: str) -> Dict[str, Any]:
    check_keys(table, ("root", "compress", *FS_KEYS), where)
    root = typed(table, "root", (str, os.PathLike))
    return {
        "root": resolve_path(root, base_dir),
        "compress": typed(table, "compress", bool, False),
        "type_name": table.get("type", "cloudpickle"),
        "fs": FsPolicy.from_table(table, where),
    }


def _exists(path: str, what: str) -> bool:
    """``os.path.exists`` that raises, instead of answering False, when
    this user may not look (a colleague's cache written under umask 077)."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except PermissionError:
        raise permission_error(path, what) from None
    return True


class _FileRoot:
    """What both file stores share: a root directory, a compress flag, and
    the ``shared`` / ``allow_network_fs`` options (the latter changes
    nothing here: file stores are safe on network file systems)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        compress: bool = False,
        type_name: str = "cloudpickle",
        fs: FsPolicy = DEFAULT_FS,
    ) -> None:
        self.root = Path(os.path.expanduser(os.fspath(root))).absolute()
        self._root_str = str(self.root)
        self.compress = compress
        self.type_name = type_name
        self.fs = fs.check()

    def to_config(self) -> Dict[str, Any]:
        cfg: Dict[str, Any] = {"type": self.type_name, "root": str(self.root)}
        if self.compress:
            cfg["compress"] = True
        cfg.update(self.fs.to_config())
        return cfg

    def collect_temporaries(self, foreign_age: Optional[float] = None) -> int:
        """Remove temp files that writers left behind; returns how many.

        A temp file of a dead process of this host goes at once; one of
        another host (or of unknown origin) once it is ``foreign_age``
        seconds old (default :data:`._fs.FOREIGN_TEMP_AGE_S`); a live
        writer's is never touched. See :func:`._fs.temp_is_stale`.
        """
        kwargs = {} if foreign_age is None else {"foreign_age": foreign_age}
        removed = 0
        now = time.time()
        for shard in _shards(self.root):
            try:
                entries = list(os.scandir(shard))
            except FileNotFoundError:
                continue
            for entry in entries:
                if not (entry.name.startswith(".") and entry.name.endswith(".tmp")):
                    continue
                try:
                    mtime = entry.stat(follow_symlinks=False).st_mtime
                except FileNotFoundError:  # renamed into place meanwhile
                    continue
                if temp_is_stale(entry.name, mtime, now, **kwargs):
                    try:
                        os.unlink(entry.path)
                        removed += 1
                    except FileNotFoundError:
                        pass
        return removed


class FileValueStore(_FileRoot, ValueStore):
    """Value blobs as files; optional gzip compression of the body.

    Args:
        root: directory (created on first write).
        compress: gzip the body (level 1: cheap, and most of the win for
            the redundant data scientists store).
        type_name: the ``values.type`` it was built as ("pickle" or
            "cloudpickle": the same files), kept for ``to_config``.
        fs: ``shared`` (file and directory modes) and ``allow_network_fs``
            (accepted, and not needed here); see :mod:`._fs`.

    Raises:
        PermissionError: this user may not read the cache's directory or
            a file in it; the message names which, and the fix.
    """

    @classmethod
    def from_config(cls, table: Dict[str, Any], base_dir: Optional[Path] = None) -> FileValueStore:
        return cls(**_file_options(table, base_dir, f"values.type = {table.get('type')!r}"))

    def _path(self, digest: str) -> Path:
        return _shard(self.root, _check_key(digest)) / digest

    def put(self, digest: str, blob: Blob) -> None:
        path = self._path(digest)
        try:
            # already stored: refresh its time, so that a garbage collection
            # running beside this save sees a fresh value, not an orphan
            os.utime(path)
            return
        except FileNotFoundError:
            pass
        except PermissionError:
            if path.exists():  # a colleague's file in a shared cache: it stays
                return
        header = json.dumps(
            {"kind": blob.kind, "meta": blob.meta, "size": blob.size, "gzip": self.compress}
        ).encode()

        def write(fh: BinaryIO) -> None:
            fh.write(_VALUE_MAGIC + _LEN.pack(len(header)) + header)
            out: Any = gzip.GzipFile(fileobj=fh, mode="wb", compresslevel=1, mtime=0) if self.compress else fh
            written = 0
            for chunk in blob.chunks():
                out.write(chunk)
                written += len(chunk)
            if out is not fh:
                out.close()
            if written != blob.size:
                raise CorruptEntryError(f"value {digest[:16]}: got {written} bytes, expected {blob.size}")

        _atomic_write(path, write, self.fs)

    def get(self, digest: str) -> Blob:
        path = self._path(digest)
        try:
            fh = open(path, "rb")
        except (FileNotFoundError, NotADirectoryError):
            raise KeyError(digest) from None
        except PermissionError:
            raise permission_error(path, "the value file") from None
        with fh:
            file_size = os.fstat(fh.fileno()).st_size
            head = fh.read(len(_VALUE_MAGIC) + _LEN.size)
            if len(head) < len(_VALUE_MAGIC) + _LEN.size or not head.startswith(_VALUE_MAGIC):
                raise CorruptEntryError(f"{path} is not a fleche-remote value file")
            (hlen,) = _LEN.unpack(head[len(_VALUE_MAGIC) :])
            # sizes in the header are checked against the file before any
            # buffer is allocated for them
            if hlen > min(MAX_HEADER_BYTES, file_size - len(head)):
                raise CorruptEntryError(
                    f"{path}: its header claims {hlen} bytes, "
                    f"the file has {file_size - len(head)} after the magic"
                )
            try:
                header = json.loads(fh.read(hlen))
            except (ValueError, RecursionError) as exc:
                raise CorruptEntryError(f"{path}: unreadable header ({exc})") from None
        offset = len(head) + hlen
        stored = file_size - offset
        if not (
            isinstance(header, dict)
            and isinstance(header.get("kind"), str)
            and isinstance(header.get("meta"), dict)
            and type(header.get("size")) is int
            and header["size"] >= 0
        ):
            raise CorruptEntryError(
                f"{path}: expected a header with kind (str), meta (dict) and size (int >= 0)"
            )
        size: int = header["size"]
        if header.get("gzip"):
            if not self.compress:
                raise CorruptEntryError(
                    f"{path} is gzip-compressed, but this store has compress = false; "
                    f"set compress = true if the cache was written that way"
                )
            if size > stored * _GZIP_MAX_RATIO + 1024:
                raise CorruptEntryError(
                    f"{path}: {stored} compressed bytes cannot hold the {size} its header claims"
                )

            def opener() -> Any:
                raw = open(path, "rb")
                raw.seek(offset)
                return gzip.GzipFile(fileobj=raw, mode="rb")

            return FileBlob(header["kind"], header["meta"], size, path, offset, opener)
        if size != stored:
            raise CorruptEntryError(f"{path}: its header claims a {size}-byte body, the file holds {stored}")
        return FileBlob(header["kind"], header["meta"], size, path, offset)

    def contains(self, digest: str) -> bool:
        try:
            _check_key(digest)
        except KeyError:
            return False
        return _exists(os.path.join(self._root_str, digest[:2], digest), "the value file")

    def delete(self, digest: str) -> None:
        try:
            os.unlink(self._path(digest))
        except (FileNotFoundError, KeyError):
            pass

    def digests(self) -> Iterator[str]:
        yield from _walk(self.root, "")

    def stored_at(self, digest: str) -> Optional[float]:
        try:
            return os.stat(self._path(digest)).st_mtime
        except (OSError, KeyError):
            return None

    def discard_many(
        self, digests: Sequence[str], since: float, referenced: Callable[[Sequence[str]], List[bool]]
    ) -> List[str]:
        """As :meth:`ValueStore.discard_many`, without a window: each
        candidate is first renamed aside (atomic), then checked again: a
        save that stored it again meanwhile refreshed its time (the rename
        keeps it), and a record written meanwhile is found; either puts it
        back. A save that came after the rename found no file and wrote a
        new one; putting ours back then replaces it with the same bytes."""
        candidates = [d for d in digests if (self.stored_at(d) or 0.0) < since]
        if not candidates:
            return []
        candidates = [d for d, ref in zip(candidates, referenced(candidates)) if not ref]
        hidden: Dict[str, str] = {}
        for digest in candidates:
            path = str(self._path(digest))
            aside = os.path.join(os.path.dirname(path), temp_name(digest))
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue
            hidden[digest] = aside
        if not hidden:
            return []
        names = list(hidden)
        gone = []
        for digest, ref in zip(names, referenced(names)):
            aside = hidden[digest]
            try:
                fresh = os.stat(aside).st_mtime >= since
            except FileNotFoundError:
                continue
            if ref or fresh:
                os.replace(aside, self._path(digest))
            else:
                os.unlink(aside)
                gone.append(digest)
        return gone


def _shards(root: Path) -> List[Path]:
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except FileNotFoundError:
        return []
    except PermissionError:
        raise permission_error(root, "the cache directory") from None
    return [Path(e.path) for e in entries if len(e.name) == 2 and e.is_dir()]


def _walk(root: Path, suffix: str) -> Iterator[str]:
    for shard in _shards(root):
        yield from _list_shard(shard, suffix)


def _list_shard(shard: Path, suffix: str, prefix: str = "") -> Iterator[str]:
    try:
        entries = os.listdir(shard)
    except FileNotFoundError:
        return
    except PermissionError:
        raise permission_error(shard, "the cache directory") from None
    for name in sorted(entries):
        if name.startswith(".") or not name.endswith(suffix):
            continue
        key = name[: len(name) - len(suffix)] if suffix else name
        if key.startswith(prefix):
            yield key


class FileCallStore(_FileRoot, LoggedUses, CallStore, KeptClaims):
    """Call records as small files, decoded with the restricted decoder.

    Takes the arguments of :class:`FileValueStore` and raises as it does.
    """

    @classmethod
    def from_config(cls, table: Dict[str, Any], base_dir: Optional[Path] = None) -> FileCallStore:
        return cls(**_file_options(table, base_dir, f"calls.type = {table.get('type')!r}"))

    def _path(self, key: str) -> Path:
        return _shard(self.root, _check_key(key)) / (key + ".call")

    def put(self, record: CallRecord) -> None:
        path = self._path(record.key)
        if path.exists():
            return
        data = dumps_plain(record)
        if self.compress:
            data = gzip.compress(data, compresslevel=1, mtime=0)

        def write(fh: BinaryIO) -> None:
            fh.write(_CALL_MAGIC + data)

        _atomic_write(path, write, self.fs)

    def get(self, key: str) -> CallRecord:
        path = self._path(key)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise KeyError(key) from None
        except PermissionError:
            raise permission_error(path, "the call file") from None
        if not data.startswith(_CALL_MAGIC):
            raise CorruptEntryError(f"{path} is not a fleche-remote call file")
        body = data[len(_CALL_MAGIC) :]
        # decompressed only as this store writes: a gzip body in a store with
        # compress = false was not written by it
        if body[:2] == b"\x1f\x8b":
            if not self.compress:
                raise CorruptEntryError(
                    f"{path} is gzip-compressed, but this store has compress = false; "
                    f"set compress = true if the cache was written that way"
                )
            body = _gunzip(body, MAX_RECORD_BYTES, path)
        try:
            record = loads_plain(body)
        except Exception as exc:
            raise CorruptEntryError(f"{path} does not decode: {exc}") from None
        return check_record(record, str(path))

    def contains(self, key: str) -> bool:
        # the hot path of every lookup: plain strings, no Path objects
        try:
            _check_key(key)
        except KeyError:
            return False
        return _exists(os.path.join(self._root_str, key[:2], key + ".call"), "the call file")

    def delete(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except (FileNotFoundError, KeyError):
            pass

    def keys(self) -> Iterator[str]:
        yield from _walk(self.root, ".call")

    def keys_with_prefix(self, prefix: str, limit: int = 2) -> List[str]:
        if len(prefix) < 2:
            return super().keys_with_prefix(prefix, limit)
        found: List[str] = []
        for key in _list_shard(_shard(self.root, prefix), ".call", prefix):
            found.append(key)
            if len(found) >= limit:
                break
        return found

    # -- quotas: a record's mtime is when it was stored; uses go to a side log --

    @property
    def _uses(self) -> UsesLog:
        return UsesLog(self.root / USES_FILE)

    def stored_times(self, keys: Sequence[str]) -> List[Optional[float]]:
        out: List[Optional[float]] = []
        for key in keys:
            try:
                out.append(os.stat(self._path(key)).st_mtime)
            except (OSError, KeyError):
                out.append(None)
        return out

    # -- claims: files in <root>/claims (see storage/claims.py) ---------------

    def _make_keeper(self) -> Claims:
        # "claims" is no two-letter shard, so listing the calls never sees it
        return FileClaims(self.root / "claims")
