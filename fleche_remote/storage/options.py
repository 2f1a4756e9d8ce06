"""Small helpers the store modules share for reading their config tables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple, Type, Union

from ..errors import ConfigError


def check_keys(table: Dict[str, Any], allowed: Iterable[str], where: str) -> None:
    """Refuse keys a store does not understand: a typo must not pass silently."""
    allowed = set(allowed) | {"type"}
    for key in table:
        if key not in allowed:
            raise ConfigError(
                f"unknown key {key!r} for {where}; expected one of {', '.join(sorted(allowed))}",
                key=key,
            )


def typed(
    table: Dict[str, Any],
    key: str,
    types: Union[Type[Any], Tuple[Type[Any], ...]],
    default: Any = ...,
) -> Any:
    """``table[key]`` checked against ``types``; ``default`` when absent."""
    if key not in table:
        if default is ...:
            raise ConfigError(f"missing required key {key!r}", key=key)
        return default
    value = table[key]
    if isinstance(value, bool) and types in (int, float, (int, float)):
        raise ConfigError(f"{key!r} must be a number, got a boolean", key=key)
    if not isinstance(value, types):
        names = "/".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise ConfigError(f"{key!r} must be {names}, got {type(value).__name__} {value!r}", key=key)
    return value


def resolve_path(value: str | os.PathLike[str], base_dir: Optional[Path]) -> Path:
    """Expand ``~`` and make a relative path absolute against ``base_dir``."""
    path = Path(os.path.expanduser(os.fspath(value)))
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / path
    return path
