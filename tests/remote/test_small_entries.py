"""``[c.result for c in cache.load_many(keys)]`` is one round trip.

A server whose store keeps small values next to their records (the
``sql`` template) answers ``load_many`` with the records and those values
in one reply; a large value is not sent until its ``.result`` is read,
and a server that predates the form is asked for records only.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from fleche_remote import Call, SshCache
from fleche_remote.config import cache_from_config
from fleche_remote.errors import CorruptEntryError
from fleche_remote.remote import connection, handlers
from fleche_remote.remote.connection import Connection
from fleche_remote.remote.packing import PIPELINE_PARTS, pipeline_parts
from fleche_remote.signing import SignatureError

from .helpers import SQL_TOML, remote_dir, ssh_cache

#: Over the store's inline bound (32 KiB): kept in a file, not in the database.
BIG = b"x" * (200 << 10)


def fill(store: Path) -> list:
    cache = cache_from_config({"template": "sql", "root": str(store)})
    calls = [Call("loop.g", {"i": i}, [float(i)] * 10) for i in range(300)]
    calls.append(Call("loop.g", {"i": "big"}, BIG))
    return cache.save_many(calls)


def test_load_many_brings_small_results_in_its_one_request(sshd: Any, tmp_path: Path) -> None:
    workdir = remote_dir(tmp_path, SQL_TOML)
    keys = fill(workdir / "store")
    remote = ssh_cache(sshd, workdir)
    try:
        assert "small_entries" in remote.info(refresh=False)["features"]
        missing = "0" * 64
        before = remote.request_count
        calls = remote.load_many([*keys[:-1], missing])
        assert calls[-1] is None
        assert [c.result for c in calls[:-1]] == [[float(i)] * 10 for i in range(300)]
        assert [c.arguments for c in calls[:3]] == [{"i": 0}, {"i": 1}, {"i": 2}]
        # records and results together, in two parts sent back to back (one round trip)
        assert remote.request_count - before == len(pipeline_parts(keys)) == 2

        before = remote.request_count
        big = remote.load_many(keys[-1:])[0]
        assert remote.request_count - before == 1  # the record alone: the large value stayed there
        assert not big.loaded
        assert big.result == BIG
        assert remote.request_count - before == 2  # fetched when read
    finally:
        remote.close()


def test_a_long_listing_is_asked_in_parts_all_sent_before_the_first_answer_is_read(
    sshd: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a long listing is split so that the server packs one part while the
    # client unpacks the one before; every part leaves at once, so over a
    # slow link it is still one round trip, and order and gaps are kept
    workdir = remote_dir(tmp_path, SQL_TOML)
    cache = cache_from_config({"template": "sql", "root": str(workdir / "store")})
    keys = cache.save_many([Call("loop.h", {"i": i}, [float(i)] * 10) for i in range(1500)])
    asked = [k if i % 7 else f"{i:064x}" for i, k in enumerate(keys)]  # every 7th is not stored
    in_flight_at_answers = []
    answer = Connection.answer

    def counting(self: Connection, exchange: Any, consume: Any = None) -> Any:
        in_flight_at_answers.append(self.in_flight)
        return answer(self, exchange, consume)

    monkeypatch.setattr(Connection, "answer", counting)
    remote = ssh_cache(sshd, workdir)
    try:
        remote.ping()
        in_flight_at_answers.clear()
        before = remote.request_count
        calls = remote.load_many(asked)
        assert remote.request_count - before == PIPELINE_PARTS
        assert in_flight_at_answers == list(range(PIPELINE_PARTS, 0, -1))  # all sent, then read in turn
        assert [c is None for c in calls] == [i % 7 == 0 for i in range(1500)]
        assert [c.result for c in calls if c is not None] == [[float(i)] * 10 for i in range(1500) if i % 7]
        assert remote.contains(keys[1])  # nothing left over on the connection
    finally:
        remote.close()


def test_a_listing_with_more_parts_than_free_slots_reads_its_own_answers_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # another thread holds most of the slots for requests in flight: the
    # listing must not wait for a slot while holding answers of its own
    store = cache_from_config({"template": "sql", "root": str(tmp_path / "store")})
    remote = SshCache.in_process(store, timeout=20)
    try:
        keys = remote.save_many([Call("slots.h", {"i": i}, [float(i)] * 10) for i in range(1500)])
        monkeypatch.setattr(connection, "MAX_IN_FLIGHT", 3)
        calls = remote.load_many(keys)
        assert len(pipeline_parts(keys)) == 8
        assert [c.result for c in calls] == [[float(i)] * 10 for i in range(1500)]
        assert remote._connection().in_flight == 0
    finally:
        remote.close()


def test_a_part_that_fails_forgets_the_parts_behind_it_and_the_connection_goes_on(tmp_path: Path) -> None:
    key = "6c" * 32
    store = cache_from_config({"template": "sql", "root": str(tmp_path / "store")})
    remote = SshCache.in_process(store, secret_key=key)
    try:
        keys = remote.save_many([Call("signed.h", {"i": i}, [float(i)] * 10) for i in range(600)])
        assert len(pipeline_parts(keys)) == 4
        # a record of the first part is changed behind the signer's back
        db = sqlite3.connect(str(tmp_path / "store" / "calls.db"))
        db.execute("UPDATE fr_calls SET version = 'forged' WHERE key = ?", (bytes.fromhex(keys[10]),))
        assert db.total_changes == 1
        db.commit()
        db.close()
        with pytest.raises(SignatureError):
            remote.load_many(keys)
        conn = remote._connection()
        assert conn.in_flight == 0  # the three parts behind it were forgotten, not left queued
        calls = remote.load_many(keys[150:])
        assert [c.result for c in calls] == [[float(i)] * 10 for i in range(150, 600)]
    finally:
        remote.close()


def test_a_server_without_the_form_is_asked_for_records_then_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an older server lists no features: the client asks as it did before
    monkeypatch.setattr(handlers, "served_features", lambda cache, read_only=False: [])
    keys = fill(tmp_path / "store")
    remote = SshCache.in_process(cache_from_config({"template": "sql", "root": str(tmp_path / "store")}))
    try:
        assert remote.info(refresh=False)["features"] == []
        before = remote.request_count
        calls = remote.load_many(keys)
        assert remote.request_count - before == 1
        assert [c.result for c in calls[:-1]] == [[float(i)] * 10 for i in range(300)]
        assert calls[-1].result == BIG
        assert remote.request_count - before == 2  # records, then the values in one batch
    finally:
        remote.close()


def test_a_signed_client_checks_the_values_that_came_along(tmp_path: Path) -> None:
    key = "6b" * 32
    store = cache_from_config({"template": "sql", "root": str(tmp_path / "store")})
    remote = SshCache.in_process(store, secret_key=key)
    try:
        keys = remote.save_many([Call("signed.g", {"i": i}, [float(i)] * 10) for i in range(20)])
        before = remote.request_count
        assert [c.result for c in remote.load_many(keys)] == [[float(i)] * 10 for i in range(20)]
        assert remote.request_count - before == 1

        # someone with write access to the database swaps one result's bytes
        # for another's: the signature no longer matches, and it is refused
        # before anything is unpickled
        tampered = store.load_records([keys[3]])[0].value
        other = store.load_blobs([store.load_records([keys[4]])[0].value])[0]
        db = sqlite3.connect(str(tmp_path / "store" / "calls.db"))
        db.execute(
            "UPDATE fr_blobs SET body = ? WHERE digest = ?", (other.read_all(), bytes.fromhex(tampered))
        )
        assert db.total_changes == 1  # keys and digests are stored as their 32 bytes
        db.commit()
        db.close()
        calls = remote.load_many(keys)
        assert calls[2].result == [2.0] * 10
        with pytest.raises(SignatureError):
            calls[3].result  # noqa: B018
    finally:
        remote.close()


def test_arguments_that_do_not_unpickle_here_fail_when_read_naming_their_call(
    sshd: Any, tmp_path: Path
) -> None:
    # arguments are unpickled when read: a listing that reads results only
    # goes through, and reading them says which call and why
    workdir = remote_dir(tmp_path, SQL_TOML)
    keys = fill(workdir / "store")
    # a pickle of {"i": Thing()}, Thing from a module this process lacks
    gone = b"\x80\x04}\x94\x8c\x01i\x94\x8c\x15fr_module_not_here_xy\x94\x8c\x05Thing\x94\x93\x94)\x81\x94s."
    db = sqlite3.connect(str(workdir / "store" / "calls.db"))
    db.execute("UPDATE fr_calls SET arguments = ? WHERE key = ?", (gone, bytes.fromhex(keys[5])))
    assert db.total_changes == 1
    db.commit()
    db.close()
    remote = ssh_cache(sshd, workdir)
    try:
        calls = remote.load_many(keys[:10])
        assert [c.result for c in calls] == [[float(i)] * 10 for i in range(10)]
        assert calls[4].arguments == {"i": 4}
        with pytest.raises(CorruptEntryError) as caught:
            calls[5].arguments  # noqa: B018
        message = str(caught.value)
        assert keys[5][:16] in message and "loop.g" in message
        assert "ModuleNotFoundError" in message and "fr_module_not_here_xy" in message
        assert isinstance(caught.value.__cause__, ModuleNotFoundError)
        assert calls[6].arguments == {"i": 6}
    finally:
        remote.close()
