"""Concurrent writers over ssh: 4 client processes x 250 saves into one
remote cache, with 2 reader processes querying and loading meanwhile, for
each shared backend (files, SQLite, PostgreSQL, HDF5).

Each client is a fresh ``python -c`` process with its own SshCache, so
its own server process on the far side; all of them go through one ssh
connection (ControlMaster), as jobs on one login node would. Writers start
together on a signal and save 50 entries one by one, then 200 in batches
of 50. Readers run until the writers are done and check every entry they
see: a record a query returns, or a key ``contains`` admits, must load
whole and right. At the end, 1000 of 1000 are there and load.
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

from fleche_remote import Call

from .support import DEADLINE_S, master_connection, open_store, remote_with_stores

WRITERS = 4
PER_WRITER = 250
SINGLE = 50
BATCH = 50
READERS = 2

RESULT_FOR = """
def result_for(i):
    if i % 3 == 0:
        return np.arange(i % 7 + 1, dtype=float) * i
    if i % 3 == 1:
        return b"r%d" % i * (1 + i % 50)
    return {"i": i, "square": i * i}
"""

COMMON = (
    """
import json, os, random, sys, time
import numpy as np
from fleche_remote import Call
from fleche_remote.remote.client import SshCache
"""
    + RESULT_FOR
    + """
spec = json.loads(sys.argv[1])
cache = SshCache(spec["host"], cache_name=spec["store"], workdir=spec["remote"], python=sys.executable,
                 ssh_options=spec["options"], timeout=60)
cache.contains("00" * 32)
open(spec["ready"], "w").close()
deadline = time.monotonic() + 60
while not os.path.exists(spec["go"]):
    if time.monotonic() > deadline:
        sys.exit("never got the go signal")
    time.sleep(0.002)

def same(i, got):
    want = result_for(i)
    if isinstance(want, np.ndarray):
        return isinstance(got, np.ndarray) and got.shape == want.shape and bool((got == want).all())
    return got == want
"""
)

WRITER = (
    COMMON
    + f"SINGLE, BATCH = {SINGLE}, {BATCH}\n"
    + """
indices = spec["indices"]
calls = [Call("conc.f", {"i": i}, result_for(i), {"i": i}) for i in indices]
saved = 0
for call in calls[:SINGLE]:
    cache.save(call)
    saved += 1
for start in range(SINGLE, len(calls), BATCH):
    saved += len(cache.save_many(calls[start:start + BATCH]))
cache.close()
print(json.dumps({"saved": saved}))
"""
)

READER = (
    COMMON
    + """
rng = random.Random(spec["seed"])
keys = {i: str(Call("conc.f", {"i": i}).key()) for i in range(spec["total"])}
rounds = seen = 0
while True:
    done = os.path.exists(spec["done"])
    for record in cache.query("conc.f"):
        i = record.arguments["i"]
        if record.metadata != {"i": i} or not same(i, record.result):
            sys.exit("partial entry from a query: call " + str(i))
        seen += 1
    sample = rng.sample(range(spec["total"]), 40)
    for i, there in zip(sample, cache.contains_many([keys[i] for i in sample])):
        if there and not same(i, cache.load_value(keys[i])):
            sys.exit("partial entry from a load: call " + str(i))
    rounds += 1
    if done:
        break
cache.close()
print(json.dumps({"rounds": rounds, "seen": seen}))
"""
)


def _toml(postgres_url: str) -> str:
    return f"""\
[files]
template = "cloudpickle"
root = "files"

[sqlite]
template = "sql"
root = "sqlite"

[postgres]
template = "sql"
root = "postgres"
url = "{postgres_url}"

[hdf5]
template = "hdf5"
root = "hdf5"
"""


def _start(script: str, spec: Dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str], deadline: float, what: str) -> Dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"a {what} did not finish in time")
    assert proc.returncode == 0, f"a {what} failed (exit {proc.returncode}):\n{err}"
    return dict(json.loads(out))


@pytest.mark.slow
@pytest.mark.parametrize("store", ["files", "sqlite", "postgres", "hdf5"])
def test_four_writers_and_two_readers_over_ssh(sshd, tmp_path: Path, store: str, request: Any) -> None:
    url = request.getfixturevalue("postgres_url") if store == "postgres" else "sqlite://"
    remote = remote_with_stores(tmp_path, _toml(url))
    total = WRITERS * PER_WRITER
    go, done = tmp_path / "go", tmp_path / "done"
    with master_connection(sshd) as options:
        base = {
            "host": sshd.host,
            "store": store,
            "remote": str(remote),
            "options": list(options),
            "go": str(go),
        }
        writers: List[subprocess.Popen[str]] = []
        readers: List[subprocess.Popen[str]] = []
        try:
            for w in range(WRITERS):
                indices = list(range(w * PER_WRITER, (w + 1) * PER_WRITER))
                writers.append(_start(WRITER, {**base, "indices": indices, "ready": str(tmp_path / f"w{w}")}))
            for r in range(READERS):
                spec = {
                    **base,
                    "seed": r,
                    "total": total,
                    "done": str(done),
                    "ready": str(tmp_path / f"r{r}"),
                }
                readers.append(_start(READER, spec))
            deadline = time.monotonic() + 4 * DEADLINE_S
            ready = [tmp_path / f"w{w}" for w in range(WRITERS)] + [
                tmp_path / f"r{r}" for r in range(READERS)
            ]
            while not all(path.exists() for path in ready):
                for proc in writers + readers:
                    if proc.poll() is not None:
                        pytest.fail(f"a client exited before it was ready:\n{proc.communicate()[1]}")
                assert time.monotonic() < deadline, "clients were not ready in time"
                time.sleep(0.01)
            start = time.monotonic()
            go.touch()
            saved = [_finish(proc, deadline, "writer")["saved"] for proc in writers]
            took = time.monotonic() - start
            done.touch()
            reads = [_finish(proc, deadline, "reader") for proc in readers]
        finally:
            for proc in writers + readers:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    assert saved == [PER_WRITER] * WRITERS
    assert all(r["rounds"] >= 1 for r in reads)
    print(f"{store}: {total} saves by {WRITERS} ssh clients in {took:.2f} s; readers {reads}")
    namespace: Dict[str, Any] = {"np": __import__("numpy")}
    exec(RESULT_FOR, namespace)
    cache = open_store(remote, store)
    try:
        keys = [str(Call("conc.f", {"i": i}).key()) for i in range(total)]
        assert cache.contains_many(keys) == [True] * total
        for i, lazy in enumerate(cache.load_many(keys)):
            assert lazy is not None, f"call {i} is missing"
            want, got = namespace["result_for"](i), lazy.result
            if hasattr(want, "shape"):
                assert (got == want).all(), f"call {i} is wrong"
            else:
                assert got == want, f"call {i} is wrong"
    finally:
        cache.close()
    assert not any(p.name.endswith(".tmp") for p in (remote / store).rglob("*")), os.listdir(remote / store)
