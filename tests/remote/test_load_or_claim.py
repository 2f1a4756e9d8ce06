"""A ``@cached`` miss on an ssh cache, through the real sshd: the lookup
claims the key in the same request, so computing starts one round trip
after the call, as a hit returns one round trip after it."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Dict, List

import pytest
from claims_world import World, wait_for

from fleche_remote import Call, SshCache, cached
from fleche_remote.claiming import me
from fleche_remote.config import cache_from_config
from fleche_remote.errors import ProtocolError
from fleche_remote.remote import handlers
from fleche_remote.storage.claims import Holder

from .helpers import SQL_TOML, remote_dir, ssh_cache, ssh_table


def claimed(observer: SshCache, key: str) -> bool:
    keeper = observer.claim_keeper()
    assert keeper is not None
    return keeper.claimed([key])[0]


@pytest.mark.parametrize("toml", ["files", "sql"])
def test_a_miss_computes_one_round_trip_after_the_call(sshd: Any, tmp_path: Path, toml: str) -> None:
    workdir = remote_dir(tmp_path, SQL_TOML) if toml == "sql" else remote_dir(tmp_path)
    remote = ssh_cache(sshd, workdir)
    observer = ssh_cache(sshd, workdir)  # another connection to the same server
    seen: Dict[str, Any] = {}
    try:

        @cached(cache=remote)
        def double(x: int) -> int:
            seen["requests"] = remote.request_count - before
            seen["claimed"] = claimed(observer, double.key(x))
            return 2 * x

        remote.ping()  # the handshake is done: count requests from here
        before = remote.request_count
        assert double(21) == 42
        # one request before computing, and the claim was held meanwhile
        assert seen == {"requests": 1, "claimed": True}
        # the release goes out in the background, behind the save
        wait_for(lambda: not claimed(observer, double.key(21)), "the claim's release")
        assert observer.load_value(double.key(21)) == 42

        before = remote.request_count
        assert double(21) == 42  # a hit: one request, nothing claimed
        assert remote.request_count - before == 1
        assert not claimed(observer, double.key(21))
    finally:
        remote.close()
        observer.close()


def test_a_stack_claiming_in_its_write_behind_layer_misses_in_one_round_trip(
    sshd: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    workdir = remote_dir(tmp_path)
    stack = cache_from_config(
        [
            {"template": "cloudpickle", "root": str(tmp_path / "laptop")},
            ssh_table(sshd, workdir, write_behind=True),
        ]
    )
    layer = stack.layers[-1]
    observer = ssh_cache(sshd, workdir)
    seen: Dict[str, Any] = {}
    try:

        @cached(cache=stack)
        def double(x: int) -> int:
            seen["requests"] = layer.request_count - before
            seen["claimed"] = claimed(observer, double.key(x))
            return 2 * x

        layer.ping()
        before = layer.request_count
        assert double(4) == 8
        assert seen == {"requests": 1, "claimed": True}
        assert stack.flush(60)
        wait_for(lambda: not claimed(observer, double.key(4)), "the claim's release after the push")
        assert observer.load_value(double.key(4)) == 8

        # a hit in the laptop's layer asks the cluster nothing
        before = layer.request_count
        assert double(4) == 8 and layer.request_count == before
        # a result the cluster has and the laptop lacks: found in one
        # request, and copied into the laptop's layer
        stack.layers[0].evict(double.key(4))
        runs = len(seen)
        before = layer.request_count
        seen.clear()
        assert double(4) == 8
        assert seen == {} and runs == 2  # not computed again
        assert layer.request_count - before == 1
        assert stack.layers[0].contains(double.key(4))
    finally:
        stack.close()
        observer.close()


def tripled(x: int) -> int:
    return 3 * x


def test_a_stack_whose_calls_hit_its_local_layer_never_starts_ssh(
    sshd: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    laptop = {"template": "cloudpickle", "root": str(tmp_path / "laptop")}
    local = cached(cache=cache_from_config(laptop))(tripled)
    assert local(2) == 6  # stored on the laptop alone
    stack = cache_from_config([laptop, ssh_table(sshd, remote_dir(tmp_path), write_behind=True)])
    try:
        f = cached(cache=stack)(tripled)
        assert f.key(2) == local.key(2)
        assert f(2) == 6
        assert not stack.layers[-1].connected  # the claims' place was not even asked
    finally:
        stack.close()


def test_two_processes_on_one_ssh_cache_compute_once(sshd: Any, tmp_path: Path) -> None:
    workdir = remote_dir(tmp_path)
    world = World(tmp_path, None)
    try:
        a = world.start(block=True, cache=ssh_table(sshd, workdir))
        b = world.start(block=True, cache=ssh_table(sshd, workdir))
        world.go()
        world.wait_for(
            lambda: len(world.computed()) == 1 and world.calling(a) and world.calling(b) and world.waiting(),
            "one process computing while the other waits on the server's claim",
        )
        world.finish()
        assert [world.result(a), world.result(b)] == [42, 42]
        assert len(world.computed()) == 1, world.computed()
    finally:
        world.close()


def test_a_call_another_holds_waits_then_reads_its_result(
    sshd: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    workdir = remote_dir(tmp_path)
    remote = ssh_cache(sshd, workdir)
    observer = ssh_cache(sshd, workdir)
    runs: List[int] = []
    try:

        @cached(cache=remote)
        def double(x: int) -> int:
            runs.append(x)
            return 2 * x

        elsewhere = Holder("a-process-elsewhere", "elsewhere", 1)
        keeper = observer.claim_keeper()
        assert keeper is not None
        assert keeper.claim([double.key(3)], elsewhere, 60) == [None]
        waiting = threading.Event()

        class Seen(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if "waiting for" in record.getMessage():
                    waiting.set()

        seen = Seen()
        logging.getLogger("fleche_remote.claims").addHandler(seen)
        got: List[Any] = []
        with caplog.at_level(logging.INFO, logger="fleche_remote.claims"):
            thread = threading.Thread(target=lambda: got.append(double(3)))
            thread.start()
            try:
                assert waiting.wait(60), "the call never waited for the other holder"
                # the holder saves its result (here, through the same server), then releases
                assert observer.save(
                    Call(double.name, double.arguments(3), 6, {}, double.version)
                ) == double.key(3)
                keeper.release([double.key(3)], elsewhere)
            finally:
                thread.join(60)
                logging.getLogger("fleche_remote.claims").removeHandler(seen)
        assert not thread.is_alive()
        assert got == [6] and runs == []  # read, not computed
    finally:
        remote.close()
        observer.close()


def test_a_damaged_stored_value_is_computed_again(
    sshd: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    workdir = remote_dir(tmp_path)
    remote = ssh_cache(sshd, workdir)
    try:
        runs: List[int] = []

        @cached(cache=remote)
        def double(x: int) -> int:
            runs.append(x)
            return 2 * x

        assert double(7) == 14
        value = remote.load(double.key(7)).record.value
        (path,) = (workdir / "store").rglob(value)
        path.write_bytes(b"not a pickle")
        with caplog.at_level(logging.WARNING, logger="fleche_remote.cached"):
            assert double(7) == 14
        assert runs == [7, 7]
        assert "corrupt" in caplog.text
    finally:
        remote.close()


@pytest.mark.parametrize("first", ["after its handshake", "before its handshake"])
def test_an_earlier_server_is_asked_in_two_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: str
) -> None:
    # a server of an earlier version: it claims, but neither lists nor knows load_or_claim
    monkeypatch.setattr(handlers, "served_features", lambda cache, read_only=False: [])
    monkeypatch.delitem(handlers.CLAIM_HANDLERS, "load_or_claim")
    remote = SshCache.in_process(cache_from_config({"template": "sql", "root": str(tmp_path / "store")}))
    try:
        seen: Dict[str, Any] = {}

        @cached(cache=remote)
        def double(x: int) -> int:
            seen["requests"] = remote.request_count - before
            keeper = remote.claim_keeper()
            seen["claimed"] = keeper is not None and keeper.claimed([double.key(x)]) == [True]
            return 2 * x

        before = remote.request_count
        if first == "after its handshake":
            remote.ping()
            assert remote.lookup_claims() is None
            before = remote.request_count
        assert double(1) == 2
        # the lookup, then the claim (and, asked before the handshake, the
        # refused load_or_claim before them)
        assert seen == {"requests": 2 if first == "after its handshake" else 3, "claimed": True}
        assert remote.lookup_claims() is None
        seen.clear()
        assert double(1) == 2 and seen == {}
    finally:
        remote.close()


@pytest.mark.parametrize(
    "args, problem",
    [
        ({"keys": ["a" * 64, "b" * 64], "holder": ["o", "h", 1, 0.0], "lease": 30.0}, "one key"),
        ({"keys": ["a" * 64], "holder": ["o", "h"], "lease": 30.0}, "holder"),
        ({"keys": ["a" * 64], "holder": ["o", "h", 1, 0.0], "lease": "long"}, "lease"),
        ({"keys": "a" * 64, "holder": ["o", "h", 1, 0.0], "lease": 30.0}, "keys"),
    ],
)
def test_a_malformed_lookup_that_claims_is_refused_and_the_connection_goes_on(
    tmp_path: Path, args: Dict[str, Any], problem: str
) -> None:
    remote = SshCache.in_process(cache_from_config({"template": "sql", "root": str(tmp_path / "store")}))
    try:
        with pytest.raises(ProtocolError, match=problem):
            remote._request("load_or_claim", args)
        assert remote.contains_many(["a" * 64]) == [False]
        keeper = remote.claim_keeper()
        assert keeper is not None and keeper.claimed(["a" * 64]) == [False]  # nothing was claimed
        assert me().owner != "o"
    finally:
        remote.close()


def test_threads_of_one_process_compute_a_call_once(sshd: Any, tmp_path: Path) -> None:
    workdir = remote_dir(tmp_path)
    remote = ssh_cache(sshd, workdir)
    runs: List[int] = []
    inside = threading.Event()
    finish = threading.Event()
    waiting: List[str] = []
    all_waiting = threading.Event()

    class Waiters(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "waiting for" in record.getMessage():
                waiting.append(threading.current_thread().name)
                if len(waiting) == 3:
                    all_waiting.set()

    try:

        @cached(cache=remote)
        def slow(x: int) -> int:
            runs.append(x)
            inside.set()
            assert finish.wait(60)
            return x + 1

        results: List[int] = []
        threads = [threading.Thread(target=lambda: results.append(slow(1))) for _ in range(4)]
        claims_log = logging.getLogger("fleche_remote.claims")
        handler = Waiters(logging.INFO)
        claims_log.addHandler(handler)
        old_level = claims_log.level
        claims_log.setLevel(logging.INFO)
        try:
            threads[0].start()
            assert inside.wait(60)
            for t in threads[1:]:
                t.start()
            # the three others wait for the first (on its event, not the server)
            assert all_waiting.wait(60), waiting
            finish.set()
            for t in threads:
                t.join(60)
        finally:
            claims_log.removeHandler(handler)
            claims_log.setLevel(old_level)
            finish.set()
        assert results == [2] * 4 and runs == [1]
    finally:
        remote.close()
