"""The HDF5 stores against real h5py files."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path
from typing import Any, Iterator, List

import h5py
import numpy as np
import pytest

from fleche_remote.caches import Cache
from fleche_remote.call import Call, CallRecord, make_record
from fleche_remote.codec.plain import dumps_plain
from fleche_remote.codec.values import BytesBlob, StreamBlob, blob_digest, decode_value, encode_value
from fleche_remote.errors import AmbiguousDigestError, ConfigError, CorruptEntryError, StorageError
from fleche_remote.storage.base import build_store
from fleche_remote.storage.hdf5 import INCOMING, Hdf5CallStore, Hdf5ValueStore


@pytest.fixture
def h5(tmp_path: Path) -> Path:
    return tmp_path / "sub" / "cache.h5"


@pytest.fixture
def values(h5: Path) -> Hdf5ValueStore:
    return Hdf5ValueStore(h5)


@pytest.fixture
def calls(h5: Path) -> Hdf5CallStore:
    return Hdf5CallStore(h5)


def record(key: str, name: str = "mod.f", **kw: Any) -> CallRecord:
    fields: dict[str, Any] = dict(
        key=key,
        name=name,
        version=None,
        arguments=b"\x80\x04N.",
        arg_digests={"x": "1" * 64},
        metadata={"host": "n1", "t": (1, b"2")},
        value="f" * 64,
        value_kind="pickle",
        value_size=3,
    )
    fields.update(kw)
    return CallRecord(**fields)


def pieces(data: bytes, n: int) -> Iterator[bytes]:
    for i in range(0, len(data), n):
        yield data[i : i + n]


ARRAYS = {
    "f8-2d": np.arange(12.0).reshape(3, 4),
    "i4-big-endian": np.arange(5, dtype=">i4"),
    "bool": np.array([[True, False], [False, True]]),
    "complex": np.array([1 + 2j, -3j], dtype="<c8"),
    "f2-3d": np.arange(24, dtype="<f2").reshape(2, 3, 4),
    "bytes-S3": np.array([b"ab", b"cde"]),
    "empty-2d": np.zeros((0, 3)),
    "empty-1d": np.zeros(0, dtype="u1"),
    "0d": np.array(7.5),
    "unicode-raw": np.array(["ab", "c"]),
}


# -- values -----------------------------------------------------------------


@pytest.mark.parametrize("arr", list(ARRAYS.values()), ids=list(ARRAYS))
def test_ndarray_round_trip(values: Hdf5ValueStore, arr: np.ndarray) -> None:
    blob = encode_value(arr)
    digest = blob_digest(blob)
    values.put(digest, blob)
    got = values.get(digest)
    assert (got.kind, got.meta, got.size) == ("ndarray", blob.meta, blob.size)
    assert blob_digest(got) == digest
    back = decode_value(got)
    assert back.dtype == arr.dtype and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)


@pytest.mark.parametrize("name", ["f8-2d", "i4-big-endian", "bool", "complex", "0d", "empty-2d"])
def test_ndarray_is_a_native_dataset_for_plain_h5py(values: Hdf5ValueStore, h5: Path, name: str) -> None:
    arr = ARRAYS[name]
    blob = encode_value(arr)
    digest = blob_digest(blob)
    values.put(digest, blob)
    with h5py.File(h5, "r") as f:
        ds = f["values"][digest]
        assert ds.dtype == arr.dtype and ds.shape == arr.shape
        np.testing.assert_array_equal(ds[()], arr)
        assert ds.attrs["kind"] == "ndarray" and ds.attrs["layout"] == "native"


def test_dtype_hdf5_cannot_hold_is_kept_raw(values: Hdf5ValueStore, h5: Path) -> None:
    arr = np.arange(3).astype("<M8[s]")
    blob = BytesBlob("ndarray", {"dtype": arr.dtype.str, "shape": [3]}, arr.view(np.uint8).tobytes())
    values.put("ab" * 32, blob)
    got = values.get("ab" * 32)
    assert (got.kind, got.meta) == ("ndarray", blob.meta)
    np.testing.assert_array_equal(np.frombuffer(got.read_all(), dtype=arr.dtype), arr)
    with h5py.File(h5, "r") as f:
        assert f["values"]["ab" * 32].attrs["layout"] == "raw"


@pytest.mark.parametrize("value", [b"raw \x00\xff", b"", {"a": (1, [2.5])}], ids=["bytes", "empty", "pickle"])
def test_bytes_and_pickle_round_trip_as_uint8(values: Hdf5ValueStore, h5: Path, value: Any) -> None:
    blob = encode_value(value)
    digest = blob_digest(blob)
    values.put(digest, blob)
    got = values.get(digest)
    assert (got.kind, got.meta) == (blob.kind, blob.meta)
    assert decode_value(got) == value
    with h5py.File(h5, "r") as f:
        ds = f["values"][digest]
        assert ds.dtype == np.uint8 and ds.shape == (blob.size,)


def test_streamed_chunks_that_split_rows(values: Hdf5ValueStore) -> None:
    arr = np.arange(35.0).reshape(7, 5)  # 40-byte rows arriving in 7-byte chunks
    meta = {"dtype": arr.dtype.str, "shape": [7, 5]}
    values.put("ab" * 32, StreamBlob("ndarray", meta, arr.nbytes, pieces(arr.tobytes(), 7)))
    np.testing.assert_array_equal(decode_value(values.get("ab" * 32)), arr)
    data = bytes(range(256)) * 5
    values.put("cd" * 32, StreamBlob("bytes", {}, len(data), pieces(data, 333)))
    assert values.get("cd" * 32).read_all() == data


@pytest.mark.parametrize("kind", ["ndarray", "bytes"])
def test_truncated_stream_leaves_nothing(values: Hdf5ValueStore, h5: Path, kind: str) -> None:
    arr = np.arange(20.0).reshape(4, 5)
    meta = {"dtype": arr.dtype.str, "shape": [4, 5]} if kind == "ndarray" else {}
    short = StreamBlob(kind, meta, arr.nbytes, pieces(arr.tobytes()[:100], 30))
    with pytest.raises(CorruptEntryError, match="ended after 100 of its declared 160 bytes"):
        values.put("ab" * 32, short)
    assert not values.contains("ab" * 32)
    with h5py.File(h5, "r") as f:
        assert INCOMING not in f["values"]
    values.put("ab" * 32, encode_value(b"later writes still work"))
    assert values.get("ab" * 32).read_all() == b"later writes still work"


def test_ndarray_meta_that_does_not_fit_the_size_is_refused(values: Hdf5ValueStore) -> None:
    bad = BytesBlob("ndarray", {"dtype": "<f8", "shape": [3]}, b"\0" * 16)
    with pytest.raises(CorruptEntryError, match=r"needs 24 bytes, blob has 16"):
        values.put("ab" * 32, bad)
    with pytest.raises(CorruptEntryError, match="needs meta with 'dtype' and 'shape'"):
        values.put("ab" * 32, BytesBlob("ndarray", {}, b""))


def test_value_put_is_idempotent_and_delete_forgets(values: Hdf5ValueStore) -> None:
    blob = encode_value(b"same")
    digest = blob_digest(blob)
    values.put(digest, blob)
    values.put(digest, blob)
    values.put(digest, StreamBlob("bytes", {}, 4, iter([b"same"])))
    assert list(values.digests()) == [digest]
    values.delete(digest)
    values.delete(digest)
    assert not values.contains(digest)
    assert list(values.digests()) == []


def test_missing_before_and_after_the_file_exists(
    values: Hdf5ValueStore, calls: Hdf5CallStore, h5: Path
) -> None:
    for present in ([], ["ab" * 32]):
        with pytest.raises(KeyError):
            values.get("0" * 64)
        with pytest.raises(KeyError):
            calls.get("0" * 64)
        assert not values.contains("0" * 64) and not calls.contains("0" * 64)
        assert list(values.digests()) == present and list(calls.keys()) == []
        assert calls.keys_with_prefix("0") == [] and list(calls.query()) == []
        values.put("ab" * 32, encode_value(b"x"))  # the file now exists
    assert h5.is_file()
    with pytest.raises(KeyError):
        values.get("../etc")  # not a key: never becomes an HDF5 path


def test_value_without_attributes_is_a_corrupt_entry(values: Hdf5ValueStore, h5: Path) -> None:
    values.put("ab" * 32, encode_value(b"x"))
    with h5py.File(h5, "a") as f:
        f["values"].create_dataset("cd" * 32, data=np.zeros(3, dtype="u1"))
        f["values"].create_group("ef" * 32)
        f["values"]["ab" * 32].attrs["meta"] = "{broken"
    with pytest.raises(CorruptEntryError, match="lacks readable kind/meta/layout"):
        values.get("cd" * 32)
    with pytest.raises(CorruptEntryError, match="expected a dataset"):
        values.get("ef" * 32)
    with pytest.raises(CorruptEntryError, match="lacks readable"):
        values.get("ab" * 32)


def test_a_file_that_is_not_hdf5_is_a_storage_error(h5: Path) -> None:
    h5.parent.mkdir(parents=True)
    h5.write_bytes(b"this is not HDF5")
    with pytest.raises(StorageError, match=r"cannot open .* as an HDF5 file"):
        Hdf5CallStore(h5).get("ab" * 32)


# -- calls --------------------------------------------------------------------


def test_call_round_trip_and_idempotent_put(calls: Hdf5CallStore) -> None:
    rec = record("ab" * 32, version="3")
    calls.put(rec)
    calls.put(rec)
    calls.put(record("ab" * 32, metadata={"other": 1}))  # same key: the stored one stays
    assert calls.get(rec.key) == rec
    assert list(calls.keys()) == [rec.key]
    assert calls.get_many([rec.key, "cd" * 32, "bad/key"]) == [rec, None, None]
    assert calls.contains_many([rec.key, "cd" * 32, "bad/key"]) == [True, False, False]
    calls.delete(rec.key)
    calls.delete(rec.key)
    assert not calls.contains(rec.key)


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\x00garbage", "does not decode"),
        (dumps_plain({"not": "a record"}), "holds a dict, expected a CallRecord"),
        (dumps_plain(record("cd" * 32)), "holds the record of key cdcd"),
    ],
)
def test_garbage_call_is_a_corrupt_entry(
    calls: Hdf5CallStore, h5: Path, payload: bytes, message: str
) -> None:
    calls.put(record("ef" * 32))
    with h5py.File(h5, "a") as f:
        f["calls"].create_dataset("ab" * 32, data=np.frombuffer(payload, dtype="u1"))
    with pytest.raises(CorruptEntryError, match=message):
        calls.get("ab" * 32)


def test_prefix_expansion(calls: Hdf5CallStore, values: Hdf5ValueStore) -> None:
    for key in ("ab01" + "0" * 60, "ab02" + "0" * 60, "ac00" + "0" * 60, "f" * 64):
        calls.put(record(key))
    assert calls.keys_with_prefix("ab", 5) == ["ab01" + "0" * 60, "ab02" + "0" * 60]
    assert calls.keys_with_prefix("ab", 1) == ["ab01" + "0" * 60]
    assert calls.keys_with_prefix("f" * 64) == ["f" * 64]
    assert calls.keys_with_prefix("ad") == [] and calls.keys_with_prefix("x") == []
    cache = Cache(values, calls)
    assert cache.expand("ac") == "ac00" + "0" * 60
    with pytest.raises(AmbiguousDigestError):
        cache.expand("ab")
    with pytest.raises(KeyError):
        cache.expand("ad")


def test_query_by_name_arguments_and_metadata(calls: Hdf5CallStore) -> None:
    recs: List[CallRecord] = []
    for i in range(8):
        blob = encode_value(i)
        call = Call("mod.f" if i < 6 else "mod.g", {"x": i % 3, "y": i}, metadata={"parity": i % 2})
        recs.append(make_record(call, blob, blob_digest(blob)))
        calls.put(recs[-1])
    x0 = recs[0].arg_digests["x"]

    def keys(**kw: Any) -> List[str]:
        return sorted(r.key for r in calls.query(**kw))

    assert keys(name="mod.f") == sorted(r.key for r in recs[:6])
    assert keys(arg_digests={"x": x0}) == sorted(r.key for r in (recs[0], recs[3], recs[6]))
    assert keys(name="mod.f", arg_digests={"x": x0}, metadata={"parity": 1}) == [recs[3].key]
    assert keys(metadata={"parity": 0}, name="mod.g") == [recs[6].key]
    assert keys(name="nope") == []


def test_values_and_calls_share_one_file(h5: Path) -> None:
    cache = Cache(Hdf5ValueStore(h5), Hdf5CallStore(h5))
    key = cache.save(Call("mod.f", {"x": 1}, result=np.eye(3)))
    np.testing.assert_array_equal(cache.load_value(key), np.eye(3))
    with h5py.File(h5, "r") as f:
        assert set(f) == {"values", "calls"}


# -- locking ------------------------------------------------------------------


def test_a_held_lock_times_out_with_a_clear_error(h5: Path) -> None:
    store = Hdf5CallStore(h5, lock_timeout=0.2)
    store.put(record("ab" * 32))
    fd = os.open(str(h5) + ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # another reader: reads go on, writes wait
        assert store.get("ab" * 32).key == "ab" * 32
        with pytest.raises(StorageError, match=r"could not lock .*cache.h5.lock \(exclusive\) within 0.2 s"):
            store.put(record("cd" * 32))
        fcntl.flock(fd, fcntl.LOCK_EX)  # a writer: reads wait too
        with pytest.raises(StorageError, match=r"\(shared\) within 0.2 s"):
            store.get("ab" * 32)
    finally:
        os.close(fd)
    store.put(record("cd" * 32))
    assert store.contains("cd" * 32)


def test_threads_share_one_file(h5: Path) -> None:
    cache = Cache(Hdf5ValueStore(h5), Hdf5CallStore(h5))
    errors: List[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(20):
                key = cache.save(Call("mod.f", {"t": t, "i": i}, result=np.full(3, i)))
                np.testing.assert_array_equal(cache.load_value(key), np.full(3, i))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors
    assert len(list(cache.calls.keys())) == 80


# -- config -------------------------------------------------------------------


def test_config_relative_path_resolves_against_base_dir(tmp_path: Path) -> None:
    store = build_store("values", {"type": "hdf5", "path": "data/c.h5"}, tmp_path)
    assert isinstance(store, Hdf5ValueStore)
    assert store.to_config() == {"type": "hdf5", "path": str(tmp_path / "data" / "c.h5")}
    store.put("ab" * 32, encode_value(b"x"))
    assert (tmp_path / "data" / "c.h5").is_file()
    calls = Hdf5CallStore.from_config({"type": "hdf5", "path": "c.h5", "lock_timeout": 5}, tmp_path)
    assert calls.to_config() == {"type": "hdf5", "path": str(tmp_path / "c.h5"), "lock_timeout": 5.0}


@pytest.mark.parametrize(
    "table, message",
    [
        ({"type": "hdf5"}, r"calls.type = 'hdf5' needs path = 'cache.h5'"),
        ({"type": "hdf5", "path": 3}, "'path' must be str/PathLike, got int 3"),
        ({"type": "hdf5", "path": "a.h5", "lock_timeout": "1"}, "'lock_timeout' must be int/float, got str"),
        ({"type": "hdf5", "path": "a.h5", "lock_timeout": 0}, "lock_timeout must be > 0 seconds, got 0"),
        ({"type": "hdf5", "path": "a.h5", "url": "x"}, "unknown key 'url' for calls.type = 'hdf5'"),
    ],
)
def test_config_errors(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_store("calls", table)
    with pytest.raises(ConfigError, match=message.replace("calls.type", "values.type")):
        build_store("values", table)


@pytest.mark.parametrize("layout", ["chunked", "contiguous", "filtered"])
def test_a_value_declared_huge_but_never_written_is_refused_before_allocating(
    values: Hdf5ValueStore, h5: Path, layout: str
) -> None:
    # a few hundred bytes in a shared file that would read back as 64 GiB of
    # fill values: refused before h5py allocates the array
    values.put("ab" * 32, encode_value(b"x"))
    huge = (1 << 36,)
    with h5py.File(h5, "a") as f:
        options: dict[str, Any] = {
            "chunked": {"chunks": (1 << 20,)},
            "contiguous": {},
            "filtered": {"chunks": (1 << 20,), "compression": "gzip"},
        }[layout]
        ds = f["values"].create_dataset("cd" * 32, shape=huge, dtype="u1", **options)
        ds.attrs.update({"kind": "bytes", "meta": "{}", "layout": "raw"})
    assert h5.stat().st_size < 1 << 20
    with pytest.raises(CorruptEntryError, match="cdcdcdcd") as info:
        values.get("cd" * 32)
    assert "declares" in str(info.value) or "chunked or filtered" in str(info.value)
    assert values.get("ab" * 32).read_all() == encode_value(b"x").read_all()  # the rest still reads


def test_values_written_by_the_store_pass_the_size_checks(values: Hdf5ValueStore) -> None:
    # the edge cases of the checks: nothing stored, a scalar, an empty array
    for i, value in enumerate([b"", b"x" * 100_000, np.float32(1.5), np.zeros((0, 3))]):
        digest = f"{i:02x}" * 32
        values.put(digest, encode_value(value))
        got = decode_value(values.get(digest))
        assert type(got) is type(value) and np.array_equal(got, value), (value, got)
