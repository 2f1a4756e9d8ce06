"""fleche's fleche.toml forms that are not plain fleche-remote tables.

Users come with files written for the ``fleche`` package (0.22). Every form
it documents either works here or fails with an error that names the file,
the table, the key and what to write instead; nothing is dropped without a
word. :mod:`fleche_remote.config` calls these checks while it builds a
cache, so this module holds the knowledge of fleche and the messages, and
``config`` keeps the shape of our own format.

What is translated (see also README, "fleche.toml written for fleche"):

* ``lock_timeout`` on a ``pickle``/``cloudpickle`` store is deprecated in
  fleche and has no effect here either (writes are atomic renames, no
  lock): dropped with a :class:`ConfigDeprecationWarning`.
* ``remaining_depth`` on a value store (fleche's destructuring depth) has
  no effect: results are stored whole. Dropped with a
  :class:`~fleche_remote.config.trust.ConfigWarning`.
* an SQL ``url`` that is a bare path (``url = "db/calls.db"``) means that
  SQLite file, relative to the declaring file like every relative path.
* ``values``/``calls`` ``type = "void"`` (both halves) is a
  :class:`~fleche_remote.caches.void.VoidCache`.
* ``[default] metadata = ["Runtime"]`` (fleche's default) is accepted:
  every call fleche-remote stores carries ``wall_time`` and ``timestamp``.

* the ``dill`` store type and template are our cloudpickle files, and
  ``bagofholding_hdf`` is our ``hdf5`` (``root/values.h5`` and
  ``root/calls.h5``): equivalent caches, not fleche's bytes, as the ``sql``
  template's values are.
* a ``pool`` table is a :class:`~fleche_remote.caches.pool.CachePool`.

What is refused, with the nearest equivalent: ``max_size``, a store
``type`` in the wrong case, an SQL call store with no ``url`` (fleche's
in-memory default keeps nothing), and other metadata collectors.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Dict, List, Mapping, Optional, Protocol

from ..errors import ConfigError
from .trust import ConfigWarning


class ConfigDeprecationWarning(DeprecationWarning):
    """A fleche.toml key that is deprecated and has no effect."""


# Python hides a DeprecationWarning raised from library code, and fleche's
# own deprecation of lock_timeout is a visible FutureWarning: a user whose
# key silently stopped doing anything should hear about it once. So this
# one category is shown by default, unless the user set warning options
# themselves (-W or PYTHONWARNINGS), which then decide.
if not sys.warnoptions:
    warnings.filterwarnings("default", category=ConfigDeprecationWarning)


class Where(Protocol):
    """Where a table came from (``config._Where``): builds errors and labels."""

    def error(self, message: str, key: Optional[str] = None) -> ConfigError: ...

    def label(self, key: Optional[str] = None) -> str: ...


#: fleche store types read as ours: ``dill`` files are our file store (results
#: pickled with cloudpickle, which also stores lambdas, closures and classes
#: defined interactively: what dill is chosen for), ``bagofholding_hdf`` is
#: our ``hdf5`` (one HDF5 file per half under ``root``, NumPy arrays as
#: native datasets). Like the ``sql`` template's values, they are
#: equivalent caches, not fleche's bytes: a directory fleche wrote is not
#: read (``fleche-remote import-fleche`` copies one over).
SUBSTITUTED_STORE_TYPES = ("dill", "bagofholding_hdf")
#: bagofholding's options that have no counterpart in our HDF5 store
BAGOFHOLDING_ONLY = ("version_validator", "prefix_length")
#: fleche templates read as ours (see SUBSTITUTED_STORE_TYPES)
SUBSTITUTED_TEMPLATES = {"dill": "cloudpickle", "bagofholding_hdf": "hdf5"}
#: fleche templates we do not have, and what to write instead.
UNSUPPORTED_TEMPLATES = {
    "void": (
        "there is no 'void' template (in fleche either); write values = { type = 'void' } and "
        "calls = { type = 'void' } to store nothing"
    ),
}
#: store types for which fleche deprecated lock_timeout (it has no effect there)
LOCKLESS_TYPES = ("pickle", "cloudpickle", "dill")
#: fleche metadata names accepted in [default] metadata (what @cached records covers them)
ACCEPTED_METADATA = ("Runtime",)
RECORDED_METADATA = "wall_time, timestamp, hostname, python_version and fleche_remote_version"


def check_cache_table(cfg: Mapping[str, Any], where: Where) -> None:
    """Refuse the cache-level keys of fleche that we have no counterpart for."""
    # fleche's max_size is read as max_calls (storage/quota.py): we evict
    # the least recently used where fleche evicted at random


def check_template(template: Any, where: Where) -> Any:
    """The template to build for fleche's ``template``: a substituted one
    becomes ours; a fleche-only one is refused with what to write instead."""
    if isinstance(template, str) and template in UNSUPPORTED_TEMPLATES:
        raise where.error(UNSUPPORTED_TEMPLATES[template], key="template")
    if isinstance(template, str):
        return SUBSTITUTED_TEMPLATES.get(template, template)
    return template


def sql_template_values(value: Any) -> Any:
    """The sql template's ``values`` (fleche's default is bagofholding_hdf):
    ``dill`` files are our cloudpickle files, ``bagofholding_hdf`` our hdf5."""
    if isinstance(value, str):
        return SUBSTITUTED_TEMPLATES.get(value, value)
    return value


def sqlite_url(url: str) -> str:
    """``url`` as a SQLAlchemy url: a bare path becomes ``sqlite:///PATH``.

    ``sqlite:///`` followed by a relative path is relative to the declaring
    file (the SQL store resolves it), ``~`` expands, and an absolute path
    gives the four-slash form. Anything with a scheme is left alone.
    """
    if not url.strip() or "://" in url or url.startswith("sqlite:"):
        return url
    return f"sqlite:///{url}"


def normalise_store(kind: str, table: Mapping[str, Any], where: Where) -> Dict[str, Any]:
    """A store table with fleche's forms turned into ours.

    Args:
        kind: ``"values"`` or ``"calls"``.
        table: the store's table (``type`` present).
        where: the cache table it belongs to.

    Returns:
        A new table for the store's own ``from_config``.

    Raises:
        ConfigError: a fleche store type or form we do not support.
    """
    out = dict(table)
    type_name = out.get("type")
    if not isinstance(type_name, str):
        return out
    if type_name == "dill":
        out["type"] = type_name = "cloudpickle"
    elif type_name == "bagofholding_hdf":
        out = _bagofholding_as_hdf5(kind, out, where)
        type_name = "hdf5"
    if type_name != type_name.lower():
        raise where.error(
            f"store types are lowercase, as in fleche: write type = {type_name.lower()!r}, not {type_name!r}",
            key=f"{kind}.type",
        )
    if "lock_timeout" in out and type_name in LOCKLESS_TYPES:
        del out["lock_timeout"]
        warnings.warn(
            f"{where.label(f'{kind}.lock_timeout')}: lock_timeout is deprecated and has no effect on "
            f"a {type_name!r} store (writes are atomic renames and take no lock); remove it",
            ConfigDeprecationWarning,
            stacklevel=2,
        )
    if "remaining_depth" in out and kind == "values":
        del out["remaining_depth"]
        warnings.warn(
            f"{where.label(f'{kind}.remaining_depth')}: remaining_depth (fleche's destructuring depth) "
            f"has no effect here: fleche-remote stores each result whole; remove it",
            ConfigWarning,
            stacklevel=2,
        )
    if type_name == "sql":
        if "url" not in out:
            raise where.error(
                f"{kind}.type = 'sql' needs a url: a SQLite file (url = 'calls.db', relative to this "
                f"file) or 'postgresql+psycopg://user@host/dbname'. fleche's default without a url is "
                f"an in-memory database that keeps nothing; for that write {kind} = {{ type = 'memory' }}",
                key=f"{kind}.url",
            )
        if isinstance(out["url"], str):
            out["url"] = sqlite_url(out["url"])
    return out


def _bagofholding_as_hdf5(kind: str, table: Dict[str, Any], where: Where) -> Dict[str, Any]:
    """fleche's ``{type = "bagofholding_hdf", root = DIR}`` as our
    ``{type = "hdf5", path = DIR/values.h5}`` (``calls.h5`` for calls)."""
    out = {k: v for k, v in table.items() if k not in ("type", "root", *BAGOFHOLDING_ONLY)}
    out["type"] = "hdf5"
    dropped = [k for k in BAGOFHOLDING_ONLY if k in table]
    if dropped:
        warnings.warn(
            f"{where.label(f'{kind}.{dropped[0]}')}: {', '.join(dropped)} (bagofholding's) has no effect "
            f"on the hdf5 store that reads this table; remove it",
            ConfigWarning,
            stacklevel=3,
        )
    root = table.get("root")
    if not isinstance(root, str):
        raise where.error(
            f"a bagofholding_hdf store needs root = 'DIR' (its directory), got {root!r}", key=f"{kind}.root"
        )
    out["path"] = f"{root.rstrip('/')}/{kind}.h5"
    return out


def check_void(values: Any, calls: Any, cfg: Mapping[str, Any], where: Where) -> bool:
    """Whether a values/calls pair is fleche's ``void`` (store nothing).

    Raises:
        ConfigError: only one half is void, a void table has other keys,
            or the cache is also ``read_only``.
    """
    halves = {"values": values, "calls": calls}
    void = [k for k, t in halves.items() if isinstance(t, Mapping) and t.get("type") == "void"]
    if not void:
        return False
    if len(void) == 1:
        other = "calls" if void[0] == "values" else "values"
        raise where.error(
            f"a void {void[0]} store needs a void {other} store too (a record without its value, or "
            f"the reverse, is never a hit); write values = {{ type = 'void' }} and "
            f"calls = {{ type = 'void' }} to store nothing",
            key=f"{other}.type",
        )
    for kind, table in halves.items():
        extra = sorted(k for k in table if k != "type")
        if extra:
            raise where.error(
                f"a void store takes no options; remove {', '.join(extra)}", key=f"{kind}.{extra[0]}"
            )
    if cfg.get("read_only") is True:
        raise where.error("a void cache stores nothing anyway; remove read_only", key="read_only")
    return True


def check_metadata(value: Any, fail: Where) -> None:
    """Accept fleche's default ``[default] metadata``; refuse the rest.

    fleche-remote's ``@cached`` records fixed metadata on every call; it has
    no pluggable collectors. ``"Runtime"`` (fleche's default, timing) is
    covered by what it records; any other collector would be silently
    missing, so it is refused.
    """
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise fail.error(
            f'[default] metadata must be a list of names like ["Runtime"], got '
            f"{type(value).__name__} {value!r}",
            key="metadata",
        )
    refused: List[str] = [name for name in value if name not in ACCEPTED_METADATA]
    if not refused:
        return
    name = refused[0]
    if name == "Tags":
        why = "Tags takes arguments and cannot be set from a file (in fleche either)"
    elif name in ("Environment", "Git"):
        why = f"fleche's {name} metadata collector is not supported"
    else:
        why = f"{name!r} is not a metadata collector"
    raise fail.error(
        f"{why}; fleche-remote records {RECORDED_METADATA} with every call and has no other "
        f'collectors. Remove {name!r} from [default] metadata ("Runtime", fleche\'s default, is accepted)',
        key="metadata",
    )
