"""Building caches from fleche.toml tables, and the tables back from caches.

``cache_from_config`` turns one table (or an array of tables: a stack)
into a cache; ``cache_to_config`` is its inverse, through each cache's own
``to_config``. The ``type = ...`` registry lives here too. Which table to
build, and where the files are, is :mod:`fleche_remote.config`'s business.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from ..caches import BaseCache, Cache, CacheStack
from ..caches.pool import CachePool
from ..caches.void import VoidCache
from ..caches.writebehind import WRITE_BEHIND_KEY
from ..errors import ConfigError
from ..signing import config_signer
from ..storage.base import build_store
from ..storage.fs import FS_KEYS
from ..storage.options import resolve_path
from ..storage.quota import LIMIT_KEYS, SSH_LIMITS_MESSAGE
from . import forms as config_forms
from .hints import close_match, did_you_mean

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
SQL_TEMPLATE_VALUES = ("cloudpickle", "pickle", "hdf5")
_EXPLICIT_KEYS = ("values", "calls", "read_only", "secret_key", *LIMIT_KEYS)


class Where:
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
    where = Where(Path(source) if source is not None else None, name)
    return build_table(cfg, where)


def build_table(cfg: Any, where: Where) -> BaseCache:
    if isinstance(cfg, list):
        if not cfg:
            raise where.error("a cache stack needs at least one layer, got an empty array")
        prefix = where.table if where.table is not None else ""
        return build_stack([(item, Where(where.source, f"{prefix}[{i}]")) for i, item in enumerate(cfg)])
    if not isinstance(cfg, dict):
        raise where.error(f"a cache must be a table or an array of tables, got {_describe(cfg)}")
    config_forms.check_cache_table(cfg, where)
    if "pool" in cfg:
        return _build_pool(cfg, where)
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


def _build_pool(cfg: Dict[str, Any], where: Where) -> BaseCache:
    """fleche's ``[[name.pool]]``: a read-only union of member caches."""
    extra = sorted(k for k in cfg if k != "pool")
    if extra:
        raise where.error(
            f"a pool table holds only its members ([[{where.table}.pool]] tables); remove "
            f"{', '.join(extra)} (a pool is read-only anyway)",
            key=extra[0],
        )
    members = cfg["pool"]
    if not isinstance(members, list) or not members:
        raise where.error(
            f"pool must be an array of cache tables ([[{where.table}.pool]]), got {_describe(members)}",
            key="pool",
        )
    prefix = where.table if where.table is not None else ""
    return CachePool(
        [build_table(item, Where(where.source, f"{prefix}.pool[{i}]")) for i, item in enumerate(members)]
    )


def build_stack(items: Sequence[Tuple[Any, Where]]) -> BaseCache:
    """A stack of layers, each with the place it was declared (layers of
    an inline ``[default] cache`` array may come from different files)."""
    layers: List[BaseCache] = []
    write_behind: List[BaseCache] = []
    for i, (item, layer_where) in enumerate(items):
        item, behind = _split_write_behind(item, layer_where, first=not i)
        layers.append(build_table(item, layer_where))
        if behind:
            write_behind.append(layers[-1])
    return CacheStack(layers, write_behind=write_behind)


def _split_write_behind(item: Any, where: Where, first: bool) -> Tuple[Any, bool]:
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


def _read_only(cfg: Dict[str, Any], where: Where) -> bool:
    value = cfg.get("read_only", False)
    if not isinstance(value, bool):
        raise where.error(f"read_only must be true or false, got {_describe(value)}", key="read_only")
    return value


def _build_typed(cfg: Dict[str, Any], where: Where) -> BaseCache:
    type_name = cfg["type"]
    if not isinstance(type_name, str):
        raise where.error(
            f"type must be a string naming a cache type, got {_describe(type_name)}", key="type"
        )
    if type_name not in _CACHE_TYPES:
        raise where.error(
            f"unknown cache type {type_name!r}{did_you_mean(type_name, cache_types())}; "
            f"known cache types: {', '.join(cache_types())} "
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


def _build_store(kind: str, table: Any, where: Where) -> Any:
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


def _build_explicit(cfg: Dict[str, Any], where: Where) -> BaseCache:
    _check_explicit_keys(cfg, where)
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


def _cache(values: Any, calls: Any, cfg: Dict[str, Any], where: Where, **kwargs: Any) -> Cache:
    """A ``Cache`` with the limits of its table (max_bytes, max_calls,
    max_age, fleche's max_size); errors name the file and table."""
    limits = {k: cfg[k] for k in LIMIT_KEYS if k in cfg}
    try:
        return Cache(values, calls, **limits, **kwargs)
    except ConfigError as exc:
        raise where.rewrap(exc) from None


#: Every key a cache table may hold in one of its forms, for suggestions.
_CACHE_KEYS = (*_EXPLICIT_KEYS, "template", "root", "type", "url", "pool", *FS_KEYS)


def _check_explicit_keys(cfg: Dict[str, Any], where: Where) -> None:
    """Refuse keys an explicit (values/calls) table does not take, a
    misspelt one first, with the key it most likely meant."""
    unknown = [key for key in cfg if key not in _EXPLICIT_KEYS]
    if not unknown:
        return
    misspelt = [key for key in unknown if close_match(key, _CACHE_KEYS) not in (None, key)]
    key = (misspelt or unknown)[0]
    expected = "expected values and calls tables, read_only, secret_key; or template with root; or type"
    if misspelt:
        raise where.error(f"unknown key {key!r}{did_you_mean(key, _CACHE_KEYS)} ({expected})", key=key)
    if key in ("root", "url"):
        raise where.error(
            f"{key} goes with a template, and this table has none: add template = 'cloudpickle' "
            f"(or 'pickle', 'sql', 'hdf5'), or give values and calls tables",
            key=key,
        )
    raise where.error(f"unknown key {key!r} in a cache table; {expected}", key=key)


def _template_root(cfg: Dict[str, Any], where: Where) -> Path:
    if "root" not in cfg:
        raise where.error(f"template {cfg['template']!r} needs a 'root' directory", key="root")
    root = cfg["root"]
    if not isinstance(root, str):
        raise where.error(f"root must be a string path, got {_describe(root)}", key="root")
    return resolve_path(root, where.base_dir)


def _build_template(cfg: Dict[str, Any], where: Where) -> BaseCache:
    template = config_forms.check_template(cfg["template"], where)
    if not isinstance(template, str) or template not in TEMPLATES:
        raise where.error(
            f"unknown template {template!r}{did_you_mean(str(template), TEMPLATES)}; "
            f"known templates: {', '.join(TEMPLATES)}",
            key="template",
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
                f"unknown key {key!r} for template {template!r}{did_you_mean(key, allowed)}; "
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
            value_type = config_forms.sql_template_values(cfg.get("values", "cloudpickle"))
            if value_type not in SQL_TEMPLATE_VALUES:
                raise where.error(
                    f"the sql template stores values in files or HDF5; values must be one of "
                    f"{', '.join(SQL_TEMPLATE_VALUES)}, got {_describe(value_type)}",
                    key="values",
                )
            url = cfg.get("url", f"sqlite:///{root / 'calls.db'}")
            if not isinstance(url, str):
                raise where.error(f"url must be a SQLAlchemy URL string, got {_describe(url)}", key="url")
            url = config_forms.sqlite_url(url)
            if value_type == "hdf5":
                values = {"type": "hdf5", "path": str(root / "values.h5")}
            else:
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
