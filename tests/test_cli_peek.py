"""``fleche_remote.codec.peek``: arguments shown without importing or running anything."""

from __future__ import annotations

import dataclasses
import pathlib
import pickle
import sys

import cloudpickle
import numpy as np

from fleche_remote.codec.peek import PEEK_MAX_BYTES, abridged_arguments, peek_arguments


@dataclasses.dataclass
class Point:
    x: int


class Boom:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def shown(**arguments) -> str:
    return abridged_arguments(cloudpickle.dumps(arguments, protocol=4), 200)


def test_plain_data_shows_as_itself() -> None:
    assert shown(n=200, s="abc", b=b"xy", f=1.5, t=(1, 2), d={"k": None}) == (
        "n=200, s='abc', b=b'xy', f=1.5, t=(1, 2), d={'k': None}"
    )
    assert shown(xs=list(range(100))) == "xs=[0, 1, 2, 3, ...]"


def test_objects_become_placeholders_with_array_shapes() -> None:
    assert shown(a=np.zeros((3, 4))) == "a=ndarray(shape=(3, 4))"
    assert shown(p=pathlib.PurePosixPath("/x")) == "p=<PurePosixPath>"
    assert shown(f=lambda v: v) == "f=<function>"
    assert shown(pt=Point(1)) == "pt=<Point>"  # a class of this test module, pickled by value


def test_nothing_is_imported_or_run(tmp_path) -> None:
    marker = tmp_path / "ran"
    data = cloudpickle.dumps({"obj": Boom(str(marker))}, protocol=4)
    assert pickle.loads(data)["obj"] is None and marker.exists()  # a real unpickle runs it
    marker.unlink()
    arguments, complete = peek_arguments(data)
    assert complete and repr(arguments["obj"]) == "<Path.touch>"
    assert not marker.exists()
    # a global whose import has effects (it opens a web browser) is named, never imported
    sys.modules.pop("antigravity", None)
    fly = b"\x80\x04}\x94\x8c\x01x\x94cantigravity\nfly\n\x94s."
    assert abridged_arguments(fly) == "x=<antigravity.fly>"
    assert "antigravity" not in sys.modules


def test_unreadable_or_huge_pickles_show_their_size() -> None:
    assert abridged_arguments(b"not a pickle") == "<12 bytes>"
    assert abridged_arguments(pickle.dumps([1, 2])) == "<" + str(len(pickle.dumps([1, 2]))) + " bytes>"
    huge = cloudpickle.dumps({"b": b"x" * PEEK_MAX_BYTES}, protocol=4)
    assert abridged_arguments(huge) == f"<{len(huge)} bytes>"
