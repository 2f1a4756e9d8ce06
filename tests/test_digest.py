"""Stable digests: the contract that a key is the same in every process,
on every supported Python, forever (until ``DIGEST_SCHEME`` changes).

``GOLDEN`` was computed once and written here on purpose: it *is* the
stability contract. If a change to ``digest.py`` alters any of these
values, every key already stored by users becomes unreachable; such a
change must bump ``DIGEST_SCHEME`` and regenerate this table knowingly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path, PurePosixPath
from typing import Any, Dict

import numpy as np
import pytest

from fleche_remote import Digest, UnstableDigestWarning, digest_of
from fleche_remote.digest import call_digest

REPO = Path(__file__).resolve().parents[1]

#: Builds the case table; run as is here and in other interpreters, so the
#: values are constructed the same way everywhere.
CASES_SOURCE = r"""
import dataclasses
import enum
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from fleche_remote.digest import call_digest, digest_of

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
}


def digests():
    out = {}
    for label, value in CASES.items():
        if isinstance(value, tuple) and value[:1] == ("call-digest",):
            out[label] = str(call_digest(value[1], value[2], value[3]))
        else:
            out[label] = str(digest_of(value))
    return out
"""

GOLDEN: Dict[str, str] = {
    "none": "e3ed524c47bece6e0f7a8ba1558d9f73f8c74218b2cf6e8caff8cc26606a1d97",
    "true": "88efa262a81b206cec1b8bffec6ec850cdff24adeaf8cdcbc7ba4a053f0414fb",
    "false": "b8f29f799a73568d6eaf5c73a0fe8c076ceb478b0c44c8ce70136b9b9ed1eab8",
    "int_0": "9778faf48a2b2dc687e45aa71a6c84f6e9ed1c5586ede09b0d767b6a7712ec2f",
    "int_1": "9a9ff22202a4bdedd717fbcda2d1d1a565db087b20d1897c20b58843881c7fb5",
    "int_neg": "ab7738f54717bcfcfe085f3ce0e93e75a5ddbc30ba3c188a8d3197a344a70527",
    "int_big": "9fd0dd7060f4ff75159da4e5726db9fce00bbc5c7597d118eb87aa76ea0820b8",
    "float_1": "7e6c91d24841b3e30abcaae3bc70ad075a06aa1ab4375aafd4ff15185ab8ae8a",
    "float_half": "4201e7fab90247f6ffe1b56b0dd99d9420740d1cc5d4fcc23dec8063c76a09a6",
    "float_neg_zero": "f908b8a15f88607ba2a83c9aaaa7ffb55619b12e45bf5bfeb417bbb0b0f44085",
    "float_nan": "7b76438900d71acdc0122eb98283e7ed21653fe64e26fa07c8035319362bc964",
    "float_inf": "b2cafde5936d1471080a4002e6e21ec303dff6f881743954883753a2999f06e3",
    "complex": "1ab4e5a576f300005227e6b7a53293056ebc4baaf7ed8921221c1b176f57d3f2",
    "str_empty": "127b01347a3fc2c15574a24fd62294d0ab0e9d9bcfb5230a0865bfbbdeb3d3e2",
    "str_ascii": "c433183b0051e38f5ebce56c7008013a5b3511dd735b899d92ecc771929d5735",
    "str_unicode": "c9293567d1d53aba9a1c00f0a41f3a9b08500ed166614b106a5738054d614995",
    "bytes": "ab1262ac632274d1620c2c915bcc5cc6c35ebd39a9276005667ba53048656849",
    "bytearray": "ad57ede933f95ddaa649dd42cb0361eb220475c7aa87c8cf5e45cea59610f4c2",
    "tuple_empty": "88b81d34a0002050f759f4c4824e9acfb951951df69d7b6dcb959d7eac62e49b",
    "tuple": "bbd99f882fb6ba38821c55954c8a71d5b0a644365b60045666162d63dd8b7322",
    "list": "b8e2f4bbce330671292884a77cc744460323d1a7d9fb0ae4e503c7084e4372a4",
    "nested": "d70809d5cb067fe2f9d883246305882fee03482a259f73405123f6f992673bca",
    "dict": "0916a648468f61dfa011cf5adb1e026f8e5d55dbd130a63ad04b322c55d8ca58",
    "dict_int_keys": "aac62e68d581a6d0c97dea12da3e3e00234af432421323b277149dc8ec4b1b86",
    "set": "c7ecb1247a28e918fe91a542ab3ed2db8a601d98809f978ebd2bdd43e74c28de",
    "frozenset": "66bd896950baef7c5a430f49ebdcd25e57e2543134aa052adb1ee35600659c46",
    "path": "b678287615f26a79b6ba3c9cdc7cd19e9262bf442100f5bd6a4cde86e0a06cb6",
    "pure_posix_path": "e9868eb6316df0f5f6eeb3efaf1846f5e4edb8aca8e9f58b9487f4cc3f73c996",
    "dataclass": "74a5f5ff99f82acb43f253f819a1013595b01c26a638b3dd505b590cf23e0159",
    "enum": "7734891a759556e93efe329dbe25527d09469b29aeabf969d6a0dff7ce297dea",
    "np_int64_array": "c5530e8aacec9aa1855889e89c67306bf6df9b5d5c18b356df9e691b80d6d018",
    "np_float32_array": "43c7f8cea0b0aac5178e18078b3923b570986b42f28e53de47822ad6e0e15748",
    "np_bool_array": "47899e9be92d20963eb0a2e0a0848602eeccbf79a649efebaad06093ffc6d2f0",
    "np_unicode_array": "4446a259f31b1d53933d0ece924c9afd9f67b99705cb3d44daf2c136b54447f6",
    "np_empty": "5a360a9d9197e50b998f38780a038473e1fc3450f3fbc1fec37a7b268e299bfe",
    "np_object_array": "f8f6011f4f5c317e80aa4707ccf3e46fbf8d7a076849769ca2374a67cbd38f39",
    "np_datetime64_array": "346919bb63b7a43a72ee72495c8ea76b3d380c246143fed0d8c476e9591fa590",
    "np_timedelta64_array": "f3bc709aa03a725f85267cf8c9fa0b2aa72412713c9250b98abafcf768edd8dc",
    "np_0d_array": "368806343b515c3dfa45dbe60ea3615eecc828b0e2d53520649f10bd4fe401b3",
    "np_float64": "ce6fec42027b655031a2df68d7651f73da5140b057ccbb63aeba53dadf5614ea",
    "np_int32": "1c97cb392a4e7a2ffca425bc86c293bfa3de08937e356b58187c85ebe15ad8b3",
    "np_bool": "5277d02adc5b8aede5768e798eb8902167b31edb541da00b9ba55b275026724b",
    "call": "038146a95c241644f61f2407c47b63160d7d0d99407f64c6d94045853b422403",
    "call_versioned": "8694da95c6c86d9ab2816965d2e5c17ae0a0b658eb4b23b6f255e8ebc416568d",
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


def test_case_table_is_the_golden_table() -> None:
    # a case added without a golden value (or the reverse) is a mistake
    assert set(_cases()["CASES"]) == set(GOLDEN)
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
