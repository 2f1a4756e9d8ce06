"""Database URLs of the SQL stores, and the :class:`~.db.Database` each opens.

Nothing here imports SQLAlchemy unless the url is a PostgreSQL one: a
``sqlite://`` url is taken apart by hand, so that a server with nothing
installed starts fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple
from urllib.parse import parse_qsl

from ...errors import ConfigError
from ..fs import DEFAULT_FS, FS_KEYS, FsPolicy
from ..options import check_keys, resolve_path, typed
from .db import Database

EXAMPLE = "'sqlite:///path/calls.db' or 'postgresql+psycopg://user@host/dbname'"


def split_url(url: str, where: str) -> Tuple[str, str]:
    """(backend, rest) of a database URL, without importing SQLAlchemy."""
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme or not all(c.isalnum() or c in "+-." for c in scheme):
        raise ConfigError(
            f"{where}: url {url!r} is not a database URL (no scheme://); expected {EXAMPLE}", key="url"
        )
    return scheme.split("+", 1)[0].lower(), rest


def resolve_url(url: str, base_dir: Optional[Path], where: str) -> Tuple[str, str]:
    """The url to keep in config, and its backend ("sqlite" or "postgresql").

    A relative SQLite path resolves against ``base_dir`` (else the current
    directory) and ``~`` expands, so the stored url is absolute and means
    the same file from anywhere. Only a PostgreSQL url is parsed by
    SQLAlchemy (imported then).
    """
    backend, rest = split_url(url, where)
    if backend == "sqlite":
        if url.split("://", 1)[0].lower() not in ("sqlite", "sqlite+pysqlite"):
            raise ConfigError(f"{where}: url {url!r}: SQLite is reached through Python's sqlite3", key="url")
        if rest and not rest.startswith("/"):
            raise ConfigError(
                f"{where}: url {url!r} is not a database URL (a SQLite url has no host); expected {EXAMPLE}",
                key="url",
            )
        db = rest[1:].partition("?")[0]
        if db and db != ":memory:" and not db.startswith("file:"):
            query = rest.partition("?")[2]
            return f"sqlite:///{resolve_path(db, base_dir)}" + (f"?{query}" if query else ""), backend
        return url, backend
    if backend in ("postgresql", "postgres"):
        pg_url(url, where)  # a url SQLAlchemy cannot parse is a config error now, not at first use
        return url, "postgresql"
    raise ConfigError(f"{where}: url {url!r} names backend {backend!r}; expected {EXAMPLE}", key="url")


def pg_url(url: str, where: str) -> Any:
    """SQLAlchemy's URL for a PostgreSQL url; psycopg 3 when no driver is named."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise ConfigError(
            f"{where}: url {url!r} is not a database URL ({exc}); expected {EXAMPLE}", key="url"
        ) from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def open_database(url: str, what: str, echo: bool = False, fs: FsPolicy = DEFAULT_FS) -> Database:
    """The :class:`~.db.Database` for an (already resolved) url."""
    backend, rest = split_url(url, what)
    if backend == "sqlite":
        from .sqlite import SqliteDatabase, connect_target

        path, _, query = rest[1:].partition("?")
        target, uri = connect_target(path, dict(parse_qsl(query)))
        return SqliteDatabase(target, uri, what, url, echo, fs)
    from .postgres import PostgresDatabase

    parsed = pg_url(url, what)
    return PostgresDatabase(parsed, what, parsed.render_as_string(hide_password=True), echo)


def sql_options(table: Dict[str, Any], base_dir: Optional[Path], kind: str) -> Dict[str, Any]:
    """A ``values`` or ``calls`` table of ``type = "sql"`` as constructor arguments."""
    where = f"{kind}.type = 'sql'"
    check_keys(table, ("url", "echo", *FS_KEYS), where)
    if "url" not in table:
        raise ConfigError(f"{where} needs url = {EXAMPLE}; no url was given", key="url")
    url = typed(table, "url", str)
    if not url.strip():
        raise ConfigError(f"{where} needs url = {EXAMPLE}; got an empty string", key="url")
    return {
        "url": resolve_url(url, base_dir, where)[0],
        "echo": typed(table, "echo", bool, False),
        "fs": FsPolicy.from_table(table, where),
    }
