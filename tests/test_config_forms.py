"""fleche.toml files written for the ``fleche`` package (0.22.2).

``tests/data/fleche_forms/`` holds every form fleche documents, collected
from its module docstring, its docs (``docs/storage/*.rst``,
``agents/USAGE.md``) and its own config tests. Each cache in each file
either works here or fails with a ConfigError that names the file, the
table and the key, and says what to write instead. The expectations below
cover every table of every file: a new file or table without one fails
the test.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Type, Union

import pytest

from fleche_remote import Cache, CacheStack, Call, ConfigError, cached
from fleche_remote.caches import BaseCache
from fleche_remote.caches.pool import CachePool
from fleche_remote.caches.void import VoidCache
from fleche_remote.config import (
    Config,
    cache_from_config,
    cache_to_config,
    forget_loaded_caches,
    load_cache,
    load_config,
)
from fleche_remote.config.forms import ConfigDeprecationWarning
from fleche_remote.config.trust import ConfigWarning
from fleche_remote.remote.client import SshCache

FORMS = Path(__file__).parent / "data" / "fleche_forms"
DEFAULT = None  # the key for "the cache [default] names"

Check = Callable[[BaseCache, Path, Path], None]


class Works:
    """The cache builds, is of ``kind``, and a local one round-trips a value."""

    def __init__(
        self,
        kind: Type[BaseCache],
        *,
        layers: Tuple[Type[BaseCache], ...] = (),
        read_only: bool = False,
        roundtrip: bool = True,
        warns: Optional[Tuple[Type[Warning], str]] = None,
        check: Optional[Check] = None,
    ) -> None:
        self.kind, self.layers, self.read_only = kind, layers, read_only
        self.roundtrip = roundtrip and not read_only and kind is not SshCache
        self.warns, self.check = warns, check

    def verify(
        self, cache: BaseCache, caught: List[warnings.WarningMessage], folder: Path, home: Path
    ) -> None:
        assert type(cache) is self.kind
        if self.layers:
            assert isinstance(cache, CacheStack)
            assert tuple(type(layer) for layer in cache.layers) == self.layers
        if self.kind is not SshCache:  # an ssh cache would connect to answer
            assert cache.read_only is self.read_only
        ours = [w for w in caught if issubclass(w.category, (ConfigWarning, DeprecationWarning))]
        if self.warns is None:
            assert ours == [], [str(w.message) for w in ours]
        else:
            category, fragment = self.warns
            assert any(issubclass(w.category, category) and fragment in str(w.message) for w in ours), ours
        if self.check is not None:
            self.check(cache, folder, home)
        if self.roundtrip:
            key = cache.save(Call("forms.f", {"x": 1}, [1, 2]))
            if isinstance(cache, VoidCache):
                assert not cache.contains(key)
            else:
                assert cache.load_value(key) == [1, 2]


class Fails:
    """Building raises a ConfigError naming this table and key, with ``fragment``
    (the thing to do instead) in the message."""

    def __init__(self, table: str, key: str, fragment: str) -> None:
        self.table, self.key, self.fragment = table, key, fragment

    def verify_error(self, err: ConfigError, path: Path) -> None:
        assert (err.file, err.table, err.key) == (str(path), self.table, self.key), str(err)
        assert self.fragment in err.message, err.message
        assert str(path) in str(err) and f"[{self.table}]" in str(err) and repr(self.key) in str(err)


Outcome = Union[Works, Fails]


def values_root(expected: Callable[[Path, Path], Path]) -> Check:
    def check(cache: BaseCache, folder: Path, home: Path) -> None:
        assert isinstance(cache, Cache)
        assert cache.values.to_config()["root"] == str(expected(folder, home))

    return check


def calls_url(expected: Callable[[Path, Path], str]) -> Check:
    def check(cache: BaseCache, folder: Path, home: Path) -> None:
        assert isinstance(cache, Cache)
        assert cache.calls.to_config()["url"] == expected(folder, home)

    return check


def value_type(name: str) -> Check:
    def check(cache: BaseCache, folder: Path, home: Path) -> None:
        assert isinstance(cache, Cache) and cache.values.to_config()["type"] == name

    return check


def compressed(cache: BaseCache, folder: Path, home: Path) -> None:
    assert isinstance(cache, Cache)
    assert cache.values.to_config()["compress"] is True and cache.calls.to_config()["compress"] is True


MEMORY = Works(Cache)
FILES = Works(Cache)
HOME_SQL = calls_url(lambda folder, home: f"sqlite:///{home / '.fleche' / 'calls.db'}")
HOME_CACHE_SQL = calls_url(lambda folder, home: f"sqlite:///{home / '.cache' / 'fleche' / 'calls.db'}")
LOCAL_THEN_SSH = Works(CacheStack, layers=(Cache, SshCache), roundtrip=False)
POOL = Works(CachePool, layers=(Cache, Cache), read_only=True)
HDF5_VALUES = value_type("hdf5")


def max_calls(n: int) -> Outcome:
    """fleche's max_size = n reads as max_calls = n (least recently used out)."""

    def check(cache: BaseCache, folder: Path, home: Path) -> None:
        assert isinstance(cache, Cache) and cache.limits.max_calls == n

    return Works(Cache, check=check)


EXPECTED: Dict[str, Union[Fails, Dict[Optional[str], Outcome]]] = {
    "module_docstring_example.toml": {
        DEFAULT: FILES,
        "persistent": Works(Cache, check=values_root(lambda f, h: h / ".fleche" / "values")),
        "fast": MEMORY,
        "with_sql_calls": Works(Cache, check=HOME_SQL),
        "limited": max_calls(100),
        "readonly": Works(Cache, read_only=True),
        "mystack": Works(CacheStack, layers=(Cache, Cache)),
        "mypool": POOL,
        "shared": LOCAL_THEN_SSH,
    },
    "module_docstring_templates.toml": {
        "terse": Works(Cache, check=values_root(lambda f, h: h / ".fleche" / "values")),
        # fleche's sql template defaults to bagofholding_hdf values; ours to cloudpickle files
        "sqlbacked": Works(Cache, check=value_type("cloudpickle")),
    },
    "configuration_rst_full_example.toml": {
        DEFAULT: FILES,
        "persistent": FILES,
        "fast": MEMORY,
        "hdf5_values": Works(Cache, check=HDF5_VALUES),
        "limited": max_calls(100),
        "readonly": Works(Cache, read_only=True),
        "layered": Works(CacheStack, layers=(Cache, Cache)),
        "shared": POOL,
    },
    "configuration_rst_sections.toml": {
        DEFAULT: MEMORY,
        "mycache": MEMORY,
        "terse": FILES,
        "sqlbacked": FILES,
        "hdf5_multi": Works(Cache, warns=(ConfigWarning, "prefix_length"), check=HDF5_VALUES),
        "destructured": Works(Cache, warns=(ConfigWarning, "remaining_depth")),
        "ssh_stack": Works(CacheStack, layers=(Cache, SshCache), roundtrip=False, check=None),
    },
    "builtin_memory.toml": {DEFAULT: MEMORY},
    "builtin_names_in_a_stack.toml": {DEFAULT: Works(CacheStack, layers=(Cache, VoidCache))},
    "builtin_void.toml": {DEFAULT: Works(VoidCache), "with_void": MEMORY},
    "default_names_no_table.toml": {
        DEFAULT: Fails("default", "cache", "did you mean 'persistent'?"),
        "persistent": MEMORY,
    },
    "default_cache_inline_template.toml": {DEFAULT: MEMORY},
    "default_cache_inline_table.toml": {DEFAULT: MEMORY},
    "default_cache_inline_braces.toml": {
        DEFAULT: Works(Cache, check=calls_url(lambda f, h: f"sqlite:///{f / 'inline' / 'calls.db'}")),
    },
    "default_cache_inline_stack_of_names.toml": {
        DEFAULT: LOCAL_THEN_SSH,
        "local": Works(Cache, check=values_root(lambda f, h: f / "cache" / "values")),
        "remote": Works(SshCache),
    },
    "default_cache_inline_stack_of_tables.toml": {
        DEFAULT: Works(CacheStack, layers=(Cache, Cache)),
    },
    "metadata_tags.toml": Fails("default", "metadata", "Remove 'Tags' from [default] metadata"),
    "metadata_environment_git.toml": Fails("default", "metadata", "Remove 'Environment'"),
    "type_wrong_case.toml": {
        DEFAULT: Fails("existing", "values.type", "write type = 'memory'"),
        "existing": Fails("existing", "values.type", "write type = 'memory'"),
    },
    "max_size_read_only.toml": {
        "limited": max_calls(10),
        "readonly": Works(Cache, read_only=True),
        "template_limited": max_calls(7),
        "template_readonly": Works(Cache, read_only=True),
    },
    "void.toml": {
        DEFAULT: Works(VoidCache),
        "home_only": Works(VoidCache),
        "mystack": Works(CacheStack, layers=(Cache, VoidCache)),
        "half_void": Fails("half_void", "calls.type", "calls = { type = 'void' }"),
    },
    "relative_paths.toml": {
        DEFAULT: Works(Cache, check=values_root(lambda f, h: f / "fleche" / "values")),
        "local": Works(Cache, check=values_root(lambda f, h: f / "fleche" / "values")),
        "bare_sql_path": Works(Cache, check=calls_url(lambda f, h: f"sqlite:///{f / 'fleche' / 'calls.db'}")),
        "relative_sql_url": Works(
            Cache, check=calls_url(lambda f, h: f"sqlite:///{f / 'fleche' / 'calls.db'}")
        ),
        "memory_sql": Works(Cache, check=calls_url(lambda f, h: "sqlite:///:memory:")),
        "tilde": Works(Cache, check=values_root(lambda f, h: h / ".fleche" / "values")),
        "relative_workdir": Works(CacheStack, layers=(Cache, SshCache), roundtrip=False),
    },
    "templates.toml": {
        "memory": MEMORY,
        "pickle": Works(Cache, check=value_type("pickle")),
        "cloudpickle": Works(Cache, check=values_root(lambda f, h: f / "t" / "cloudpickle" / "values")),
        "dill": Works(Cache, check=value_type("cloudpickle")),
        "bagofholding": Works(Cache, check=HDF5_VALUES),
        "sql": Works(Cache, check=calls_url(lambda f, h: f"sqlite:///{f / 't' / 'sql' / 'calls.db'}")),
        "sql_pickle_values_url": Works(
            Cache, check=calls_url(lambda f, h: f"sqlite:///{f / 't' / 'sql2' / 'other.db'}")
        ),
        "sql_dill_values": Works(Cache, check=value_type("cloudpickle")),
        "sql_bare_url": Works(
            Cache, check=calls_url(lambda f, h: f"sqlite:///{f / 't' / 'sql4' / 'calls.db'}")
        ),
        "stacked": Works(CacheStack, layers=(Cache, Cache)),
    },
    "store_options.toml": {
        "compressed": Works(Cache, check=compressed),
        "lock_timeout": Works(Cache, warns=(ConfigDeprecationWarning, "lock_timeout is deprecated")),
        "echo": MEMORY,
        "no_url": Fails("no_url", "calls.url", "calls = { type = 'memory' }"),
        "dill": Works(Cache, check=value_type("cloudpickle")),
        "bagofholding": Works(Cache, warns=(ConfigWarning, "version_validator"), check=HDF5_VALUES),
    },
    "usage_minimal.toml": {
        DEFAULT: FILES,
        "persistent": FILES,
        "tldr": Works(Cache, check=value_type("pickle")),
        "five_minute": Works(Cache, check=values_root(lambda f, h: h / ".cache" / "fleche" / "values")),
    },
}
#: signed caches are built elsewhere; here only the contract: works, or a
#: ConfigError that names the table and the secret_key key
LENIENT = {"secret_key.toml": ("mycache", "values.secret_key")}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("FLECHE_SECRET_KEY", raising=False)
    forget_loaded_caches()
    yield home
    forget_loaded_caches()


def test_every_form_file_has_expectations() -> None:
    files = sorted(p.name for p in FORMS.glob("*.toml"))
    assert files == sorted([*EXPECTED, *LENIENT])
    assert len(files) >= 15


def _build(name: Optional[str], path: Path) -> Tuple[BaseCache, List[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = load_cache(name, config=load_config(path))
    return cache, caught


@pytest.mark.parametrize("filename", sorted(EXPECTED))
def test_fleche_form_works_or_says_what_to_do(home: Path, tmp_path: Path, filename: str) -> None:
    folder = tmp_path / "project"
    folder.mkdir()
    path = folder / "fleche.toml"
    shutil.copy(FORMS / filename, path)
    expected = EXPECTED[filename]
    if isinstance(expected, Fails):  # the file as a whole (its [default] table) is refused
        with pytest.raises(ConfigError) as info:
            load_config(path)
        expected.verify_error(info.value, path)
        return
    config = load_config(path)
    names: List[Optional[str]] = list(config.cache_names())
    if config.default_spec() is not None:
        names.append(DEFAULT)
    assert sorted(names, key=str) == sorted(expected, key=str), "every table needs an expectation"
    for name, outcome in expected.items():
        if isinstance(outcome, Fails):
            with pytest.raises(ConfigError) as info:
                _build(name, path)
            outcome.verify_error(info.value, path)
            continue
        cache, caught = _build(name, path)
        try:
            outcome.verify(cache, caught, folder, home)
        finally:
            cache.close()


@pytest.mark.parametrize("filename", sorted(LENIENT))
def test_secret_key_form_works_or_names_the_key(home: Path, tmp_path: Path, filename: str) -> None:
    path = tmp_path / "fleche.toml"
    shutil.copy(FORMS / filename, path)
    table, key = LENIENT[filename]
    try:
        cache, _ = _build(table, path)
    except ConfigError as err:
        assert (err.file, err.table, err.key) == (str(path), table, key)
    else:
        cache.close()


# -- the translations, one by one ------------------------------------------------


def test_lock_timeout_warning_is_shown_by_default(tmp_path: Path) -> None:
    """A DeprecationWarning from library code is hidden by Python's default
    filters; this one is not, since the key silently stopped doing anything."""
    import subprocess
    import sys

    (tmp_path / "fleche.toml").write_text(
        "[c]\nvalues = { type = 'cloudpickle', root = 'v', lock_timeout = 1 }\n"
        "calls = { type = 'cloudpickle', root = 'c' }\n"
    )
    code = (
        "from fleche_remote.config import load_cache, load_config\n"
        "load_cache('c', config=load_config('fleche.toml'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True
    )
    assert "ConfigDeprecationWarning" in done.stderr and "key 'values.lock_timeout'" in done.stderr
    assert str(tmp_path / "fleche.toml") in done.stderr


def test_lock_timeout_stays_a_real_option_of_hdf5(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache = cache_from_config(
            {
                "values": {"type": "hdf5", "path": str(tmp_path / "v.h5"), "lock_timeout": 3},
                "calls": {"type": "memory"},
            }
        )
    assert isinstance(cache, Cache) and cache.values.to_config()["lock_timeout"] == 3.0


def test_bare_sqlite_path_resolves_against_the_declaring_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    (project / "deep" / "er").mkdir(parents=True)
    (project / "fleche.toml").write_text(
        "[c]\nvalues = { type = 'memory' }\ncalls = { type = 'sql', url = 'db/calls.db' }\n"
    )
    monkeypatch.chdir(project / "deep" / "er")
    cache = load_cache("c", config=load_config(cwd=project / "deep" / "er"))
    try:
        key = cache.save(Call("f", {"x": 1}, 2))
        assert cache.contains(key)
    finally:
        cache.close()
    assert (project / "db" / "calls.db").is_file()
    assert not (project / "deep" / "er" / "db").exists()


def test_void_cache_stores_nothing_and_round_trips_its_config() -> None:
    cache = cache_from_config({"values": {"type": "void"}, "calls": {"type": "void"}})
    assert isinstance(cache, VoidCache) and not cache.read_only
    key = cache.save(Call("f", {"x": 1}, 2))
    assert len(key) == 64
    assert cache.save_many([Call("f", {"x": 2}, 3), Call("f", {"x": 3}, 4)])
    assert not cache.contains(key) and key not in cache
    assert cache.contains_many([key, "0" * 64]) == [False, False]
    assert cache.load_many([key]) == [None] and cache.load_many([key], results=True) == [None]
    for op in (cache.load, cache.load_value, cache.evict, cache.expand):
        with pytest.raises(KeyError):
            op(key)
    with pytest.raises(KeyError):
        cache.load_blob("0" * 64)
    assert list(cache.query()) == [] and list(cache.query("f", x=1)) == []
    assert cache.collect_garbage() == 0
    assert isinstance(cache_from_config(cache_to_config(cache)), VoidCache)


def test_cached_over_a_void_cache_computes_every_time() -> None:
    runs: List[int] = []

    @cached(cache=VoidCache())
    def f(x: int) -> int:
        runs.append(x)
        return x + 1

    assert f(1) == 2 and f(1) == 2 and runs == [1, 1]


@pytest.mark.parametrize(
    ("table", "key", "fragment"),
    [
        ({"values": {"type": "void", "root": "x"}, "calls": {"type": "void"}}, "values.root", "no options"),
        ({"values": {"type": "void"}, "calls": {"type": "void"}, "read_only": True}, "read_only", "nothing"),
        (
            {"values": {"type": "memory"}, "calls": {"type": "void"}},
            "values.type",
            "values = { type = 'void' }",
        ),
        ({"values": {"type": "memory", "remaining_depth": 1}, "calls": {"type": "memory"}}, None, None),
        (
            {"values": {"type": "memory"}, "calls": {"type": "memory", "remaining_depth": 1}},
            "calls.remaining_depth",
            "unknown key",
        ),
        (
            {"values": {"type": "memory"}, "calls": {"type": "memory", "lock_timeout": 1}},
            "calls.lock_timeout",
            "unknown key",
        ),
        ({"pool": [{"template": "memory"}], "read_only": True}, "read_only", "holds only its members"),
        ({"pool": []}, "pool", "array of cache tables"),
        ({"template": "void"}, "template", "calls = { type = 'void' }"),
    ],
)
def test_each_fleche_key_is_translated_or_refused(
    table: Dict[str, Any], key: Optional[str], fragment: Optional[str]
) -> None:
    if key is None:  # accepted with a warning
        with pytest.warns(ConfigWarning, match="remaining_depth"):
            assert isinstance(cache_from_config(table, name="t"), Cache)
        return
    with pytest.raises(ConfigError) as info:
        cache_from_config(table, name="t", source="/p/fleche.toml")
    assert (info.value.file, info.value.table, info.value.key) == ("/p/fleche.toml", "t", key)
    assert fragment is not None and fragment in info.value.message


def test_default_cache_array_names_resolve_in_their_own_files(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cache = ["near", "far"]``: each named layer keeps its own file's
    relative paths, as the named table would."""
    far = tmp_path / "home" / "fleche.toml"
    far.write_text("[far]\ntemplate = 'cloudpickle'\nroot = 'far-cache'\n")
    project = home / "project"
    project.mkdir()
    (project / "fleche.toml").write_text(
        "[default]\ncache = ['near', 'far', { template = 'memory' }]\n"
        "[near]\ntemplate = 'cloudpickle'\nroot = 'near-cache'\n"
    )
    monkeypatch.chdir(project)
    stack = load_cache()
    assert isinstance(stack, CacheStack)
    near_layer, far_layer, memory_layer = stack.layers
    assert isinstance(near_layer, Cache) and near_layer.values.to_config()["root"] == str(
        project / "near-cache" / "values"
    )
    assert isinstance(far_layer, Cache) and far_layer.values.to_config()["root"] == str(
        home / "far-cache" / "values"
    )
    assert isinstance(memory_layer, Cache)
    assert load_cache() is stack  # remembered like a named default
    broken = Config({"default": {"cache": ["near", "nope"]}, "near": {"template": "memory"}}, {})
    with pytest.raises(ConfigError, match=r"cache\[1\] names 'nope'") as info:
        load_cache(config=broken)
    assert (info.value.table, info.value.key) == ("default", "cache")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("[default]\ncache = []\n", "names no layer"),
        ("[default]\ncache = [1]\n", "cache[0] must be a table name"),
        ("[default]\ncache = 3\n", "must be a str, dict, list"),
        ("[default]\nmetadata = 'Runtime'\n", "must be a list"),
        ("[default]\nmetadata = ['Git']\n", "Git metadata collector is not supported"),
    ],
)
def test_malformed_default_forms(tmp_path: Path, body: str, fragment: str) -> None:
    path = tmp_path / "fleche.toml"
    path.write_text(body)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.file, info.value.table) == (str(path), "default")
    assert info.value.key in ("cache", "metadata") and fragment in info.value.message


def test_runtime_metadata_and_an_empty_list_are_accepted(tmp_path: Path) -> None:
    for body in ("[default]\nmetadata = ['Runtime']\n", "[default]\nmetadata = []\n"):
        path = tmp_path / "fleche.toml"
        path.write_text(body)
        assert load_config(path).files == [path]
