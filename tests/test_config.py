"""fleche.toml: discovery, merging, building caches, errors, round trips,
redaction, and the shipped example file."""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, Optional

import pytest

from fleche_remote import Cache, CacheStack, Call, ConfigError
from fleche_remote.caches import BaseCache
from fleche_remote.caches.void import VoidCache
from fleche_remote.config import (
    Config,
    builtin_config,
    cache_from_config,
    cache_to_config,
    candidate_paths,
    forget_loaded_caches,
    is_secret_key,
    load_cache,
    load_config,
    redact,
    register_cache_type,
)
from fleche_remote.storage.file import FileCallStore, FileValueStore
from fleche_remote.storage.memory import MemoryCallStore, MemoryValueStore

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private $HOME with XDG_CONFIG_HOME and XDG_CACHE_HOME unset, and a
    clean cache memo."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    forget_loaded_caches()
    yield home
    forget_loaded_caches()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def memory_table(**extra: Any) -> Dict[str, Any]:
    return {"values": {"type": "memory"}, "calls": {"type": "memory"}, **extra}


def roundtrip_value(cache: BaseCache, value: Any = 41) -> Any:
    key = cache.save(Call("tests.f", {"x": value}, value + 1))
    return cache.load_value(key)


# -- discovery ---------------------------------------------------------------------


def test_walk_collects_every_file_up_to_home_closest_first(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    above = write(home.parent / "fleche.toml", "[above]\ntemplate = 'memory'\n")
    at_home = write(home / "fleche.toml", "[h]\ntemplate = 'memory'\n")
    proj = write(home / "proj" / "fleche.toml", "[p]\ntemplate = 'memory'\n")
    deep = home / "proj" / "a" / "b"
    deep.mkdir(parents=True)
    xdg = write(home / ".config" / "fleche" / "cache.toml", "[x]\ntemplate = 'memory'\n")
    monkeypatch.chdir(deep)

    config = load_config()

    assert config.files == [proj, at_home, xdg]
    assert above not in config.searched  # the walk stops at $HOME
    assert sorted(config) == ["h", "p", "x"]
    assert config.source("p") == proj and config.source("h") == at_home and config.source("x") == xdg
    assert config.source("missing") is None


def test_candidate_paths_list_every_directory_then_xdg(home: Path) -> None:
    deep = home / "a" / "b"
    assert candidate_paths(deep) == [
        deep / "fleche.toml",
        home / "a" / "fleche.toml",
        home / "fleche.toml",
        home / ".config" / "fleche" / "cache.toml",
    ]


def test_walk_outside_home_goes_to_the_filesystem_root(home: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere" / "x"
    outside.mkdir(parents=True)
    found = write(tmp_path / "elsewhere" / "fleche.toml", "[e]\ntemplate = 'memory'\n")
    paths = candidate_paths(outside)
    assert paths[-2] == Path("/fleche.toml")
    assert load_config(cwd=outside).files[0] == found


def test_xdg_config_home_is_honoured_and_empty_means_default(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    custom = write(tmp_path / "xdg" / "fleche" / "cache.toml", "[c]\ntemplate = 'memory'\n")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert load_config(cwd=home).files == [custom]
    monkeypatch.setenv("XDG_CONFIG_HOME", "")
    assert candidate_paths(home)[-1] == home / ".config" / "fleche" / "cache.toml"


def test_closer_file_wins_a_whole_table(home: Path) -> None:
    write(
        home / "fleche.toml",
        """
        [default]
        cache = "far"
        [shared]
        template = "memory"
        read_only = true
        [far]
        template = "memory"
        """,
    )
    proj = write(
        home / "proj" / "fleche.toml", "[shared]\nvalues = {type = 'memory'}\ncalls = {type = 'memory'}\n"
    )
    config = load_config(cwd=home / "proj")
    # replaced, not merged: the farther file's read_only does not leak in
    assert config["shared"] == {"values": {"type": "memory"}, "calls": {"type": "memory"}}
    assert config.source("shared") == proj
    assert config["default"] == {"cache": "far"}
    assert config.default_cache() == "far"
    assert config.cache_names() == ["far", "shared"]


def test_root_true_stops_the_walk_and_skips_xdg(home: Path) -> None:
    write(home / "fleche.toml", "[above]\ntemplate = 'memory'\n")
    write(home / ".config" / "fleche" / "cache.toml", "[xdg]\ntemplate = 'memory'\n")
    proj = write(home / "proj" / "fleche.toml", "[default]\nroot = true\n[p]\ntemplate = 'memory'\n")
    inner = write(home / "proj" / "sub" / "fleche.toml", "[inner]\ntemplate = 'memory'\n")
    config = load_config(cwd=home / "proj" / "sub")
    assert config.files == [inner, proj]
    assert sorted(config) == ["default", "inner", "p"]


def test_explicit_path_reads_only_that_file(home: Path) -> None:
    write(home / "fleche.toml", "[other]\ntemplate = 'memory'\n")
    only = write(home / "elsewhere.toml", "[mine]\ntemplate = 'memory'\n")
    config = load_config(only, cwd=home)
    assert list(config) == ["mine"] and config.files == [only]
    with pytest.raises(ConfigError) as info:
        load_config(home / "nope.toml")
    assert info.value.file == str(home / "nope.toml")


# -- relative paths resolve against the declaring file -----------------------------


def test_relative_paths_resolve_against_the_declaring_file(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proj = home / "proj"
    write(
        proj / "fleche.toml",
        """
        [explicit]
        values = {type = "cloudpickle", root = "store/values"}
        calls = {type = "sql", url = "sqlite:///store/calls.db"}
        [tpl]
        template = "sql"
        root = "t"
        [h5]
        template = "hdf5"
        root = "h"
        """,
    )
    deep = proj / "deep" / "er"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)

    explicit = load_cache("explicit")
    assert explicit.values.root == proj / "store" / "values"
    assert roundtrip_value(explicit) == 42
    assert (proj / "store" / "calls.db").is_file()
    assert not (deep / "store").exists()

    tpl = load_cache("tpl")
    assert tpl.values.root == proj / "t" / "values"
    assert tpl.calls.to_config()["url"] == f"sqlite:///{proj / 't' / 'calls.db'}"
    assert roundtrip_value(tpl) == 42

    h5 = load_cache("h5")
    assert h5.values.to_config()["path"] == str(proj / "h" / "values.h5")
    assert h5.calls.to_config()["path"] == str(proj / "h" / "calls.h5")


def test_without_a_source_relative_paths_resolve_against_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cache = cache_from_config({"template": "cloudpickle", "root": "here"})
    assert cache.values.root == tmp_path / "here" / "values"
    assert cache.calls.root == tmp_path / "here" / "calls"


def test_load_cache_memoizes_while_files_are_unchanged(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(home / "fleche.toml", "[default]\ncache = 'a'\n[a]\ntemplate = 'memory'\n")
    monkeypatch.chdir(home)
    first = load_cache()
    assert load_cache("a") is first  # one cache (one ssh connection) per process
    write(path, "[default]\ncache = 'a'\n[a]\ntemplate = 'memory'\nread_only = true\n")
    os.utime(path, ns=(1, 1))  # a different stamp even on coarse-mtime file systems
    changed = load_cache()
    assert changed is not first and changed.read_only


# -- templates and stacks -------------------------------------------------------------


def test_templates_build_the_documented_layout(tmp_path: Path) -> None:
    cache = cache_from_config({"template": "pickle", "root": str(tmp_path)})
    assert isinstance(cache.values, FileValueStore) and cache.values.root == tmp_path / "values"
    assert isinstance(cache.calls, FileCallStore) and cache.calls.root == tmp_path / "calls"
    assert cache.values.to_config()["type"] == "pickle"

    memory = cache_from_config({"template": "memory", "read_only": True})
    assert isinstance(memory.values, MemoryValueStore) and isinstance(memory.calls, MemoryCallStore)
    assert memory.read_only

    sql = cache_from_config({"template": "sql", "root": str(tmp_path), "values": "pickle"})
    assert sql.values.to_config() == {"type": "pickle", "root": str(tmp_path / "values")}
    pg = "postgresql+psycopg://u@db.invalid/x"
    assert (
        cache_from_config({"template": "sql", "root": str(tmp_path), "url": pg}).calls.to_config()["url"]
        == pg
    )


def test_a_list_is_a_stack_with_layers_in_order(tmp_path: Path) -> None:
    stack = cache_from_config([{"template": "memory"}, {"template": "cloudpickle", "root": str(tmp_path)}])
    assert isinstance(stack, CacheStack)
    assert isinstance(stack.layers[0].values, MemoryValueStore)
    assert stack.layers[1].values.root == tmp_path / "values"


# -- errors: one ConfigError naming file, table and key ----------------------------------

ERROR_CASES = [
    # (toml body, table, key, fragment of the message)
    ("[c]\nvalues = {type = 'nosuch'}\ncalls = {type = 'memory'}\n", "c", "values.type", "cloudpickle"),
    ("[c]\nvalues = {type = 'memory'}\ncalls = {type = 'nosuch'}\n", "c", "calls.type", "known types"),
    ("[c]\nvalues = {type = 'cloudpickle'}\ncalls = {type = 'memory'}\n", "c", "values.root", "root"),
    ("[c]\nvalues = {type = 'memory'}\ncalls = {type = 'sql'}\n", "c", "calls.url", "url"),
    (
        "[c]\nvalues = {type = 'cloudpickle', root = 3}\ncalls = {type = 'memory'}\n",
        "c",
        "values.root",
        "int 3",
    ),
    (
        "[c]\nvalues = {type = 'memory', colour = 1}\ncalls = {type = 'memory'}\n",
        "c",
        "values.colour",
        "colour",
    ),
    ("[c]\nvalues = {type = 'memory'}\ncalls = {type = 'memory'}\ncolour = 1\n", "c", "colour", "colour"),
    ("[c]\nvalues = 'cloudpickle'\ncalls = {type = 'memory'}\n", "c", "values", "must be a table"),
    ("[c]\nvalues = {root = 'x'}\ncalls = {type = 'memory'}\n", "c", "values.type", "type"),
    ("[c]\nvalues = {type = 'memory'}\n", "c", "calls", "'calls' is missing"),
    (
        "[c]\nvalues = {type = 'memory'}\ncalls = {type = 'memory'}\nread_only = 'yes'\n",
        "c",
        "read_only",
        "str",
    ),
    ("[c]\ntemplate = 'cloudpickle'\n", "c", "root", "needs a 'root'"),
    ("[c]\ntemplate = 'cloudpickle'\nroot = 3\n", "c", "root", "int 3"),
    ("[c]\ntemplate = 'zip'\n", "c", "template", "memory, pickle, cloudpickle, sql, hdf5"),
    ("[c]\ntemplate = 'memory'\nroot = 'x'\n", "c", "root", "unknown key"),
    ("[c]\ntemplate = 'sql'\nroot = 'x'\nurl = 5\n", "c", "url", "int 5"),
    ("[c]\ntemplate = 'sql'\nroot = 'x'\nvalues = 'memory'\n", "c", "values", "cloudpickle, pickle, hdf5"),
    ("[c]\ntemplate = 'memory'\nvalues = {type = 'memory'}\n", "c", "values", "not both"),
    ("[c]\ntemplate = 'memory'\ncalls = {type = 'memory'}\n", "c", "calls", "not both"),
    ("[c]\ntype = 'ftp'\n", "c", "type", "known cache types: ssh"),
    ("[c]\ntype = 7\n", "c", "type", "int 7"),
    ("[c]\ntype = 'ssh'\n", "c", "host", "host"),
    ("[c]\ntype = 'ssh'\nhost = 'h'\nport = 22\n", "c", "port", "port"),
    ("c = []\n", "c", None, "at least one layer"),
    ("c = 3\n", "c", None, "int 3"),
    (
        "[[c]]\ntemplate = 'memory'\n[[c]]\nvalues = {type = 'nosuch'}\ncalls = {type = 'memory'}\n",
        "c[1]",
        "values.type",
        "nosuch",
    ),
]


@pytest.mark.parametrize(("body", "table", "key", "fragment"), ERROR_CASES)
def test_every_malformed_table_names_file_table_and_key(
    home: Path, body: str, table: str, key: Optional[str], fragment: str
) -> None:
    path = write(home / "proj" / "fleche.toml", body)
    config = load_config(cwd=home / "proj")
    with pytest.raises(ConfigError) as info:
        load_cache("c", config=config)
    err = info.value
    assert (err.file, err.table, err.key) == (str(path), table, key)
    assert fragment in err.message
    assert str(path) in str(err)


def test_toml_syntax_error_names_file_and_line(home: Path) -> None:
    path = write(home / "fleche.toml", "[ok]\ntemplate = 'memory'\nbroken = = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(cwd=home)
    assert info.value.file == str(path)
    assert "line 3" in info.value.message


@pytest.mark.parametrize(
    ("body", "key", "fragment"),
    [
        ("[default]\nroot = 'yes'\n", "root", "bool"),
        ("[default]\ncache = 1\n", "cache", "str"),
        ("[default]\ncolour = 'red'\n", "colour", "cache, metadata, root"),
        ("default = 1\n", None, "must be a table"),
    ],
)
def test_malformed_default_table(home: Path, body: str, key: Optional[str], fragment: str) -> None:
    path = write(home / "fleche.toml", body)
    with pytest.raises(ConfigError) as info:
        load_config(cwd=home)
    assert (info.value.file, info.value.table, info.value.key) == (str(path), "default", key)
    assert fragment in info.value.message


def test_no_config_found_lists_every_path_looked_at(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deep = home / "a" / "b"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    # the default is the built-in cache; any other name is an error that says where we looked
    builtin = cache_to_config(load_cache())
    assert builtin == {
        "values": {"type": "cloudpickle", "root": str(home / ".cache" / "fleche-remote" / "values")},
        # explicit tables say inline_max: without it, the named value store gets every value
        "calls": {
            "type": "sql",
            "url": f"sqlite:///{home / '.cache' / 'fleche-remote' / 'calls.db'}",
            "inline_max": 32768,
        },
    }
    with pytest.raises(ConfigError, match=r"no fleche\.toml found") as info:
        load_cache("results")
    for path in candidate_paths(deep):
        assert str(path) in str(info.value)
    # a caller that discovered the files itself (the server) decides: no file is an error...
    discovered = load_config()
    with pytest.raises(ConfigError, match=r"no fleche\.toml found; looked at") as info:
        load_cache(config=discovered)
    assert str(deep / "fleche.toml") in str(info.value)
    # ...unless it asks for the built-in default
    assert cache_to_config(load_cache(config=builtin_config(discovered.searched))) == builtin


def test_unknown_name_lists_the_available_ones(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(
        home / "fleche.toml", "[default]\ncache = 'b'\n[a]\ntemplate = 'memory'\n[[b]]\ntemplate = 'memory'\n"
    )
    monkeypatch.chdir(home)
    with pytest.raises(ConfigError, match=r"no cache named 'zz'; available: a, b") as info:
        load_cache("zz")
    assert info.value.table == "zz"
    assert isinstance(load_cache(), CacheStack)
    assert load_cache("default") is load_cache()  # fleche's name for the default cache


def test_no_default_cache_says_how_to_set_one(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(home / "fleche.toml", "[a]\ntemplate = 'memory'\n")
    monkeypatch.chdir(home)
    with pytest.raises(ConfigError, match=r'add cache = "NAME" to \[default\]') as info:
        load_cache()
    assert (info.value.table, info.value.key) == ("default", "cache")


def test_load_cache_accepts_a_plain_mapping() -> None:
    cache = load_cache("m", config={"m": memory_table(read_only=True)})
    assert isinstance(cache, Cache) and cache.read_only


# -- cache types registry -------------------------------------------------------------


class _TaggedCache(Cache):
    """A cache type of its own, to prove the registry and to_config() path."""

    def __init__(self, tag: str) -> None:
        super().__init__(MemoryValueStore(), MemoryCallStore())
        self.tag = tag

    def to_config(self) -> Dict[str, Any]:
        return {"type": "tagged", "tag": self.tag}


def _tagged_factory(table: Dict[str, Any], base_dir: Optional[Path]) -> BaseCache:
    if "tag" not in table:
        raise ConfigError("tagged needs a tag", key="tag")
    return _TaggedCache(table["tag"])


def test_registered_cache_type_builds_and_round_trips(tmp_path: Path) -> None:
    register_cache_type("tagged", _tagged_factory)
    cache = cache_from_config({"type": "tagged", "tag": "t1"})
    assert isinstance(cache, _TaggedCache) and cache.tag == "t1"
    # a Cache subclass with its own to_config() keeps its own config form
    stack = CacheStack([cache, Cache(MemoryValueStore(), MemoryCallStore())])
    assert cache_to_config(stack)[0] == {"type": "tagged", "tag": "t1"}
    rebuilt = cache_from_config(cache_to_config(stack))
    assert isinstance(rebuilt.layers[0], _TaggedCache) and rebuilt.layers[0].tag == "t1"

    source = write(tmp_path / "fleche.toml", "[t]\ntype = 'tagged'\n")
    with pytest.raises(ConfigError) as info:
        load_cache("t", config=load_config(source))
    assert (info.value.file, info.value.table, info.value.key) == (str(source), "t", "tag")


def test_lazy_string_factory_is_imported_on_use() -> None:
    register_cache_type("lazytagged", f"{__name__}:_tagged_factory")
    assert cache_from_config({"type": "lazytagged", "tag": "x"}).tag == "x"


@pytest.mark.parametrize(
    ("name", "factory", "error"),
    [
        ("not an identifier", _tagged_factory, ValueError),
        ("fine", "no-colon", ValueError),
        ("fine", ":attr", ValueError),
        ("fine", 42, TypeError),
    ],
)
def test_register_cache_type_validates(name: str, factory: Any, error: type) -> None:
    with pytest.raises(error):
        register_cache_type(name, factory)


def test_ssh_type_builds_an_ssh_cache_without_connecting() -> None:
    from fleche_remote.remote.client import SshCache

    table = {"type": "ssh", "host": "nobody@host.invalid", "cache_name": "r", "ssh_options": ["-p", "2222"]}
    cache = cache_from_config(table)
    assert isinstance(cache, SshCache)
    assert cache_to_config(cache) == table


# -- round trips ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda root: memory_table(),
        lambda root: memory_table(read_only=True),
        lambda root: {"template": "cloudpickle", "root": str(root)},
        lambda root: {
            "values": {"type": "pickle", "root": str(root / "v"), "compress": True},
            "calls": {"type": "sql", "url": f"sqlite:///{root / 'c.db'}"},
        },
        lambda root: {"template": "hdf5", "root": str(root)},
        lambda root: [
            {"template": "cloudpickle", "root": str(root / "a")},
            {"template": "pickle", "root": str(root / "b")},
        ],
    ],
    ids=["memory", "read-only", "template", "mixed", "hdf5", "stack"],
)
def test_round_trip(tmp_path: Path, make: Any) -> None:
    original = cache_from_config(make(tmp_path))
    cfg = cache_to_config(original)
    rebuilt = cache_from_config(cfg)
    assert type(rebuilt) is type(original)
    assert cache_to_config(rebuilt) == cfg
    assert rebuilt.read_only == original.read_only
    if not original.read_only and "memory" not in str(cfg):
        # same storage: what one saves, the other finds
        key = original.save(Call("tests.rt", {"x": 1}, [1, 2, 3]))
        assert rebuilt.load_value(key) == [1, 2, 3]
    original.close()
    rebuilt.close()


def test_cache_to_config_refuses_what_has_no_config_form() -> None:
    class Opaque(Cache):
        pass

    class NotACache(BaseCache):  # no to_config(), not a Cache
        def __init__(self) -> None:
            pass

    NotACache.__abstractmethods__ = frozenset()
    with pytest.raises(TypeError, match="no config form"):
        cache_to_config(NotACache())
    # a Cache subclass without its own to_config() still has Cache's form
    assert cache_to_config(Opaque(MemoryValueStore(), MemoryCallStore())) == memory_table()


# -- redaction -------------------------------------------------------------------------


def test_redact_masks_secrets_and_url_passwords_without_touching_the_input() -> None:
    cfg = {
        "db": {
            "calls": {"type": "sql", "url": "postgresql://alice:s3cr3t@db.example.org:5432/fleche"},
            "values": {"type": "pickle", "root": "/r", "secret_key": ["00ff", "aa11"]},
        },
        "api": {
            "api_key": "k",
            "apiKey": "k2",
            "token": 1,
            "password": "p",
            "DB_PASSWORD": "p",
            "secret": "s",
        },
        "plain": {"key": "visible", "cache_name": "results", "host": "user@host", "root": "/x"},
        "list": [{"url": "https://bob:hunter2@example.org/x?token=abc&page=2"}],
        "opts": ["-o", "ControlPath=~/.ssh/cm-%r@%h:%p"],
    }
    before = repr(cfg)
    out = redact(cfg)
    assert repr(cfg) == before
    assert out["db"]["calls"]["url"] == "postgresql://alice:***@db.example.org:5432/fleche"
    assert out["db"]["values"] == {"type": "pickle", "root": "/r", "secret_key": "***"}
    assert set(out["api"].values()) == {"***"}
    assert out["plain"] == cfg["plain"]
    assert out["list"][0]["url"] == "https://bob:***@example.org/x?token=***&page=2"
    assert out["opts"] == cfg["opts"]


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("password", True),
        ("secret_key", True),
        ("api_key", True),
        ("aws-access-key", True),
        ("auth_token", True),
        ("key", False),
        ("cache_name", False),
        ("keys", False),
        ("host", False),
    ],
)
def test_is_secret_key(key: str, secret: bool) -> None:
    assert is_secret_key(key) is secret


def test_redact_accepts_a_config(home: Path) -> None:
    write(home / "fleche.toml", "[pg]\ntemplate = 'sql'\nroot = 'r'\nurl = 'postgresql://u:pw@h/d'\n")
    out = redact(load_config(cwd=home))
    assert out == {"pg": {"template": "sql", "root": "r", "url": "postgresql://u:***@h/d"}}


# -- the shipped example ----------------------------------------------------------------


def test_example_file_builds_every_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fleche_remote.remote.client import SshCache

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    path = tmp_path / "fleche.toml"
    shutil.copy(REPO / "fleche.toml.example", path)
    config = load_config(cwd=tmp_path)
    assert config.files == [path]
    assert config.default_cache() == "local"

    built = {}
    for name in config.cache_names():
        table = config[name]
        if isinstance(table, list):
            _local, ssh = table
            assert ssh["type"] == "ssh"
            assert set(ssh) == {
                "type",
                "host",
                "cache_name",
                "python",
                "ssh_options",
                "setup_commands",
                "workdir",
            }
            assert all(isinstance(o, str) for o in ssh["ssh_options"] + ssh["setup_commands"])
            stack = load_cache(name, config=config)
            assert isinstance(stack, CacheStack) and isinstance(stack.layers[1], SshCache)
            remote = stack.layers[1]  # parsed, never connected
            for key in ("host", "cache_name", "python", "workdir"):
                assert getattr(remote, key) == ssh[key], key
            assert list(remote.ssh_options) == ssh["ssh_options"]
            assert list(remote.setup_commands) == ssh["setup_commands"]
            built[name] = stack.layers[0]
        else:
            built[name] = load_cache(name, config=config)
    assert {
        "local",
        "scratch",
        "sqlite",
        "postgres",
        "arrays",
        "colleague",
        "terse_sql",
        "terse_hdf5",
    } <= set(built)
    assert built["colleague"].read_only and built["terse_read_only"].read_only
    assert "postgresql" in built["postgres"].calls.to_config()["url"]
    assert isinstance(built["off"], VoidCache)
    for name, cache in built.items():
        if cache.read_only or name in ("postgres", "off"):  # /shared and db.example.org are not here
            continue
        assert roundtrip_value(cache) == 42, name
        cache.close()
    # every relative path landed beside the file
    assert (tmp_path / ".fleche" / "values").is_dir()
    assert (tmp_path / ".fleche" / "arrays" / "values.h5").is_file()


def test_example_file_is_what_cli_config_prints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fleche_remote.cli import main

    path = tmp_path / "fleche.toml"
    shutil.copy(REPO / "fleche.toml.example", path)
    assert main(["config", "--config", str(path)]) == 0
    printed = capsys.readouterr().out
    assert f"# from {path}" in printed
    assert "fleche:***@db.example.org" in printed and "secret" not in printed
    assert tomllib.loads(printed) == redact(tomllib.loads(path.read_text()))


def test_config_is_a_mapping() -> None:
    config = Config({"a": {"template": "memory"}}, {"a": Path("/x/fleche.toml")})
    assert dict(config) == {"a": {"template": "memory"}} and len(config) == 1
    assert config.source("a") == Path("/x/fleche.toml")
    assert "Config(['a']" in repr(config)


# -- the command line ------------------------------------------------------------------


def test_cli_config_shows_sources_and_redacts(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    far = write(home / "fleche.toml", "[default]\ncache = 'pg'\n[pg]\ntemplate = 'sql'\nroot = 'r'\n")
    near = write(
        home / "proj" / "fleche.toml",
        "[pg]\ntemplate = 'sql'\nroot = 'r'\nurl = 'postgresql://u:hunter2@h/d'\n"
        "[other]\ntemplate = 'memory'\n",
    )
    from fleche_remote.cli import main

    os.chdir(home / "proj")
    try:
        assert main(["config"]) == 0
    finally:
        os.chdir(home)
    out = capsys.readouterr().out
    assert "hunter2" not in out and "postgresql://u:***@h/d" in out
    assert f"[pg]  # from {near}" in out and f"[default]  # from {far}" in out
    assert out.index(str(near)) < out.index(str(far))  # the header lists the closer file first
    assert tomllib.loads(out)["pg"]["url"] == "postgresql://u:***@h/d"


def test_cli_config_without_files_says_where_it_looked(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fleche_remote.cli import main

    os.chdir(home)
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "no fleche.toml found" in out and str(home / "fleche.toml") in out


@pytest.mark.parametrize(
    ("argv", "body", "fragment"),
    [
        (["ls", "nope"], "[a]\ntemplate = 'memory'\n", "no cache named 'nope'; available: a"),
        (["ls", "a"], "[a]\ntemplate = 'zip'\n", "unknown template 'zip'"),
        (["config"], "[a]\ntemplate = = 'memory'\n", "TOML syntax error: Invalid value (at line 2"),
    ],
)
def test_cli_config_errors_are_one_line_and_exit_2(
    home: Path, capsys: pytest.CaptureFixture[str], argv: list, body: str, fragment: str
) -> None:
    from fleche_remote.cli import main

    path = write(home / "fleche.toml", body)
    assert main([*argv, "--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fleche-remote: error: ")
    assert fragment in lines[0] and str(path) in lines[0]
    assert "Traceback" not in captured.err


def test_cli_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    from fleche_remote.cli import main

    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["--help"]) == 0
    assert "serve" in capsys.readouterr().out


def test_cli_serve_passes_its_arguments_through(monkeypatch: pytest.MonkeyPatch) -> None:
    from fleche_remote.cli import main
    from fleche_remote.remote import server

    seen = []
    monkeypatch.setattr(server, "main", lambda argv: seen.append(argv) or 7)
    assert main(["serve", "--cache", "x", "--read-only", "--config", "/p/fleche.toml"]) == 7
    assert seen == [["--cache", "x", "--read-only", "--config", "/p/fleche.toml"]]


def test_python_dash_m_runs_the_cli(tmp_path: Path) -> None:
    import subprocess

    path = write(tmp_path / "fleche.toml", "[m]\ntemplate = 'memory'\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.run(
        [sys.executable, "-m", "fleche_remote", "ls", "zz", "--config", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert run.returncode == 2
    assert run.stderr.startswith("fleche-remote: error: no cache named 'zz'")
