"""fleche.toml discovery: which files apply, read and merged.

Files are found by walking up from the working directory to ``$HOME``
(inclusive, when the working directory is inside it) or ``/``, then
``$XDG_CONFIG_HOME/fleche/cache.toml``; they merge shallowly at the top
level, the closer file winning a whole table, and ``root = true`` in a
``[default]`` table stops the walk. A discovered file that someone else
could have written is skipped with a warning
(:mod:`fleche_remote.config.trust`). With no file at all,
:func:`builtin_config` is what applies
(:mod:`fleche_remote.config.default`).

Building caches from the tables is :mod:`fleche_remote.config`'s job; this
module only reads, merges and checks ``[default]``, the one table that is
not a cache.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from ..errors import ConfigError
from . import forms as config_forms
from .default import builtin_tables, user_cache_dir
from .hints import did_you_mean
from .trust import UntrustedConfigWarning, skip_message, untrusted_reason

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised by the 3.9 test interpreter only
    import tomli as tomllib

CONFIG_NAME = "fleche.toml"
DEFAULT_TABLE = "default"
#: Keys of ``[default]`` and their types; ``cache`` is a name, an inline
#: table or an inline array (a stack); ``metadata`` is checked by
#: :func:`~fleche_remote.config.forms.check_metadata`.
DEFAULT_KEYS: Dict[str, Tuple[type, ...]] = {"cache": (str, dict, list), "root": (bool,), "metadata": (list,)}


class _DefaultPlace:
    """``[default]`` of one file, as the place an error is about."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, message: str, key: Optional[str] = None) -> ConfigError:
        return ConfigError(message, file=str(self.path), table=DEFAULT_TABLE, key=key)

    def label(self, key: Optional[str] = None) -> str:
        return str(self.error("", key)).strip(" ()")


class Config(Mapping[str, Any]):
    """The merged top-level tables of every fleche.toml that applies.

    A read-only mapping from table name to its (parsed TOML) value that
    also remembers where each table came from, because relative paths in
    a table resolve against its own file and error messages name it.

    Attributes:
        files: the files read, highest priority (closest) first.
        searched: every path looked at, found or not, for error messages.
        ignored: discovered files that were skipped as unsafe, each with
            the reason (see :mod:`fleche_remote.config.trust`).
        builtin: True when no file was found and the tables are the
            built-in default (see :func:`builtin_config`).
    """

    def __init__(
        self,
        tables: Mapping[str, Any],
        sources: Mapping[str, Optional[Path]],
        files: Sequence[Path] = (),
        searched: Sequence[Path] = (),
        ignored: Sequence[Tuple[Path, str]] = (),
        builtin: bool = False,
    ) -> None:
        self._tables = dict(tables)
        self._sources = dict(sources)
        self.files: List[Path] = list(files)
        self.searched: List[Path] = list(searched)
        self.ignored: List[Tuple[Path, str]] = list(ignored)
        self.builtin = builtin

    def __getitem__(self, name: str) -> Any:
        return self._tables[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tables)

    def __len__(self) -> int:
        return len(self._tables)

    def __repr__(self) -> str:
        return f"Config({sorted(self._tables)}, files={[str(f) for f in self.files]})"

    def source(self, name: str) -> Optional[Path]:
        """The file that declared top-level table ``name`` (None if unknown)."""
        return self._sources.get(name)

    def cache_names(self) -> List[str]:
        """Names of the tables that can be caches (everything but ``[default]``
        and ``[compute]``, the host's settings for ``f.map(..., on=...)``)."""
        return sorted(
            k
            for k, v in self._tables.items()
            if k not in (DEFAULT_TABLE, "compute") and isinstance(v, (dict, list))
        )

    def default_cache(self) -> Optional[str]:
        """``[default] cache`` when it names a table, else None (unset or inline)."""
        spec = self.default_spec()
        return spec if isinstance(spec, str) else None

    def default_spec(self) -> Any:
        """``[default] cache`` as written: a name, an inline table, an array, or None."""
        default = self._tables.get(DEFAULT_TABLE)
        return default.get("cache") if isinstance(default, dict) else None


def _home() -> Optional[Path]:
    try:
        return Path.home().absolute()
    except (RuntimeError, KeyError):  # no HOME and no passwd entry
        return None


def _xdg_config_file(home: Optional[Path]) -> Optional[Path]:
    # the XDG spec treats an empty XDG_CONFIG_HOME like an unset one
    base = os.environ.get("XDG_CONFIG_HOME") or (str(home / ".config") if home is not None else "")
    return Path(base) / "fleche" / "cache.toml" if base else None


def candidate_paths(cwd: Optional[os.PathLike[str] | str] = None) -> List[Path]:
    """Every path discovery looks at, highest priority first.

    ``fleche.toml`` in ``cwd`` and each parent up to ``$HOME`` (inclusive)
    or the filesystem root, then the XDG file. Whether they exist is not
    checked here.
    """
    home = _home()
    home_real = home.resolve() if home is not None else None
    current = Path(cwd if cwd is not None else os.getcwd()).absolute()
    paths = []
    while True:
        paths.append(current / CONFIG_NAME)
        if home is not None and (current == home or current.resolve() == home_real):
            break
        if current.parent == current:
            break
        current = current.parent
    xdg = _xdg_config_file(home)
    if xdg is not None and xdg not in paths:
        paths.append(xdg)
    return paths


def read_toml(path: os.PathLike[str] | str) -> Dict[str, Any]:
    """Parse one TOML file.

    Raises:
        ConfigError: the file is unreadable or not valid TOML (the message
            gives the line and column the parser stopped at).
    """
    data, _ = _read_toml(Path(path), trusted_only=False)
    assert data is not None
    return data


def _read_toml(path: Path, trusted_only: bool) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """Parse ``path``: ``(tables, None)``; with ``trusted_only``,
    ``(None, reason)`` and a warning for a file that others could have
    written.

    The ownership check and the parse use one open file, so the file
    checked is the file read.
    """
    try:
        with open(path, "rb") as fh:
            if trusted_only:
                reason = untrusted_reason(os.fstat(fh.fileno()))
                if reason is not None:
                    warnings.warn(skip_message(path, reason), UntrustedConfigWarning, stacklevel=3)
                    return None, reason
            return tomllib.load(fh), None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(_syntax_message(path, str(exc)), file=str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror or exc}", file=str(path)) from None


#: A value TOML cannot parse that looks like a word: a string left unquoted.
_BARE_VALUE = re.compile(r"^\s*([A-Za-z0-9_.\-\"']+)\s*=\s*([A-Za-z_~./][^\s#,\]}]*)\s*(?:#.*)?$")


def _syntax_message(path: Path, error: str) -> str:
    """The parser's message (which gives the line and column once), and,
    for a string left unquoted (``template = sql``), the line to write."""
    message = f"TOML syntax error: {error}"
    found = re.search(r"line (\d+)", error)
    if not found or not error.startswith("Invalid value"):
        return message
    try:
        line = path.read_text(errors="replace").splitlines()[int(found.group(1)) - 1]
    except (OSError, IndexError):
        return message
    bare = _BARE_VALUE.match(line)
    if bare is None:
        return message
    key, value = bare.groups()
    return f'{message}; strings need quotes: write {key} = "{value}"'


def _check_default(table: Any, path: Path) -> None:
    where = _DefaultPlace(path)
    if not isinstance(table, dict):
        raise where.error(f"[default] must be a table, got {type(table).__name__} {table!r}")
    for key, value in table.items():
        expected = DEFAULT_KEYS.get(key)
        if expected is None:
            known = ", ".join(sorted(DEFAULT_KEYS))
            hint = did_you_mean(key, DEFAULT_KEYS)
            raise where.error(f"unknown key {key!r} in [default]{hint}; expected one of {known}", key)
        if not isinstance(value, expected):
            names = ", ".join(t.__name__ for t in expected)
            got = f"{type(value).__name__} {value!r}"
            raise where.error(f"[default] {key} must be a {names}, got {got}", key)
    if "metadata" in table:
        config_forms.check_metadata(table["metadata"], where)
    spec = table.get("cache")
    if isinstance(spec, list):
        if not spec:
            raise where.error("[default] cache = [] names no layer; give at least one", "cache")
        for i, item in enumerate(spec):
            if not isinstance(item, (str, dict, list)):
                raise where.error(
                    f"[default] cache[{i}] must be a table name or an inline table, got "
                    f"{type(item).__name__} {item!r}",
                    "cache",
                )


def load_config(
    path: Optional[os.PathLike[str] | str] = None, *, cwd: Optional[os.PathLike[str] | str] = None
) -> Config:
    """Find, read and merge the fleche.toml files that apply.

    Args:
        path: read just this file instead of discovering.
        cwd: start the walk here instead of the current directory.

    Discovered files that others could have written are skipped with an
    :class:`~fleche_remote.config.trust.UntrustedConfigWarning` (and listed
    in ``config.ignored``); a file named by ``path`` is read as it is.

    Returns:
        The merged :class:`Config`; it is empty (``config.files == []``)
        when no file was found, which is not an error:
        :func:`load_cache` then uses the built-in default.

    Raises:
        ConfigError: a file is missing (``path`` given), unreadable, not
            valid TOML, or has a malformed ``[default]`` table.
    """
    if path is not None:
        path = Path(path).expanduser().absolute()
        if not path.is_file():
            raise ConfigError("config file does not exist", file=str(path))
        candidates, searched = [path], [path]
    else:
        searched = candidate_paths(cwd)
        candidates = [p for p in searched if p.is_file()]
    tables: Dict[str, Any] = {}
    sources: Dict[str, Optional[Path]] = {}
    files: List[Path] = []
    ignored: List[Tuple[Path, str]] = []
    for candidate in candidates:  # closest first, so the first table of a name wins
        data, unsafe = _read_toml(candidate, trusted_only=path is None)
        if data is None:
            ignored.append((candidate, unsafe or ""))
            continue
        files.append(candidate)
        if DEFAULT_TABLE in data:
            _check_default(data[DEFAULT_TABLE], candidate)
        for name, value in data.items():
            if name not in tables:
                tables[name] = value
                sources[name] = candidate
        default = data.get(DEFAULT_TABLE)
        if isinstance(default, dict) and default.get("root") is True:
            break
    return Config(tables, sources, files, searched, ignored)


def builtin_config(searched: Sequence[Path] = (), ignored: Sequence[Tuple[Path, str]] = ()) -> Config:
    """The configuration in effect when no fleche.toml was found: one
    cache, ``local``, in the user cache directory (see
    :mod:`fleche_remote.config.default`), which is ``[default] cache``."""
    tables = builtin_tables(user_cache_dir(_home()))
    return Config(tables, {}, (), searched, ignored, builtin=True)
