"""Stable digests: the contract that a key is the same in every process,
on every supported Python, forever (until the digest scheme changes).

``GOLDEN`` is written here on purpose: it *is* the stability contract. It
was computed with ``_reference_digest`` below, an independent
re-implementation of the scheme as ``digest.py``'s notes specify it (from
``hashlib``, ``struct``, ``json`` and ``xxhash`` only), not by pasting
``digest_of``'s output. If a change to ``digest.py`` alters any value,
every key already stored by users becomes unreachable; such a change must
bump ``DIGEST_SCHEME_NAME`` and the prefixes, and regenerate this table
knowingly (``python tests/test_digest.py`` prints it from the reference).
"""

from __future__ import annotations

import copyreg
import dataclasses
import enum
import hashlib
import json
import math
import os
import pickle
import struct
import subprocess
import sys
import warnings
from pathlib import Path, PurePath, PurePosixPath
from typing import Any, Dict

import numpy as np
import pytest
import xxhash

from fleche_remote import Digest, UnstableDigestWarning, digest_of
from fleche_remote.call import LEGACY_DIGEST_SCHEME, Call, CallRecord, make_record
from fleche_remote.codec import bodyhash as bodyhash_module
from fleche_remote.codec import digest as digest_module
from fleche_remote.codec.bodyhash import DIGEST_SCHEME_NAME, BulkHashUnavailable
from fleche_remote.codec.digest import (
    c_order_blocks,
    call_digest,
    call_digest_from_arg_digests,
)
from fleche_remote.codec.plain import dumps_plain, loads_plain
from fleche_remote.codec.values import (
    BytesBlob,
    FileBlob,
    StreamBlob,
    VerifyingBlob,
    blob_digest,
    blob_hasher,
)

REPO = Path(__file__).resolve().parents[1]

#: Builds the case table; run as is here and in other interpreters, so the
#: values are constructed the same way everywhere.
CASES_SOURCE = r"""
import dataclasses
import enum
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from fleche_remote.codec.digest import call_digest, digest_of
from fleche_remote.codec.values import BytesBlob, blob_digest

MiB = 1 << 20

Point = dataclasses.make_dataclass("Point", [("x", int), ("y", float)], frozen=True)
Point.__module__ = "golden"
Color = enum.Enum("Color", ["RED", "GREEN"], module="golden")

CASES = {
    "none": None,
    "true": True,
    "false": False,
    "int_0": 0,
    "int_1": 1,
    "int_neg": -7,
    "int_big": 2**100,
    "float_1": 1.0,
    "float_half": 0.5,
    "float_neg_zero": -0.0,
    "float_nan": float("nan"),
    "float_inf": float("inf"),
    "complex": 1 + 2j,
    "str_empty": "",
    "str_ascii": "abc",
    "str_unicode": "\u00e9t\u00e9 \u2603",
    "bytes": b"\x00\xff",
    "bytearray": bytearray(b"ab"),
    "tuple_empty": (),
    "tuple": (1, "a", None),
    "list": [1, "a", None],
    "nested": {"a": [1, {"b": (2.5, b"c")}], "d": {"e": None}},
    "dict": {"x": 1, "y": [1, 2]},
    "dict_int_keys": {1: "one", 2: "two"},
    "set": {1, 2, 3},
    "frozenset": frozenset({"a", "b"}),
    "path": Path("data/run1.h5"),
    "pure_posix_path": PurePosixPath("/abs/file"),
    "dataclass": Point(1, 2.0),
    "enum": Color.GREEN,
    "np_int64_array": np.arange(6, dtype="<i8").reshape(2, 3),
    "np_float32_array": np.linspace(0, 1, 5, dtype="<f4"),
    "np_bool_array": np.array([True, False]),
    "np_unicode_array": np.array(["a", "bc"], dtype="<U2"),
    "np_empty": np.zeros((0, 3), dtype="<f8"),
    "np_object_array": np.array([1, "a", None], dtype=object),
    "np_datetime64_array": np.array(["2024-02-29", "1970-01-01"], dtype="<M8[D]"),
    "np_timedelta64_array": np.array([1, -2], dtype="<m8[s]"),
    "np_0d_array": np.array(2.5, dtype="<f8"),
    "np_float64": np.float64(1.5),
    "np_int32": np.int32(7),
    "np_bool": np.bool_(True),
    "call": ("call-digest", "mod.f", {"x": 1, "y": [1, 2]}, None),
    "call_versioned": ("call-digest", "mod.f", {"x": 1, "y": [1, 2]}, "2"),
    # the bulk threshold: below it a body is hashed as itself, from it on as XXH3-128
    "bytes_below_bulk": bytes(range(256)) * (MiB // 256 - 1) + bytes(255),
    "bytes_at_bulk": bytes(range(256)) * (MiB // 256),
    "str_at_bulk": "\u00e9" * (MiB // 2),
    "np_at_bulk": np.arange(MiB // 8, dtype="<i8"),
    "np_fortran_over_bulk": np.asfortranarray(np.arange(3 * MiB // 8, dtype="<f8").reshape(-1, 512)),
    "call_big_argument": ("call-digest", "mod.g", {"a": np.ones(MiB // 4, dtype="<f4"), "n": 3}, None),
}

#: Value digests of fixed (kind, meta, body) blobs: a server on another
#: Python must compute the same digest as the client that saved the value.
VALUE_CASES = {
    "value_empty": ("bytes", {}, b""),
    "value_bytes": ("bytes", {}, b"hello"),
    "value_ndarray": ("ndarray", {"dtype": "<f8", "shape": [2]}, b"\x00" * 16),
    "value_pickle5": ("pickle5", {"buffers": [MiB]}, b"stream" + b"\x07" * MiB),
    "value_below_bulk": ("bytes", {}, b"\x01" * (MiB - 1)),
    "value_at_bulk": ("bytes", {}, b"\x01" * MiB),
}


def digests():
    out = {}
    for label, value in CASES.items():
        if isinstance(value, tuple) and value[:1] == ("call-digest",):
            out[label] = str(call_digest(value[1], value[2], value[3]))
        else:
            out[label] = str(digest_of(value))
    for label, (kind, meta, body) in VALUE_CASES.items():
        out[label] = str(blob_digest(BytesBlob(kind, meta, body)))
    return out
"""


# -- the reference: the scheme, re-implemented from its description ---------

REF_KEY_PREFIX = b"fleche-remote/digest/2\x00"
REF_VALUE_PREFIX = b"fleche-remote/value/2\x00"
REF_THRESHOLD = 1 << 20


def _ref_body(tag: bytes, data: bytes, threshold: int) -> bytes:
    """tag, u64 length, then the bytes, or from the threshold on their XXH3-128."""
    n = len(data)
    return tag + n.to_bytes(8, "big") + (data if n < threshold else xxhash.xxh3_128(data).digest())


def _ref_named(tag: bytes, name: str, payload: Any, threshold: int) -> bytes:
    text = name.encode()
    return tag + len(text).to_bytes(4, "big") + text + _ref_encode(payload, threshold)


def _ref_encode(obj: Any, threshold: int) -> bytes:
    t = type(obj)
    if obj is None:
        return b"N"
    if t is bool:
        return b"T" if obj else b"F"
    if t is int:
        text = str(obj).encode()
        return b"i" + len(text).to_bytes(4, "big") + text
    if t is float:
        return b"fnan" if obj != obj else b"f" + struct.pack(">d", obj)
    if t is complex:
        return b"c" + struct.pack(">dd", obj.real, obj.imag)
    if t is str:
        return _ref_body(b"s", obj.encode("utf-8", "surrogatepass"), threshold)
    if t in (bytes, bytearray, memoryview):
        return _ref_body(b"b", bytes(obj), threshold)
    if t in (tuple, list):
        head = (b"t" if t is tuple else b"l") + len(obj).to_bytes(8, "big")
        return head + b"".join(_ref_encode(x, threshold) for x in obj)
    if t is dict:
        pairs = sorted(_ref_raw(k, threshold) + _ref_raw(v, threshold) for k, v in obj.items())
        return b"d" + len(pairs).to_bytes(8, "big") + b"".join(pairs)
    if t in (set, frozenset):
        elems = sorted(_ref_raw(x, threshold) for x in obj)
        return (b"S" if t is set else b"Z") + len(elems).to_bytes(8, "big") + b"".join(elems)
    if isinstance(obj, PurePath):
        return _ref_named(b"p", "path", obj.as_posix(), threshold)
    if isinstance(obj, enum.Enum):
        return _ref_named(b"e", f"{t.__module__}.{t.__qualname__}", obj.name, threshold)
    if dataclasses.is_dataclass(obj):
        fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        return _ref_named(b"D", f"{t.__module__}.{t.__qualname__}", fields, threshold)
    if isinstance(obj, np.ndarray) and obj.dtype != object:
        dtype_text = obj.dtype.str if obj.dtype.fields is None else repr(obj.dtype.descr)
        header = f"{dtype_text}|{','.join(str(n) for n in obj.shape)}".encode()
        return (
            b"a" + len(header).to_bytes(4, "big") + header + _ref_body(b"", obj.tobytes(order="C"), threshold)
        )
    if isinstance(obj, np.generic):
        header = obj.dtype.str.encode()
        return b"g" + len(header).to_bytes(4, "big") + header + obj.tobytes()
    if isinstance(obj, np.ndarray):
        return (
            b"O" + obj.ndim.to_bytes(4, "big") + _ref_encode(tuple(obj.shape), threshold)
            + _ref_encode(obj.ravel().tolist(), threshold)
        )  # fmt: skip
    raise TypeError(f"the reference does not cover {t}")


def _ref_raw(obj: Any, threshold: int = REF_THRESHOLD) -> bytes:
    return hashlib.sha256(REF_KEY_PREFIX + _ref_encode(obj, threshold)).digest()


def _reference_digest(obj: Any, threshold: int = REF_THRESHOLD) -> str:
    return _ref_raw(obj, threshold).hex()


def _reference_value_digest(
    kind: str, meta: Dict[str, Any], body: bytes, threshold: int = REF_THRESHOLD
) -> str:
    head = json.dumps([kind, meta], sort_keys=True, separators=(",", ":")).encode() + b"\x00"
    return hashlib.sha256(REF_VALUE_PREFIX + head + _ref_body(b"", body, threshold)).hexdigest()


def _reference_table() -> Dict[str, str]:
    namespace = _cases()
    out = {}
    for label, value in namespace["CASES"].items():
        if isinstance(value, tuple) and value[:1] == ("call-digest",):
            out[label] = _reference_digest(("call", value[1], value[3], value[2]))
        else:
            out[label] = _reference_digest(value)
    for label, (kind, meta, body) in namespace["VALUE_CASES"].items():
        out[label] = _reference_value_digest(kind, meta, body)
    return out


GOLDEN: Dict[str, str] = {
    "none": "694deecffa3d4f64d6c8f0080eac2beed2cb3e37c5f4a1ac821b93721b1c0a52",
    "true": "a74cda73a41275fbbfce9b3a5c5a7d116eb2460165089ebbee43c9c9493dddd6",
    "false": "fa68a81234fc0bcdad963e3f9477c8811ded87d76e07aebf5d26f1b52856313f",
    "int_0": "76ab424bf7e43bf77b9cd90561ad7166db8773bfa82e32f8f95d6fecb2fa9590",
    "int_1": "437614276556489c538ccde02101a8268fe02691e57ed76ea4d9145032c3139f",
    "int_neg": "ff9242cba54ba338cefd6297ff387ba6603f9b8aef9daab2a88d4bdf018f26c8",
    "int_big": "a01a3379182d65e2036b1a7129c808f4e376ee680c03520def0a40d78692e59c",
    "float_1": "443a02b948cac129d85355becfdc8dabf9da96bb8bbd44684668dd683c58b18d",
    "float_half": "c82d75d301e654c513e02ec7170d3c8d533b4f296c65d12affb80dcff209f89c",
    "float_neg_zero": "58bca88ac7facc2353f1e90c0a37abdafd9ec9229ec6eb17deb094d4dcd8dd76",
    "float_nan": "f51163e06dfcb1eb4eb34de15b245c85ddaa4eab7a9e23f5de1af597de99ef47",
    "float_inf": "106784641e750b3f2c3ec35319fb1df81a85cfd4b206fea93bbfeb804f850c79",
    "complex": "1862a3cc58b14704eb5d935d6cfc55d8d576a975959a6b0a87925de199696944",
    "str_empty": "f80b7b4b00f0bf0573de0856f32930f56bf5c75d3c43355b22be916a2e804064",
    "str_ascii": "28756ccbc26e3cc5c82f7183716c8649276a2bb2b54d4c33c6b7c2b849db6895",
    "str_unicode": "05b200f69fe1b14cac2216d8455a4664bb9fa3b7e5e755332862a28d1f718825",
    "bytes": "4f61a2a1aaf1922a59d91aa738da21ec8e8a5f76b5033deec5d71b7eeb201e01",
    "bytearray": "f56218776523c32e24e35a97289f9452a9178037f8bdcf39495839318c424561",
    "tuple_empty": "a30baa5e9c526a0afff04ae791a15346459d840abe936f9a7a358bd8bb51e291",
    "tuple": "5f285e80fee1b7b75bdfc64ea10426bc647b30cf31f7dc6d81dfbd09d572b4f4",
    "list": "78cbdf5f3bdbc6f5bc63e11d904ecd8f95212588c57748f2d6462a6e53ef46e4",
    "nested": "58476c4e90c0a007a91a4caaf23116a7f80da2fe572a9d629d520fb5439fae35",
    "dict": "6f9d26bfc8588ef7df983ceea08f2d05ac301c8742dc4cde736b8e3b0efc1023",
    "dict_int_keys": "4dcaabe4f0810b3d9704473764827f553efc29b270072bd21bdaf596ac0505b1",
    "set": "e347c25f0485f9f69aea960deeb8a4c6b73ed6c48a786214894a2121e609799c",
    "frozenset": "9d5a7a15c99f2abe43e00c7f04b769d179f798b53b72cd796465b80b2bcf8ca5",
    "path": "37009c1842f540ea4bc846f8ec389e678448a261427bf55f91cb0a268e52a50c",
    "pure_posix_path": "e2ad93acee7bd24a1e6628de0324c032ac4385b175cf4925fb0fc0ddb520dfcd",
    "dataclass": "ffb6fd47fc4eecb6f1eb4b213caea3751de36006bec2bd73d488d23dafe6db9a",
    "enum": "aa877a66bc019916e42fe694810c64a7b6f4165f7f6d8a33f389b19109829322",
    "np_int64_array": "35780ffc991292eaffc97af1a83675c8c3f64b9446da8c77ba3cc2d7231fbe20",
    "np_float32_array": "c20bb79fbe3ce35a7b73763b1b7031146e64be8615aaffbc695674e1903d2c3e",
    "np_bool_array": "a8632c7cfe6a04f90bf5a5081cd3c124d46dc8b49a68be5f680985f27fdee7eb",
    "np_unicode_array": "86a6f1f0717651e80a38d1d73760ec93ed361eb856b39758ea84611d7a806c4c",
    "np_empty": "382aa4fe10acd85391a961e39634536266c40374532732a34e0addb69aca6510",
    "np_object_array": "87cb66d132784f1aabd78d8143cdc5e1d3b8031ba3f999c8f30f90ed9e7b1456",
    "np_datetime64_array": "59f1856cb24711cc1681ede31d15d5868076b64ac07a8c8a28aa6c9966d33ad8",
    "np_timedelta64_array": "06cb26c85680d8cab018149c140ce1dd7897455ddfb6ae13c366f0fedd3dceac",
    "np_0d_array": "1594115b8ad7506006a3aa9db146d40ce16fa5269830661d2e2d1a7d18c977ac",
    "np_float64": "75e3e8462247063bedfac86379141fa096e472454e8617874ad8d72375f7cb14",
    "np_int32": "92c44e32b8f8d6930f9720fca85398918ce83b15d66432d1fda624e125fc2628",
    "np_bool": "3852755beb00e7c829f4c283a2841c5efa4d2b462ca59c69e27686d9b864f0ef",
    "call": "1f9fb1c0f9a05c811163de008c2ab930b4247771692ee72b370d0fc7bb5c7f6f",
    "call_versioned": "7b3acbb3d2d813bc8ce7f18068b5592c5df9c1a295a6f4617f4ea676381cbd89",
    "bytes_below_bulk": "691906fe32f2b4f25740478cc01f03d014b473d93876a374fe342b4a74c7b3e8",
    "bytes_at_bulk": "35da3166d27c3f0b362e29a2a97fe5093ece283d38494b8b3847975c28ceac56",
    "str_at_bulk": "619add1f09101ea2bdd236f5bfd6412662b3cd0d1afd2e530a7483b40cddc0e9",
    "np_at_bulk": "9b84a7d1c165be45a879ae1137670a632c36358ebe9807b9b2ea09eeda0c406a",
    "np_fortran_over_bulk": "bdaf04cf5297d6d719718ce3e989318ca78c666263bccde0f170c5392be853ba",
    "call_big_argument": "db4432d255c743e7b1bf8aee10df71032230afc84b5987ab8bd51a9d69f70351",
    "value_empty": "7a9d513b5bd1552253c3c0f71fa28eced4152bd90a06d0333c717fa80254f987",
    "value_bytes": "bd000a144063b15e4e95c8ef37d06c47ba07b29fd2b989f1f51b0f0f57acb497",
    "value_ndarray": "f7943d2f6682e3cea9d59ce012c4c47053e565d1c181e889e11c27550dbfb38f",
    "value_pickle5": "2776be02c10d454d2d97f52a94423cc0855e3ef554526081e7e0146f9eaca7b8",
    "value_below_bulk": "42f11fe8389f8e1f5b93075b7880343ec0e988ab035be2a934f51a8e44cb1960",
    "value_at_bulk": "8c547ac15854144c2ea71dc4afaf54bb8e814bf2673740f8a2dceb6073e36bbc",
}


def _cases() -> Dict[str, Any]:
    namespace: Dict[str, Any] = {}
    exec(CASES_SOURCE, namespace)
    return namespace


def _digests_in(python: str, hash_seed: str = "random") -> Dict[str, str]:
    script = CASES_SOURCE + "\nimport json\nprint(json.dumps(digests()))\n"
    env = dict(os.environ, PYTHONHASHSEED=hash_seed, PYTHONPATH=str(REPO))
    proc = subprocess.run([python, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, (
        f"{python} could not compute the digests (it needs fleche_remote and numpy):\n{proc.stderr}"
    )
    return json.loads(proc.stdout)


def test_golden_digests_in_this_process() -> None:
    assert _cases()["digests"]() == GOLDEN


def test_reference_implementation_gives_the_golden_table() -> None:
    # the table is the independent reference's output, and stays so
    assert _reference_table() == GOLDEN


def test_case_table_is_the_golden_table() -> None:
    # a case added without a golden value (or the reverse) is a mistake
    namespace = _cases()
    assert set(namespace["CASES"]) | set(namespace["VALUE_CASES"]) == set(GOLDEN)
    assert len(set(GOLDEN.values())) == len(GOLDEN)  # and every case is a different key


@pytest.mark.parametrize("hash_seed", ["0", "4242"])
def test_same_digests_in_a_fresh_process(hash_seed: str) -> None:
    # different hash seeds reorder sets and dicts; the digests must not notice
    assert _digests_in(sys.executable, hash_seed) == GOLDEN


@pytest.mark.parametrize("version", ["3.9", "3.13"])
def test_same_digests_on_every_supported_python(other_pythons: Dict[str, str], version: str) -> None:
    assert version in other_pythons, f"the other_pythons fixture offers no Python {version}"
    assert _digests_in(other_pythons[version]) == GOLDEN


def test_digest_is_a_hex_str() -> None:
    d = digest_of("x")
    assert isinstance(d, Digest) and isinstance(d, str)
    assert len(d) == 64 and int(d, 16) >= 0
    assert d.short() == d[:12] and d.short(4) == d[:4]


def test_dict_and_set_order_do_not_matter() -> None:
    a = {"x": 1, "y": 2, "z": [3]}
    b = {"z": [3], "y": 2, "x": 1}
    assert list(a) != list(b) and digest_of(a) == digest_of(b)
    assert digest_of({3, 1, 2}) == digest_of({2, 3, 1})
    assert digest_of({"k": {1: "a", "b": 2}}) == digest_of({"k": {"b": 2, 1: "a"}})
    assert call_digest("f", {"x": 1, "y": 2}) == call_digest("f", {"y": 2, "x": 1})


@pytest.mark.parametrize(
    "values",
    [
        (1, 1.0, True, "1", b"1", np.int64(1), np.float64(1.0)),
        (0, 0.0, False, None, "", (), [], {}),
        ((1, 2), [1, 2], {1, 2}, frozenset({1, 2})),
        (("ab", "c"), ("a", "bc")),
        ("path", Path("path"), b"path"),
        (np.array([1, 2], dtype="<i8"), np.array([1, 2], dtype="<i4"), np.array([[1, 2]], dtype="<i8")),
    ],
)
def test_equal_looking_values_of_different_types_differ(values: tuple) -> None:
    digests = [digest_of(v) for v in values]
    assert len(set(digests)) == len(values)


def test_equal_values_hash_equal() -> None:
    assert digest_of(2**70) == digest_of(int("1" + "0" * 21) * 0 + 2**70)
    assert digest_of(float("nan")) == digest_of(-float("nan"))  # every NaN is one argument
    assert digest_of(Path("a/b")) == digest_of(PurePosixPath("a/b"))
    assert digest_of(bytearray(b"xy")) == digest_of(b"xy")


def test_numpy_arrays_hash_by_dtype_shape_and_content() -> None:
    a = np.arange(12, dtype="<f8").reshape(3, 4)
    fortran = np.asfortranarray(a)
    assert not fortran.flags["C_CONTIGUOUS"]
    assert digest_of(fortran) == digest_of(a)  # memory layout is not the value
    assert digest_of(a[:, ::2]) == digest_of(np.ascontiguousarray(a[:, ::2]))
    changed = a.copy()
    changed[2, 3] += 1e-12
    assert digest_of(changed) != digest_of(a)
    assert digest_of(a.reshape(4, 3)) != digest_of(a)
    assert digest_of(np.float32(1.5)) != digest_of(np.float64(1.5))
    assert digest_of(np.array([1, "a"], dtype=object)) == digest_of(np.array([1, "a"], dtype=object))


@dataclasses.dataclass
class Sample:
    name: str
    values: list


def test_dataclasses_hash_by_class_and_fields() -> None:
    assert digest_of(Sample("a", [1])) == digest_of(Sample("a", [1]))
    assert digest_of(Sample("a", [1])) != digest_of(Sample("a", [2]))
    other = dataclasses.make_dataclass("Other", [("name", str), ("values", list)])
    assert digest_of(other("a", [1])) != digest_of(Sample("a", [1]))  # another class, same fields


def test_unknown_class_warns_once_per_type() -> None:
    class Opaque:
        def __init__(self, v: int) -> None:
            self.v = v

    class AlsoOpaque:
        pass

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = digest_of(Opaque(1))
        digest_of(Opaque(2))
        digest_of([Opaque(3)])
        digest_of(AlsoOpaque())
    unstable = [w for w in caught if issubclass(w.category, UnstableDigestWarning)]
    assert len(unstable) == 2
    assert "Opaque" in str(unstable[0].message) and "AlsoOpaque" in str(unstable[1].message)
    assert first == digest_of(Opaque(1)) and first != digest_of(Opaque(2))


def test_known_types_do_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for value in _cases()["CASES"].values():
            digest_of(value)
        digest_of(Sample("x", [np.zeros(2)]))
        digest_of(math.pi)


# -- the bulk rule and its threshold ------------------------------------------


def test_bulk_threshold_is_part_of_the_scheme() -> None:
    # changing it changes keys: it must move only with DIGEST_SCHEME_NAME
    assert bodyhash_module.BULK_THRESHOLD == REF_THRESHOLD == 1 << 20
    assert DIGEST_SCHEME_NAME == "fleche-remote/2"


@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 200])
def test_threshold_boundary_matches_the_reference(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    monkeypatch.setattr(bodyhash_module, "BULK_THRESHOLD", 64)
    data = bytes((i * 7) % 251 for i in range(n))
    for value in (data, data.decode("latin-1"), np.frombuffer(data, dtype=np.uint8), {"k": data}):
        assert digest_of(value) == _reference_digest(value, threshold=64), (n, type(value))
    blob = BytesBlob("bytes", {}, data)
    assert blob_digest(blob) == _reference_value_digest("bytes", {}, data, threshold=64)
    # the same digest whatever the chunking of a streamed body
    chunked = StreamBlob("bytes", {}, n, (data[i : i + 5] for i in range(0, n, 5)))
    assert blob_digest(chunked) == blob_digest(blob)


def test_below_and_at_the_threshold_use_different_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bodyhash_module, "BULK_THRESHOLD", 64)
    for n in (63, 64):
        data = b"x" * n
        raw_form = hashlib.sha256(REF_KEY_PREFIX + b"b" + n.to_bytes(8, "big") + data).hexdigest()
        bulk_form = hashlib.sha256(
            REF_KEY_PREFIX + b"b" + n.to_bytes(8, "big") + xxhash.xxh3_128(data).digest()
        ).hexdigest()
        assert digest_of(data) == (raw_form if n < 64 else bulk_form)


def test_large_array_in_any_layout_hashes_as_its_c_order_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bodyhash_module, "BULK_THRESHOLD", 1000)
    monkeypatch.setattr(digest_module, "BLOCK_BYTES", 4096)  # many slabs, one row at a time too
    a = np.arange(40 * 30 * 7, dtype="<f8").reshape(40, 30, 7)
    for view in (np.asfortranarray(a), a[:, ::2], a[::-1], a.transpose(1, 0, 2)):
        assert digest_of(view) == _reference_digest(np.ascontiguousarray(view), threshold=1000)
    for limit in (1, 100, 4096, 10**9):
        assert b"".join(c_order_blocks(a[:, ::3], limit)) == np.ascontiguousarray(a[:, ::3]).tobytes()


def test_missing_xxhash_is_a_clear_error_only_for_large_bodies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bodyhash_module, "BULK_THRESHOLD", 64)
    monkeypatch.setattr(bodyhash_module, "_xxh3_128", None)
    monkeypatch.setitem(sys.modules, "xxhash", None)  # import xxhash now fails
    digest_of(b"x" * 63)  # small bodies need only the standard library
    with pytest.raises(BulkHashUnavailable, match="pip install 'xxhash>=3'"):
        digest_of(b"x" * 64)
    # a server verifying an incoming large value fails before taking any of it
    consumed = []

    def source() -> Any:
        consumed.append(1)
        yield b"x" * 64

    verifying = VerifyingBlob(StreamBlob("bytes", {}, 64, source()), "0" * 64)
    with pytest.raises(BulkHashUnavailable):
        next(iter(verifying.chunks()))
    assert not consumed


def test_a_wrong_xxhash_build_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    class Wrong:
        VERSION = "0.7"

        @staticmethod
        def xxh3_128(data: bytes = b"") -> Any:
            return hashlib.md5(data)

    monkeypatch.setattr(bodyhash_module, "_xxh3_128", None)
    monkeypatch.setitem(sys.modules, "xxhash", Wrong)
    with pytest.raises(BulkHashUnavailable, match="expected 99aa06d3"):
        bodyhash_module.bulk_hasher()


# -- keys from per-argument digests, and the record's scheme -----------------


@pytest.mark.parametrize(
    "arguments",
    [{}, {"x": 1}, {"x": [1, 2], "y": {"z": None}, "big": np.arange(300_000, dtype="<i8")}],
)
def test_key_from_argument_digests_is_the_call_key(arguments: Dict[str, Any]) -> None:
    for version in (None, "2"):
        arg_digests = {k: digest_of(v) for k, v in arguments.items()}
        assert call_digest_from_arg_digests("m.f", arg_digests, version) == call_digest(
            "m.f", arguments, version
        )


def test_make_record_hashes_each_argument_once(monkeypatch: pytest.MonkeyPatch) -> None:
    big = np.arange(300_000, dtype="<i8")
    call = Call("m.f", {"a": big, "b": 2}, result=b"r")
    seen = []
    real = digest_module._encode_numpy

    def counting(obj: Any, update: Any, depth: int) -> None:
        seen.append(obj.nbytes)
        real(obj, update, depth)

    monkeypatch.setattr(digest_module, "_encode_numpy", counting)
    blob = BytesBlob("bytes", {}, b"r")
    record = make_record(call, blob, blob_digest(blob))
    assert seen == [big.nbytes]
    monkeypatch.setattr(digest_module, "_encode_numpy", real)
    assert record.key == call.key()
    assert record.arg_digests == {"a": digest_of(big), "b": digest_of(2)}
    assert record.digest_scheme == DIGEST_SCHEME_NAME


def _record(**fields: Any) -> CallRecord:
    base: Dict[str, Any] = dict(
        key="ab" * 32, name="m.f", version=None, arguments=b"", arg_digests={}, metadata={}, value="cd" * 32
    )
    return CallRecord(**{**base, **fields})


def test_records_carry_their_scheme_through_the_restricted_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    record = _record()
    assert record.digest_scheme == DIGEST_SCHEME_NAME
    assert loads_plain(dumps_plain(record)) == record
    # pickle it exactly as a CallRecord was pickled before it had the field
    old_state = {k: v for k, v in vars(record).items() if k != "digest_scheme"}
    monkeypatch.setattr(
        CallRecord, "__reduce_ex__", lambda self, p: (copyreg.__newobj__, (CallRecord,), old_state)
    )
    data = pickle.dumps(record, protocol=4)
    monkeypatch.undo()
    old = loads_plain(data)
    assert isinstance(old, CallRecord)
    assert old.digest_scheme == LEGACY_DIGEST_SCHEME and old.key == record.key and old.value_size == 0


def test_value_digests_are_checked_under_the_scheme_a_record_names() -> None:
    blob = BytesBlob("bytes", {}, b"abc")
    digest = blob_digest(blob)
    assert b"".join(VerifyingBlob(blob, digest, DIGEST_SCHEME_NAME).chunks()) == b"abc"
    with pytest.raises(Exception, match="unknown to this fleche-remote"):
        blob_hasher("bytes", {}, scheme="fleche-remote/99")
    with pytest.raises(Exception, match="hashes to"):
        list(VerifyingBlob(BytesBlob("bytes", {}, b"abd"), digest).chunks())
    with pytest.raises(Exception, match="header said"):
        list(VerifyingBlob(StreamBlob("bytes", {}, 4, [b"abc"]), digest).chunks())


def test_file_blob_reads_the_same_digest(tmp_path: Path) -> None:
    body = bytes(range(256)) * 5000
    path = tmp_path / "v"
    path.write_bytes(b"head" + body)
    assert blob_digest(FileBlob("bytes", {}, len(body), path, 4)) == blob_digest(BytesBlob("bytes", {}, body))


if __name__ == "__main__":  # prints GOLDEN, computed by the reference
    print("GOLDEN: Dict[str, str] = {")
    for label, hexdigest in _reference_table().items():
        print(f"    {label!r}: {hexdigest!r},".replace("'", '"'))
    print("}")
