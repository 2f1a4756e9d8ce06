"""fleche.toml: discovery, building caches from tables, and back again.

The format is the one the ``fleche`` package reads, so an existing file
mostly just works. In short:

* Every top-level table names a cache, except ``[default]``, which holds
  ``cache`` (the cache ``load_cache()`` returns: a table's name, an inline
  table, or an array of names and tables, which is a stack),
  ``root = true`` (stop the discovery walk here) and ``metadata``
  (fleche's; only its default ``["Runtime"]`` is accepted, see
  :mod:`fleche_remote.config.forms`).
* A cache table is either explicit (``values = {type = ...}`` and
  ``calls = {type = ...}``), a ``template`` with a ``root``, or
  ``type = "ssh"`` (or another registered cache type). ``read_only = true``
  goes with the first two. An array of tables (``[[name]]``) is a
  :class:`~fleche_remote.caches.CacheStack`, first layer first; an ssh
  layer of a stack may say ``write_behind = true`` (saves are pushed to it
  in the background).
* Files are found by walking up from the working directory to ``$HOME``
  (inclusive) or ``/``, then ``$XDG_CONFIG_HOME/fleche/cache.toml``; they
  merge shallowly at the top level, the closer file winning a whole table
  (:mod:`fleche_remote.config.discovery`). A discovered file that someone
  else could have written is skipped with a warning
  (:mod:`fleche_remote.config.trust`). With no file at all, the built-in
  cache in the user cache directory is used
  (:mod:`fleche_remote.config.default`).
* fleche's own forms (``lock_timeout``, bare-path SQL urls, ``void``,
  ``dill``, pools, ...) are translated or refused in
  :mod:`fleche_remote.config.forms`.
* A relative ``root`` or SQLite ``url`` is relative to the file that
  declared it, so a checked-in file means the same cache from any
  subdirectory.

Design rule: every malformed config raises exactly one
:class:`~fleche_remote.errors.ConfigError` naming the file, the table and
the key, at the moment the table is used. Store classes only know their
own keys, so their errors are caught here and given the file, the table
and a ``values.``/``calls.`` prefix.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..caches import BaseCache, Cache, CacheStack
from ..caches.void import VoidCache
from ..caches.writebehind import WRITE_BEHIND_KEY
from ..errors import ConfigError
from ..redaction import is_secret_key, redact, redact_text
from ..signing import config_signer
from ..storage.base import build_store
from ..storage.fs import FS_KEYS
from ..storage.options import resolve_path
from ..storage.quota import LIMIT_KEYS, SSH_LIMITS_MESSAGE
from . import forms as config_forms
from .discovery import (  # discovery lives there; its names stay importable from here
    CONFIG_NAME,  # noqa: F401
    DEFAULT_KEYS,  # noqa: F401
    DEFAULT_TABLE,
    Config,
    builtin_config,
    candidate_paths,
    load_config,
    read_toml,
)

#: The table name errors and the cache memo use for an inline ``[default] cache``.
INLINE_DEFAULT = "default.cache"

log = logging.getLogger("fleche_remote.config")

CacheConfig = Union[Dict[str, Any], List[Any]]
CacheFactory = Callable[[Dict[str, Any], Optional[Path]], BaseCache]


# -- cache types ----------------------------------------------------------------

_CACHE_TYPES: Dict[str, Union[CacheFactory, str]] = {
    "ssh": "fleche_remote.remote.client:SshCache.from_config",
}


def register_cache_type(name: str, factory: Union[CacheFactory, str]) -> None:
    """Make ``type = name`` in a cache table build a cache with ``factory``.

    Args:
        name: the ``type`` value (an identifier).
        factory: ``factory(table, base_dir) -> BaseCache``, where ``table``
            is the whole cache table (``type`` included) and ``base_dir``
            the declaring file's directory; or a lazy ``"module:attr"``
            string (``attr`` may be dotted, e.g. ``"Class.from_config"``),
            imported on first use so that registering costs nothing.

    Raises:
        ValueError: ``name`` is not an identifier or ``factory`` a malformed
            string.
        TypeError: ``factory`` is neither callable nor a string.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"cache type name must be an identifier, got {name!r}")
    if isinstance(factory, str):
        module, sep, attr = factory.partition(":")
        if not sep or not module or not attr:
            raise ValueError(f"a lazy cache factory must look like 'module:attr', got {factory!r}")
    elif not callable(factory):
        raise TypeError(f"cache factory must be callable or a 'module:attr' string, got {factory!r}")
    _CACHE_TYPES[name] = factory


def cache_types() -> List[str]:
    """Names accepted by ``type = ...`` in a cache table."""
    return sorted(_CACHE_TYPES)


def _cache_factory(name: str) -> CacheFactory:
    entry = _CACHE_TYPES[name]
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        entry = obj
    return entry  # type: ignore[return-value]


# -- building caches ------------------------------------------------------------

TEMPLATES = ("memory", "pickle", "cloudpickle", "sql", "hdf5")
#: value store types the ``sql`` template accepts as ``values = "..."``
SQL_TEMPLATE_VALUES = ("cloudpickle", "pickle")
_EXPLICIT_KEYS = ("values", "calls", "read_only", "secret_key", *LIMIT_KEYS)


class _Where:
    """The file and table a config dict came from, for error messages."""

    def __init__(self, source: Optional[Path], table: Optional[str]) -> None:
        self.source = source
        self.table = table

    @property
    def base_dir(self) -> Optional[Path]:
        return self.source.parent if self.source is not None else None

    def error(self, message: str, key: Optional[str] = None) -> ConfigError:
        return ConfigError(
            message, file=str(self.source) if self.source is not None else None, table=self.table, key=key
        )

    def label(self, key: Optional[str] = None) -> str:
        """``file F, table [T], key 'K'``: the place a warning is about."""
        return str(self.error("", key)).strip(" ()")

    def rewrap(self, exc: ConfigError, prefix: str = "") -> ConfigError:
        """``exc`` (raised by a store that knows only its own key) with the
        file, the table and the full key path filled in."""
        key = exc.key
        if prefix and not (key or "").startswith(prefix + "."):
            key = prefix if key is None else f"{prefix}.{key}"
        new = ConfigError(
            exc.message,
            file=exc.file or (str(self.source) if self.source is not None else None),
            table=exc.table or self.table,
            key=key,
        )
        new.__cause__ = exc
        return new


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def cache_from_config(
    cfg: CacheConfig,
    *,
    name: Optional[str] = None,
    source: Optional[os.PathLike[str] | str] = None,
) -> BaseCache:
    """Build a cache from one cache table, or a stack from a list of them.

    Args:
        cfg: a table (dict) in one of the forms the module notes list, or
            a list of tables for a :class:`~fleche_remote.caches.CacheStack`
            (a list may nest, which TOML writes as inline arrays).
        name: the table's name, used in error messages.
        source: the file that declared it; relative paths resolve against
            its directory (else against the current directory).

    Returns:
        A :class:`~fleche_remote.caches.Cache`, a
        :class:`~fleche_remote.caches.CacheStack`, or what a registered
        cache type builds (``type = "ssh"``: an ``SshCache``).

    Raises:
        ConfigError: the table is malformed; the error names the file, the
            table and the key.
    """
    where = _Where(Path(source) if source is not None else None, name)
    return _build(cfg, where)


def _build(cfg: Any, where: _Where) -> BaseCache:
    if isinstance(cfg, list):
        if not cfg:
            raise where.error("a cache stack needs at least one layer, got an empty array")
        prefix = where.table if where.table is not None else ""
        return _build_stack([(item, _Where(where.source, f"{prefix}[{i}]")) for i, item in enumerate(cfg)])
    if not isinstance(cfg, dict):
        raise where.error(f"a cache must be a table or an array of tables, got {_describe(cfg)}")
    config_forms.check_cache_table(cfg, where)
    if WRITE_BEHIND_KEY in cfg:
        raise where.error(
            f"{WRITE_BEHIND_KEY} = true goes on an ssh layer of a stack ([[name]] tables), "
            f"not on a single cache",
            key=WRITE_BEHIND_KEY,
        )
    if "type" in cfg:
        return _build_typed(cfg, where)
    if "template" in cfg:
        return _build_template(cfg, where)
    return _build_explicit(cfg, where)


def _build_stack(items: Sequence[Tuple[Any, _Where]]) -> BaseCache:
    """A stack of layers, each with the place it was declared (layers of
    an inline ``[default] cache`` array may come from different files)."""
    layers: List[BaseCache] = []
    write_behind: List[BaseCache] = []
    for i, (item, layer_where) in enumerate(items):
        item, behind = _split_write_behind(item, layer_where, first=not i)
        layers.append(_build(item, layer_where))
        if behind:
            write_behind.append(layers[-1])
    return CacheStack(layers, write_behind=write_behind)


def _split_write_behind(item: Any, where: _Where, first: bool) -> Tuple[Any, bool]:
    """A stack layer's table without ``write_behind``, and whether it was set.

    The key belongs to the stack, not to the layer, so it is taken out
    before the table reaches the layer's own factory (which would reject
    it as unknown).
    """
    if not isinstance(item, dict) or WRITE_BEHIND_KEY not in item:
        return item, False
    value = item[WRITE_BEHIND_KEY]
    if not isinstance(value, bool):
        raise where.error(
            f"{WRITE_BEHIND_KEY} must be true or false, got {_describe(value)}", key=WRITE_BEHIND_KEY
        )
    if value and item.get("type") != "ssh":
        raise where.error(
            f"{WRITE_BEHIND_KEY} = true applies to a type = 'ssh' layer, got type = {item.get('type')!r}",
            key=WRITE_BEHIND_KEY,
        )
    if value and first:
        raise where.error(
            f"{WRITE_BEHIND_KEY} = true cannot be on the first layer of a stack: saves land there "
            f"directly; put it on a lower ssh layer",
            key=WRITE_BEHIND_KEY,
        )
    rest = {k: v for k, v in item.items() if k != WRITE_BEHIND_KEY}
    return rest, value


def _read_only(cfg: Dict[str, Any], where: _Where) -> bool:
    value = cfg.get("read_only", False)
    if not isinstance(value, bool):
        raise where.error(f"read_only must be true or false, got {_describe(value)}", key="read_only")
    return value


def _build_typed(cfg: Dict[str, Any], where: _Where) -> BaseCache:
    type_name = cfg["type"]
    if not isinstance(type_name, str):
        raise where.error(
            f"type must be a string naming a cache type, got {_describe(type_name)}", key="type"
        )
    if type_name not in _CACHE_TYPES:
        raise where.error(
            f"unknown cache type {type_name!r}; known cache types: {', '.join(cache_types())} "
            f"(or leave out 'type' and give values/calls tables or a template)",
            key="type",
        )
    limited = [k for k in LIMIT_KEYS if k in cfg]
    if limited and type_name == "ssh":
        raise where.error(SSH_LIMITS_MESSAGE.format(key=limited[0]), key=limited[0])
    factory = _cache_factory(type_name)
    try:
        cache = factory(dict(cfg), where.base_dir)
    except ConfigError as exc:
        raise where.rewrap(exc) from None
    if not isinstance(cache, BaseCache):
        raise TypeError(f"the factory for cache type {type_name!r} returned {cache!r}, not a BaseCache")
    return cache


def _build_store(kind: str, table: Any, where: _Where) -> Any:
    if not isinstance(table, dict):
        raise where.error(
            f'{kind} must be a table like {{type = "cloudpickle", ...}}, got {_describe(table)}', key=kind
        )
    if "type" not in table:
        raise where.error(f"{kind} needs a 'type' naming a store type", key=f"{kind}.type")
    table = config_forms.normalise_store(kind, table, where)
    try:
        return build_store(kind, table, where.base_dir)
    except ConfigError as exc:
        raise where.rewrap(exc, kind) from None


def _build_explicit(cfg: Dict[str, Any], where: _Where) -> BaseCache:
    for key in cfg:
        if key not in _EXPLICIT_KEYS:
            raise where.error(
                f"unknown key {key!r} in a cache table; expected {', '.join(_EXPLICIT_KEYS)}, "
                f"or a template, or a type",
                key=key,
            )
    for kind in ("values", "calls"):
        if kind not in cfg:
            raise where.error(
                f"a cache table needs both 'values' and 'calls' tables (or a 'template', or a 'type'); "
                f"'{kind}' is missing",
                key=kind,
            )
    read_only = _read_only(cfg, where)
    if config_forms.check_void(cfg["values"], cfg["calls"], cfg, where):
        return VoidCache()
    signer, values_table, calls_table = config_signer(cfg, where)  # also fleche's per-store keys
    inline_max = 0  # the value store the user named gets the values, unless calls opt in
    if isinstance(calls_table, dict) and "inline_max" in calls_table:
        inline_max = calls_table["inline_max"]
        calls_table = {k: v for k, v in calls_table.items() if k != "inline_max"}
    values = _build_store("values", values_table, where)
    calls = _build_store("calls", calls_table, where)
    return _cache(values, calls, cfg, where, read_only=read_only, secret_key=signer, inline_max=inline_max)


def _cache(values: Any, calls: Any, cfg: Dict[str, Any], where: _Where, **kwargs: Any) -> Cache:
    """A ``Cache`` with the limits of its table (max_bytes, max_calls,
    max_age, fleche's max_size); errors name the file and table."""
    limits = {k: cfg[k] for k in LIMIT_KEYS if k in cfg}
    try:
        return Cache(values, calls, **limits, **kwargs)
    except ConfigError as exc:
        raise where.rewrap(exc) from None


def _template_root(cfg: Dict[str, Any], where: _Where) -> Path:
    if "root" not in cfg:
        raise where.error(f"template {cfg['template']!r} needs a 'root' directory", key="root")
    root = cfg["root"]
    if not isinstance(root, str):
        raise where.error(f"root must be a string path, got {_describe(root)}", key="root")
    return resolve_path(root, where.base_dir)


def _build_template(cfg: Dict[str, Any], where: _Where) -> BaseCache:
    template = cfg["template"]
    config_forms.check_template(template, where)
    if not isinstance(template, str) or template not in TEMPLATES:
        raise where.error(
            f"unknown template {template!r}; known templates: {', '.join(TEMPLATES)}", key="template"
        )
    allowed = {"template", "read_only", "secret_key", *LIMIT_KEYS}
    if template != "memory":
        allowed |= {"root", *FS_KEYS}
    if template == "sql":
        allowed |= {"url", "values"}
    if ("values" in cfg and template != "sql") or isinstance(cfg.get("values"), dict) or "calls" in cfg:
        key = "calls" if "calls" in cfg else "values"
        raise where.error(
            f"give either template = {template!r} or explicit values/calls tables, not both", key=key
        )
    for key in cfg:
        if key not in allowed:
            raise where.error(
                f"unknown key {key!r} for template {template!r}; "
                f"expected one of {', '.join(sorted(allowed))}",
                key=key,
            )
    read_only = _read_only(cfg, where)
    if template == "memory":
        values: Dict[str, Any] = {"type": "memory"}
        calls: Dict[str, Any] = {"type": "memory"}
    else:
        root = _template_root(cfg, where)
        if template in ("pickle", "cloudpickle"):
            values = {"type": template, "root": str(root / "values")}
            calls = {"type": template, "root": str(root / "calls")}
        elif template == "hdf5":
            values = {"type": "hdf5", "path": str(root / "values.h5")}
            calls = {"type": "hdf5", "path": str(root / "calls.h5")}
        else:  # sql
            value_type = cfg.get("values", "cloudpickle")
            config_forms.check_sql_template_values(value_type, where)
            if value_type not in SQL_TEMPLATE_VALUES:
                raise where.error(
                    f"the sql template stores values in files; values must be one of "
                    f"{', '.join(SQL_TEMPLATE_VALUES)}, got {_describe(value_type)}",
                    key="values",
                )
            url = cfg.get("url", f"sqlite:///{root / 'calls.db'}")
            if not isinstance(url, str):
                raise where.error(f"url must be a SQLAlchemy URL string, got {_describe(url)}", key="url")
            url = config_forms.sqlite_url(url)
            values = {"type": value_type, "root": str(root / "values")}
            calls = {"type": "sql", "url": url}
    for table in (values, calls):  # shared / allow_network_fs reach both stores
        table.update((k, cfg[k]) for k in FS_KEYS if k in cfg)
    return _cache(
        _build_store("values", values, where),
        _build_store("calls", calls, where),
        cfg,
        where,
        read_only=read_only,
        secret_key=config_signer(cfg, where)[0],
    )


def cache_to_config(cache: BaseCache) -> CacheConfig:
    """The config that :func:`cache_from_config` turns back into ``cache``.

    Paths come out absolute, so the result does not depend on where it is
    later written. A stack's write-behind layers come out with
    ``write_behind = true``; its ``backfill=False`` and a write-behind
    layer's queue and journal settings have no config form and are not
    kept.

    Args:
        cache: a :class:`~fleche_remote.caches.Cache`, a
            :class:`~fleche_remote.caches.CacheStack`, or any cache with a
            ``to_config()`` method (an ``SshCache``).

    Returns:
        A table (dict), or a list of them for a stack.

    Raises:
        TypeError: ``cache`` has no config form.
    """
    result = cache.to_config()
    if not isinstance(result, (dict, list)):
        raise TypeError(f"{type(cache).__name__}.to_config() returned {_describe(result)}, not a table")
    return result


# -- loading a named cache --------------------------------------------------------

_loaded: Dict[Tuple[Any, ...], BaseCache] = {}
_loaded_lock = threading.Lock()


def _fingerprint(config: Config) -> Tuple[Any, ...]:
    # same files with the same contents -> the same cache object, so that
    # every @cached function shares one ssh connection per remote
    stamps: List[Tuple[str, Optional[int], Optional[int]]] = []
    for path in config.files:
        try:
            st = path.stat()
            stamps.append((str(path), st.st_mtime_ns, st.st_size))
        except OSError:
            stamps.append((str(path), None, None))
    return tuple(stamps)


def load_cache(name: Optional[str] = None, *, config: Optional[Mapping[str, Any]] = None) -> BaseCache:
    """The cache called ``name`` in the applicable fleche.toml files.

    Without ``config``, the files are discovered from the current
    directory and the built cache is remembered: asking again for the
    same name while the files are unchanged returns the same object, so
    one process keeps one connection per remote.

    When this call discovers the files itself (no ``config``) and finds
    none at all, the built-in default applies (:func:`builtin_config`: a
    cache named ``local`` in the user cache directory), and the first use
    in a process says so at INFO level. That is ``@cached``'s path. A
    caller that passes a discovered :class:`Config` with no files gets the
    "no fleche.toml found" error instead, so a server started where no
    fleche.toml is (a wrong ``workdir``, most likely) says so rather than
    quietly filling a cache nobody configured; such a caller may pass
    ``builtin_config(config.searched)`` to choose the default itself.

    Args:
        name: a top-level table; None means ``[default] cache`` (a name,
            an inline table, or an array of names and tables: a stack).
        config: a :class:`Config` (or a plain mapping of tables, whose
            relative paths then resolve against the current directory).

    Returns:
        The built cache.

    Raises:
        ConfigError: a given discovered ``config`` found no file (the
            message lists every path looked at), no default is set,
            ``name`` is not a table (the message lists the ones there
            are), or the table is malformed.
    """
    remember = config is None
    if config is None:
        cfg = load_config()
    elif isinstance(config, Config):
        cfg = config
    else:
        cfg = Config(config, {})
    if not cfg.files and cfg.searched and not cfg.builtin:
        if not remember:
            looked = ", ".join(str(p) for p in cfg.searched)
            raise ConfigError(f"no fleche.toml found; looked at: {looked}")
        cfg = builtin_config(cfg.searched, cfg.ignored)
    if cfg.builtin:
        _announce_builtin(cfg)
    read = ", ".join(str(f) for f in cfg.files) or "none"
    if cfg.builtin:
        looked = ", ".join(str(p) for p in cfg.searched)
        read = f"no fleche.toml found, so only the built-in cache exists; looked at: {looked}"
    if name is None:
        spec = cfg.default_spec()
        if spec is None:
            source = cfg.source(DEFAULT_TABLE)
            raise ConfigError(
                f'no cache name given and no default set; add cache = "NAME" to [default] '
                f"(files read: {read})",
                file=str(source) if source is not None else None,
                table=DEFAULT_TABLE,
                key="cache",
            )
        if not isinstance(spec, str):
            return _remembered(INLINE_DEFAULT, cfg, remember, lambda: _build_inline_default(spec, cfg))
        name = spec
    if name not in cfg or name == DEFAULT_TABLE:
        available = ", ".join(cfg.cache_names()) or "none"
        raise ConfigError(f"no cache named {name!r}; available: {available} ({read})", table=name)
    table, source = cfg[name], cfg.source(name)
    return _remembered(name, cfg, remember, lambda: cache_from_config(table, name=name, source=source))


def _remembered(name: str, cfg: Config, remember: bool, build: Callable[[], BaseCache]) -> BaseCache:
    if not remember:
        return build()
    token = (name, _fingerprint(cfg), str(cfg.get(name, "")) if cfg.builtin else "")
    with _loaded_lock:
        cache = _loaded.get(token)
        if cache is None:
            cache = _loaded[token] = build()
        return cache


def _build_inline_default(spec: Any, cfg: Config) -> BaseCache:
    """``[default] cache`` given as a table or an array: an array's strings
    name top-level tables (each resolving paths against its own file), its
    tables are layers written in place."""
    source = cfg.source(DEFAULT_TABLE)
    if isinstance(spec, dict):
        return _build(spec, _Where(source, INLINE_DEFAULT))
    items: List[Tuple[Any, _Where]] = []
    for i, item in enumerate(spec):
        if not isinstance(item, str):
            items.append((item, _Where(source, f"{INLINE_DEFAULT}[{i}]")))
            continue
        if item not in cfg or item == DEFAULT_TABLE:
            available = ", ".join(cfg.cache_names()) or "none"
            raise ConfigError(
                f"[default] cache[{i}] names {item!r}, which is not a table here; available: {available}",
                file=str(source) if source is not None else None,
                table=DEFAULT_TABLE,
                key="cache",
            )
        items.append((cfg[item], _Where(cfg.source(item), item)))
    return _build_stack(items)


_announced: List[str] = []


def _announce_builtin(cfg: Config) -> None:
    # once per process: every @cached function resolves its cache through here
    table = cfg.get(cfg.default_cache() or "")
    root = table.get("root") if isinstance(table, dict) else None
    if root in _announced:
        return
    _announced.append(str(root))
    log.info(
        "no fleche.toml found (looked at %s); caching in the built-in cache at %s. "
        "Add a fleche.toml to choose another (see `fleche-remote config`)",
        ", ".join(str(p) for p in cfg.searched) or "nowhere",
        root,
    )


def forget_loaded_caches() -> None:
    """Drop the caches :func:`load_cache` remembered (closing them)."""
    with _loaded_lock:
        caches = list(_loaded.values())
        _loaded.clear()
    for cache in caches:
        cache.close()


__all__ = [
    "Config",
    "cache_from_config",
    "cache_to_config",
    "cache_types",
    "candidate_paths",
    "forget_loaded_caches",
    "is_secret_key",
    "load_cache",
    "load_config",
    "read_toml",
    "redact",
    "redact_text",
    "register_cache_type",
]
