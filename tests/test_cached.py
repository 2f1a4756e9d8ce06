"""``@cached``: memoization into real caches, keys, helpers, failure paths."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

import fleche_remote
from fleche_remote import Cache, CacheStack, ConfigError, CorruptEntryError, Digest, cached
from fleche_remote.cached import CachedFunction
from fleche_remote.config import cache_from_config, forget_loaded_caches
from fleche_remote.storage.memory import MemoryCallStore, MemoryValueStore

REPO = Path(__file__).resolve().parents[1]


def memory_cache(read_only: bool = False) -> Cache:
    return Cache(MemoryValueStore(), MemoryCallStore(), read_only=read_only)


def counting(cache: Any = None, **options: Any) -> Tuple[CachedFunction, List[Tuple[Any, ...]]]:
    """A cached ``add`` that records every time it really runs."""
    runs: List[Tuple[Any, ...]] = []

    def add(x: int, y: int = 10, *, scale: int = 1) -> int:
        """Add, then scale."""
        runs.append((x, y, scale))
        return (x + y) * scale

    return cached(cache=cache, **options)(add), runs


@pytest.fixture(params=["memory", "file"])
def cache(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "memory":
        return memory_cache()
    return cache_from_config({"template": "cloudpickle", "root": str(tmp_path / "c")})


def test_memoizes(cache: Any) -> None:
    add, runs = counting(cache)
    assert add(1) == 11
    assert add(1) == 11
    assert add(2, 3) == 5
    assert runs == [(1, 10, 1), (2, 3, 1)]
    assert add.cache is cache


def test_a_new_process_finds_what_an_earlier_one_saved(tmp_path: Path) -> None:
    script = f"""
import sys
from fleche_remote import cached
from fleche_remote.config import cache_from_config

cache = cache_from_config({{"template": "cloudpickle", "root": {str(tmp_path)!r}}})

@cached(cache=cache)
def square(x):
    print("computing", file=sys.stderr)
    return x * x

print(square(12))
"""
    (tmp_path / "job.py").write_text(script)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    runs = [
        subprocess.run(
            [sys.executable, "job.py"], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
        )
        for _ in range(2)
    ]
    assert [r.stdout for r in runs] == ["144\n", "144\n"]
    assert [r.stderr.count("computing") for r in runs] == [1, 0]


def test_none_is_a_result_like_any_other() -> None:
    runs = []

    @cached(cache=memory_cache())
    def nothing(x: int) -> None:
        runs.append(x)

    assert nothing(1) is None and nothing(1) is None
    assert runs == [1]


def test_positional_keyword_and_default_spellings_share_a_key() -> None:
    add, runs = counting(memory_cache())
    key = add.key(1)
    assert key == add.key(x=1) == add.key(1, 10) == add.key(1, y=10, scale=1) == add.key(y=10, x=1)
    assert add.key(1, 11) != key and add.key(1, scale=2) != key
    assert isinstance(key, Digest) and len(key) == 64
    add(1)
    add(x=1, y=10)
    assert len(runs) == 1


def test_key_is_the_call_key_under_module_qualname() -> None:
    add, _ = counting(memory_cache())
    assert add.name == f"{__name__}.counting.<locals>.add"
    # an unpinned function's version is the digest of its code
    assert add.version is not None and add.version.startswith("code:")
    call = fleche_remote.Call(add.name, {"x": 2, "y": 3, "scale": 1}, version=add.version)
    assert add.key(2, y=3) == call.key()


def test_wrong_arguments_raise_like_the_function_would() -> None:
    add, runs = counting(memory_cache())
    with pytest.raises(TypeError):
        add(1, 2, 3)
    with pytest.raises(TypeError):
        add.key(z=1)
    assert runs == []


def test_version_separates_results() -> None:
    store = memory_cache()
    v1, runs1 = counting(store, version="1")
    v2, runs2 = counting(store, version="2")
    assert v1.key(1) != v2.key(1)
    v1(1)
    v2(1)
    v1(1)
    assert len(runs1) == 1 and len(runs2) == 1
    assert v1.load(1).version == "1"


def test_ignored_parameters_do_not_enter_the_key() -> None:
    runs = []

    @cached(cache=memory_cache(), ignore=("verbose",))
    def slow(x: int, verbose: bool = False) -> int:
        runs.append((x, verbose))
        return x

    assert slow.key(1, verbose=True) == slow.key(1)
    slow(1, verbose=True)
    slow(1, verbose=False)
    assert runs == [(1, True)]
    assert "verbose" not in slow.load(1).arguments


def test_ignore_accepts_a_single_name() -> None:
    add, _ = counting(memory_cache(), ignore="scale")
    assert add.key(1, scale=1) == add.key(1, scale=5)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"ignore": ("verbos",)}, "'verbos'"),
        ({"cache": 42}, "cache must be"),
        ({"version": 2.5}, "version must be"),
    ],
)
def test_bad_options_fail_at_decoration(options: Dict[str, Any], fragment: str) -> None:
    with pytest.raises(TypeError, match=fragment):
        counting(**options)


def test_decorating_a_non_function_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="needs a function"):
        cached(42)  # type: ignore[call-overload]


def test_helpers_contains_load_query(cache: Any) -> None:
    add, runs = counting(cache)
    assert not add.contains(1)
    with pytest.raises(KeyError):
        add.load(1)
    add(1)
    add(2)
    add(2, y=0)
    assert add.contains(1) and add.contains(x=1, y=10)
    stored = add.load(1)
    assert stored.result == 11 and stored.name == add.name
    assert stored.arguments == {"x": 1, "y": 10, "scale": 1}
    assert sorted(c.result for c in add.query()) == [2, 11, 12]
    assert sorted(c.result for c in add.query(x=2)) == [2, 12]
    assert [c.result for c in add.query(x=2, y=0)] == [2]
    assert list(add.query(x=2.0)) == []  # 2.0 is a different argument from 2
    assert len(runs) == 3  # the helpers never run the function


def test_query_is_scoped_to_the_function() -> None:
    store = memory_cache()
    add, _ = counting(store)

    @cached(cache=store)
    def other(x: int) -> int:
        return -x

    add(1)
    other(1)
    assert [c.result for c in add.query(x=1)] == [11]
    assert [c.result for c in other.query(x=1)] == [-1]


def test_metadata_is_plain_and_describes_the_run() -> None:
    add, _ = counting(memory_cache())
    add(1)
    meta = dict(add.load(1).metadata)
    described = {"wall_time", "hostname", "python_version", "timestamp", "fleche_remote_version", "code"}
    assert set(meta) == described
    assert meta["code"]["digest"] == add.version[len("code:") :]
    assert meta["wall_time"] >= 0 and meta["timestamp"] > 1.6e9
    assert meta["python_version"] == ".".join(map(str, sys.version_info[:3]))
    assert meta["fleche_remote_version"] == fleche_remote.__version__


def test_wraps_the_function() -> None:
    add, _ = counting(memory_cache())
    assert add.__name__ == "add" and add.__doc__ == "Add, then scale."
    assert add.__wrapped__.__name__ == "add"
    assert callable(add.__wrapped__) and not isinstance(add.__wrapped__, CachedFunction)
    assert isinstance(add, CachedFunction) and "add" in repr(add)


def test_bare_decorator_form(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "fleche.toml").write_text("[default]\ncache = 'm'\n[m]\ntemplate = 'memory'\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    forget_loaded_caches()

    @cached
    def double(x: int) -> int:
        return 2 * x

    assert isinstance(double, CachedFunction) and double(4) == 8
    assert double.contains(4)
    forget_loaded_caches()


def test_read_only_cache_computes_without_saving(caplog: pytest.LogCaptureFixture) -> None:
    store = memory_cache(read_only=True)
    add, runs = counting(store)
    with caplog.at_level(logging.DEBUG, logger="fleche_remote.cached"):
        assert add(1) == 11
        assert add(1) == 11
    assert len(runs) == 2
    assert not add.contains(1) and list(store.calls.keys()) == []
    assert "read-only" in caplog.text


def test_a_read_only_layer_below_a_writable_one_is_read_and_back_filled() -> None:
    shared = memory_cache()
    producer, _ = counting(shared)
    producer(5)
    frozen = Cache(shared.values, shared.calls, read_only=True)
    local = memory_cache()
    consumer, runs = counting(CacheStack([local, frozen]))
    assert consumer(5) == 15 and runs == []
    assert local.contains(consumer.key(5))


def test_corrupt_entry_is_logged_and_recomputed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = cache_from_config({"template": "cloudpickle", "root": str(tmp_path)})
    add, runs = counting(store)
    add(1)
    key = add.key(1)
    (tmp_path / "calls" / key[:2] / f"{key}.call").write_bytes(b"garbage")
    with pytest.raises(CorruptEntryError):
        store.load_value(key)  # the premise: loading really fails
    with caplog.at_level(logging.WARNING, logger="fleche_remote.cached"):
        assert add(1) == 11
    assert len(runs) == 2
    assert "corrupt" in caplog.text


def test_a_failed_save_still_returns_the_result(caplog: pytest.LogCaptureFixture) -> None:
    @cached(cache=memory_cache())
    def make_lock(x: int) -> Any:
        return threading.Lock()  # cannot be pickled

    with caplog.at_level(logging.WARNING, logger="fleche_remote.cached"):
        lock = make_lock(1)
    assert hasattr(lock, "acquire")
    assert "could not save" in caplog.text
    assert not make_lock.contains(1)


def test_exceptions_from_the_function_propagate_and_are_not_cached() -> None:
    calls = []

    @cached(cache=memory_cache())
    def fail(x: int) -> int:
        calls.append(x)
        raise ValueError("boom")

    for _ in range(2):
        with pytest.raises(ValueError, match="boom"):
            fail(1)
    assert calls == [1, 1]


@dataclasses.dataclass(frozen=True)
class Model:
    k: int

    @cached(cache=memory_cache())
    def predict(self, x: int) -> int:
        return self.k * x


def test_methods_bind_self() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a dataclass self hashes stably
        assert Model(3).predict(2) == 6
        assert Model(4).predict(2) == 8
    assert Model.predict.contains(Model(3), 2)
    assert not Model.predict.contains(Model(5), 2)


def test_a_cached_function_pickles_for_worker_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pickle

    import cloudpickle

    explicit, _ = counting(cache_from_config({"template": "cloudpickle", "root": str(tmp_path / "c")}))
    explicit(1)
    copy = cloudpickle.loads(cloudpickle.dumps(explicit))
    assert copy.contains(1) and copy(1) == 11  # an explicit cache travels with it

    (tmp_path / "fleche.toml").write_text("[default]\ncache = 'm'\n[m]\ntemplate = 'memory'\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    forget_loaded_caches()
    try:
        resolved = pickle.loads(pickle.dumps(Model.predict))
        assert resolved is Model.predict  # module-level: by reference
        configured, _ = counting()
        configured(1)
        clone = cloudpickle.loads(cloudpickle.dumps(configured))
        assert clone._cache is None  # resolved again where it lands
        assert clone(1) == 11 and clone.cache is configured.cache
    finally:
        forget_loaded_caches()


def test_threads_computing_the_same_key_all_get_the_result(tmp_path: Path) -> None:
    store = cache_from_config({"template": "cloudpickle", "root": str(tmp_path)})
    n = 6
    barrier = threading.Barrier(n, timeout=10)

    @cached(cache=store, claims=False)  # with claims one computes, the others wait (test_claims.py)
    def together(x: int) -> List[int]:
        barrier.wait()  # every thread is inside the function at once: all of them missed
        return [x] * 3

    results: List[Any] = [None] * n
    errors: List[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = together(7)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert errors == []
    assert results == [[7, 7, 7]] * n
    assert [c.result for c in together.query()] == [[7, 7, 7]]


def test_cache_is_resolved_lazily_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    forget_loaded_caches()
    add, _ = counting("nowhere")  # no fleche.toml yet: decorating must not fail
    with pytest.raises(ConfigError, match=r"no fleche\.toml found"):
        add(1)
    (tmp_path / "fleche.toml").write_text("[nowhere]\ntemplate = 'memory'\n")
    seen = []
    barrier = threading.Barrier(4, timeout=10)

    def resolve() -> None:
        barrier.wait()
        seen.append(add.cache)

    threads = [threading.Thread(target=resolve) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert len(seen) == 4 and all(c is seen[0] for c in seen)
    forget_loaded_caches()


def test_default_cache_comes_from_fleche_toml_in_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "fleche.toml").write_text(
        '[default]\ncache = "disk"\n\n[disk]\ntemplate = "cloudpickle"\nroot = ".cache"\n\n'
        '[other]\ntemplate = "pickle"\nroot = ".other"\n'
    )
    monkeypatch.chdir(project / "src")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    forget_loaded_caches()
    try:
        add, runs = counting()
        named, _ = counting("other")
        assert add(1) == 11 and add(1) == 11 and len(runs) == 1
        named(2)
        # relative to the fleche.toml, not to the working directory
        assert add.cache.values.root == project / ".cache" / "values"
        assert (project / ".cache" / "calls" / add.key(1)[:2] / f"{add.key(1)}.call").is_file()
        assert named.cache.calls.root == project / ".other" / "calls"
        assert named.contains(2) and not add.contains(2)
    finally:
        forget_loaded_caches()


def test_a_callable_without_a_qualified_name_is_refused_at_decoration() -> None:
    with pytest.raises(TypeError, match="__qualname__"):
        cached(cache=memory_cache())(functools.partial(pow, 2))


# -- sweeps: f.map, f.starmap, f.map_kwargs ----------------------------------------


def test_map_returns_results_in_input_order_computing_each_distinct_call_once(cache: Any) -> None:
    add, runs = counting(cache)
    assert add.map([3, 1, 3, 2, 1]) == [13, 11, 13, 12, 11]
    assert sorted(runs) == [(1, 10, 1), (2, 10, 1), (3, 10, 1)]
    assert add.map([]) == []
    assert add(2) == 12 and len(runs) == 3  # what map saved, a plain call finds


def test_map_computes_only_the_misses() -> None:
    add, runs = counting(memory_cache())
    add(1)
    add(5)
    runs.clear()
    assert add.map(range(6)) == [10, 11, 12, 13, 14, 15]
    assert [r[0] for r in runs] == [0, 2, 3, 4]  # serially, in input order


def test_map_is_one_lookup_and_one_save_for_the_whole_batch() -> None:
    from layers import Counting

    layer = Counting(memory_cache())
    add, _ = counting(layer)
    add.map([0, 1])
    layer.reset()
    assert add.map(range(50)) == [x + 10 for x in range(50)]
    # besides: a local index query asking whether other code stored these
    # arguments, to say why they compute (bounded per process)
    assert layer.counts.pop("query_records") == 1
    assert layer.counts == {"load_entries": 1, "save_records": 1}
    assert layer.saved == [48]
    layer.reset()
    add.map(range(50))
    assert layer.counts == {"load_entries": 1}  # all hits: nothing to save


def test_the_item_is_the_single_positional_argument() -> None:
    seen = []

    @cached(cache=memory_cache())
    def length(xs: Any) -> int:
        seen.append(xs)
        return len(xs)

    assert length.map([(1, 2), (3, 4, 5)]) == [2, 3]  # a tuple is one argument, not unpacked
    assert length.key((1, 2)) == length.load((1, 2)).key


def test_starmap_and_map_kwargs_share_keys_with_plain_calls() -> None:
    add, runs = counting(memory_cache())
    assert add.starmap([(1, 2), (3,), [4, 5]]) == [3, 13, 9]
    assert add.map_kwargs([{"x": 1, "y": 2}, {"x": 2, "scale": 3}, {"y": 2, "x": 1}]) == [3, 36, 3]
    assert len(runs) == 4
    assert add(1, y=2) == 3 and add(x=2, scale=3) == 36 and len(runs) == 4


def test_map_checks_every_item_before_running_any() -> None:
    add, runs = counting(memory_cache())
    with pytest.raises(TypeError):
        add.starmap([(1,), (1, 2, 3, 4)])
    assert runs == []


@pytest.mark.parametrize("pool", ["serial", "threads"])
def test_a_failing_call_raises_after_saving_what_was_computed(pool: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    store = memory_cache()
    runs: List[int] = []

    @cached(cache=store)
    def inverse(x: int) -> float:
        runs.append(x)
        return 1 / x

    executor = ThreadPoolExecutor(1) if pool == "threads" else None
    try:
        with pytest.raises(ZeroDivisionError):
            inverse.map([1, 2, 0, 4], executor=executor)
    finally:
        if executor is not None:
            executor.shutdown()
    assert inverse.contains(1) and inverse.contains(2) and not inverse.contains(0)
    runs.clear()
    assert inverse.map([1, 2, 4]) == [1.0, 0.5, 0.25]
    # serially nothing runs after the failure; a pool may have started 4 already (then it was kept)
    assert runs == [4] if pool == "serial" else runs in ([], [4])


def test_map_through_a_thread_pool() -> None:
    from concurrent.futures import ThreadPoolExecutor

    started = threading.Barrier(4, timeout=10)

    @cached(cache=memory_cache())
    def slow_square(x: int) -> int:
        started.wait()  # all four run at once, or the barrier breaks
        return x * x

    with ThreadPoolExecutor(4) as pool:
        assert slow_square.map([1, 2, 3, 4], executor=pool) == [1, 4, 9, 16]
    assert slow_square.load(3).metadata["wall_time"] >= 0
    assert slow_square.map([4, 3]) == [16, 9]  # hits: the barrier is not touched again


def test_map_through_a_process_pool(tmp_path: Path) -> None:
    script = f"""
import os
from concurrent.futures import ProcessPoolExecutor
from fleche_remote import cached
from fleche_remote.config import cache_from_config

cache = cache_from_config({{"template": "cloudpickle", "root": {str(tmp_path / "c")!r}}})

@cached(cache=cache)
def where(x):
    return (x, os.getpid())

if __name__ == "__main__":
    with ProcessPoolExecutor(2) as pool:
        got = where.map([1, 2, 3, 1], executor=pool)
    assert [x for x, _ in got] == [1, 2, 3, 1], got
    assert all(pid != os.getpid() for _, pid in got), got
    assert where.map([3, 2, 1]) == [got[2], got[1], got[0]]
    print("ok")
"""
    (tmp_path / "sweep.py").write_text(script)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "sweep.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "ok\n"


def test_map_keeps_results_when_saving_fails(caplog: pytest.LogCaptureFixture) -> None:
    store = memory_cache()

    @cached(cache=store)
    def make(x: int) -> Any:
        return threading.Lock() if x == 2 else x  # a lock cannot be pickled

    with caplog.at_level(logging.WARNING, logger="fleche_remote.cached"):
        got = make.map([1, 2, 3])
    assert got[0] == 1 and hasattr(got[1], "acquire") and got[2] == 3
    assert "could not save 1 of 3" in caplog.text
    assert make.contains(1) and make.contains(3) and not make.contains(2)  # the others were kept


def test_map_on_a_read_only_cache_computes_without_saving() -> None:
    add, runs = counting(memory_cache(read_only=True))
    assert add.map([1, 1, 2]) == [11, 11, 12]
    assert add.map([1]) == [11] and len(runs) == 3


def test_map_recomputes_a_corrupt_entry(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = cache_from_config({"template": "cloudpickle", "root": str(tmp_path)})
    add, runs = counting(store)
    add.map([1, 2, 3])
    key = add.key(2)
    (tmp_path / "calls" / key[:2] / f"{key}.call").write_bytes(b"garbage")
    runs.clear()
    with caplog.at_level(logging.WARNING, logger="fleche_remote.cached"):
        assert add.map([1, 2, 3]) == [11, 12, 13]
    assert runs == [(2, 10, 1)]
    assert "corrupt" in caplog.text
