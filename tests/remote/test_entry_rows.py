"""``load_many`` from a server that hands on its rows.

A server whose calls are in SQL with small values inline sends each
listed row as stored; the client builds and checks a call's record when
something other than its result is first read, and checks its value when
the result is. These tests show that what a user reads is the same as
through records, that a damaged row is an error for that call only and
names it, and that the server's own rules (``max_age``) still apply.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, List

import pytest

from fleche_remote import CacheStack, Call
from fleche_remote.codec.values import decode_value
from fleche_remote.config import cache_from_config
from fleche_remote.errors import CorruptEntryError, ProtocolError
from fleche_remote.remote.packing import pipeline_parts
from fleche_remote.remote.rows import checked_rows

from .helpers import SQL_TOML, remote_dir, ssh_cache


def stored(workdir: Path, n: int) -> List[str]:
    cache = cache_from_config({"template": "sql", "root": str(workdir / "store")})
    try:
        calls = [
            Call("rows.f", {"i": i, "tag": "t"}, [float(i)] * 10, metadata={"n": i, "who": "me"}, version="2")
            for i in range(n)
        ]
        return [str(k) for k in cache.save_many(calls)]
    finally:
        cache.close()


def change(workdir: Path, sql: str, *params: Any) -> None:
    db = sqlite3.connect(str(workdir / "store" / "calls.db"))
    try:
        assert db.execute(sql, params).rowcount == 1
        db.commit()
    finally:
        db.close()


def test_a_listing_reads_as_the_records_do(sshd: Any, tmp_path: Path) -> None:
    workdir = remote_dir(tmp_path, SQL_TOML)
    keys = stored(workdir, 30)
    remote = ssh_cache(sshd, workdir)
    try:
        assert "entry_rows" in remote.info(refresh=False)["features"]
        before = remote.request_count
        calls = remote.load_many([*keys, "0" * 64])
        assert remote.request_count - before == 1
        assert calls[-1] is None
        assert [c.result for c in calls[:-1]] == [[float(i)] * 10 for i in range(30)]
        for key, call in zip(keys, calls):
            one = remote.load(key)  # through a record the server built and checked
            assert call.record == one.record
            assert (call.key, call.name, call.version, call.value_digest) == (
                key,
                "rows.f",
                "2",
                one.value_digest,
            )
            assert call.arguments == one.arguments and call.metadata == one.metadata == one.record.metadata
    finally:
        remote.close()


def test_a_damaged_row_is_an_error_for_its_call_only_and_names_it(sshd: Any, tmp_path: Path) -> None:
    workdir = remote_dir(tmp_path, SQL_TOML)
    keys = stored(workdir, 12)
    spoiled = {
        3: ("metadata", "[1, 2]"),
        4: ("metadata", "[" * 200_000 + "]" * 200_000),
        5: ("name", "n" * 5000),
        6: ("arguments", 7),
    }
    for i, (column, value) in spoiled.items():
        change(workdir, f"UPDATE fr_calls SET {column} = ? WHERE key = ?", value, bytes.fromhex(keys[i]))
    # two values: meta that is no JSON, and a body shorter than its size
    value_of = {}
    db = sqlite3.connect(str(workdir / "store" / "calls.db"))
    for i in (8, 9):
        value_of[i] = db.execute(
            "SELECT value FROM fr_calls WHERE key = ?", (bytes.fromhex(keys[i]),)
        ).fetchone()[0]
    db.close()
    change(workdir, "UPDATE fr_blobs SET meta = 'not json' WHERE digest = ?", value_of[8])
    change(workdir, "UPDATE fr_blobs SET size = size + 1 WHERE digest = ?", value_of[9])

    remote = ssh_cache(sshd, workdir)
    try:
        calls = remote.load_many(keys)  # the listing itself goes through
        for i, call in enumerate(calls):
            if i in spoiled:
                # its result is still readable, as with arguments that do not unpickle here
                assert call.result == [float(i)] * 10
                with pytest.raises(CorruptEntryError) as caught:
                    call.name  # noqa: B018
                assert keys[i][:16] in str(caught.value)
                assert keys[i][:12] in repr(call) and "damaged" in repr(call)  # a repr never raises
            elif i in value_of:
                assert call.name == "rows.f" and call.arguments == {"i": i, "tag": "t"}
                with pytest.raises(CorruptEntryError) as caught:
                    call.result  # noqa: B018
                assert value_of[i].hex()[:16] in str(caught.value)
            else:
                assert (call.name, call.arguments, call.result) == (
                    "rows.f",
                    {"i": i, "tag": "t"},
                    [float(i)] * 10,
                )
    finally:
        remote.close()


def test_the_servers_max_age_still_applies(sshd: Any, tmp_path: Path) -> None:
    workdir = remote_dir(tmp_path, SQL_TOML + 'max_age = "30d"\n')
    keys = stored(workdir, 5)
    change(workdir, "UPDATE fr_calls SET created = 1000.0 WHERE key = ?", bytes.fromhex(keys[2]))
    remote = ssh_cache(sshd, workdir)
    try:
        calls = remote.load_many(keys)
        assert [c is None for c in calls] == [False, False, True, False, False]
        assert [c.result for c in calls if c is not None] == [[float(i)] * 10 for i in (0, 1, 3, 4)]
        assert not remote.contains(keys[2])  # expired, so evicted on the server
    finally:
        remote.close()


@pytest.mark.parametrize(
    "rows, n",
    [
        ("rows", 1),  # not a list
        ([None], 2),  # one row for two keys
        ([[1] * 14], 1),  # a list, not a row
        ([(1,) * 13], 1),  # a row short of a column
    ],
)
def test_rows_that_are_not_rows_are_a_protocol_error(rows: Any, n: int) -> None:
    with pytest.raises(ProtocolError):
        checked_rows(rows, n, "the server")


def test_results_true_over_rows_and_a_value_kept_elsewhere(sshd: Any, tmp_path: Path) -> None:
    workdir = remote_dir(tmp_path, SQL_TOML)
    keys = stored(workdir, 10)
    big = b"x" * (200 << 10)  # over the store's inline bound: kept in a file, not in the row
    cache = cache_from_config({"template": "sql", "root": str(workdir / "store")})
    big_key = str(cache.save(Call("rows.big", {}, big)))
    cache.close()
    remote = ssh_cache(sshd, workdir)
    try:
        remote.ping()
        before = remote.request_count
        calls = remote.load_many(keys, results=True)
        assert remote.request_count - before == 1
        assert [c.result for c in calls] == [[float(i)] * 10 for i in range(10)]

        before = remote.request_count
        calls = remote.load_many([*keys, big_key], results=True)
        assert remote.request_count - before == 2  # the rows, then the value that was not in them
        assert all(c.loaded for c in calls)  # asked for with the listing, not when read
        assert calls[-1].result == big and calls[0].result == [0.0] * 10
    finally:
        remote.close()


def test_a_server_of_files_lists_no_rows_and_answers_as_before(sshd: Any, tmp_path: Path) -> None:
    workdir = remote_dir(tmp_path)  # the cloudpickle template: calls as files
    cache = cache_from_config({"template": "cloudpickle", "root": str(workdir / "store")})
    keys = [str(k) for k in cache.save_many([Call("rows.g", {"i": i}, i) for i in range(5)])]
    cache.close()
    remote = ssh_cache(sshd, workdir)
    try:
        assert "entry_rows" not in remote.info(refresh=False)["features"]
        before = remote.request_count
        assert [c.result for c in remote.load_many(keys, results=True)] == list(range(5))
        assert remote.request_count - before == 1
    finally:
        remote.close()


def expected_entries(workdir: Path, keys: List[str]) -> List[Any]:
    """What the server's own store gives, as (key, result) or None."""
    cache = cache_from_config(
        {
            "template": "sql" if (workdir / "store" / "calls.db").exists() else "cloudpickle",
            "root": str(workdir / "store"),
        }
    )
    try:
        return [None if e is None else (e[0].key, decode_value(e[1])) for e in cache.load_entries(keys)]
    finally:
        cache.close()


@pytest.mark.parametrize("toml", ["sql", "files"])
def test_a_long_entry_listing_goes_in_parts_and_reads_as_one_request(
    sshd: Any, tmp_path: Path, toml: str
) -> None:
    # what a stack back-fills from: 600 calls, two of them with values kept
    # outside the rows (or, from a server of files, outside the reply)
    workdir = remote_dir(tmp_path, SQL_TOML) if toml == "sql" else remote_dir(tmp_path)
    template = "sql" if toml == "sql" else "cloudpickle"
    cache = cache_from_config({"template": template, "root": str(workdir / "store")})
    calls = [Call("rows.long", {"i": i}, [float(i)] * 10) for i in range(598)]
    calls += [Call("rows.long", {"i": i}, b"x" * (200 << 10) + bytes([i % 256])) for i in (598, 599)]
    keys = [str(k) for k in cache.save_many(calls)]
    cache.close()
    asked = [*keys[:300], "0" * 64, *keys[300:]]
    remote = ssh_cache(sshd, workdir)
    try:
        remote.ping()
        before = remote.request_count
        entries = remote.load_entries(asked)
        # the parts back to back (one round trip), then the two large values in one more
        assert remote.request_count - before == len(pipeline_parts(asked)) + 1
        got = [None if e is None else (e[0].key, decode_value(e[1])) for e in entries]
        assert got == expected_entries(workdir, asked)
        assert got[300] is None and got[-1] == (keys[-1], calls[-1].result)
        one = remote.load(keys[5]).record
        assert entries[5] is not None and entries[5][0] == one  # the same record as the server builds
    finally:
        remote.close()


def test_a_long_entry_listing_leaves_out_a_call_whose_value_is_lost(sshd: Any, tmp_path: Path) -> None:
    workdir = remote_dir(tmp_path, SQL_TOML)
    cache = cache_from_config({"template": "sql", "root": str(workdir / "store")})
    calls = [Call("rows.lost", {"i": i}, i) for i in range(299)]
    calls.append(Call("rows.lost", {"i": 299}, b"y" * (200 << 10)))
    keys = [str(k) for k in cache.save_many(calls)]
    lost = cache.load_records([keys[-1]])[0].value
    cache.close()
    (path,) = (workdir / "store").rglob(lost)  # the value kept outside the rows
    path.unlink()
    remote = ssh_cache(sshd, workdir)
    try:
        entries = remote.load_entries(keys)
        assert entries[-1] is None  # as one request answers: no entry without its value
        assert [decode_value(e[1]) for e in entries[:-1]] == list(range(299))
    finally:
        remote.close()


def test_a_stack_back_fills_a_long_listing_from_an_ssh_layer(sshd: Any, tmp_path: Path) -> None:
    workdir = remote_dir(tmp_path, SQL_TOML)
    keys = stored(workdir, 400)
    remote = ssh_cache(sshd, workdir)
    top = cache_from_config({"template": "sql", "root": str(tmp_path / "laptop")})
    stack = CacheStack([top, remote])
    try:
        assert [c.result for c in stack.load_many(keys)] == [[float(i)] * 10 for i in range(400)]
        assert top.contains_many(keys) == [True] * 400
        assert [top.load(k).record for k in keys[:3]] == [remote.load(k).record for k in keys[:3]]
    finally:
        stack.close()
