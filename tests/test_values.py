"""Value blobs: kinds, round trips, and how many times a big value is copied.

The "pickle5" kind keeps an object's large buffers out of its pickle
stream; these tests prove that it round-trips through every place a blob
goes (memory, files, gzip, HDF5, a chunked stream), that encoding copies
nothing of the buffers' size, that decoding reads each buffer once into
the memory the rebuilt object keeps, and that unknown or inconsistent
blobs are refused with a message saying what was expected.
"""

from __future__ import annotations

import gzip
import tracemalloc
from pathlib import Path
from typing import Any, Dict, Iterator, List

import numpy as np
import pytest

from fleche_remote.codec import values as values_module
from fleche_remote.codec.values import (
    KINDS,
    OUT_OF_BAND_MIN,
    Blob,
    BytesBlob,
    FileBlob,
    PartsBlob,
    StreamBlob,
    VerifyingBlob,
    blob_digest,
    decode_value,
    encode_value,
)
from fleche_remote.errors import CorruptEntryError
from fleche_remote.storage.file import FileValueStore
from fleche_remote.storage.memory import MemoryValueStore

MiB = 1 << 20


def _assert_same(a: Any, b: Any) -> None:
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b and type(a) is type(b)


def _streamed(blob: Blob, piece: int) -> StreamBlob:
    """The blob as it arrives from a wire: odd-sized pieces, read once."""
    body = blob.read_all()
    return StreamBlob(
        blob.kind, blob.meta, blob.size, (body[i : i + piece] for i in range(0, len(body), piece))
    )


VALUES: Dict[str, Any] = {
    "dict_of_arrays": {"a": np.arange(200_000, dtype="<i8"), "b": np.random.default_rng(0).random((300, 70))},
    "mixed": [np.ones(100_000, dtype="<f4"), "text", {"small": np.arange(3)}, None],
    "fortran_inside": {"f": np.asfortranarray(np.arange(60_000.0).reshape(300, 200))},
    "read_only": {"r": np.frombuffer(bytes(range(256)) * 1000, dtype=np.uint8)},
    "bytearray": bytearray(b"xyz" * 50_000),
    "structured": np.zeros(20_000, dtype=[("x", "<f8"), ("n", "<i4")]),
    "object_array": np.array([1, "a", None], dtype=object),
}


def test_objects_with_big_buffers_use_pickle5_and_small_ones_pickle() -> None:
    blob = encode_value(VALUES["dict_of_arrays"])
    assert blob.kind == "pickle5"
    assert blob.meta == {"buffers": [200_000 * 8, 300 * 70 * 8]}
    assert encode_value({"small": np.arange(10)}).kind == "pickle"
    assert encode_value(b"raw").kind == "bytes"
    assert encode_value(np.arange(5)).kind == "ndarray"
    assert set(KINDS) == {"pickle", "pickle5", "bytes", "ndarray"}


@pytest.mark.parametrize("label", list(VALUES))
@pytest.mark.parametrize("piece", [1, 4093, MiB + 7])
def test_round_trip_through_a_chunked_stream(label: str, piece: int) -> None:
    value = VALUES[label]
    blob = encode_value(value)
    if piece == 1 and blob.size > 300_000:
        piece = 997  # one byte at a time is proven on the smaller values
    _assert_same(value, decode_value(_streamed(blob, piece)))


@pytest.mark.parametrize("label", list(VALUES))
@pytest.mark.parametrize("compress", [False, True])
def test_round_trip_through_a_file_store(tmp_path: Path, label: str, compress: bool) -> None:
    store = FileValueStore(tmp_path, compress=compress)
    blob = encode_value(VALUES[label])
    digest = blob_digest(blob)
    store.put(digest, blob)
    got = store.get(digest)
    assert (got.kind, got.meta, got.size) == (blob.kind, blob.meta, blob.size)
    assert blob_digest(got) == digest
    _assert_same(VALUES[label], decode_value(got))


def test_round_trip_through_memory_and_hdf5_stores(tmp_path: Path) -> None:
    from fleche_remote.storage.hdf5 import Hdf5ValueStore

    value = VALUES["dict_of_arrays"]
    blob = encode_value(value)
    digest = blob_digest(blob)
    for store in (MemoryValueStore(), Hdf5ValueStore(tmp_path / "v.h5")):
        # stores keep the kind opaque: the server and HDF5 never unpickle it
        store.put(digest, VerifyingBlob(blob, digest))
        got = store.get(digest)
        assert (got.kind, got.meta) == ("pickle5", blob.meta)
        _assert_same(value, decode_value(got))


def test_decoded_buffers_are_writable_and_owned_by_the_result() -> None:
    value = {"a": np.arange(100_000, dtype="<i8")}
    back = decode_value(_streamed(encode_value(value), MiB))
    assert back["a"].flags.writeable
    back["a"][0] = 42  # the memory belongs to the result, not to a shared bytes
    assert value["a"][0] == 0


def test_encoding_copies_no_buffer() -> None:
    arrays = {f"a{i}": np.full(4 * MiB // 8, i, dtype="<f8") for i in range(4)}  # 16 MiB
    tracemalloc.start()
    try:
        blob = encode_value(arrays)
        digest = blob_digest(blob)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert blob.kind == "pickle5" and blob.size > 16 * MiB
    assert peak < 2 * MiB, f"encoding and hashing 16 MiB of buffers allocated {peak} bytes"
    assert isinstance(blob, PartsBlob) and len(digest) == 64


def test_a_non_contiguous_array_streams_in_bounded_slabs(monkeypatch: pytest.MonkeyPatch) -> None:
    from fleche_remote.codec import digest as digest_module

    monkeypatch.setattr(digest_module, "BLOCK_BYTES", MiB)
    arr = np.asfortranarray(np.arange(4 * MiB // 8, dtype="<f8").reshape(512, -1))  # 4 MiB
    tracemalloc.start()
    try:
        blob = encode_value(arr)
        digest = blob_digest(blob)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * MiB + (64 << 10), f"hashing a 4 MiB Fortran array held {peak} bytes"
    assert digest == blob_digest(encode_value(np.ascontiguousarray(arr)))
    _assert_same(arr, decode_value(BytesBlob(blob.kind, blob.meta, blob.read_all())))


def test_decoding_from_a_file_reads_once_into_the_result(tmp_path: Path) -> None:
    value = {f"a{i}": np.full(4 * MiB // 8, i, dtype="<f8") for i in range(4)}  # 16 MiB
    store = FileValueStore(tmp_path)
    blob = encode_value(value)
    digest = blob_digest(blob)
    store.put(digest, blob)
    got = store.get(digest)
    tracemalloc.start()
    try:
        back = decode_value(got)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    _assert_same(value, back)
    # the result's own 16 MiB, plus the stream and bookkeeping: no second copy
    assert peak < 16 * MiB + MiB, f"decoding 16 MiB allocated {peak} bytes at peak"


def test_buffers_beyond_the_cap_go_in_band(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(values_module, "OUT_OF_BAND_MAX", 2)
    value = [np.full(OUT_OF_BAND_MIN, i, dtype=np.uint8) for i in range(4)]
    blob = encode_value(value)
    assert blob.kind == "pickle5" and blob.meta == {"buffers": [OUT_OF_BAND_MIN] * 2}
    _assert_same(value, decode_value(_streamed(blob, 5000)))


def test_unknown_kinds_are_refused_clearly() -> None:
    with pytest.raises(CorruptEntryError, match=r"unknown value kind 'pickle7'; expected one of"):
        decode_value(BytesBlob("pickle7", {}, b"x"))


@pytest.mark.parametrize(
    "meta",
    [{}, {"buffers": "12"}, {"buffers": [-1]}, {"buffers": [1.5]}, {"buffers": [100]}, {"buffers": [True]}],
)
def test_pickle5_with_inconsistent_meta_is_refused(meta: Dict[str, Any]) -> None:
    with pytest.raises(CorruptEntryError, match="pickle5 value needs meta 'buffers'"):
        decode_value(BytesBlob("pickle5", meta, b"0123456789"))


def _chunks(parts: List[bytes]) -> Iterator[bytes]:
    yield from parts


def test_short_or_long_bodies_are_refused() -> None:
    blob = encode_value(np.arange(10, dtype="<i8"))
    body = blob.read_all()
    with pytest.raises(CorruptEntryError, match="ended after 40 of 80 bytes"):
        decode_value(StreamBlob("ndarray", blob.meta, 80, _chunks([body[:40]])))
    with pytest.raises(CorruptEntryError, match="8 bytes longer"):
        decode_value(StreamBlob("ndarray", blob.meta, 80, _chunks([body, b"x" * 8])))
    with pytest.raises(CorruptEntryError, match="dtype and shape need 80"):
        decode_value(BytesBlob("ndarray", blob.meta, body[:72]))


def test_a_truncated_file_is_refused(tmp_path: Path) -> None:
    blob = encode_value({"a": np.arange(100_000, dtype="<i8")})
    path = tmp_path / "v"
    path.write_bytes(blob.read_all()[:-10])
    with pytest.raises(CorruptEntryError, match="truncated"):
        decode_value(FileBlob(blob.kind, blob.meta, blob.size, path))
    with pytest.raises(CorruptEntryError, match="truncated"):
        FileBlob("bytes", {}, blob.size, path).read_all()


def test_gzip_file_blobs_fill_through_the_opener(tmp_path: Path) -> None:
    value = {"a": np.arange(100_000, dtype="<i8")}
    blob = encode_value(value)
    path = tmp_path / "v.gz"
    path.write_bytes(gzip.compress(blob.read_all()))
    got = FileBlob(blob.kind, blob.meta, blob.size, path, opener=lambda: gzip.open(path, "rb"))
    _assert_same(value, decode_value(got))
