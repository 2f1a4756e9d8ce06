"""fleche's query form beside ours, on every cache of the conformance suite
(memory, files, SQLite, PostgreSQL, HDF5, stacks, and each of them behind
SshCache through the real sshd), and filters that cannot apply raising."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional

import pytest
from conformance.factories import FACTORIES, CacheUnderTest, params

from fleche_remote import BaseCache, Call, cached
from fleche_remote.caches import Cache
from fleche_remote.storage.memory import MemoryCallStore, MemoryValueStore

NAME = "qmod.f"
RUNTIME_A = {"hostname": "node1", "cores": 4}
RUNTIME_B = {"hostname": "node2", "cores": 4}

CALLS = {
    "a": Call(NAME, {"x": 1, "mode": "fast"}, "a", {"runtime": RUNTIME_A, "tags": ["x", "y"]}),
    "b": Call(NAME, {"x": 2, "mode": "fast"}, "b", {"runtime": RUNTIME_B, "n": 2}),
    "c": Call(NAME, {"x": 1, "mode": None}, "c", {"runtime": RUNTIME_A}, version="2"),
    "g": Call("other.f", {"x": 1}, "g", {"n": 2}),
    "h": Call("qmod.h", {"y": 1}, "h", {}),
}


@pytest.fixture(params=params())
def cache_under_test(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[CacheUnderTest]:
    subject = FACTORIES[request.param].make(tmp_path, request)
    try:
        yield subject
    finally:
        subject.close()


def found(cache: BaseCache, *args: Any, **kwargs: Any) -> List[str]:
    return sorted(lazy.result for lazy in cache.query(*args, **kwargs))


@dataclass
class QueryCall:
    """fleche's ``QueryCall``, field for field (fleche itself needs Python >= 3.11)."""

    name: Optional[str] = None
    arguments: Optional[Dict[str, Any]] = None
    metadata: Optional[Dict[str, Any]] = None
    module: Optional[str] = None
    version: Any = None
    code_digest: Optional[str] = None
    result: Any = None


def test_fleche_query_forms_on_every_cache(cache_under_test: CacheUnderTest) -> None:
    cache_under_test.writer.save_many(CALLS.values())
    cache = cache_under_test.cache
    # fleche's arguments= is the keyword form
    assert found(cache, name=NAME, arguments={"x": 1}) == found(cache, NAME, x=1) == ["a", "c"]
    assert found(cache, NAME, arguments={"x": 1}, mode="fast") == ["a"]
    # None in arguments= is fleche's wildcard; as a keyword it is the value None
    assert found(cache, arguments={"mode": None}) == ["a", "b", "c"]
    assert found(cache, NAME, mode=None) == ["c"]
    # fleche keeps the module apart, and its name is the bare qualname
    assert found(cache, name="f", module="qmod") == ["a", "b", "c"]
    assert found(cache, name="f") == ["a", "b", "c", "g"]
    assert found(cache, module="qmod") == ["a", "b", "c", "h"]
    # version: int or str, the same version
    assert found(cache, NAME, version=2) == found(cache, NAME, version="2") == ["c"]
    # fleche's nested metadata: partial tables, None wildcards, lists
    assert found(cache, metadata={"runtime": {"hostname": "node1"}}) == ["a", "c"]
    assert found(cache, metadata={"runtime": {"cores": None}}) == ["a", "b", "c"]
    assert found(cache, metadata={"runtime": None}) == ["a", "b", "c"]
    assert found(cache, metadata={"n": 2}) == ["b", "g"]
    assert found(cache, metadata={"tags": ("x", "y")}) == found(cache, metadata={"tags": ["x", "y"]}) == ["a"]
    assert found(cache, metadata={"runtime": {"hostname": "node9"}}) == []
    # a fleche QueryCall as the only argument
    assert found(cache, QueryCall(name="f", module="qmod", arguments={"x": 1}, version=2)) == ["c"]


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"name": "f", "result": 1}, TypeError, "does not index results"),
        ({"code_digest": "ab"}, TypeError, "code digest as its version"),
        ({"name": 3}, TypeError, "function name"),
        ({"name": ""}, ValueError, "empty"),
        ({"module": 1}, TypeError, "module must be a str"),
        ({"arguments": [("x", 1)]}, TypeError, "mapping of argument name"),
        ({"arguments": {1: 1}}, TypeError, "argument names"),
        ({"arguments": {"x": 1}, "x": 1}, TypeError, "given both"),
        ({"metadata": ["tag"]}, TypeError, "mapping of key"),
        ({"metadata": {"k": object()}}, TypeError, "could never match"),
        ({"version": 2.5}, TypeError, "version must be"),
        ({"name": QueryCall(name="f"), "x": 1}, TypeError, "not both"),
        ({"name": QueryCall(result=3)}, TypeError, "does not index results"),
    ],
)
def test_filters_that_cannot_apply_raise_at_the_call(
    kwargs: Dict[str, Any], error: type, fragment: str
) -> None:
    cache = Cache(MemoryValueStore(), MemoryCallStore())
    with pytest.raises(error, match=fragment):
        cache.query(**kwargs)  # raised before any iteration


def test_cached_function_query_checks_names_against_the_signature() -> None:
    cache = Cache(MemoryValueStore(), MemoryCallStore())

    def f(x: int, mode: str = "fast", verbose: bool = False, version: int = 0) -> int:
        return x

    g = cached(cache=cache, ignore="verbose")(f)
    g(1)
    g(2, mode="slow")
    g(1, version=3)
    assert sorted(c.arguments["x"] for c in g.query(1)) == [1, 1]
    assert [c.arguments["mode"] for c in g.query(arguments={"x": 2})] == ["slow"]
    assert [c.arguments["version"] for c in g.query(1, arguments={"version": 3})] == [3]
    assert len(list(g.query(metadata={"hostname": None}))) == 3
    with pytest.raises(TypeError, match="takes no argument 'y'"):
        g.query(y=1)
    with pytest.raises(TypeError, match="takes no argument 'z'"):
        g.query(arguments={"z": 1})
    with pytest.raises(ValueError, match="ignore list"):
        g.query(verbose=True)
    with pytest.raises(TypeError, match="parameter named 'version'"):
        g.query(version=3)
    with pytest.raises(TypeError):
        g.query(1, 2, 3, 4, 5)  # more than f takes
