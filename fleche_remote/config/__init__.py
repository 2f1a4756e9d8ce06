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

import logging
import threading
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from ..caches import BaseCache
from ..caches.void import VOID_CONFIG, VoidCache
from ..errors import ConfigError
from ..redaction import is_secret_key, redact, redact_text
from .build import (  # building lives there; its names stay importable from here
    SQL_TEMPLATE_VALUES,  # noqa: F401
    TEMPLATES,  # noqa: F401
    CacheConfig,  # noqa: F401
    CacheFactory,  # noqa: F401
    Where,
    build_stack,
    build_table,
    cache_from_config,
    cache_to_config,
    cache_types,
    register_cache_type,
)
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
from .hints import did_you_mean

#: The table name errors and the cache memo use for an inline ``[default] cache``.
INLINE_DEFAULT = "default.cache"

log = logging.getLogger("fleche_remote.config")


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
        if spec not in cfg and spec not in BUILTIN_NAMES:
            raise _default_names_nothing(cfg, spec, None)
        name = spec
    elif name == DEFAULT_TABLE:  # fleche's alias for "the default cache"
        return load_cache(None, config=None if remember else cfg)
    if name not in cfg and name in BUILTIN_NAMES:
        return _remembered(name, cfg, remember, lambda: _builtin_cache(name))
    if name not in cfg:
        available = ", ".join(cfg.cache_names()) or "none"
        hint = did_you_mean(name, [*cfg.cache_names(), *BUILTIN_NAMES])
        raise ConfigError(
            f"no cache named {name!r}{hint}; available: {available}, and the built-ins "
            f"{', '.join(BUILTIN_NAMES)} ({read})",
            table=name,
        )
    table, source = cfg[name], cfg.source(name)
    return _remembered(name, cfg, remember, lambda: cache_from_config(table, name=name, source=source))


#: Names that need no table, as in fleche: ``memory`` (an in-memory cache,
#: one per process) and ``void`` (stores nothing); ``default`` is the cache
#: ``[default] cache`` names. A table of the same name wins.
BUILTIN_NAMES = ("memory", "void")


def _builtin_cache(name: str) -> BaseCache:
    if name == "void":
        return VoidCache()
    return build_table({"template": "memory"}, Where(None, name))


def _default_names_nothing(cfg: Config, name: str, index: Optional[int]) -> ConfigError:
    """``[default] cache`` (or one entry of its array) names no table."""
    source = cfg.source(DEFAULT_TABLE)
    tables = cfg.cache_names()
    entry = "cache" if index is None else f"cache[{index}]"
    hint = did_you_mean(name, [*tables, *BUILTIN_NAMES])
    choices = ", ".join([*tables, *BUILTIN_NAMES])
    return ConfigError(
        f"[default] {entry} names {name!r}, which is not a table here{hint}; add a [{name}] table "
        f"or write {entry} = one of: {choices}",
        file=str(source) if source is not None else None,
        table=DEFAULT_TABLE,
        key="cache",
    )


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
        return build_table(spec, Where(source, INLINE_DEFAULT))
    items: List[Tuple[Any, Where]] = []
    for i, item in enumerate(spec):
        if not isinstance(item, str):
            items.append((item, Where(source, f"{INLINE_DEFAULT}[{i}]")))
            continue
        if item not in cfg and item in BUILTIN_NAMES:
            items.append(({"template": "memory"} if item == "memory" else VOID_CONFIG, Where(None, item)))
            continue
        if item not in cfg or item == DEFAULT_TABLE:
            raise _default_names_nothing(cfg, item, i)
        items.append((cfg[item], Where(cfg.source(item), item)))
    return build_stack(items)


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
