"""``@cached(version=...)`` takes a str or an int; ``2`` and ``"2"`` are one
version (documented in ``normalize_version``), on every kind of store."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List

import pytest

from fleche_remote import Call, cached
from fleche_remote.caches import Cache
from fleche_remote.codec.digest import call_digest, normalize_version
from fleche_remote.config import cache_from_config
from fleche_remote.storage.memory import MemoryCallStore, MemoryValueStore


def test_int_and_str_versions_are_one_version() -> None:
    assert normalize_version(2) == normalize_version("2") == "2"
    assert normalize_version(None) is None
    assert call_digest("m.f", {"x": 1}, 2) == call_digest("m.f", {"x": 1}, "2")
    assert call_digest("m.f", {"x": 1}, 2) != call_digest("m.f", {"x": 1}, 3)
    assert call_digest("m.f", {"x": 1}, 2) != call_digest("m.f", {"x": 1}, None)
    assert Call("m.f", {"x": 1}, version=2).key() == Call("m.f", {"x": 1}, version="2").key()


@pytest.mark.parametrize("bad", [True, 2.0, b"2", [2]])
def test_other_version_types_are_refused(bad: Any) -> None:
    with pytest.raises(TypeError, match="version must be a str, an int or None"):
        normalize_version(bad)
    with pytest.raises(TypeError, match="version must be"):
        cached(version=bad)(lambda x: x)


@pytest.mark.parametrize("store", ["memory", "sqlite", "hdf5"])
def test_an_int_version_round_trips_as_its_string(store: str, tmp_path: Path) -> None:
    if store == "memory":
        cache: Any = Cache(MemoryValueStore(), MemoryCallStore())
    elif store == "sqlite":
        cache = cache_from_config(
            {
                "values": {"type": "cloudpickle", "root": str(tmp_path / "v")},
                "calls": {"type": "sql", "url": f"sqlite:///{tmp_path / 'c.db'}"},
            }
        )
    else:
        cache = cache_from_config(
            {
                "values": {"type": "hdf5", "path": str(tmp_path / "c.h5")},
                "calls": {"type": "hdf5", "path": str(tmp_path / "c.h5")},
            }
        )
    runs: List[int] = []

    def f(x: int) -> int:
        runs.append(x)
        return x * 10

    v2 = cached(cache=cache, version=2)(f)
    assert v2.version == "2"
    assert v2(1) == 10
    as_text = cached(cache=cache, version="2")(f)
    assert as_text(1) == 10 and runs == [1]  # found: the same version
    assert cached(cache=cache, version=3)(f)(1) == 10 and runs == [1, 1]  # a new version runs again
    (lazy,) = list(cache.query(v2.name, version=2))
    assert lazy.version == "2"
    # the key rebuilt from what the store gives back is the key it is filed under
    assert Call(lazy.name, dict(lazy.arguments), version=lazy.version).key() == lazy.key == v2.key(1)
    cache.close()


def test_a_call_saved_with_an_int_version_reads_back_the_same_on_every_store(tmp_path: Path) -> None:
    caches: List[Any] = [
        Cache(MemoryValueStore(), MemoryCallStore()),
        cache_from_config({"template": "sql", "root": str(tmp_path / "sql")}),
        cache_from_config({"template": "hdf5", "root": str(tmp_path / "h5")}),
    ]
    for cache in caches:
        key = cache.save(Call("m.f", {"x": 1}, 10, version=2))
        assert key == Call("m.f", {"x": 1}, version="2").key()
        assert cache.load(key).version == "2", cache
        cache.close()
