"""Progress bars of large transfers over real ssh (``fleche_remote.progress``)."""

from __future__ import annotations

import io
import os
import sys

import pytest
from remote.helpers import remote_dir, ssh_cache

from fleche_remote import Call, SshCache
from fleche_remote.progress import PROGRESS_MIN_BYTES, ByteBar, wanted

BIG = bytes(PROGRESS_MIN_BYTES + (1 << 20))


def test_bars_both_ways_when_asked(sshd, tmp_path, capsys) -> None:
    cache = ssh_cache(sshd, remote_dir(tmp_path), progress=True)
    try:
        key = cache.save(Call("m.big", {"n": 1}, BIG))
        assert cache.load_value(key) == BIG
        small = cache.save(Call("m.small", {"n": 1}, b"x" * 1000))
        assert cache.load_value(small) == b"x" * 1000
    finally:
        cache.close()
    captured = capsys.readouterr()
    assert captured.out == ""  # bars never touch stdout
    err = captured.err
    assert f"{sshd.host} ->" in err and f"{sshd.host} <-" in err
    assert err.count("100%") == 2  # one bar each way, none for the small value
    assert "9.00M/9.00M" in err


def test_no_bar_when_off_or_when_stderr_is_not_a_terminal(sshd, tmp_path, capsys) -> None:
    for setting in (False, None):  # capsys' stderr is no terminal
        cache = ssh_cache(sshd, remote_dir(tmp_path), progress=setting)
        try:
            assert cache.load_value(cache.save(Call("m.big", {"n": 2}, BIG))) == BIG
        finally:
            cache.close()
    assert capsys.readouterr().err == ""


def test_plain_lines_without_tqdm(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `from tqdm import tqdm` raises ImportError
    stream = io.StringIO()
    with ByteBar(3 << 20, "host ->", stream) as bar:
        for _ in range(3):
            bar.update(1 << 20)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "host ->: 0 B of 3.0 MiB started"
    assert lines[-1].startswith("host ->: 3.0 MiB of 3.0 MiB done in ")


def test_auto_follows_whether_stderr_is_a_terminal() -> None:
    master, slave = os.openpty()
    try:
        with open(slave, "w", closefd=False) as tty:
            assert wanted(None, tty) is True
            assert wanted(False, tty) is False
        assert wanted(None, io.StringIO()) is False
        assert wanted(True, io.StringIO()) is True
    finally:
        os.close(master)
        os.close(slave)


@pytest.mark.parametrize("value", [True, False])
def test_progress_is_a_config_key_of_ssh_tables(value) -> None:
    cache = SshCache.from_config({"host": "me@cluster", "progress": value})
    assert cache.progress is value
    assert cache.to_config()["progress"] is value
    assert "progress" not in SshCache("me@cluster").to_config()
