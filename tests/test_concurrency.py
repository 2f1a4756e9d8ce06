"""Several processes saving into one cache at once, for every shared backend.

Each worker is a fresh ``python -c`` subprocess (nothing inherited from
pytest by fork), builds its cache from the same config tables, signals
that it is ready, and starts saving only when every worker is ready, so
the saves really overlap. A worker that fails exits non-zero and the test
shows its stderr; every wait has a deadline.

PostgreSQL runs get a fresh database of their own (conftest.py's
``postgres_url``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np
import pytest

from fleche_remote.caches import Cache
from fleche_remote.call import Call
from fleche_remote.storage.base import InlineValues, build_store

#: The result of call ``i``: every blob kind, so each store path is exercised.
RESULT_FOR = """
def result_for(i):
    if i % 3 == 0:
        return np.arange(i % 5 + 1, dtype=float) * i
    if i % 3 == 1:
        return b"r%d" % i
    return {"i": i, "square": i * i}
"""

WORKER = (
    """
import json, os, sys, time
import numpy as np
from fleche_remote.caches import Cache
from fleche_remote.call import Call
from fleche_remote.storage.base import build_store
"""
    + RESULT_FOR
    + """
spec = json.loads(sys.argv[1])
cache = Cache(build_store("values", spec["values"]), build_store("calls", spec["calls"]))
open(spec["ready"], "w").close()
deadline = time.monotonic() + 60
while not os.path.exists(spec["go"]):
    if time.monotonic() > deadline:
        sys.exit("worker never got the go signal")
    time.sleep(0.002)
start = time.perf_counter()
for i in spec["indices"]:
    cache.save(Call("work.f", {"i": i}, result=result_for(i), metadata={"i": i}))
print(json.dumps({"saved": len(spec["indices"]), "seconds": time.perf_counter() - start}))
cache.close()
"""
)

_ns: Dict[str, Any] = {"np": np}
exec(RESULT_FOR, _ns)
result_for: Callable[[int], Any] = _ns["result_for"]

#: No run should come near this; it only turns a hang into a failure.
DEADLINE_S = 120.0


@pytest.fixture
def pg_url(postgres_url: str) -> str:
    """conftest's ``postgres_url``: a fresh, empty database for this test alone."""
    return postgres_url


BACKENDS = ["file", "file+sqlite", "file+postgres", "hdf5"]


def tables(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Dict[str, Dict[str, Any]]:
    files = {"type": "cloudpickle", "root": str(tmp_path / "values")}
    if backend == "file":
        return {"values": files, "calls": {"type": "cloudpickle", "root": str(tmp_path / "calls")}}
    if backend == "file+sqlite":
        return {"values": files, "calls": {"type": "sql", "url": f"sqlite:///{tmp_path}/calls.db"}}
    if backend == "file+postgres":
        return {"values": files, "calls": {"type": "sql", "url": request.getfixturevalue("pg_url")}}
    h5 = {"type": "hdf5", "path": str(tmp_path / "cache.h5")}
    return {"values": h5, "calls": h5}


def run_workers(stores: Dict[str, Any], tmp_path: Path, batches: List[List[int]]) -> List[Dict[str, Any]]:
    """Start one worker per batch, release them together, return their reports."""
    go = tmp_path / "go"
    procs = []
    for n, indices in enumerate(batches):
        spec = dict(stores, indices=indices, ready=str(tmp_path / f"ready-{n}"), go=str(go))
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER, json.dumps(spec)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not all((tmp_path / f"ready-{n}").exists() for n in range(len(batches))):
            for p in procs:
                if p.poll() is not None:
                    pytest.fail(f"a worker exited before it was ready:\n{p.communicate()[1]}")
            if time.monotonic() > deadline:
                pytest.fail("workers were not ready in time")
            time.sleep(0.01)
        go.touch()
        reports = []
        for p in procs:
            try:
                out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"a worker did not finish within {DEADLINE_S:g} s")
            assert p.returncode == 0, f"worker failed (exit {p.returncode}):\n{err}"
            reports.append(json.loads(out))
        return reports
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def check_all_saved(cache: Cache, indices: range) -> None:
    keys = [Call("work.f", {"i": i}).key() for i in indices]
    assert sorted(cache.calls.keys()) == sorted(keys)
    loaded = cache.load_many(keys)
    for i, lazy in zip(indices, loaded):
        assert lazy is not None, f"call {i} is missing"
        assert lazy.arguments == {"i": i} and lazy.metadata == {"i": i}
        want, got = result_for(i), lazy.result
        if isinstance(want, np.ndarray):
            np.testing.assert_array_equal(got, want)
        else:
            assert got == want, f"call {i}: {got!r} != {want!r}"
    digests = set(cache.values.digests())
    if isinstance(cache.calls, InlineValues):  # small values live in the call store's database
        digests |= set(cache.calls.blob_digests())
    assert {lazy.value_digest for lazy in loaded if lazy is not None} == digests


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_four_processes_save_distinct_calls(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    stores = tables(backend, tmp_path, request)
    batches = [list(range(w * 250, (w + 1) * 250)) for w in range(4)]
    reports = run_workers(stores, tmp_path, batches)
    assert [r["saved"] for r in reports] == [250] * 4
    slowest = max(r["seconds"] for r in reports)
    print(f"{backend}: 1000 saves by 4 processes in {slowest:.2f} s ({1000 / slowest:.0f} saves/s)")
    cache = Cache(build_store("values", stores["values"]), build_store("calls", stores["calls"]))
    check_all_saved(cache, range(1000))
    cache.close()


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_processes_save_the_same_calls(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    stores = tables(backend, tmp_path, request)
    reports = run_workers(stores, tmp_path, [list(range(500)), list(range(500))])
    assert [r["saved"] for r in reports] == [500, 500]
    slowest = max(r["seconds"] for r in reports)
    print(f"{backend}: 2 x 500 identical saves in {slowest:.2f} s")
    cache = Cache(build_store("values", stores["values"]), build_store("calls", stores["calls"]))
    check_all_saved(cache, range(500))
    assert len(list(cache.calls.keys())) == 500
    cache.close()
