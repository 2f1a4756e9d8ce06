"""Garbage and oversized frames through the real sshd, straight into
``python -m fleche_remote serve`` (no SshCache in between).

The bulk of the hostile-input testing is the in-process fuzzing in
``tests/protocol/test_fuzz.py``; these few cases prove the same on the
process a client really talks to: it answers with an error frame or
closes cleanly (exit 3 and one line saying why, never a traceback),
holds no more memory than what arrived, and stored data is untouched.
"""

from __future__ import annotations

import os
import random
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, List, Tuple

import pytest

from fleche_remote import Call
from fleche_remote.codec.plain import dumps_plain
from fleche_remote.remote.client import SshCache
from fleche_remote.remote.protocol import (
    DATA,
    MSG,
    NEED_DATA,
    BannerScanner,
    ErrorResponse,
    FrameDecoder,
    Hello,
    Request,
    Response,
    encode_message,
    frame_header,
)
from fleche_remote.testing import wait_until

from .support import DEADLINE_S, open_store, remote_with_stores


class RawServer:
    """A server started through ssh, spoken to byte by byte."""

    def __init__(self, sshd: Any, remote: Path) -> None:
        command = (
            f"cd {shlex.quote(str(remote))} && exec {shlex.quote(sys.executable)} -m fleche_remote serve"
        )
        self.proc = subprocess.Popen(
            sshd.ssh_command(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.decoder = FrameDecoder()
        scanner = BannerScanner()
        found = None
        while found is None:
            found = scanner.feed(self._read())
        self.decoder.feed(found[2])
        hello = self.next_message()
        assert isinstance(hello, Hello)
        self.pid = int(hello.info["pid"])

    def _read(self) -> bytes:
        assert self.proc.stdout is not None
        data = os.read(self.proc.stdout.fileno(), 1 << 16)
        assert data, f"the server closed the connection: {self.finish()}"
        return data

    def next_message(self) -> Any:
        while True:
            frame = self.decoder.next_frame()
            if frame is not NEED_DATA:
                assert frame.type == MSG, frame
                return frame.message
            self.decoder.feed(self._read())

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except BrokenPipeError:  # it already closed: what it said is checked by the caller
            pass

    def finish(self) -> Tuple[int, str]:
        """Close our side; the exit status and stderr."""
        _, err = self.proc.communicate(timeout=DEADLINE_S)  # closes stdin first
        return self.proc.returncode, err.decode(errors="replace")


@pytest.fixture
def stocked(sshd: Any, tmp_path: Path) -> Tuple[Path, List[str]]:
    remote = remote_with_stores(tmp_path)
    cache = SshCache(sshd.host, workdir=str(remote), python=sys.executable, ssh_options=sshd.ssh_options)
    keys = [str(cache.save(Call("hostile.f", {"i": i}, os.urandom(50_000 * i)))) for i in range(3)]
    cache.close()
    return remote, keys


def _untouched(remote: Path, keys: List[str], before: Any) -> None:
    cache = open_store(remote, "files")
    try:
        assert cache.contains_many(keys) == [True] * len(keys)
        assert [len(cache.load_value(k)) for k in keys] == [0, 50_000, 100_000]
    finally:
        cache.close()
    assert _files(remote) == before


def _files(remote: Path) -> List[Tuple[str, int]]:
    return sorted(
        (p.relative_to(remote).as_posix(), p.stat().st_size) for p in remote.rglob("*") if p.is_file()
    )


def _bad_request() -> bytes:
    payload = dumps_plain(Request(1.0, "ping"))  # type: ignore[arg-type]  # the id a struct can't pack
    return frame_header(MSG, 1, len(payload)) + payload


CLOSING = [
    ("random garbage", lambda: random.Random(3).randbytes(5000), "expected frame marker"),
    ("a message of 2**64-1 bytes", lambda: frame_header(MSG, 1, 2**64 - 1), "exceeds the limit"),
    ("a 1 TiB value chunk", lambda: frame_header(DATA, 1, 1 << 40) + b"x" * 100, "exceeds the limit"),
    ("a request whose id is a float", _bad_request, "request id must be an int"),
    (
        "half a frame, then nothing",
        lambda: frame_header(MSG, 1, 1000) + b"\x80" * 10,
        "input ended inside a frame",
    ),
]


@pytest.mark.parametrize("name, make, reason", CLOSING, ids=[c[0] for c in CLOSING])
def test_hostile_bytes_close_the_server_cleanly(sshd, stocked, name: str, make: Any, reason: str) -> None:
    remote, keys = stocked
    before = _files(remote)
    server = RawServer(sshd, remote)
    server.send(make())
    code, err = server.finish()
    assert code == 3, (code, err)
    assert "protocol error, closing" in err and reason in err, err
    assert "Traceback" not in err, err
    _untouched(remote, keys, before)


def test_bad_requests_get_error_frames_on_a_connection_that_goes_on(sshd, stocked) -> None:
    remote, keys = stocked
    before = _files(remote)
    server = RawServer(sshd, remote)
    bad = [
        Request(1, "no_such_op"),
        Request(2, "load_value", {"key": ["not", "a", "str"]}),
        Request(3, "evict", {"key": "../" + keys[1]}),
        Request(4, "expand", {"prefix": "%"}),
        Request(5, "load_blob", {"digest": "../../etc/passwd"}),
        Request(6, "contains_many", {"keys": [keys[0], "\x00" + keys[0], keys[0][:10] + "%"]}),
        Request(7, "ping"),
    ]
    server.send(b"".join(encode_message(r) for r in bad))
    answers = {}
    while len(answers) < len(bad):
        message = server.next_message()
        answers[message.id] = message
    assert all(isinstance(answers[n], ErrorResponse) for n in range(1, 6)), answers
    assert (
        answers[1].type == "fleche_remote.errors.ProtocolError" and "unknown operation" in answers[1].message
    )
    assert answers[2].type == "fleche_remote.errors.ProtocolError" and "must be a str" in answers[2].message
    assert [answers[n].type for n in (3, 4, 5)] == ["KeyError"] * 3
    assert isinstance(answers[6], Response) and answers[6].result == [True, False, False]
    assert isinstance(answers[7], Response)
    code, err = server.finish()
    assert code == 0 and "Traceback" not in err, err
    _untouched(remote, keys, before)


def test_a_huge_announced_message_costs_only_what_arrives(sshd, stocked) -> None:
    """A header for a message at the 1 GiB limit, then a trickle: the
    server's resident memory stays near its size before."""
    remote, _ = stocked
    server = RawServer(sshd, remote)
    before, read = _rss(server.pid), _read_bytes(server.pid)
    server.send(frame_header(MSG, 1, (1 << 30) - 1) + b"\x80" * 4096)
    wait_until(
        lambda: _read_bytes(server.pid) >= read + 4096, "the server reading the header and payload start"
    )
    grown = _rss(server.pid) - before
    assert grown < 64 << 20, f"resident memory grew by {grown >> 20} MiB for a 4 KiB trickle"
    code, err = server.finish()
    assert code == 3 and "input ended inside a frame" in err, err


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _read_bytes(pid: int) -> int:
    """Bytes the process has read from its input pipe and files so far (rchar)."""
    with open(f"/proc/{pid}/io") as fh:
        for line in fh:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    return 0
