"""A batch through a ``CacheStack`` asks each layer once, only for what the
layers above lacked, and back-fills the first layer in one save.

The layers are real caches behind a tally (``tests/layers.py``), so the
counts are exactly the requests a remote layer would receive.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import List, Tuple

import pytest
from layers import Counting, memory_cache

from fleche_remote import Cache, CacheStack, Call, Digest
from fleche_remote.caches.stack import QUERY_BACKFILL_PAGE
from fleche_remote.config import cache_from_config

NAME = "batches.f"
MISSING = "f" * 64


def calls(n: int, start: int = 0, name: str = NAME) -> List[Call]:
    return [Call(name, {"i": i}, result={"square": i * i}) for i in range(start, start + n)]


def three_layers(
    tmp_path: Path,
) -> Tuple[CacheStack, Counting, Counting, Counting, List[Digest], List[Digest]]:
    """An empty top, 10 calls in the middle, 10 others at the bottom (a file cache)."""
    top = Counting(memory_cache())
    mid = Counting(memory_cache())
    low = Counting(cache_from_config({"template": "cloudpickle", "root": str(tmp_path / "low")}))
    in_mid = mid.inner.save_many(calls(10))
    in_low = low.inner.save_many(calls(10, start=10))
    return CacheStack([top, mid, low]), top, mid, low, in_mid, in_low


def test_load_many_with_results_asks_each_layer_once_and_backfills_in_one_save(tmp_path: Path) -> None:
    stack, top, mid, low, in_mid, in_low = three_layers(tmp_path)
    top.inner.save_many(calls(2, start=100))
    in_top = [c.key() for c in calls(2, start=100)]
    keys = in_top + in_mid + in_low + [MISSING]

    got = stack.load_many(keys, results=True)

    assert [g.result if g else None for g in got] == [{"square": i * i} for i in [100, 101, *range(20)]] + [
        None
    ]
    assert all(g.loaded for g in got if g is not None)  # results came with the lookup
    assert top.counts == {"load_entries": 1, "save_records": 1}
    assert mid.counts == {"load_entries": 1} and low.counts == {"load_entries": 1}
    assert mid.asked["load_entries"] == [in_mid + in_low + [MISSING]]  # not what the top had
    assert low.asked["load_entries"] == [[*in_low, MISSING]]
    assert top.saved == [20]  # both lower layers' hits, one batch
    assert top.inner.contains_many(in_mid + in_low) == [True] * 20

    top.reset(), mid.reset(), low.reset()
    assert [g.result for g in stack.load_many(in_mid + in_low, results=True) if g] == [
        {"square": i * i} for i in range(20)
    ]
    assert top.counts == {"load_entries": 1} and not mid.counts and not low.counts  # offline now


def test_load_records_backfills_with_entries_not_one_blob_per_record(tmp_path: Path) -> None:
    stack, top, mid, low, in_mid, in_low = three_layers(tmp_path)
    got = stack.load_many(in_mid + in_low)
    assert [g.key for g in got if g] == in_mid + in_low
    assert top.counts == {"load_records": 1, "save_records": 1}
    assert mid.counts == {"load_entries": 1} and low.counts == {"load_entries": 1}
    assert low.asked["load_entries"] == [in_low]
    assert top.saved == [20]
    assert got[0].result == {"square": 0}  # type: ignore[union-attr]
    assert top.counts["load_blobs"] + top.counts["load_blob"] == 1 and not mid.counts["load_blob"]


def test_a_true_miss_in_load_records_costs_one_more_request_per_lower_layer(tmp_path: Path) -> None:
    # the listed-without-value check runs only for keys nobody had
    stack, _top, mid, low, in_mid, _ = three_layers(tmp_path)
    assert stack.load_many([in_mid[0], MISSING])[1] is None
    assert mid.counts == {"load_entries": 1, "load_records": 1}
    assert mid.asked["load_records"] == [[MISSING]]
    assert low.counts == {"load_entries": 1, "load_records": 1}


def test_contains_many_and_load_blobs_ask_each_layer_for_the_rest_only(tmp_path: Path) -> None:
    stack, top, mid, low, in_mid, in_low = three_layers(tmp_path)
    assert stack.contains_many(in_mid + in_low + [MISSING]) == [True] * 20 + [False]
    assert [c["contains_many"] for c in (top.counts, mid.counts, low.counts)] == [1, 1, 1]
    assert low.asked["contains_many"] == [[*in_low, MISSING]]
    assert not top.counts["save_records"]  # nothing to copy: no data moved

    digests = [r.value for r in mid.inner.load_records(in_mid[:2]) + low.inner.load_records(in_low[:2]) if r]
    blobs = stack.load_blobs([*digests, "0" * 64])
    assert [b is not None for b in blobs] == [True] * 4 + [False]
    assert low.asked["load_blobs"] == [[*digests[2:], "0" * 64]]
    assert [c["load_blobs"] for c in (top.counts, mid.counts, low.counts)] == [1, 1, 1]


def test_load_value_and_load_are_one_request_per_layer(tmp_path: Path) -> None:
    stack, top, _mid, low, _, in_low = three_layers(tmp_path)
    assert stack.load_value(in_low[3][:10]) == {"square": 13 * 13}
    assert low.counts == {"expand": 1, "load_entries": 1}
    assert top.counts == {"expand": 1, "load_entries": 1, "save_records": 1}
    assert stack.load(in_low[4]).result == {"square": 14 * 14}
    assert low.counts["load_entries"] == 2 and low.counts["load_blob"] == 0
    with pytest.raises(KeyError):
        stack.load_value(MISSING)


def test_no_backfill_into_a_read_only_first_layer_or_when_turned_off(tmp_path: Path) -> None:
    for make in (
        lambda top, low: CacheStack([top, low], backfill=False),
        lambda top, low: CacheStack([Counting(memory_cache(read_only=True)), low]),
    ):
        top = Counting(memory_cache())
        low = Counting(memory_cache())
        keys = low.inner.save_many(calls(5))
        stack = make(top, low)
        first = stack.layers[0]
        assert isinstance(first, Counting)
        assert [g.result for g in stack.load_many(keys, results=True) if g] == [
            {"square": i * i} for i in range(5)
        ]
        assert [g.key for g in stack.load_many(keys) if g] == keys
        assert stack.load_value(keys[0]) == {"square": 0}
        assert not first.counts["save_records"]
        assert low.counts["load_blob"] == 0
        assert low.counts["load_records"] == 1  # records only: nothing to copy


def test_a_layer_that_lists_a_call_but_lost_its_value_is_not_backfilled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    top = memory_cache()
    low = memory_cache()
    key = low.save(Call(NAME, {"i": 1}, "gone"))
    low.values.delete(low.load_records([key])[0].value)  # type: ignore[union-attr]
    stack = CacheStack([top, low])
    # the layer repairs itself on first sight (its record goes, so the call
    # is a miss and its next save stores it whole); nothing is back-filled
    with pytest.raises(KeyError):
        stack.load(key)
    assert not low.contains(key) and not top.contains(key)
    with pytest.raises(KeyError):
        stack.load_value(key)
    assert stack.load_many([key], results=True) == [None]
    assert not top.contains(key)


def test_a_failing_backfill_still_answers(caplog: pytest.LogCaptureFixture) -> None:
    top = Counting(memory_cache())
    top.fail_saves = OSError("disk full")
    low = memory_cache()
    key = low.save(Call(NAME, {"i": 2}, 4))
    with caplog.at_level(logging.WARNING, logger="fleche_remote.stack"):
        assert CacheStack([top, low]).load_value(key) == 4
    assert "could not back-fill" in caplog.text


def test_query_backfills_a_page_at_a_time(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    top = Counting(memory_cache())
    low = Counting(cache_from_config({"template": "cloudpickle", "root": str(tmp_path / "low")}))
    n = 2 * QUERY_BACKFILL_PAGE + 10
    low.inner.save_many(calls(n))
    low.inner.save_many(calls(3, name="batches.other"))
    top.inner.save_many(calls(5))  # already local: neither re-fetched nor listed twice
    lost = low.inner.save(Call(NAME, {"i": "lost"}, "x"))
    low.inner.values.delete(low.inner.load_records([lost])[0].value)  # type: ignore[attr-defined,union-attr]
    stack = CacheStack([top, low])

    with caplog.at_level(logging.WARNING, logger="fleche_remote.stack"):
        found = [c.key for c in stack.query(NAME)]

    assert sorted(found) == sorted([c.key() for c in calls(n)] + [lost])
    pages = math.ceil((n - 5 + 1) / QUERY_BACKFILL_PAGE)
    assert low.counts["load_blobs"] == pages and low.counts["load_blob"] == 0
    assert sum(len(a) for a in low.asked["load_blobs"]) == n - 5 + 1
    assert top.counts["save_records"] == pages and sum(top.saved) == n - 5
    assert "not its value" in caplog.text
    assert top.inner.contains_many([c.key() for c in calls(n)]) == [True] * n
    assert not top.inner.contains(lost)

    top.reset(), low.reset()
    assert len(list(stack.query(NAME, i=7))) == 1
    assert top.counts["save_records"] == 0  # already local


def test_query_without_backfill_only_lists(tmp_path: Path) -> None:
    top = Counting(memory_cache())
    low = Counting(memory_cache())
    low.inner.save_many(calls(4))
    assert len(list(CacheStack([top, low], backfill=False).query(NAME))) == 4
    assert not low.counts["load_blobs"] and not top.counts["save_records"]


def test_one_layer_stack_is_the_layer() -> None:
    only = Counting(memory_cache())
    stack = CacheStack([only])
    key = stack.save(Call(NAME, {"i": 0}, 0))
    assert stack.load_value(key) == 0 and stack.load_many([key], results=True)[0] is not None
    assert only.counts["save_records"] == 1
    assert isinstance(only.inner, Cache)
