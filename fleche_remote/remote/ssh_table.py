"""The ``type = "ssh"`` table of fleche.toml: which keys it takes, what
each must be, and the table that rebuilds a given :class:`SshCache`.

Kept apart from the client because it is the layer's configuration, not
what the layer asks of its server: it reads a cache's public settings and
needs nothing of the connection.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Protocol, Sequence

from ..errors import ConfigError
from ..signing import Signer
from ..storage.options import check_keys, typed
from . import health

#: Every key of the table, and the type (or types) its value must have.
CONFIG_KEYS: Dict[str, Any] = {
    "host": str,
    "cache_name": str,
    "python": str,
    "ssh_options": list,
    "setup_commands": list,
    "workdir": str,
    "connect_timeout": (int, float),
    "timeout": (int, float),
    "read_only": bool,
    "fast_cipher": bool,
    "ssh": str,
    "progress": bool,
    "on_error": str,
    "retry_after": (int, float),
    "idle_timeout": (int, float),
    "bootstrap": str,
    "secret_key": (str, list),
}


def kwargs_from_table(table: Mapping[str, Any]) -> Dict[str, Any]:
    """The constructor arguments a ``type = "ssh"`` table spells.

    Raises:
        ConfigError: naming the key that is unknown, missing or of the
            wrong type.
    """
    table = dict(table)
    check_keys(table, CONFIG_KEYS, "type = 'ssh'")
    if "host" not in table:
        raise ConfigError("type = 'ssh' needs host = 'user@machine'", key="host")
    kwargs = {key: typed(table, key, expected) for key, expected in CONFIG_KEYS.items() if key in table}
    for key in ("ssh_options", "setup_commands"):
        if not all(isinstance(v, str) for v in kwargs.get(key, ())):
            raise ConfigError(f"{key!r} must be a list of strings", key=key)
    if "on_error" in kwargs:
        try:
            health.check_on_error(kwargs["on_error"])
        except ValueError as exc:
            raise ConfigError(str(exc), key="on_error") from None
    for key in ("retry_after", "idle_timeout"):
        try:
            health.check_seconds(key, kwargs.get(key))
        except ValueError as exc:
            raise ConfigError(str(exc), key=key) from None
    kwargs["secret_key"] = Signer.from_config(kwargs.get("secret_key"))  # or FLECHE_SECRET_KEY
    return kwargs


class Settings(Protocol):
    """What :func:`table_of` reads of a cache: its public settings."""

    @property
    def host(self) -> str: ...

    @property
    def cache_name(self) -> Optional[str]: ...

    @property
    def python(self) -> str: ...

    @property
    def ssh_options(self) -> Sequence[str]: ...

    @property
    def setup_commands(self) -> Sequence[str]: ...

    @property
    def workdir(self) -> Optional[str]: ...

    @property
    def connect_timeout(self) -> float: ...

    @property
    def timeout(self) -> float: ...

    @property
    def fast_cipher(self) -> bool: ...

    @property
    def ssh(self) -> str: ...

    @property
    def progress(self) -> Optional[bool]: ...

    @property
    def bootstrap(self) -> str: ...

    @property
    def signer(self) -> Optional[Signer]: ...

    @property
    def on_error(self) -> str: ...

    @property
    def retry_after(self) -> Optional[float]: ...

    @property
    def idle_timeout(self) -> Optional[float]: ...

    @property
    def local_read_only(self) -> bool: ...


def table_of(cache: Settings) -> Dict[str, Any]:
    """The table that rebuilds ``cache``: only what differs from the defaults."""
    cfg: Dict[str, Any] = {"type": "ssh", "host": cache.host}
    if cache.cache_name is not None:
        cfg["cache_name"] = cache.cache_name
    if cache.python != "python3":
        cfg["python"] = cache.python
    if cache.ssh_options:
        cfg["ssh_options"] = list(cache.ssh_options)
    if cache.setup_commands:
        cfg["setup_commands"] = list(cache.setup_commands)
    if cache.workdir is not None:
        cfg["workdir"] = cache.workdir
    if cache.connect_timeout != 60.0:
        cfg["connect_timeout"] = cache.connect_timeout
    if cache.timeout != 60.0:
        cfg["timeout"] = cache.timeout
    if cache.local_read_only:
        cfg["read_only"] = True
    if not cache.fast_cipher:
        cfg["fast_cipher"] = False
    if cache.ssh != "ssh":
        cfg["ssh"] = cache.ssh
    if cache.progress is not None:
        cfg["progress"] = cache.progress
    if cache.on_error != "raise":
        cfg["on_error"] = cache.on_error
    if cache.retry_after is not None:
        cfg["retry_after"] = cache.retry_after
    if cache.idle_timeout is not None:
        cfg["idle_timeout"] = cache.idle_timeout
    if cache.bootstrap != "auto":
        cfg["bootstrap"] = cache.bootstrap
    if cache.signer is not None and cache.signer.in_config:  # secret: redact before showing
        cfg["secret_key"] = cache.signer.to_config()
    return cfg


__all__ = ["CONFIG_KEYS", "Settings", "kwargs_from_table", "table_of"]
