"""The BaseCache contract, checked once for every cache type.

Each test runs against every factory in :mod:`.factories` (memory, files,
SQL, HDF5, read-only, stacks, and the remote caches in front of them).
The tests use the public :class:`~fleche_remote.BaseCache` API only, so
that a cache across ssh passes them unchanged: ``writer`` puts entries in
place, ``cache`` is the one being checked (they are the same object unless
the cache is read-only).
"""

from __future__ import annotations

import itertools
import os
import secrets
import string
import time
from pathlib import Path
from typing import Any, Iterator, List, Optional

import numpy as np
import pytest

from fleche_remote import (
    AmbiguousDigestError,
    BaseCache,
    Cache,
    CacheStack,
    Call,
    Digest,
    LazyCall,
    Rejected,
    SshCache,
)
from fleche_remote.claiming import me
from fleche_remote.codec.values import decode_value
from fleche_remote.storage.base import InlineValues
from fleche_remote.storage.claims import Holder

from .factories import FACTORIES, CacheUnderTest, params, params_with
from .values import SSH_VALUE_CASES, VALUES, Point, assert_same

NAME = "conformance.f"
OTHER = "conformance.g"
MISSING = "f" * 64  # a well-formed key nothing is ever saved under (checked below)


@pytest.fixture(params=params())
def cache_under_test(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[CacheUnderTest]:
    subject = FACTORIES[request.param].make(tmp_path, request)
    try:
        yield subject
    finally:
        subject.close()


@pytest.fixture(params=params("stack"))
def stack_under_test(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[CacheUnderTest]:
    subject = FACTORIES[request.param].make(tmp_path, request)
    try:
        assert isinstance(subject.cache, CacheStack), f"{request.param} is tagged 'stack'"
        yield subject
    finally:
        subject.close()


def make_calls(n: int, name: str = NAME, start: int = 0) -> List[Call]:
    return [Call(name, {"i": i}, result={"square": i * i}) for i in range(start, start + n)]


# -- round trips ------------------------------------------------------------------


def test_read_only_flag_is_as_expected(cache_under_test: CacheUnderTest) -> None:
    assert cache_under_test.cache.read_only is cache_under_test.expect_read_only
    assert cache_under_test.writer.read_only is False


@pytest.mark.parametrize(
    ("cache_under_test", "case"), params_with(list(VALUES), SSH_VALUE_CASES), indirect=["cache_under_test"]
)
def test_value_round_trip(cache_under_test: CacheUnderTest, case: str) -> None:
    value = VALUES[case]
    call = Call(NAME, {"case": case}, value)
    key = cache_under_test.writer.save(call)
    assert key == call.key()
    cache = cache_under_test.cache
    lazy = cache.load(key)
    assert isinstance(lazy, LazyCall)
    assert lazy.key == key
    assert_same(lazy.result, value)
    assert_same(cache.load_value(key), value)


def test_arguments_metadata_and_version_come_back(cache_under_test: CacheUnderTest) -> None:
    arguments = {"x": 1, "y": [1, "two", (3.0,)], "z": None, "arr": np.arange(3), "p": Point(0, 1)}
    metadata = {"host": "node17", "wall": 1.25, "n": 3, "ok": True, "none": None,
                "tags": ["a", "b"], "nested": {"k": [1, {"m": "v"}]}}  # fmt: skip
    call = Call(NAME, arguments, "result", metadata=metadata, version="2")
    key = cache_under_test.writer.save(call)
    lazy = cache_under_test.cache.load(key)
    assert lazy.name == NAME
    assert lazy.version == "2"
    assert dict(lazy.metadata) == metadata
    assert set(lazy.arguments) == set(arguments)
    for k, v in arguments.items():
        assert_same(lazy.arguments[k], v)
    assert isinstance(lazy.key, Digest) and lazy.key == key
    assert len(lazy.value_digest) == 64 and set(lazy.value_digest) <= set(string.hexdigits.lower())
    plain = lazy.to_call()
    assert (plain.name, plain.result, plain.metadata, plain.version) == (NAME, "result", metadata, "2")


def test_version_makes_a_different_entry(cache_under_test: CacheUnderTest) -> None:
    v1 = Call(NAME, {"x": 1}, "old", version="1")
    v2 = Call(NAME, {"x": 1}, "new", version="2")
    keys = cache_under_test.writer.save_many([v1, v2])
    assert keys[0] != keys[1]
    cache = cache_under_test.cache
    assert [cache.load_value(k) for k in keys] == ["old", "new"]
    assert sorted(str(c.version) for c in cache.query(NAME, x=1)) == ["1", "2"]


def test_keys_are_full_lowercase_hex_digests(cache_under_test: CacheUnderTest) -> None:
    keys = cache_under_test.writer.save_many(make_calls(3))
    for key in keys:
        assert isinstance(key, Digest)
        assert len(key) == 64 and set(key) <= set("0123456789abcdef")
    assert MISSING not in keys


# -- laziness -----------------------------------------------------------------------


def test_results_load_only_when_asked_for(
    cache_under_test: CacheUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    call = Call(NAME, {"big": True}, np.arange(100_000, dtype=np.float64))
    key = cache_under_test.writer.save(call)
    cache = cache_under_test.cache
    fetched: List[str] = []
    real = cache.fetch_result

    def counting(digest: str) -> Any:
        fetched.append(digest)
        return real(digest)

    monkeypatch.setattr(cache, "fetch_result", counting)
    lazy = cache.load(key)
    listed = list(cache.query(NAME))
    many = cache.load_many([key])
    assert fetched == []
    assert not lazy.loaded and not listed[0].loaded and many[0] is not None and not many[0].loaded
    assert lazy.arguments == {"big": True}  # available without the result
    assert fetched == []

    assert_same(lazy.result, call.result)
    assert lazy.loaded
    assert fetched == [lazy.value_digest]
    lazy.result  # noqa: B018 (a second access must not fetch again)
    assert len(fetched) == 1


# -- keys and prefixes --------------------------------------------------------------


def test_load_and_expand_by_unique_prefix(cache_under_test: CacheUnderTest) -> None:
    calls = make_calls(20)
    keys = cache_under_test.writer.save_many(calls)
    cache = cache_under_test.cache
    for key, call in zip(keys[:5], calls):
        prefix = key[:12]
        assert [k for k in keys if k.startswith(prefix)] == [key]  # unique among what is stored
        assert cache.expand(prefix) == key
        assert isinstance(cache.expand(prefix), Digest)
        assert cache.load(prefix).key == key
        assert cache.load_value(prefix) == call.result
    assert cache.expand(keys[0]) == keys[0]


def test_unknown_keys_raise_key_error(cache_under_test: CacheUnderTest) -> None:
    keys = cache_under_test.writer.save_many(make_calls(3))
    cache = cache_under_test.cache
    for attempt in (
        lambda: cache.expand(MISSING),
        lambda: cache.load(MISSING),
        lambda: cache.load_value(MISSING),
    ):
        with pytest.raises(KeyError) as info:
            attempt()
        assert not isinstance(info.value, AmbiguousDigestError)
    # a prefix nothing starts with, and strings that cannot be keys at all
    unused = next("".join(p) for p in itertools.product("0123456789abcdef", repeat=3)
                  if not any(k.startswith("".join(p)) for k in keys))  # fmt: skip
    for bad in (unused, "", "not-hex!", "g" * 64):
        with pytest.raises(KeyError):
            cache.expand(bad)


def test_ambiguous_prefix_raises(cache_under_test: CacheUnderTest) -> None:
    # 17 keys over 16 hex digits: at least two share their first character
    keys = cache_under_test.writer.save_many(make_calls(17))
    first = sorted(keys, key=lambda k: sum(x[0] == k[0] for x in keys))[-1][0]
    sharing = {k for k in keys if k.startswith(first)}
    assert len(sharing) >= 2
    cache = cache_under_test.cache
    for attempt in (lambda: cache.expand(first), lambda: cache.load(first), lambda: cache.load_value(first)):
        with pytest.raises(AmbiguousDigestError) as info:
            attempt()
        assert len(info.value.candidates) >= 2
        assert set(info.value.candidates) <= sharing
        assert isinstance(info.value, KeyError)
    if not cache.read_only:
        with pytest.raises(AmbiguousDigestError):
            cache.evict(first)
        assert cache.contains_many(sorted(sharing)) == [True] * len(sharing)


# -- contains / load_many -----------------------------------------------------------


def test_contains_and_contains_many(cache_under_test: CacheUnderTest) -> None:
    cache = cache_under_test.cache
    c1, c2 = make_calls(2)
    assert not cache.contains(c1.key())
    assert c1.key() not in cache
    k1, k2 = cache_under_test.writer.save_many([c1, c2])
    assert cache.contains(k1) and cache.contains(str(k2))
    assert k1 in cache
    assert cache.contains_many([k1, MISSING, k2, k1]) == [True, False, True, True]
    assert cache.contains_many([]) == []
    assert not cache.contains(MISSING)


def test_a_lookup_that_claims_finds_what_is_stored_and_claims_what_is_not(
    cache_under_test: CacheUnderTest,
) -> None:
    cache = cache_under_test.cache
    # an ssh cache that may write offers it; a local store has no round
    # trip to save, and a read-only cache takes no claims (known once the
    # server's handshake is in: read_only waits for it)
    expected = isinstance(cache, SshCache) and not cache.read_only
    offered = cache.lookup_claims()
    assert (offered is not None) == expected
    if offered is None:
        return
    keeper, lookup = offered
    (call,) = make_calls(1)
    key = cache_under_test.writer.save(call)
    assert lookup(key, me(), 30.0) == (True, call.result)
    found, (record, blob) = cache.lookup_claims(entries=True)[1](key, me(), 30.0)  # type: ignore[index]
    assert found and record.key == key and decode_value(blob) == call.result
    assert keeper.claimed([key]) == [False]  # a hit claims nothing

    missing = secrets.token_hex(32)
    assert lookup(missing, me(), 30.0) == (False, None)
    assert keeper.claimed([missing]) == [True]
    found, holder = lookup(missing, Holder(secrets.token_hex(16), "elsewhere", 1), 30.0)
    assert not found and holder.owner == me().owner  # held: the holder is named
    keeper.release([missing], me())
    assert keeper.claimed([missing]) == [False]


def test_load_many_keeps_order_and_gives_none_for_missing(cache_under_test: CacheUnderTest) -> None:
    calls = make_calls(3)
    keys = cache_under_test.writer.save_many(calls)
    got = cache_under_test.cache.load_many([keys[2], MISSING, keys[0], keys[2]])
    assert got[1] is None
    assert [g.key if g else None for g in got] == [keys[2], None, keys[0], keys[2]]
    assert [g.result if g else None for g in got] == [calls[2].result, None, calls[0].result, calls[2].result]
    assert cache_under_test.cache.load_many([]) == []
    assert cache_under_test.cache.load_many([MISSING]) == [None]


# -- saving ---------------------------------------------------------------------------


def test_saving_the_same_call_twice_is_a_no_op(cache_under_test: CacheUnderTest) -> None:
    writer = cache_under_test.writer
    call = Call(NAME, {"x": 1}, {"first": True}, metadata={"run": 1})
    k1 = writer.save(call)
    k2 = writer.save(call)
    # same call, another result: still the same entry, and the first result stays
    k3 = writer.save(Call(NAME, {"x": 1}, {"first": False}, metadata={"run": 2}))
    assert k1 == k2 == k3
    entries = list(cache_under_test.cache.query(NAME))
    assert [e.key for e in entries] == [k1]
    assert entries[0].result == {"first": True}
    assert dict(entries[0].metadata) == {"run": 1}


def test_save_many(cache_under_test: CacheUnderTest) -> None:
    calls = make_calls(5)
    batch = [*calls, calls[0]]
    keys = cache_under_test.writer.save_many(batch)
    assert keys == [c.key() for c in batch]
    assert cache_under_test.writer.save_many([]) == []
    cache = cache_under_test.cache
    assert [cache.load_value(k) for k in keys[:5]] == [c.result for c in calls]
    assert sorted(e.key for e in cache.query(NAME)) == sorted(keys[:5])


def test_equal_results_are_stored_once(cache_under_test: CacheUnderTest) -> None:
    result = {"shared": np.arange(1000)}
    writer = cache_under_test.writer
    before = _stored_values(writer)
    k1 = writer.save(Call(NAME, {"x": 1}, result))
    k2 = writer.save(Call(OTHER, {"y": "other"}, result))
    k3 = writer.save(Call(NAME, {"x": 2}, b"different"))
    cache = cache_under_test.cache
    d1, d2, d3 = (cache.load(k).value_digest for k in (k1, k2, k3))
    assert d1 == d2 != d3
    if before is not None:
        assert _stored_values(writer) == before + 2


def test_metadata_must_be_plain_data(cache_under_test: CacheUnderTest) -> None:
    call = Call(NAME, {"x": 1}, 1, metadata={"when": object()})
    with pytest.raises(TypeError):
        cache_under_test.writer.save(call)
    assert not cache_under_test.cache.contains(call.key())


# -- evict ------------------------------------------------------------------------------


def test_evict(cache_under_test: CacheUnderTest) -> None:
    cache = cache_under_test.cache
    calls = make_calls(3)
    k0, k1, k2 = cache_under_test.writer.save_many(calls)
    if cache.read_only:
        for key in (k0, k1[:12], MISSING):
            with pytest.raises(Rejected):
                cache.evict(key)
        assert cache.contains_many([k0, k1, k2]) == [True, True, True]
        return

    cache.evict(k0)
    assert not cache.contains(k0)
    with pytest.raises(KeyError):
        cache.load(k0)
    with pytest.raises(KeyError):
        cache.load_value(k0)
    gone, present = cache.load_many([k0, k1])
    assert gone is None and present is not None and present.key == k1
    assert sorted(e.key for e in cache.query(NAME)) == sorted([k1, k2])
    with pytest.raises(KeyError):
        cache.evict(k0)  # already gone
    with pytest.raises(KeyError):
        cache.evict(MISSING)

    cache.evict(k1[:12])  # by unique prefix
    assert cache.contains_many([k0, k1, k2]) == [False, False, True]
    assert cache.load_value(k2) == calls[2].result  # the others are untouched

    assert cache.save(calls[0]) == k0  # an evicted call can be saved again
    assert cache.load_value(k0) == calls[0].result


def test_evict_keeps_values_other_calls_share(cache_under_test: CacheUnderTest) -> None:
    writer = cache_under_test.writer
    shared = np.arange(500)
    k1 = writer.save(Call(NAME, {"x": 1}, shared))
    k2 = writer.save(Call(NAME, {"x": 2}, shared))
    k3 = writer.save(Call(NAME, {"x": 3}, "only mine"))
    writer.evict(k1)
    writer.evict(k3)
    _age_values(writer)  # past the grace period that spares saves in progress
    collected = writer.collect_garbage()
    if _stored_values(writer) is not None:
        assert collected == 1  # k3's value; k1's is still k2's
    else:
        assert collected in (0, 1)
    assert writer.collect_garbage() == 0
    assert_same(cache_under_test.cache.load_value(k2), shared)


# -- query ----------------------------------------------------------------------------------


def test_query(cache_under_test: CacheUnderTest) -> None:
    calls = {
        "f1": Call(NAME, {"x": 1, "mode": "fast"}, "f1", metadata={"tag": "a", "n": 1}),
        "f2": Call(NAME, {"x": 2, "mode": "fast"}, "f2", metadata={"tag": "b", "n": 2}),
        "f1.0": Call(NAME, {"x": 1.0, "mode": "slow"}, "f1.0", metadata={"tag": "a"}),
        "g1": Call(OTHER, {"x": 1}, "g1", metadata={"tag": "a", "n": 1}),
    }
    cache_under_test.writer.save_many(calls.values())
    cache = cache_under_test.cache

    def found(*args: Any, **kwargs: Any) -> List[str]:
        results = list(cache.query(*args, **kwargs))
        assert all(isinstance(r, LazyCall) for r in results)
        return sorted(r.result for r in results)

    assert found() == ["f1", "f1.0", "f2", "g1"]
    assert found(NAME) == ["f1", "f1.0", "f2"]
    assert found(OTHER) == ["g1"]
    assert found(NAME, x=1) == ["f1"]  # 1.0 is another argument
    assert found(NAME, x=1.0) == ["f1.0"]
    assert found(x=1) == ["f1", "g1"]
    assert found(NAME, mode="fast") == ["f1", "f2"]
    assert found(NAME, x=2, mode="fast") == ["f2"]
    assert found(metadata={"tag": "a"}) == ["f1", "f1.0", "g1"]
    assert found(NAME, metadata={"tag": "a", "n": 1}) == ["f1"]
    assert found(metadata={"tag": "a"}, x=1) == ["f1", "g1"]
    # nothing matches
    assert found("conformance.nobody") == []
    assert found(NAME, x=99) == []
    assert found(NAME, no_such_argument=1) == []
    assert found(metadata={"tag": "zzz"}) == []
    assert found(metadata={"no_such_key": None}) == []
    with pytest.raises(TypeError):
        found(metadata=["tag", "a"])


def test_query_results_load_lazily_and_correctly(cache_under_test: CacheUnderTest) -> None:
    calls = make_calls(4)
    cache_under_test.writer.save_many(calls)
    by_arg = {c.arguments["i"]: c.result for c in calls}
    listed = list(cache_under_test.cache.query(NAME))
    assert len(listed) == 4
    for lazy in listed:
        assert lazy.result == by_arg[lazy.arguments["i"]]


# -- read-only -------------------------------------------------------------------------------


def test_writes_are_rejected_exactly_when_read_only(cache_under_test: CacheUnderTest) -> None:
    cache = cache_under_test.cache
    kept = make_calls(3)
    keys = cache_under_test.writer.save_many(kept)
    new = Call(NAME, {"new": True}, "new")
    if cache.read_only:
        with pytest.raises(Rejected):
            cache.save(new)
        with pytest.raises(Rejected):
            cache.save_many([new, kept[0]])
        with pytest.raises(Rejected):
            cache.evict(keys[0])
        # nothing was lost, and nothing was written
        assert not cache.contains(new.key()) and not cache_under_test.writer.contains(new.key())
        assert [cache.load_value(k) for k in keys] == [c.result for c in kept]
    else:
        key = cache.save(new)
        assert cache.load_value(key) == "new"
        cache.evict(key)
        assert not cache.contains(key)
        assert [cache.load_value(k) for k in keys] == [c.result for c in kept]


# -- lifecycle --------------------------------------------------------------------------------


def test_close_then_use_again(cache_under_test: CacheUnderTest) -> None:
    call = make_calls(1)[0]
    key = cache_under_test.writer.save(call)
    cache = cache_under_test.cache
    cache.close()
    assert cache.load_value(key) == call.result  # reopened on use
    with cache as entered:
        assert entered is cache
        assert entered.contains(key)
    assert cache.load(key).result == call.result
    cache.close()
    cache.close()  # closing twice is harmless


# -- stacks ---------------------------------------------------------------------------------------


def _layers(subject: CacheUnderTest) -> List[BaseCache]:
    assert isinstance(subject.cache, CacheStack)
    return subject.cache.layers


def test_stack_saves_into_its_first_layer(stack_under_test: CacheUnderTest) -> None:
    top, lower = _layers(stack_under_test)[:2]
    call = make_calls(1)[0]
    key = stack_under_test.cache.save(call)
    assert top.contains(key)
    assert not lower.contains(key)


def test_stack_backfills_its_first_layer_from_a_lower_one(stack_under_test: CacheUnderTest) -> None:
    stack = stack_under_test.cache
    top, lower = _layers(stack_under_test)[:2]
    c1, c2, c3 = make_calls(3)
    k1, k2, k3 = lower.save_many([c1, c2, c3])
    assert top.contains_many([k1, k2, k3]) == [False, False, False]
    assert stack.contains_many([k1, k2, k3]) == [True, True, True]  # seen through the stack

    lazy = stack.load(k1)
    assert top.contains(k1)  # back-filled by the load, record and value
    assert not top.contains(k2)
    assert lazy.result == c1.result
    got = stack.load_many([k2, MISSING])
    assert got[1] is None and top.contains(k2)

    # the lower layer goes away (the cluster is offline): the copies serve
    lower.evict(k1)
    lower.evict(k2)
    lower.collect_garbage()
    assert top.load_value(k1) == c1.result
    assert stack.load_value(k1) == c1.result
    assert stack.load(k2[:12]).result == c2.result
    assert not top.contains(k3)


def test_stack_query_and_expand_span_layers(stack_under_test: CacheUnderTest) -> None:
    stack = stack_under_test.cache
    top, lower = _layers(stack_under_test)[:2]
    both, only_lower, only_top = make_calls(3)
    lower.save_many([both, only_lower])
    top.save_many([both, only_top])
    keys = sorted(e.key for e in stack.query(NAME))
    assert keys == sorted({both.key(), only_lower.key(), only_top.key()})  # no duplicates
    assert stack.expand(only_lower.key()[:12]) == only_lower.key()
    assert stack.expand(only_top.key()[:12]) == only_top.key()


# -- the registry itself ---------------------------------------------------------------------------


def test_every_local_cache_type_is_in_the_suite() -> None:
    expected = {
        "memory",
        "file",
        "file-compressed",
        "file+sqlite",
        "file+postgres",
        "hdf5",
        "read-only",
        "stack",
    }
    assert expected <= set(FACTORIES)
    assert any(e.tags for e in FACTORIES.values())


def test_every_remote_backend_runs_in_process_and_over_ssh() -> None:
    remote = {name for name, e in FACTORIES.items() if "remote" in e.tags}
    over_ssh = {name for name in remote if "ssh" in FACTORIES[name].tags}
    assert {n.replace("inproc-", "ssh-", 1) for n in remote - over_ssh} == over_ssh
    assert {"ssh-file", "ssh-sqlite", "ssh-postgres", "ssh-hdf5", "ssh-read-only"} <= over_ssh
    assert set(SSH_VALUE_CASES) <= set(VALUES)


def _age_values(cache: BaseCache, seconds: float = 2 * Cache.GC_GRACE_SECONDS) -> None:
    """Make every value of a local cache look ``seconds`` old (file times;
    HDF5's "stored" attributes)."""
    if isinstance(cache, CacheStack):
        cache = cache.layers[0]
    values = getattr(cache, "values", None)
    then = time.time() - seconds
    if type(values).__name__ == "Hdf5ValueStore":  # its values carry a "stored" attribute
        import h5py

        with h5py.File(values.path, "a") as f:  # type: ignore[union-attr]
            for ds in f.get("values", {}).values():
                ds.attrs["stored"] = then
        return
    root = getattr(values, "root", None)
    if root is None:
        return
    for path in Path(root).rglob("*"):
        if path.is_file():
            os.utime(path, (then, then))


def _stored_values(cache: BaseCache) -> Optional[int]:
    """How many distinct values a local cache holds, in its value store and
    inline in its call store; None when that is not observable through this
    process (a remote)."""
    if isinstance(cache, CacheStack):
        cache = cache.layers[0]
    if not isinstance(cache, Cache):
        return None
    digests = set(cache.values.digests())
    if isinstance(cache.calls, InlineValues):
        digests.update(cache.calls.blob_digests())
    return len(digests)
