"""The values the conformance suite round-trips through every cache: one of
each kind a user stores (plain data, classes pickled by reference, NumPy
arrays of every layout and dtype, a value large enough to stream in
chunks, values on each side of the inline threshold), and the subset
that also goes through the real sshd.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict

import numpy as np

from fleche_remote.storage.base import INLINE_MAX

# -- values of every shape ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Point:
    x: float
    y: float
    label: str = ""


class Opaque:
    """A plain class with state, not a dataclass: pickled by reference."""

    def __init__(self, payload: Dict[str, Any]) -> None:
        self.payload = payload

    def __eq__(self, other: object) -> bool:
        return type(other) is Opaque and other.payload == self.payload

    __hash__ = None  # type: ignore[assignment]


def _arrays() -> Dict[str, Any]:
    rng = np.random.default_rng(7)
    base = np.arange(24, dtype=np.int64).reshape(4, 6)
    return {
        "float64-2d": rng.standard_normal((7, 5)),
        "float32": rng.standard_normal(33).astype(np.float32),
        "float16": np.linspace(-1, 1, 9, dtype=np.float16),
        "int32-3d": np.arange(60, dtype=np.int32).reshape(3, 4, 5),
        "uint8": np.arange(256, dtype=np.uint8),
        "int8-negative": np.arange(-128, 128, dtype=np.int8),
        "big-endian": np.arange(10, dtype=">i4"),
        "bool": np.array([True, False, True, True]),
        "complex128": np.array([1 + 2j, -3.5j, 0]),
        "unicode": np.array(["a", "bcd", "ünï"]),
        "bytes-dtype": np.array([b"ab", b"", b"xyz"]),
        "datetime64": np.array(["2024-01-01", "1970-01-02"], dtype="datetime64[D]"),
        "0-d": np.array(3.25),
        "empty": np.zeros((0, 3)),
        "empty-1d-int": np.array([], dtype=np.int16),
        "fortran-order": np.asfortranarray(base.astype(np.float64)),
        "non-contiguous": base[:, ::2],
        "transposed": base.T,
        "structured": np.array([(1, 2.5), (3, -1.0)], dtype=[("a", "<i4"), ("b", "<f8")]),
        "object-dtype": np.array([1, "two", None], dtype=object),
        "10MB": rng.standard_normal(10 * 2**20 // 8),
    }


VALUES: Dict[str, Any] = {
    "None": None,
    "int": 42,
    "big-int": -(2**100) + 7,
    "float": 2.5,
    "bool": True,
    "str": "héllo wörld ✓",
    "empty-str": "",
    "bytes": b"\x00\x01binary\xff" * 100,
    "empty-bytes": b"",
    "bytearray": bytearray(b"mutable"),
    "list": [1, "two", 3.0, None],
    "tuple": (1, (2, (3,))),
    "set": {1, 2, 3},
    "frozenset": frozenset({"a", "b"}),
    "dict": {"a": 1, 2: "b", (3, 4): [5]},
    "nested": {"runs": [{"id": i, "tags": ("x", "y"), "ok": i % 2 == 0} for i in range(5)], "meta": {}},
    "dataclass": Point(1.0, -2.0, "p"),
    "custom-class": Opaque({"k": [1, 2, {"deep": b"bytes"}]}),
    "numpy-scalar": np.float32(1.5),
    **{f"ndarray-{k}": v for k, v in _arrays().items()},
}

#: Values whose encoded body is exactly INLINE_MAX - 1, INLINE_MAX and
#: INLINE_MAX + 1 bytes (a bytes value and a uint8 array are stored as is),
#: and float64 arrays around it: each lands on one side of the threshold.
for _delta in (-1, 0, 1):
    _body = (bytes(range(251)) * (INLINE_MAX // 251 + 1))[: INLINE_MAX + _delta]
    VALUES[f"bytes-inline{_delta:+d}"] = _body
    VALUES[f"ndarray-uint8-inline{_delta:+d}"] = np.frombuffer(_body, dtype=np.uint8).copy()
    VALUES[f"ndarray-float64-inline{_delta * 8:+d}"] = np.linspace(0, 1, INLINE_MAX // 8 + _delta)


def assert_same(got: Any, expected: Any) -> None:
    """Equal value and type; arrays also equal in dtype and shape."""
    assert type(got) is type(expected), f"got a {type(got).__name__}, saved a {type(expected).__name__}"
    if isinstance(expected, np.ndarray):
        assert got.dtype == expected.dtype
        assert got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)
    elif isinstance(expected, np.generic):
        assert got.dtype == expected.dtype and got == expected
    else:
        assert got == expected


#: The value round trips that also run over the real ssh: one of each way a
#: value is encoded, carried and stored (plain and by-reference pickles,
#: native arrays and their pickled fallbacks, a value streamed in chunks,
#: each side of the inline threshold). The rest differ only in what the
#: codec does on this side, which the in-process twins check for all.
SSH_VALUE_CASES = [
    "None",
    "big-int",
    "str",
    "empty-bytes",
    "set",
    "nested",
    "dataclass",
    "custom-class",
    "numpy-scalar",
    "ndarray-float64-2d",
    "ndarray-big-endian",
    "ndarray-fortran-order",
    "ndarray-0-d",
    "ndarray-empty",
    "ndarray-structured",
    "ndarray-object-dtype",
    "ndarray-10MB",
    "bytes-inline-1",
    "bytes-inline+0",
    "bytes-inline+1",
    "ndarray-uint8-inline+1",
    "ndarray-float64-inline+8",
]
