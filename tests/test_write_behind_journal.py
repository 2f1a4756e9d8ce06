"""The write-behind journal decides what reaches the remote, so: no kill
loses a promised push, every line a person or another system could write
is read (or reported), it stays small whoever writes it, and it is trusted
only when nobody else could have written it.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, List

import pytest
from layers import memory_cache

from fleche_remote import CacheStack, Call, ConfigError, WriteBehind
from fleche_remote.caches.journal import COMPACT_BYTES, Journal
from fleche_remote.config import cache_from_config

REPO = Path(__file__).resolve().parents[1]
PEER = "fleche-peer"


@pytest.fixture(autouse=True)
def state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Journals of this test go under its own directory, never the user's."""
    path = tmp_path / "state"
    monkeypatch.setenv("XDG_STATE_HOME", str(path))
    return path


def file_cache(path: Path) -> Any:
    return cache_from_config({"template": "cloudpickle", "root": str(path)})


def keys(n: int, start: int = 0) -> List[str]:
    return [f"{i:064x}" for i in range(start, start + n)]


# -- a kill at any point loses nothing ------------------------------------------------

SAVE_LOOP = """
import sys
from fleche_remote import CacheStack, Call, WriteBehind
from fleche_remote.config import cache_from_config

top = cache_from_config({{"template": "cloudpickle", "root": {top!r}}})
lower = cache_from_config({{"template": "cloudpickle", "root": {lower!r}}})
stack = CacheStack([top, lower], write_behind=[WriteBehind(lower, journal={journal!r}, batch_size=8)])
print("ready", flush=True)
i = 0
while True:
    stack.save(Call("kill.f", {{"run": {run}, "i": i}}, i))
    i += 1
"""

PUSH = """
from fleche_remote import CacheStack, WriteBehind
from fleche_remote.config import cache_from_config

top = cache_from_config({{"template": "cloudpickle", "root": {top!r}}})
lower = cache_from_config({{"template": "cloudpickle", "root": {lower!r}}})
stack = CacheStack([top, lower], write_behind=[WriteBehind(lower, journal={journal!r})])
stack.push_pending()
print(len(stack.pending()), flush=True)
"""

#: Kills of the save loop; each costs two interpreter starts (~1 s).
KILLS = 12


def test_a_kill_at_any_point_of_a_save_leaves_it_pushed_later(tmp_path: Path) -> None:
    paths = {"top": str(tmp_path / "top"), "lower": str(tmp_path / "lower"), "journal": str(tmp_path / "j")}
    env = dict(os.environ, PYTHONPATH=str(REPO))
    rng = random.Random(20240611)
    for run in range(KILLS):
        proc = subprocess.Popen(
            [sys.executable, "-c", SAVE_LOOP.format(run=run, **paths)], stdout=subprocess.PIPE, env=env
        )
        try:
            assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
            time.sleep(rng.uniform(0.0, 0.5))  # somewhere in the middle of some save
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(60)
            assert proc.stdout is not None
            proc.stdout.close()
        out = subprocess.run(
            [sys.executable, "-c", PUSH.format(**paths)], env=env, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout == "0\n"
        # everything the local layer holds arrived below
        top, lower = file_cache(tmp_path / "top"), file_cache(tmp_path / "lower")
        local = [c.key for c in top.query("kill.f")]
        assert local, "the loop saved nothing before the kill"
        missing = [k for k, there in zip(local, lower.contains_many(local)) if not there]
        assert missing == [], f"run {run}: {len(missing)} of {len(local)} local entries never pushed"


# -- reading what is there -------------------------------------------------------------


def test_crlf_and_upper_case_lines_count_and_unreadable_lines_are_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "j.journal"
    a, b, c = keys(3)
    path.write_bytes(
        b"# written on another system\r\n"
        + f"+{a.upper()}\r\n+{b}\r\n".encode()
        + b"+not-a-key\r\n"
        + f"-{a.upper()}\r\n+{c.upper()}\n".encode()
    )
    path.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="fleche_remote.writebehind"):
        assert Journal(path).live() == [b, c]
    assert f"journal {path}, line 4: '+not-a-key'" in caplog.text


def test_any_process_compacts_a_journal_past_its_size(tmp_path: Path) -> None:
    path = tmp_path / "j.journal"
    reader = Journal(path, "test")
    reader.add(keys(1, start=10**6))  # kept open across the others' compactions
    for job in range(2 * COMPACT_BYTES // (100 * 66)):  # short jobs: 100 keys each, pushed
        journal = Journal(path, "test")
        journal.add(keys(100, start=job * 100))
        journal.remove(keys(100, start=job * 100))
        journal.close()
        assert path.stat().st_size < COMPACT_BYTES + 100 * 66
    # an fd on the file compaction replaced still appends to the journal
    reader.add(keys(1, start=2 * 10**6))
    assert Journal(path).live() == keys(1, start=10**6) + keys(1, start=2 * 10**6)
    assert not [p for p in tmp_path.iterdir() if p != path]  # no temp files left
    reader.close()


# -- trusting only the user's own journal ----------------------------------------------


def _start(tmp_path: Path, journal: Path) -> CacheStack:
    top = file_cache(tmp_path / "top")
    lower = memory_cache()
    return CacheStack([top, lower], write_behind=[WriteBehind(lower, journal=journal)])


def _refused(tmp_path: Path, journal: Path, found: str, fix: str) -> None:
    """Write-behind does not start, with a message naming the path, what
    is there and the fix, and nothing was saved."""
    done: List[BaseException] = []

    def start() -> None:
        try:
            _start(tmp_path, journal)
        except BaseException as exc:
            done.append(exc)

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    thread.join(30)
    assert done, "starting write-behind hung (or did not refuse)"
    assert isinstance(done[0], ConfigError), done[0]
    message = str(done[0])
    assert str(journal) in message and found in message and fix in message, message


def test_a_directory_at_the_journal_path_is_refused_at_start(tmp_path: Path) -> None:
    journal = tmp_path / "j.journal"
    journal.mkdir()
    _refused(tmp_path, journal, "it is a directory", "move it away")


def test_a_fifo_at_the_journal_path_is_refused_without_blocking(tmp_path: Path) -> None:
    journal = tmp_path / "j.journal"
    os.mkfifo(journal, 0o600)
    _refused(tmp_path, journal, "it is a FIFO (named pipe)", "move it away")


def test_a_symlink_at_the_journal_path_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("not a journal\n")
    journal = tmp_path / "j.journal"
    journal.symlink_to(target)
    _refused(tmp_path, journal, "it is a symbolic link", "move it away")
    with pytest.raises(ConfigError, match="symbolic link"):
        Journal(journal).compact()
    assert target.read_text() == "not a journal\n"


def test_a_journal_of_another_user_is_refused(tmp_path: Path) -> None:
    journal = tmp_path / "j.journal"
    journal.write_text(f"+{keys(1)[0]}\n")
    journal.chmod(0o600)
    shutil.chown(journal, user=PEER)
    _refused(tmp_path, journal, f"owned by uid {journal.stat().st_uid}, not by this user", "move it away")


def test_a_journal_others_can_write_is_refused(tmp_path: Path) -> None:
    journal = tmp_path / "j.journal"
    journal.write_text(f"+{keys(1)[0]}\n")
    journal.chmod(0o666)
    _refused(tmp_path, journal, "writable by group or others (mode 666)", f"chmod 600 {journal}")


def test_journal_dirs_and_file_are_private_under_umask_000(tmp_path: Path, state_home: Path) -> None:
    old = os.umask(0)
    try:
        stack = _start(tmp_path, state_home / "deep" / "er" / "j.journal")
        stack.save(Call("f", {}, 1))
        stack.close()
    finally:
        os.umask(old)
    made = [state_home, state_home / "deep", state_home / "deep" / "er"]
    assert {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in made} == {str(p): "0o700" for p in made}
    assert stat.S_IMODE((state_home / "deep" / "er" / "j.journal").stat().st_mode) == 0o600
