"""fleche-remote: a persistent, content-addressed cache of function results
whose layers can live on any machine reachable by ``ssh``.

Everything public is re-exported here. Nothing heavy is imported: the
remote client, the config loader and the SQL/HDF5 backends load on first
use, so ``import fleche_remote`` stays cheap on a login node.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# Eager, unlike the other front ends: the submodule shares the function's
# name, so once anything imported ``fleche_remote.cached`` the import system
# would have bound the *module* here and the lazy hook would never run.
from .cached import cached
from .caches import BaseCache, Cache, CacheStack
from .caches.writebehind import WriteBehind
from .call import Call, CallRecord, LazyCall
from .codec.bodyhash import BulkHashUnavailable
from .codec.digest import Digest, UnstableDigestWarning, digest_of
from .errors import (
    AmbiguousDigestError,
    ClaimWaitTimeout,
    ConfigError,
    CorruptEntryError,
    FlecheRemoteError,
    IncompatibleProtocolError,
    ProtocolError,
    RecursiveCallError,
    Rejected,
    RemoteConnectionError,
    RemoteError,
    StorageError,
    UnpicklableArgumentError,
)

__version__ = "0.1.0"

_LAZY = {
    "SshCache": "fleche_remote.remote.client",
    "serve": "fleche_remote.remote.server",
    "load_config": "fleche_remote.config",
    "cache_from_config": "fleche_remote.config",
    "cache_to_config": "fleche_remote.config",
    "load_cache": "fleche_remote.config",
    "redact": "fleche_remote.config",
    "SignatureError": "fleche_remote.signing",
}

if TYPE_CHECKING:  # pragma: no cover
    from .config import cache_from_config, cache_to_config, load_cache, load_config, redact
    from .remote.client import SshCache
    from .remote.server import serve
    from .signing import SignatureError


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fleche_remote' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "AmbiguousDigestError",
    "BaseCache",
    "BulkHashUnavailable",
    "Cache",
    "CacheStack",
    "Call",
    "CallRecord",
    "ClaimWaitTimeout",
    "ConfigError",
    "CorruptEntryError",
    "Digest",
    "FlecheRemoteError",
    "IncompatibleProtocolError",
    "LazyCall",
    "ProtocolError",
    "RecursiveCallError",
    "Rejected",
    "RemoteConnectionError",
    "RemoteError",
    "SignatureError",
    "SshCache",
    "StorageError",
    "UnpicklableArgumentError",
    "UnstableDigestWarning",
    "WriteBehind",
    "__version__",
    "cache_from_config",
    "cache_to_config",
    "cached",
    "digest_of",
    "load_cache",
    "load_config",
    "redact",
    "serve",
]
