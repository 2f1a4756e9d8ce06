"""Caches keep within their limits, per store, through real processes.

Each test runs ``worker.py`` processes against one store: file
(``cloudpickle`` template), the ``sql`` template (SQLite), PostgreSQL calls
with file values, and HDF5 values with SQLite calls. The overshoot the
tests allow is the one caches/quota.py states: the save that crossed the
limit, RECHECK of the limit per other writer, and the last FRESH_S seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest

from fleche_remote import Call, cached
from fleche_remote.caches.quota import RECHECK
from fleche_remote.config import cache_from_config

WORKER = Path(__file__).with_name("worker.py")
STORES = ["file", "sql", "postgres", "hdf5"]
SIZE = 10_000  # bytes per value: files for every store but the sql template's inline ones
LIMIT = 200_000
ENTRY = SIZE + 400  # a value and its record, as limits count them


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Dict[str, Any]:
    kind = request.param
    if kind == "file":
        return {"template": "cloudpickle", "root": str(tmp_path / "c")}
    if kind == "sql":
        return {"template": "sql", "root": str(tmp_path / "c")}
    if kind == "postgres":
        url = request.getfixturevalue("postgres_url")
        return {
            "values": {"type": "cloudpickle", "root": str(tmp_path / "v")},
            "calls": {"type": "sql", "url": url},
        }
    return {
        "values": {"type": "hdf5", "path": str(tmp_path / "v.h5")},
        "calls": {"type": "sql", "url": f"sqlite:///{tmp_path / 'c.db'}"},
    }


def run(cfg: Dict[str, Any], action: str, **args: Any) -> Dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(WORKER), json.dumps(cfg), action, json.dumps(args)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def start(cfg: Dict[str, Any], action: str, **args: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), json.dumps(cfg), action, json.dumps(args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen[str]) -> Dict[str, Any]:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def key(i: int, name: str = "f") -> str:
    return Call(name, {"i": i}).key()


def test_max_bytes_holds_while_saving_four_times_the_limit(store: Dict[str, Any]) -> None:
    cfg = {**store, "max_bytes": "200 kB"}
    result = run(cfg, "fill", start=0, count=4 * LIMIT // SIZE, size=SIZE)
    assert result["peak"] <= LIMIT + 2 * ENTRY, result
    cache = cache_from_config(cfg)
    try:
        assert cache.usage().bytes <= LIMIT
        assert cache.contains(key(79)) and not cache.contains(key(0))  # the oldest went
        for i in range(80):  # what is left is whole: no record without its value
            if cache.contains(key(i)):
                assert len(cache.load_value(key(i))) == SIZE
        values = Path(store.get("root", "")) / "values"
        if values.is_dir():  # file values: what is on disk, not only what records say
            on_disk = sum(p.stat().st_size for p in values.rglob("*") if p.is_file())
            assert on_disk <= LIMIT, on_disk
    finally:
        cache.close()


def test_an_entry_in_use_survives_while_idle_ones_go(store: Dict[str, Any]) -> None:
    cfg = {**store, "max_bytes": "200 kB"}
    run(cfg, "fill", start=0, count=1, size=SIZE, measure=False)
    # loaded after every save (uses are flushed every few seconds: pace the saves)
    run(cfg, "fill", start=1, count=60, size=SIZE, keep=0, pause=0.12, measure=False)
    cache = cache_from_config(cfg)
    try:
        assert cache.contains(key(0))
        assert not cache.contains(key(1)) and not cache.contains(key(2))
    finally:
        cache.close()


def test_max_size_10_keeps_at_most_10_calls(store: Dict[str, Any]) -> None:
    cfg = {**store, "max_size": 10}
    run(cfg, "fill", start=0, count=30, size=100, measure=False)
    cache = cache_from_config(cfg)
    try:
        kept = [i for i in range(30) if cache.contains(key(i))]
        assert 0 < len(kept) <= 10 and 29 in kept, kept
        assert cache.usage().calls == len(kept)
    finally:
        cache.close()


def test_max_age_expires_and_the_result_is_computed_again(store: Dict[str, Any]) -> None:
    cfg = {**store, "max_age": "2s"}
    cache = cache_from_config(cfg)
    calls: List[int] = []

    @cached(cache=cache, version="1")
    def f(x: int) -> bytes:
        calls.append(x)
        return bytes(SIZE)

    try:
        f(1)
        f(1)
        assert calls == [1]
        time.sleep(2.5)
        f(1)  # older than max_age: a miss
        f(1)  # stored again, fresh
        assert calls == [1, 1]
    finally:
        cache.close()


def purge_value(cfg: Dict[str, Any], digest: str) -> None:
    """What a scratch purge or a user's rm does to a value."""
    cache = cache_from_config(cfg)
    try:
        root = getattr(cache.values, "root", None)
        if root is not None:
            os.unlink(Path(root) / digest[:2] / digest)
        else:
            cache.values.delete(digest)  # the HDF5 dataset goes
    finally:
        cache.close()


def test_a_purged_value_is_computed_again_once(store: Dict[str, Any]) -> None:
    cache = cache_from_config(store)
    calls: List[int] = []

    @cached(cache=cache, version="1")
    def f(x: int) -> bytes:
        calls.append(x)
        return b"x" * 100_000  # above any inline threshold: a file or dataset

    try:
        f(1)
        record = cache.load_records([f.key(1)])[0]
        assert record is not None
        purge_value(store, record.value)
        assert f(1) == b"x" * 100_000
        assert f(1) == b"x" * 100_000
        assert calls == [1, 1]
        assert cache.load_value(f.key(1)) == b"x" * 100_000  # repaired
    finally:
        cache.close()


@pytest.mark.parametrize("kind", ["file", "sql"])
def test_eviction_beside_4_writers_and_2_readers_tears_nothing(kind: str, tmp_path: Path) -> None:
    template = "cloudpickle" if kind == "file" else "sql"
    cfg = {"template": template, "root": str(tmp_path / "c"), "max_bytes": "200 kB"}
    run(cfg, "fill", start=0, count=5, size=SIZE, measure=False)
    readers = [start(cfg, "loads", keys=list(range(5)), seconds=6) for _ in range(2)]
    writers = [start(cfg, "fill", start=100 * (w + 1), count=40, size=SIZE, measure=False) for w in range(4)]
    for proc in writers:
        finish(proc)
    for proc in readers:
        finish(proc)  # a load is a hit or a clean miss: no torn value, no error
    cache = cache_from_config(cfg)
    try:
        usage = cache.usage()
        assert usage.bytes <= LIMIT * (1 + 4 * RECHECK) + 4 * ENTRY, usage.bytes
        for rec in cache.query_records():  # every record left has its whole value
            assert len(cache.load_value(rec.key)) == SIZE
        assert cache.usage().calls == usage.calls  # and none was dangling
    finally:
        cache.close()
