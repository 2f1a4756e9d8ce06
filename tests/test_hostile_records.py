"""Records planted by someone who may write to a shared cache directory or
holds an append-only key: each is one bad entry, never a broken listing, a
hang, a memory blow-up or code run.

The crafting helpers here are also used by
``tests/conformance/test_hostile_records.py``, which plants the same
records into every kind of store.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import pickle
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pytest

from fleche_remote import Cache, Call
from fleche_remote.call import CallRecord, UnreadableRecord
from fleche_remote.codec.peek import abridged_arguments, peek
from fleche_remote.codec.plain import loads_plain
from fleche_remote.errors import CorruptEntryError, ProtocolError
from fleche_remote.storage.file import FileCallStore, FileValueStore

#: Seconds any listing may take here; a hang fails the test instead.
DEADLINE = 60

PLACEHOLDER = "HOSTILE-PLACEHOLDER"

# -- crafted pickle pieces: each pushes exactly one value, memoizes nothing ----

#: a dict whose key is 64 nested tuples, each holding the one before twice:
#: 2**64 steps to hash, in 137 bytes
HASH_BOMB = b"}" + b")" + b"2\x86" * 64 + b"K\x01s"
#: 100,000 nested tuples
DEEP = b")" + b"\x85" * 100_000
#: a memo slot at 2**27-1: 2 GiB of memo for the C unpickler
FAR_MEMO = b"Nr" + struct.pack("<I", 2**27 - 1)
#: a 9,600-digit integer
_BIG = 10**9600
BIG_INT = (
    b"\x8b"
    + struct.pack("<i", (_BIG.bit_length() + 8) // 8)
    + _BIG.to_bytes((_BIG.bit_length() + 8) // 8, "little", signed=True)
)
#: bytearray(2**30), which the restricted decoder's allow-list names
HUGE_BYTEARRAY = b"\x8c\x08builtins\x8c\tbytearray\x93J\x00\x00\x00\x40\x85R"


def arguments_pickle(piece: bytes) -> bytes:
    """Pickled arguments ``{"x": <piece>}``."""
    return b"\x80\x04}\x8c\x01x" + piece + b"s."


def canary_arguments(canary: Path) -> bytes:
    """Arguments whose unpickling runs ``touch canary``."""
    command = f"touch {canary}".encode()
    call = b"\x8c\x05posix\x8c\x06system\x93\x8c" + bytes([len(command)]) + command + b"\x85R"
    return arguments_pickle(call)


def record(key: str = "ab" * 32, **fields: Any) -> CallRecord:
    """A well-formed record, then ``fields`` set as they are (any type)."""
    made = CallRecord(
        key=key,
        name="work.simulate",
        version=None,
        arguments=pickle.dumps({"n": 1}, protocol=4),
        arg_digests={"n": "cd" * 32},
        metadata={"timestamp": 1_700_000_000.0},
        value="ef" * 32,
        value_size=10,
    )
    for name, value in fields.items():
        object.__setattr__(made, name, value)
    return made


def record_pickle(rec: CallRecord, splice: Optional[bytes] = None) -> bytes:
    """``rec`` pickled as a store writes it, with the string
    :data:`PLACEHOLDER` (somewhere in its fields) replaced by ``splice``."""
    data = pickle.dumps(rec, protocol=4)
    if data[2:3] == b"\x95":  # one FRAME: drop it, so that the splice need not fix its length
        data = data[:2] + data[11:]
    if splice is not None:
        text = PLACEHOLDER.encode()
        pushed = b"\x8c" + bytes([len(text)]) + text
        assert data.count(pushed) == 1
        data = data.replace(pushed, splice)
    return data


def hostile_pickles() -> Dict[str, bytes]:
    """Record pickles that no store may let through as a record."""
    meta = lambda piece: record_pickle(record(metadata={"x": PLACEHOLDER}), piece)  # noqa: E731
    return {
        "metadata hash bomb": meta(HASH_BOMB),
        "metadata 100,000 deep": meta(DEEP),
        "far memo index": meta(FAR_MEMO),
        "9,600-digit integer": meta(BIG_INT),
        "huge bytearray": meta(HUGE_BYTEARRAY),
        "arguments an int": record_pickle(record(arguments=7)),
        "metadata a list": record_pickle(record(metadata=[1, 2])),
        "name an int": record_pickle(record(name=5)),
        "a refused global": meta(b"\x8c\x02os\x8c\x06system\x93"),
        "not a pickle": b"garbage",
    }


def hostile_records() -> Dict[str, CallRecord]:
    """Records that decode, but whose arguments or metadata a listing must survive."""
    return {
        "arguments hash bomb": record(arguments=arguments_pickle(HASH_BOMB)),
        "arguments 100,000 deep": record(arguments=arguments_pickle(DEEP)),
        "arguments far memo": record(arguments=arguments_pickle(FAR_MEMO)),
        "arguments big integer": record(arguments=arguments_pickle(BIG_INT)),
        "timestamp 10**400": record(metadata={"timestamp": 10**400}),
        "timestamp NaN": record(metadata={"timestamp": float("nan")}),
        "timestamp 1e300": record(metadata={"timestamp": 1e300}),
        "name with escapes": record(name="evil\x1b[2J\nfake row\x9b"),
    }


def keyed(index: int) -> str:
    return f"{index:02x}" * 32


def within(deadline: float, work: Callable[[], Any]) -> Any:
    """``work()`` in a thread; fails the test if it takes past ``deadline``."""
    box: Dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = work()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(deadline)
    assert not thread.is_alive(), f"still running after {deadline} s: a hang"
    if "error" in box:
        raise box["error"]
    return box.get("value")


def plant_file(calls_root: Path, key: str, body: bytes) -> None:
    """A call file written behind the store's back."""
    shard = calls_root / key[:2]
    shard.mkdir(parents=True, exist_ok=True)
    (shard / f"{key}.call").write_bytes(b"FRC1\n" + body)


def run_cli(*args: str, cwd: Path, timeout: float = DEADLINE) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fleche_remote", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


# -- the decoders -----------------------------------------------------------------


@pytest.mark.parametrize("name", list(hostile_pickles()))
def test_the_restricted_decoder_refuses_each_hostile_record_quickly(name: str) -> None:
    data = hostile_pickles()[name]
    with pytest.raises(ProtocolError):
        within(DEADLINE, lambda: _decode_record(data))


def _decode_record(data: bytes) -> Any:
    decoded = loads_plain(data)
    from fleche_remote.call import check_record

    try:
        return check_record(decoded, "planted")
    except CorruptEntryError as exc:
        raise ProtocolError(str(exc)) from None


@pytest.mark.parametrize("piece", [HASH_BOMB, DEEP, FAR_MEMO, BIG_INT], ids=["hash", "deep", "memo", "int"])
def test_peeking_at_hostile_arguments_says_why_and_hashes_nothing(piece: bytes) -> None:
    arguments, problem = within(DEADLINE, lambda: peek(arguments_pickle(piece)))
    assert arguments == {} and problem and "refusing" in problem
    assert within(DEADLINE, lambda: abridged_arguments(arguments_pickle(piece))).startswith("<")


def test_peeking_runs_nothing(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    arguments, problem = peek(canary_arguments(canary))
    assert problem is None and "x" in arguments
    assert not canary.exists()


# -- the file store ------------------------------------------------------------


def test_a_gzip_bomb_is_not_inflated_when_the_store_does_not_compress(tmp_path: Path) -> None:
    store = FileCallStore(tmp_path / "calls")
    bomb = gzip.compress(b"\0" * (64 << 20), compresslevel=9)
    plant_file(tmp_path / "calls", keyed(1), bomb)
    with pytest.raises(CorruptEntryError, match="compress = false"):
        store.get(keyed(1))
    # a compressing store inflates only up to a record's budget
    import fleche_remote.call as call_module

    squeezed = FileCallStore(tmp_path / "calls", compress=True)
    budget = call_module.MAX_RECORD_BYTES
    try:
        call_module.MAX_RECORD_BYTES = 1 << 20
        import fleche_remote.storage.file as file_module

        file_module.MAX_RECORD_BYTES = 1 << 20
        with pytest.raises(CorruptEntryError, match="inflates to more than"):
            squeezed.get(keyed(1))
    finally:
        call_module.MAX_RECORD_BYTES = budget
        file_module.MAX_RECORD_BYTES = budget


def test_a_value_header_that_claims_more_than_the_file_holds_is_refused(tmp_path: Path) -> None:
    store = FileValueStore(tmp_path / "values")
    digest = "ef" * 32
    header = json.dumps({"kind": "bytes", "meta": {}, "size": 3 << 30, "gzip": False}).encode()
    (tmp_path / "values" / digest[:2]).mkdir(parents=True)
    (tmp_path / "values" / digest[:2] / digest).write_bytes(
        b"FRV1\n" + struct.pack(">I", len(header)) + header + b"x"
    )
    with pytest.raises(CorruptEntryError, match="claims a 3221225472-byte body, the file holds 1"):
        store.get(digest)
    (tmp_path / "values" / digest[:2] / digest).write_bytes(b"FRV1\n" + struct.pack(">I", 1 << 31) + b"{}")
    with pytest.raises(CorruptEntryError, match="header claims 2147483648 bytes"):
        store.get(digest)


# -- the command line ---------------------------------------------------------


def _file_world(tmp_path: Path) -> Cache:
    (tmp_path / "fleche.toml").write_text(
        '[default]\ncache = "main"\nroot = true\n\n[main]\ntemplate = "cloudpickle"\nroot = "store"\n'
    )
    return Cache(FileValueStore(tmp_path / "store" / "values"), FileCallStore(tmp_path / "store" / "calls"))


def test_ls_lists_around_every_hostile_record(tmp_path: Path) -> None:
    cache = _file_world(tmp_path)
    good = cache.save(Call("work.good", {"n": 3}, result=1, metadata={"timestamp": 1_700_000_000.0}))
    calls = tmp_path / "store" / "calls"
    planted: List[str] = []
    for i, data in enumerate(hostile_pickles().values(), start=16):
        plant_file(calls, keyed(i), data)
        planted.append(keyed(i))
    for i, rec in enumerate(hostile_records().values(), start=64):
        plant_file(calls, keyed(i), record_pickle(dataclasses.replace(rec, key=keyed(i))))
    done = run_cli("ls", cwd=tmp_path)
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr and "entries could not be read" in done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith(good[:12]) and "work.good" in line and "n=3" in line for line in lines)
    for key in planted:
        (row,) = [line for line in lines if line.startswith(key[:12])]
        assert "<unreadable:" in row
    # one row per entry: the header, the good one, every planted one
    assert len(lines) == 1 + 1 + len(hostile_pickles()) + len(hostile_records())
    assert "\x1b" not in done.stdout and "\x9b" not in done.stdout
    assert "evil\\x1b[2J\\nfake row\\x9b" in done.stdout

    as_json = run_cli("ls", "--json", cwd=tmp_path)
    assert as_json.returncode == 3, as_json.stderr
    rows = {row["key"]: row for row in json.loads(as_json.stdout)}
    assert "error" not in rows[good] and rows[good]["arguments"] == {"n": "3"}
    assert all("error" in rows[key] for key in planted)
    assert "refusing" in rows[keyed(64)]["error"]  # the arguments' hash bomb
    assert rows[keyed(68)]["timestamp"] is None  # 10**400 is no time


def test_show_says_what_is_wrong_and_exits_nonzero(tmp_path: Path) -> None:
    _file_world(tmp_path)
    calls = tmp_path / "store" / "calls"
    plant_file(calls, keyed(1), hostile_pickles()["metadata hash bomb"])
    plant_file(calls, keyed(2), record_pickle(record(key=keyed(2), arguments=arguments_pickle(HASH_BOMB))))
    done = run_cli("show", keyed(1), "--max-result-bytes", "0", cwd=tmp_path)
    assert done.returncode == 1 and "refusing to decode a pickle" in done.stderr
    assert "Traceback" not in done.stderr
    done = run_cli("show", keyed(2), "--max-result-bytes", "0", cwd=tmp_path)
    assert done.returncode == 3, done.stderr
    assert "<unreadable: ProtocolError: refusing" in done.stdout
    assert "not loaded (--max-result-bytes 0)" in done.stdout


class _Canary:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.path}",))


def test_show_measures_the_value_not_the_record_s_claim(tmp_path: Path) -> None:
    cache = _file_world(tmp_path)
    canary = tmp_path / "canary"
    key = cache.save(Call("work.big", {"n": 1}, result=[_Canary(canary), b"x" * (8 << 20)]))
    assert not canary.exists()
    store = cache.calls
    honest = store.get(key)
    store.delete(key)
    store.put(dataclasses.replace(honest, value_size=1))  # the record now says 1 byte
    done = run_cli("show", key, "--max-result-bytes", "1000", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "not loaded: more than --max-result-bytes 1000" in done.stdout
    assert not canary.exists()
    help_text = run_cli("show", "--help", cwd=tmp_path).stdout
    assert "its pickle runs" in " ".join(help_text.split())
    assert "0 shows the record only" in " ".join(help_text.split())


def test_a_server_refuses_hostile_records_at_the_door_and_lists_on(sshd: Any, tmp_path: Path) -> None:
    """Through an append-only server: the saves are refused as protocol
    errors, and the server still answers afterwards."""
    from fleche_remote import SshCache
    from fleche_remote.codec.values import encode_value

    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "fleche.toml").write_text(
        '[default]\ncache = "main"\nroot = true\n\n[main]\ntemplate = "cloudpickle"\nroot = "store"\n'
    )
    options = sshd.add_key(
        forced_command=f"cd {remote} && exec {sys.executable} -m fleche_remote serve --append-only"
    )
    client = SshCache(sshd.host, ssh_options=options, timeout=60, connect_timeout=60)
    try:
        client.save(Call("work.good", {"n": 1}, result=1))
        blob = encode_value(1)
        from fleche_remote.codec.values import blob_digest

        value = str(blob_digest(blob))
        for i, rec in enumerate(
            [
                record(arguments=arguments_pickle(HASH_BOMB)),
                record(metadata={"deep": _nested(80)}),
                record(metadata=[1]),
                record(arguments=7),
            ]
        ):
            rec = dataclasses.replace(rec, key=keyed(100 + i), value=value, value_size=blob.size)
            with pytest.raises(Exception, match="refusing to store call"):
                within(DEADLINE, lambda rec=rec: client.save_records([(rec, blob)]))
        listed = within(DEADLINE, lambda: list(client.query_records()))
        assert [r.name for r in listed] == ["work.good"]
        # nested past the wire's budget, the request itself is refused: that
        # connection ends with the reason, and the next one is served
        deep = dataclasses.replace(record(metadata={"deep": _nested(500)}), value=value, value_size=blob.size)
        with pytest.raises(Exception, match="nested more than 100 deep"):
            within(DEADLINE, lambda: client.save_records([(deep, blob)]))
        client.reconnect()
        listed = within(DEADLINE, lambda: list(client.query_records()))
        assert [r.name for r in listed] == ["work.good"]
    finally:
        client.close()


def _nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


def test_unreadable_records_do_not_reach_query(tmp_path: Path) -> None:
    cache = _file_world(tmp_path)
    cache.save(Call("work.good", {"n": 3}, result=1))
    plant_file(tmp_path / "store" / "calls", keyed(1), hostile_pickles()["metadata hash bomb"])
    records = within(DEADLINE, lambda: list(cache.query_records()))
    assert sorted(type(r).__name__ for r in records) == ["CallRecord", "UnreadableRecord"]
    bad = next(r for r in records if isinstance(r, UnreadableRecord))
    assert bad.key == keyed(1) and "refusing" in bad.reason
    assert [c.name for c in within(DEADLINE, lambda: list(cache.query()))] == ["work.good"]
