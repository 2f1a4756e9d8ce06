"""Write-behind layers of a stack: pushed in the background, in batches,
bounded, journaled, never lost; and their fleche.toml form.

The pushed-to layers here are local caches behind a tally or a gate
(``tests/layers.py``); ``tests/remote/test_map_over_ssh.py`` does the same
through real ssh, with the remote killed mid-push.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, List

import pytest
from layers import Counting, Gate, memory_cache

from fleche_remote import CacheStack, Call, ConfigError, Rejected, WriteBehind, cached
from fleche_remote.caches.journal import Journal, default_journal_dir
from fleche_remote.config import cache_from_config, cache_to_config
from fleche_remote.remote.client import SshCache
from fleche_remote.testing import wait_until

REPO = Path(__file__).resolve().parents[1]
NAME = "wb.f"


@pytest.fixture(autouse=True)
def state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Journals of this test go under its own directory, never the user's."""
    path = tmp_path / "state"
    monkeypatch.setenv("XDG_STATE_HOME", str(path))
    return path


def file_cache(path: Path, **options: Any) -> Any:
    return cache_from_config({"template": "cloudpickle", "root": str(path), **options})


def calls(n: int, start: int = 0) -> List[Call]:
    return [Call(NAME, {"i": i}, result=i * i) for i in range(start, start + n)]


def test_saves_land_locally_and_arrive_below_in_batches(tmp_path: Path) -> None:
    top = file_cache(tmp_path / "top")
    lower = Counting(memory_cache())
    stack = CacheStack([top, lower], write_behind=[WriteBehind(lower, batch_size=10)])
    keys = stack.save_many(calls(25))
    assert top.contains_many(keys) == [True] * 25  # at once, whatever the pusher does
    assert stack.flush(30)
    assert lower.inner.contains_many(keys) == [True] * 25
    assert lower.counts["save_records"] <= 3 and sum(lower.saved) == 25
    assert stack.pending() == []
    assert stack.load_value(keys[3]) == 9  # read as usual, from the first layer
    stack.close()


def test_a_full_queue_blocks_the_saver_until_the_pusher_catches_up(tmp_path: Path) -> None:
    lower = Gate(memory_cache())
    writer = WriteBehind(lower, queue_size=2, batch_size=1)
    stack = CacheStack([file_cache(tmp_path / "top"), lower], write_behind=[writer])
    lower.open.clear()
    first = stack.save(calls(1)[0])
    assert lower.entered.wait(30)  # the pusher holds `first` at the gate
    done = threading.Event()

    def save_more() -> None:
        stack.save_many(calls(3, start=1))  # two fit in the queue, the third waits
        done.set()

    saver = threading.Thread(target=save_more, daemon=True)
    saver.start()
    wait_until(lambda: len(writer._queue) == 2, "the queue to fill")
    assert not done.wait(0.3)  # still blocked: the queue is full
    assert len(writer._queue) == 2
    lower.open.set()
    assert done.wait(30)
    assert stack.flush(30)
    assert lower.inner.contains_many([first] + [c.key() for c in calls(3, start=1)]) == [True] * 4
    stack.close()


def test_a_failure_is_logged_once_and_nothing_is_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    top = file_cache(tmp_path / "top")
    lower = Counting(memory_cache())
    journal = tmp_path / "wb.journal"
    stack = CacheStack([top, lower], write_behind=[WriteBehind(lower, journal=journal, batch_size=4)])
    arrived = stack.save_many(calls(3))
    assert stack.flush(30)
    lower.fail_saves = ConnectionError("the link is down")
    with caplog.at_level(logging.WARNING, logger="fleche_remote.writebehind"):
        lost = stack.save_many(calls(5, start=3))
        assert not stack.flush(30)
        more = stack.save_many(calls(4, start=8))  # saving goes on, locally
    assert caplog.text.count("write-behind to") == 1 and "the link is down" in caplog.text
    assert stack.pending() == lost + more  # exactly what did not arrive, in order
    assert lower.inner.contains_many(arrived + lost + more) == [True] * 3 + [False] * 9
    assert top.contains_many(lost + more) == [True] * 9

    # a later process sees the same journal and pushes
    stack.close()
    top2 = file_cache(tmp_path / "top")
    lower.fail_saves = None
    later = CacheStack([top2, lower], write_behind=[WriteBehind(lower, journal=journal)])
    assert later.pending() == lost + more
    assert later.push_pending() == 9
    assert later.pending() == [] and lower.inner.contains_many(lost + more) == [True] * 9
    # and background pushing resumed
    newer = later.save(calls(1, start=50)[0])
    assert later.flush(30) and lower.inner.contains(newer)
    later.close()


def test_a_flush_that_reports_a_failure_finds_it_logged_already(tmp_path: Path) -> None:
    # the warning is written before the failure shows: a handler slow to
    # write it (a loaded machine, a log on a network disk) cannot let a
    # caller see flush() fail with nothing in the log yet
    class Slow(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.messages: List[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            time.sleep(0.3)
            self.messages.append(record.getMessage())

    handler = Slow()
    logger = logging.getLogger("fleche_remote.writebehind")
    logger.addHandler(handler)
    try:
        lower = Counting(memory_cache())
        lower.fail_saves = ConnectionError("the link is down")
        stack = CacheStack(
            [file_cache(tmp_path / "top"), lower], write_behind=[WriteBehind(lower, journal=tmp_path / "j")]
        )
        stack.save_many(calls(2))
        assert not stack.flush(30)
        assert len(handler.messages) == 1 and "the link is down" in handler.messages[0]
        stack.close()
    finally:
        logger.removeHandler(handler)


def test_push_pending_raises_and_keeps_what_did_not_arrive(tmp_path: Path) -> None:
    lower = Counting(memory_cache())
    lower.fail_saves = ConnectionError("still down")
    stack = CacheStack([file_cache(tmp_path / "top"), lower], write_behind=[lower])
    keys = stack.save_many(calls(3))
    assert not stack.flush(30)
    with pytest.raises(ConnectionError):
        stack.push_pending()
    assert stack.pending() == keys
    assert isinstance(stack.write_behind[0].failure, ConnectionError)
    stack.close()


def test_an_entry_evicted_before_its_push_is_dropped(tmp_path: Path) -> None:
    lower = Gate(memory_cache())
    stack = CacheStack([file_cache(tmp_path / "top"), lower], write_behind=[WriteBehind(lower, batch_size=1)])
    lower.open.clear()
    held = stack.save(calls(1)[0])
    assert lower.entered.wait(30)
    evicted = stack.save(calls(1, start=1)[0])
    stack.evict(evicted)
    lower.open.set()
    assert stack.flush(30)
    assert lower.inner.contains(held) and not lower.inner.contains(evicted)
    assert stack.pending() == []
    stack.close()


def test_close_flushes_and_the_stack_is_usable_after(tmp_path: Path) -> None:
    lower = Counting(memory_cache())
    stack = CacheStack([file_cache(tmp_path / "top"), lower], write_behind=[lower])
    keys = stack.save_many(calls(30))
    stack.close()
    assert lower.inner.contains_many(keys) == [True] * 30
    again = stack.save(calls(1, start=40)[0])
    assert stack.flush(30) and lower.inner.contains(again)
    stack.close()


def test_f_map_saves_once_and_pushes_behind(tmp_path: Path) -> None:
    lower = Counting(memory_cache())
    stack = CacheStack([file_cache(tmp_path / "top"), lower], write_behind=[lower])

    @cached(cache=stack)
    def cube(x: int) -> int:
        return x**3

    assert cube.map(range(100)) == [x**3 for x in range(100)]
    assert stack.flush(30)
    assert lower.counts["save_records"] == 1 and lower.saved == [100]
    stack.close()


def test_journal_location_and_volatile_first_layers(tmp_path: Path, state_home: Path) -> None:
    lower = memory_cache()
    stack = CacheStack([file_cache(tmp_path / "top"), lower], write_behind=[lower])
    stack.save(calls(1)[0])
    path = stack.write_behind[0].journal.path
    assert (
        path is not None
        and path.parent == default_journal_dir() == state_home / "fleche-remote" / "write-behind"
    )
    assert path.name.endswith(".journal") and path.exists()
    # the same two layers (by config) share one journal across processes
    same = CacheStack([file_cache(tmp_path / "top"), lower], write_behind=[lower])
    assert same.write_behind[0].journal.path == path
    stack.close(), same.close()

    other = memory_cache()
    in_memory = CacheStack([memory_cache(), other], write_behind=[other])
    in_memory.save(calls(1)[0])
    assert in_memory.write_behind[0].journal.path is None  # dies with the process, as the layer does
    in_memory.close()


def test_journal_survives_a_torn_line_and_compacts(tmp_path: Path) -> None:
    path = tmp_path / "j.journal"
    keys = [f"{i:064x}" for i in range(5)]
    journal = Journal(path, "test")
    journal.add(keys[:3])
    journal.close()
    with open(path, "ab") as fh:
        fh.write(b"+" + keys[3].encode()[:20])  # a crash mid-line
    journal = Journal(path, "test")
    journal.add(keys[4:])
    journal.remove(keys[:1])
    assert journal.live() == keys[1:3] + keys[4:]
    journal.compact()
    assert path.read_text().splitlines() == ["# test"] + [f"+{k}" for k in keys[1:3] + keys[4:]]
    assert journal.live() == keys[1:3] + keys[4:]
    journal.close()


def test_bad_write_behind_arguments() -> None:
    a, b = memory_cache(), memory_cache()
    with pytest.raises(ValueError, match="lower layers"):
        CacheStack([a, b], write_behind=[a])
    with pytest.raises(ValueError, match="lower layers"):
        CacheStack([a, b], write_behind=[memory_cache()])
    with pytest.raises(ValueError, match="twice"):
        CacheStack([a, b], write_behind=[b, b])
    with pytest.raises(ValueError):
        WriteBehind(b, queue_size=0)
    with pytest.raises(TypeError):
        WriteBehind("b")  # type: ignore[arg-type]


def test_a_read_only_first_layer_refuses_saves_and_queues_nothing(tmp_path: Path) -> None:
    lower = memory_cache()
    stack = CacheStack([memory_cache(read_only=True), lower], write_behind=[lower])
    with pytest.raises(Rejected):
        stack.save(calls(1)[0])
    assert stack.pending() == []


# -- interpreter exit ------------------------------------------------------------

EXIT_SCRIPT = """
import atexit, sys
from fleche_remote import CacheStack, Call, WriteBehind
from fleche_remote.config import cache_from_config

sys.path.insert(0, {tests!r})
from layers import Gate

top = cache_from_config({{"template": "cloudpickle", "root": {top!r}}})
lower = Gate(cache_from_config({{"template": "cloudpickle", "root": {lower!r}}}))
lower.open.clear()  # the link is slow: nothing has arrived when the script ends
writer = WriteBehind(lower, batch_size=1, journal={journal!r}, close_timeout={timeout!r})
stack = CacheStack([top, lower], write_behind=[writer])
stack.save_many([Call("exit.f", {{"i": i}}, i) for i in range(40)])
print("pending", len(writer.pending()), flush=True)
if not {stuck!r}:
    # registered after the write-behind's exit hook, so it runs before it
    atexit.register(lower.open.set)
# no close(): the interpreter's exit flushes
"""


@pytest.mark.parametrize("stuck", [False, True], ids=["drains", "bounded-wait"])
def test_interpreter_exit_flushes_with_a_bounded_wait(tmp_path: Path, stuck: bool) -> None:
    journal = tmp_path / "exit.journal"
    script = EXIT_SCRIPT.format(
        tests=str(REPO / "tests"),
        top=str(tmp_path / "top"),
        lower=str(tmp_path / "lower"),
        journal=str(journal),
        stuck=stuck,
        timeout=1.0 if stuck else 60.0,
    )
    (tmp_path / "job.py").write_text(script)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "job.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "pending 40\n"  # the premise: all of it was still queued at exit
    keys = [Call("exit.f", {"i": i}, i).key() for i in range(40)]
    lower = file_cache(tmp_path / "lower")
    left = Journal(journal).live()
    if stuck:
        assert time.monotonic() - started < 60  # the wait was bounded (close_timeout = 1 s)
        assert "not pushed within" in out.stderr
        assert left == keys and lower.contains_many(keys) == [False] * 40
    else:
        assert lower.contains_many(keys) == [True] * 40 and left == []


# -- fleche.toml -------------------------------------------------------------------


def ssh_stack_table(**layer: Any) -> List[Any]:
    return [{"template": "memory"}, {"type": "ssh", "host": "me@cluster", **layer}]


def test_write_behind_in_fleche_toml_round_trips() -> None:
    stack = cache_from_config(ssh_stack_table(write_behind=True, workdir="~/p"))
    assert isinstance(stack, CacheStack)
    remote = stack.layers[1]
    assert isinstance(remote, SshCache) and not remote.connected
    assert [w.layer for w in stack.write_behind] == [remote]
    cfg = cache_to_config(stack)
    assert cfg[1] == {"type": "ssh", "host": "me@cluster", "workdir": "~/p", "write_behind": True}
    again = cache_from_config(cfg)
    assert isinstance(again, CacheStack) and again.write_behind[0].layer is again.layers[1]
    plain = cache_from_config(ssh_stack_table(write_behind=False))
    assert isinstance(plain, CacheStack) and plain.write_behind == ()
    assert "write_behind" not in cache_to_config(plain)[1]


@pytest.mark.parametrize(
    "cfg, fragment",
    [
        (ssh_stack_table(write_behind="yes"), "must be true or false"),
        ([{"template": "memory"}, {"template": "memory", "write_behind": True}], "type = 'ssh'"),
        ([{"type": "ssh", "host": "h", "write_behind": True}, {"template": "memory"}], "first layer"),
        ({"type": "ssh", "host": "h", "write_behind": True}, "layer of a stack"),
    ],
)
def test_write_behind_config_errors_name_the_key(cfg: Any, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as info:
        cache_from_config(cfg, name="shared")
    assert info.value.key == "write_behind"
