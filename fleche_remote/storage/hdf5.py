"""Stores in one HDF5 file through h5py; NumPy results as native datasets.

Layout (values and calls may share one file)::

    /values/<digest>   kind "ndarray": a dataset of the array's own dtype
                       and shape, so h5py, h5dump or HDFView users read the
                       result directly; kinds "bytes" and "pickle": a 1-D
                       uint8 dataset of the body. Attributes: "kind", "meta"
                       (JSON), and "layout" = "native" or "raw" (a dtype
                       HDF5 cannot hold, e.g. datetime64 or str, is kept as
                       raw bytes with its dtype in "meta").
    /calls/<key>       a 1-D uint8 dataset holding the call record encoded
                       with ``dumps_plain`` and decoded with the restricted
                       ``loads_plain``: opening a cache never runs its code.

Concurrency: every operation runs under the file's lock, and a new
entry is written under a temporary name (``.incoming``) and moved into
place last; :mod:`.h5file` says how.

What the lock does NOT protect: a process killed (or a node that loses
power) in the middle of a write can leave the HDF5 file itself damaged,
since the library has no journal; every entry in it may then be lost
(``h5clear``/``h5repack`` sometimes recover it). Keep irreplaceable results
in a file or SQL store, or copy the .h5 aside. The lock also needs a file
system where ``flock`` works across the machines that share it: a path on
NFS, Lustre, GPFS and other network or parallel file systems is refused
(see :mod:`._fs`) unless ``allow_network_fs = true`` says that only one
machine writes it, or that the mount has cluster-wide locks. Readers of an
.h5 that they cannot write read without a lock, as no one can write it
either.

The .h5, its directory and its lock file are created under the umask,
plus group (or world) bits with ``shared``; a reader that may not reach
them gets a PermissionError naming what is in the way.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence

import h5py
import numpy as np

from ..call import MAX_RECORD_BYTES, CallRecord, UnreadableRecord, check_record
from ..codec.plain import dumps_plain, loads_plain
from ..codec.values import Blob, BytesBlob
from ..errors import ConfigError, CorruptEntryError, ProtocolError
from .base import CallStore, ValueStore, record_matches
from .claims import Claims, FileClaims, KeptClaims
from .fs import DEFAULT_FS, FS_KEYS, FsPolicy
from .h5file import H5File
from .options import check_keys, resolve_path, typed
from .quota import Entry, LoggedUses, UsesLog, record_bytes

#: Name an entry is written under before it is moved into place. Writers
#: are exclusive, so one name suffices; a leftover from a crashed writer is
#: removed by the next write.
INCOMING = ".incoming"

#: Default seconds to wait for the lock before giving up with an error: a
#: hung process holding it must become an error, not a hang of every job.
LOCK_TIMEOUT_S = 120.0

_HEX = frozenset("0123456789abcdef")

#: What to use instead of HDF5 on a network file system, for the refusal.
_NETWORK_FIX = (
    'Use file stores (template = "cloudpickle"), which are safe there, or give each writer '
    "its own .h5 on a local disk (a per-writer layout) and copy the results together "
    "afterwards with fleche-remote push; calls can also go to PostgreSQL."
)


def _check_key(key: str) -> str:
    # keys become HDF5 link names: "/" would make groups, "." our temp name
    if not isinstance(key, str) or not key or len(key) > 64 or not set(key) <= _HEX:
        raise KeyError(key)
    return key


def _group(f: Optional[h5py.File], name: str) -> Optional[h5py.Group]:
    if f is None or name not in f:
        return None
    grp = f[name]
    if not isinstance(grp, h5py.Group):
        raise CorruptEntryError(f"{f.filename}: /{name} is a {type(grp).__name__}, expected a group")
    return grp


def _names(grp: Optional[h5py.Group]) -> List[str]:
    return [] if grp is None else [n for n in grp if not n.startswith(".")]


@contextmanager
def _incoming(grp: h5py.Group, name: str) -> Iterator[str]:
    """Build an entry under :data:`INCOMING`, then move it to ``name``."""
    if INCOMING in grp:
        del grp[INCOMING]
    try:
        yield INCOMING
        grp.move(INCOMING, name)
    except BaseException:
        if INCOMING in grp:
            del grp[INCOMING]
        raise


def _write_bytes(grp: h5py.Group, name: str, blob: Blob) -> None:
    ds = grp.create_dataset(name, shape=(blob.size,), dtype=np.uint8)
    pos = 0
    for chunk in blob.chunks():
        n = len(chunk)
        if pos + n > blob.size:
            raise CorruptEntryError(f"value body runs past its declared {blob.size} bytes")
        if n:
            ds[pos : pos + n] = np.frombuffer(chunk, dtype=np.uint8)
        pos += n
    if pos != blob.size:
        raise CorruptEntryError(f"value body ended after {pos} of its declared {blob.size} bytes")


def _array_layout(meta: Mapping[str, Any], size: int) -> tuple[np.dtype[Any], tuple[int, ...]]:
    """dtype and shape from an ndarray blob's meta, checked against its size."""
    try:
        dtype = np.dtype(meta["dtype"])
        shape = tuple(int(n) for n in meta["shape"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptEntryError(
            f"an ndarray blob needs meta with 'dtype' and 'shape'; got {dict(meta)!r} ({exc})"
        ) from None
    nbytes = dtype.itemsize * math.prod(shape)
    if nbytes != size:
        raise CorruptEntryError(f"ndarray of {dtype.str} {list(shape)} needs {nbytes} bytes, blob has {size}")
    return dtype, shape


def _write_native(grp: h5py.Group, name: str, blob: Blob) -> bool:
    """Write an ndarray blob as a dataset of its dtype; False if HDF5 can't hold the dtype.

    Streams row by row, so memory stays at a chunk plus one row, not the array.
    """
    dtype, shape = _array_layout(blob.meta, blob.size)
    try:
        ds = grp.create_dataset(name, shape=shape, dtype=dtype)
    except TypeError:  # h5py: "No conversion path for dtype" (datetime64, str, ...)
        return False
    if not shape or blob.size == 0:
        data = blob.read_all()
        if len(data) != blob.size:
            raise CorruptEntryError(f"value body has {len(data)} bytes, expected {blob.size}")
        if shape:
            return True  # zero-size: nothing to write
        ds[()] = np.frombuffer(data, dtype=dtype).reshape(())
        return True
    per_row = math.prod(shape[1:])
    row_bytes = dtype.itemsize * per_row
    pending = bytearray()
    row = 0
    for chunk in blob.chunks():
        pending += chunk
        n = len(pending) // row_bytes
        if n:
            if row + n > shape[0]:
                raise CorruptEntryError(f"value body runs past its declared {blob.size} bytes")
            ds[row : row + n] = np.frombuffer(pending, dtype=dtype, count=n * per_row).reshape(
                (n, *shape[1:])
            )
            del pending[: n * row_bytes]
            row += n
    if row != shape[0] or pending:
        got = row * row_bytes + len(pending)
        raise CorruptEntryError(f"value body ended after {got} of its declared {blob.size} bytes")
    return True


def _check_body(ds: h5py.Dataset, where: str) -> None:
    """Refuse a value dataset whose reading would allocate more than the
    file holds. h5py allocates the whole array before HDF5 reads a byte,
    and a dataset declared huge but never written (chunked, or contiguous
    with late allocation) reads back as fill values: a few hundred bytes
    planted in a shared file would cost gigabytes of memory to whoever
    loads them. Ours are contiguous, unfiltered and written whole."""
    if ds.chunks is not None or ds.compression is not None:
        raise CorruptEntryError(
            f"{where}: a chunked or filtered dataset ({ds.chunks}, {ds.compression}); "
            f"values are stored contiguous and unfiltered"
        )
    stored = ds.id.get_storage_size()
    if stored != ds.nbytes:
        raise CorruptEntryError(f"{where}: declares {ds.nbytes} bytes but has {stored} stored")
    size = ds.file.id.get_filesize()  # the file open now, no system call
    if ds.nbytes > size:
        raise CorruptEntryError(f"{where}: declares {ds.nbytes} bytes, more than its file's {size}")


def _attr_str(ds: h5py.Dataset, name: str) -> str:
    value = ds.attrs[name]
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if not isinstance(value, str):
        raise ValueError(f"attribute {name!r} is a {type(value).__name__}, expected a string")
    return value


def _options(table: Dict[str, Any], base_dir: Optional[Path], kind: str) -> Dict[str, Any]:
    where = f"{kind}.type = 'hdf5'"
    check_keys(table, ("path", "lock_timeout", *FS_KEYS), where)
    if "path" not in table:
        raise ConfigError(f"{where} needs path = 'cache.h5' (an HDF5 file); no path was given", key="path")
    path = typed(table, "path", (str, os.PathLike))
    timeout = typed(table, "lock_timeout", (int, float), LOCK_TIMEOUT_S)
    if timeout <= 0:
        raise ConfigError(f"{where}: lock_timeout must be > 0 seconds, got {timeout!r}", key="lock_timeout")
    return {
        "path": resolve_path(path, base_dir),
        "lock_timeout": float(timeout),
        "fs": FsPolicy.from_table(table, where),
    }


class _Hdf5Store:
    """Shared constructor and config for both HDF5 stores."""

    def __init__(
        self, path: str | os.PathLike[str], lock_timeout: float = LOCK_TIMEOUT_S, fs: FsPolicy = DEFAULT_FS
    ) -> None:
        self.path = resolve_path(path, None)
        self.lock_timeout = lock_timeout
        self.fs = fs.check()
        fs.check_local(self.path, "an HDF5 file", _NETWORK_FIX)
        self._file = H5File(self.path, lock_timeout, fs)

    def to_config(self) -> Dict[str, Any]:
        cfg: Dict[str, Any] = {"type": "hdf5", "path": str(self.path)}
        if self.lock_timeout != LOCK_TIMEOUT_S:
            cfg["lock_timeout"] = self.lock_timeout
        cfg.update(self.fs.to_config())
        return cfg

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


class Hdf5ValueStore(_Hdf5Store, ValueStore):
    """Result blobs in an HDF5 file; NumPy arrays as native datasets.

    Args:
        path: the .h5 file (created, with its directory, on first write);
            a relative path resolves against the current directory.
        lock_timeout: seconds to wait for ``<path>.lock`` before raising.
        fs: the ``shared`` and ``allow_network_fs`` options (see :mod:`._fs`).

    Raises:
        ConfigError: the path is on a network or parallel file system and
            ``fs`` does not allow it.
        StorageError: the lock is not free within ``lock_timeout``, or the
            file is not HDF5.
        CorruptEntryError: an entry exists but is not one this store wrote.
    """

    type_name = "hdf5"

    @classmethod
    def from_config(cls, table: Dict[str, Any], base_dir: Optional[Path] = None) -> Hdf5ValueStore:
        return cls(**_options(table, base_dir, "values"))

    def put(self, digest: str, blob: Blob) -> None:
        _check_key(digest)
        # no shared-lock pre-check: it would cost a second open of the file
        # for every new value, and the check under the lock below stops
        # before the body is read
        with self._file.open(write=True) as f:
            assert f is not None
            grp = f.require_group("values")
            if digest in grp:
                # stored again: refresh its time, so that eviction or garbage
                # collection running beside this save does not take it
                grp[digest].attrs["stored"] = time.time()
                return
            with _incoming(grp, digest) as tmp:
                layout = "native"
                if blob.kind != "ndarray" or not _write_native(grp, tmp, blob):
                    layout = "raw"
                    _write_bytes(grp, tmp, blob)
                ds = grp[tmp]
                ds.attrs["kind"] = blob.kind
                ds.attrs["meta"] = json.dumps(blob.meta, separators=(",", ":"))
                ds.attrs["layout"] = layout
                ds.attrs["stored"] = time.time()

    def get(self, digest: str) -> Blob:
        _check_key(digest)
        with self._file.open(write=False) as f:
            grp = _group(f, "values")
            if grp is None or digest not in grp:
                raise KeyError(digest)
            ds = grp[digest]
            where = f"value {digest[:16]} in {self.path}"
            if not isinstance(ds, h5py.Dataset):
                raise CorruptEntryError(f"{where} is a {type(ds).__name__}, expected a dataset")
            try:
                kind = _attr_str(ds, "kind")
                meta = json.loads(_attr_str(ds, "meta"))
                layout = _attr_str(ds, "layout")
            except (KeyError, ValueError) as exc:
                raise CorruptEntryError(
                    f"{where} lacks readable kind/meta/layout attributes ({exc})"
                ) from None
            if not isinstance(meta, dict):
                raise CorruptEntryError(f"{where}: meta is a {type(meta).__name__}, expected a JSON object")
            _check_body(ds, where)
            arr = np.asarray(ds[()], order="C")  # a scalar comes back 0-d, not (1,)
        if layout == "native" and kind == "ndarray":
            try:
                dtype, shape = _array_layout(meta, arr.nbytes)
            except CorruptEntryError as exc:
                raise CorruptEntryError(f"{where}: {exc}") from None
            if arr.shape != shape:
                raise CorruptEntryError(f"{where}: dataset shape {arr.shape}, meta says {shape}")
            if arr.dtype != dtype:
                arr = arr.astype(dtype)
        elif layout != "raw" or arr.dtype != np.uint8 or arr.ndim != 1:
            raise CorruptEntryError(
                f"{where}: expected a 1-D uint8 dataset for layout 'raw', "
                f"got {arr.dtype.str} {list(arr.shape)} with layout {layout!r}"
            )
        return BytesBlob(kind, meta, memoryview(arr.reshape(-1)).cast("B") if arr.size else b"")

    def contains(self, digest: str) -> bool:
        try:
            _check_key(digest)
        except KeyError:
            return False
        with self._file.open(write=False) as f:
            grp = _group(f, "values")
            return grp is not None and digest in grp

    def delete(self, digest: str) -> None:
        try:
            _check_key(digest)
        except KeyError:
            return
        with self._file.open(write=True) as f:
            grp = _group(f, "values")
            if grp is not None and digest in grp:
                del grp[digest]

    def digests(self) -> Iterator[str]:
        with self._file.open(write=False) as f:
            return iter(_names(_group(f, "values")))

    def stored_at(self, digest: str) -> Optional[float]:
        if not _valid(digest):
            return None
        with self._file.open(write=False) as f:
            return _stored(_group(f, "values"), digest)

    def close(self) -> None:
        """Nothing to release: the file is open only during an operation."""


class Hdf5CallStore(_Hdf5Store, LoggedUses, CallStore, KeptClaims):
    """Call records in an HDF5 file (the same file as the values, if you like).

    Batch reads, prefix expansion and queries open the file once for the
    whole batch. Prefix expansion and queries read every key name (there
    is no index to range-scan in an HDF5 group), which is fine for the
    tens of thousands of calls HDF5 caches usually hold.

    Args:
        path: the .h5 file (created, with its directory, on first write);
            a relative path resolves against the current directory.
        lock_timeout: seconds to wait for ``<path>.lock`` before raising.
        fs: the ``shared`` and ``allow_network_fs`` options (see :mod:`._fs`).

    Raises:
        ConfigError: the path is on a network or parallel file system and
            ``fs`` does not allow it.
        StorageError: the lock is not free within ``lock_timeout``, or the
            file is not HDF5.
        CorruptEntryError: an entry is not a call record this store wrote.
    """

    type_name = "hdf5"

    @classmethod
    def from_config(cls, table: Dict[str, Any], base_dir: Optional[Path] = None) -> Hdf5CallStore:
        return cls(**_options(table, base_dir, "calls"))

    def put(self, record: CallRecord) -> None:
        key = _check_key(record.key)
        data = dumps_plain(record)
        with self._file.open(write=True) as f:
            assert f is not None
            grp = f.require_group("calls")
            if key in grp:
                return
            with _incoming(grp, key) as tmp:
                ds = grp.create_dataset(tmp, data=np.frombuffer(data, dtype=np.uint8))
                ds.attrs["stored"] = time.time()

    def _read(self, grp: Optional[h5py.Group], key: str) -> Optional[CallRecord]:
        if grp is None or key not in grp:
            return None
        where = f"call {key[:16]} in {self.path}"
        ds = grp[key]
        if not isinstance(ds, h5py.Dataset) or ds.dtype != np.uint8 or ds.ndim != 1:
            raise CorruptEntryError(f"{where}: expected a 1-D uint8 dataset, got {ds!r}")
        if ds.shape[0] > MAX_RECORD_BYTES:
            raise CorruptEntryError(
                f"{where}: {ds.shape[0]} bytes, more than a record may hold ({MAX_RECORD_BYTES})"
            )
        try:
            record = loads_plain(ds[()].tobytes())
        except ProtocolError as exc:
            raise CorruptEntryError(f"{where} does not decode: {exc}") from None
        check_record(record, where)
        if record.key != key:
            raise CorruptEntryError(f"{where} holds the record of key {record.key[:16]}, expected {key[:16]}")
        return record

    def get(self, key: str) -> CallRecord:
        record = self.get_many([key])[0]
        if record is None:
            raise KeyError(key)
        return record

    def get_many(self, keys: Iterable[str]) -> List[Optional[CallRecord]]:
        keys = list(keys)
        with self._file.open(write=False) as f:
            grp = _group(f, "calls")
            return [self._read(grp, k) if _valid(k) else None for k in keys]

    def contains(self, key: str) -> bool:
        return self.contains_many([key])[0]

    def contains_many(self, keys: Iterable[str]) -> List[bool]:
        keys = list(keys)
        with self._file.open(write=False) as f:
            grp = _group(f, "calls")
            return [grp is not None and _valid(k) and k in grp for k in keys]

    def delete(self, key: str) -> None:
        if not _valid(key):
            return
        with self._file.open(write=True) as f:
            grp = _group(f, "calls")
            if grp is not None and key in grp:
                del grp[key]

    def keys(self) -> Iterator[str]:
        with self._file.open(write=False) as f:
            return iter(_names(_group(f, "calls")))

    def keys_with_prefix(self, prefix: str, limit: int = 2) -> List[str]:
        if not prefix or not set(prefix) <= _HEX:
            return []
        with self._file.open(write=False) as f:
            grp = _group(f, "calls")
            if grp is None:
                return []
            if len(prefix) == 64:
                return [prefix] if prefix in grp else []
            found: List[str] = []
            for name in grp:  # link names come in name order
                if name.startswith(prefix):
                    found.append(name)
                    if len(found) >= limit:
                        break
            return found

    def query(
        self,
        name: Optional[str] = None,
        arg_digests: Optional[Mapping[str, str]] = None,
        metadata: Optional[Mapping[str, Any]] = None,
    ) -> Iterator[CallRecord]:
        # one shared lock for the whole scan; matches are collected first so
        # the file is not held open while the caller works on them
        with self._file.open(write=False) as f:
            grp = _group(f, "calls")
            matches: List[Any] = []
            for key in _names(grp):
                try:
                    record = self._read(grp, key)
                except CorruptEntryError as exc:  # one bad entry: shown as such, the rest go on
                    matches.append(UnreadableRecord(key, str(exc)))
                    continue
                if record is not None and record_matches(record, name, arg_digests, metadata):
                    matches.append(record)
        return iter(matches)

    # -- claims: files beside the HDF5 file (see storage/claims.py) -----------

    def _make_keeper(self) -> Claims:
        # files, not datasets: a claim must not wait for the file's write lock
        return FileClaims(self.path.with_name(self.path.name + ".claims"))

    # -- quotas: a record's "stored" attribute; uses go to a side log ---------

    @property
    def _uses(self) -> UsesLog:
        return UsesLog(self.path.with_name(self.path.name + ".uses"))

    def stored_times(self, keys: Sequence[str]) -> List[Optional[float]]:
        with self._file.open(write=False) as f:
            grp = _group(f, "calls")
            return [_stored(grp, k) if _valid(k) else None for k in keys]

    def entries(self) -> Iterator[Entry]:
        used = self.last_used()
        found = []
        with self._file.open(write=False) as f:  # one open for the whole scan
            grp = _group(f, "calls")
            for key in _names(grp):
                record = self._read(grp, key)
                if record is None:
                    continue
                stored = _stored(grp, key) or 0.0
                size = record.value_size + record_bytes(len(record.arguments))
                when = max(used.get(key, 0.0), stored)
                found.append(Entry(key, record.name, record.value, size, stored, when))
        return iter(found)


def _stored(grp: Optional[h5py.Group], name: str) -> Optional[float]:
    """An entry's "stored" attribute; None for one written before it existed."""
    if grp is None or name not in grp:
        return None
    value = grp[name].attrs.get("stored")
    return None if value is None else float(value)


def _valid(key: str) -> bool:
    try:
        _check_key(key)
    except KeyError:
        return False
    return True
