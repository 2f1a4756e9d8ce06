"""Hostile records planted straight into each kind of store (file, SQL,
HDF5, and the same behind SshCache through the real sshd): listing around
them works, each is one unreadable entry, nothing hangs or runs.

The records are written behind the cache's back, as someone with write
access to a shared directory or database could; the crafting helpers come
from ``tests/test_hostile_records.py``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sqlite3
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Tuple

import pytest
from test_hostile_records import (
    DEADLINE,
    HASH_BOMB,
    arguments_pickle,
    canary_arguments,
    hostile_pickles,
    hostile_records,
    keyed,
    plant_file,
    record,
    record_pickle,
    within,
)

from fleche_remote import Call
from fleche_remote.call import CallRecord, UnreadableRecord

from .factories import FACTORIES, CacheUnderTest, _over_ssh, remote_dir

#: Factory -> how a raw record reaches its store, and where that store lives.
#: Memory stores hold objects, not bytes, so nothing can be planted there.
PLANTED = ["file", "file-compressed", "file+sqlite", "hdf5", "ssh-file", "ssh-sqlite", "ssh-hdf5"]

Planter = Callable[[str, bytes], None]


def _sqlite_planter(path: Path) -> Callable[[str, Dict[str, Any]], None]:
    def plant(key: str, columns: Dict[str, Any]) -> None:
        row = {
            "key": key,
            "name": "work.simulate",
            "version": None,
            "arguments": pickle_args(),
            "arg_digests": "{}",
            "metadata": "{}",
            "value": "ef" * 32,
            "value_kind": "pickle",
            "value_size": 10,
            "digest_scheme": "fleche-remote/2",
            "created": 0.0,
        }
        row.update(columns)
        for column in ("key", "value"):  # stored as the bytes they spell, when they are hex
            if isinstance(row[column], str) and re.fullmatch(r"(?:[0-9a-f]{2})+", row[column]):
                row[column] = bytes.fromhex(row[column])
        with sqlite3.connect(path) as db:
            names = ", ".join(row)
            db.execute(
                f"INSERT INTO fr_calls ({names}) VALUES ({', '.join('?' * len(row))})", list(row.values())
            )

    return plant


def pickle_args() -> bytes:
    import pickle

    return pickle.dumps({"n": 1}, protocol=4)


def _hdf5_planter(path: Path) -> Planter:
    def plant(key: str, body: bytes) -> None:
        import h5py
        import numpy as np

        with h5py.File(path, "a") as f:
            f.require_group("calls").create_dataset(key, data=np.frombuffer(body, dtype=np.uint8))

    return plant


def _subject(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> CacheUnderTest:
    """The cache under test. The ``ssh-*`` factories share one connection
    and store per module, emptied between tests through the API; planted
    records cannot be evicted that way, so here each test gets a server of
    its own through the session's sshd, over a fresh ``tmp_path/remote``."""
    if not name.startswith("ssh-"):
        return FACTORIES[name].make(tmp_path, request)
    backend = name[len("ssh-") :]
    return CacheUnderTest(_over_ssh(remote_dir(tmp_path, backend), request.getfixturevalue("sshd")))


def _where(name: str, tmp_path: Path) -> Tuple[str, Path]:
    """The kind of store ``name`` keeps its calls in, and where."""
    remote = tmp_path / "remote"
    return {
        "file": ("file", tmp_path / "cache" / "calls"),
        "file-compressed": ("file", tmp_path / "cache" / "calls"),
        "file+sqlite": ("sql", tmp_path / "calls.sqlite"),
        "hdf5": ("hdf5", tmp_path / "cache.h5"),
        "ssh-file": ("file", remote / "store" / "calls"),
        "ssh-sqlite": ("sql", remote / "calls.db"),
        "ssh-hdf5": ("hdf5", remote / "cache.h5"),
    }[name]


@pytest.fixture(params=PLANTED)
def planted(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Tuple[CacheUnderTest, Dict[str, str]]]:
    """A cache with one good call and every hostile record planted; the
    planted keys map to what each one is."""
    subject = _subject(request.param, tmp_path, request)
    try:
        good = subject.writer.save(Call("work.good", {"n": 3}, result=1, metadata={"timestamp": 1.7e9}))
        subject.cache.close()  # the planting happens with no one holding the store open
        if subject.writer is not subject.cache:
            subject.writer.close()
        kind, where = _where(request.param, tmp_path)
        labels: Dict[str, str] = {good: "good"}
        index = 16
        if kind == "sql":
            plant_sql = _sqlite_planter(where)
            for label, columns in {
                "metadata 200,000 deep": {"metadata": "[" * 200_000 + "]" * 200_000},
                "metadata a list": {"metadata": "[1, 2]"},
                "metadata with a huge integer": {"metadata": '{"x": ' + "9" * 9600 + "}"},
                # JSON reads these; the rules of plain data refuse them
                "metadata 80 deep": {"metadata": '{"x": ' + "[" * 80 + "]" * 80 + "}"},
                "metadata with a 2,000-digit integer": {"metadata": '{"x": ' + "9" * 2000 + "}"},
                "metadata with a malformed tag": {"metadata": '{"x": {"$dict": [1]}}'},
                "name of 5,000 characters": {"name": "n" * 5000},
                "size as text": {"value_size": "ten"},
                "arguments an int": {"arguments": 7},
                "arguments hash bomb": {"arguments": arguments_pickle(HASH_BOMB)},
                "timestamp 1e300": {"metadata": json.dumps({"timestamp": 1e300})},
                "name with escapes": {"name": "evil\x1b[2J\nfake"},
            }.items():
                plant_sql(keyed(index), columns)
                labels[keyed(index)] = label
                index += 1
        else:
            plant = (lambda k, b: plant_file(where, k, b)) if kind == "file" else _hdf5_planter(where)
            for label, body in hostile_pickles().items():
                plant(keyed(index), body)
                labels[keyed(index)] = label
                index += 1
            for label, rec in hostile_records().items():
                plant(keyed(index), record_pickle(dataclasses.replace(rec, key=keyed(index))))
                labels[keyed(index)] = label
                index += 1
        yield subject, labels
    finally:
        subject.close()


def test_query_records_lists_around_planted_records(planted: Tuple[CacheUnderTest, Dict[str, str]]) -> None:
    subject, labels = planted
    records = within(DEADLINE, lambda: list(subject.cache.query_records()))
    by_key = {r.key: r for r in records}
    assert set(by_key) == set(labels), "every entry is listed once, readable or not"
    good = next(k for k, label in labels.items() if label == "good")
    assert isinstance(by_key[good], CallRecord) and by_key[good].name == "work.good"
    unreadable = {k for k, r in by_key.items() if isinstance(r, UnreadableRecord)}
    # records whose fields are wrong or over budget come as unreadable, with a reason
    for key, label in labels.items():
        if label.startswith(
            ("metadata", "far memo", "9,600", "huge", "arguments an", "name an", "name of", "a refused")
        ):
            assert key in unreadable, label
        if label in ("not a pickle", "size as text"):
            assert key in unreadable, label
    assert all(by_key[k].reason for k in unreadable)  # type: ignore[attr-defined]


def test_query_skips_what_it_cannot_read(planted: Tuple[CacheUnderTest, Dict[str, str]]) -> None:
    subject, _labels = planted
    calls = within(DEADLINE, lambda: list(subject.cache.query("work.good")))
    assert [c.arguments for c in calls] == [{"n": 3}]


def test_show_and_ls_around_planted_records(
    planted: Tuple[CacheUnderTest, Dict[str, str]], tmp_path: Path
) -> None:
    """What ``ls`` runs for each entry (peek, timestamps, escaping) runs to
    the end on every planted one, and runs none of their code."""
    from fleche_remote.cli.common import printable, timestamp
    from fleche_remote.codec.peek import abridged_arguments, peek

    subject, _labels = planted
    canary = tmp_path / "canary"

    def look() -> int:
        shown = 0
        for rec in subject.cache.query_records():
            if isinstance(rec, UnreadableRecord):
                continue
            peek(rec.arguments)
            text = printable(f"{rec.name} {abridged_arguments(rec.arguments)} {timestamp(rec)}")
            assert "\x1b" not in text and "\n" not in text
            shown += 1
        return shown

    assert within(DEADLINE, look) >= 1
    _, problem = peek(canary_arguments(canary))
    assert problem is None and not canary.exists()


def test_a_planted_record_does_not_stop_a_later_save(planted: Tuple[CacheUnderTest, Dict[str, str]]) -> None:
    subject, _labels = planted
    key = subject.writer.save(Call("work.later", {"n": 4}, result=2))
    assert within(DEADLINE, lambda: subject.cache.load(key).result) == 2
    assert record(key=key).key == key  # the helper's records use the same key form
