"""Results that name a file on this machine.

A result that is (or plainly holds) a ``pathlib.Path`` means nothing on a
remote layer, which cannot read the file it names: ``@cached`` saves it to
local layers only (see :mod:`fleche_remote.cached`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Set

from .caches import BaseCache, CacheStack

log = logging.getLogger("fleche_remote.cached")


#: How far into tuples, lists and dicts a result is searched for a local
#: ``Path``, and the largest container searched: enough for ``(frame,
#: Path)`` or ``{"plot": Path}``, cheap for a list of a million floats.
PATH_SEARCH_DEPTH = 3
PATH_SEARCH_ITEMS = 1000

_warned_path_results: Set[str] = set()


def holds_local_path(value: Any, depth: int = 0) -> bool:
    """Whether a result is, or plainly holds, a ``pathlib.Path``: a name for
    a file on this machine, which a remote layer could not read back."""
    if isinstance(value, Path):
        return True
    if depth >= PATH_SEARCH_DEPTH:
        return False
    if type(value) in (tuple, list) and len(value) <= PATH_SEARCH_ITEMS:
        return any(holds_local_path(v, depth + 1) for v in value)
    if type(value) is dict and len(value) <= PATH_SEARCH_ITEMS:
        return any(holds_local_path(v, depth + 1) for v in value.values())
    return False


def local_target(cache: BaseCache) -> Optional[BaseCache]:
    """Where a result holding a local ``Path`` may be saved: ``cache`` when
    no remote layer would receive it; a stack's first layer, directly, when
    the stack would also push the save to a remote (write-behind); None when
    the save would go to a remote."""
    if cache.is_remote:
        return None
    if isinstance(cache, CacheStack):
        first = local_target(cache.layers[0])
        if first is None or any(w.layer.is_remote for w in cache.write_behind):
            return first
        return cache
    return cache


def path_result_skipped(name: str, cache: BaseCache) -> None:
    # logged, not raised: the caller still gets the result; once per function
    # as a warning, since the function now runs on every call
    level = logging.DEBUG if name in _warned_path_results else logging.WARNING
    _warned_path_results.add(name)
    log.log(
        level,
        "%s returned a local Path; not saving it to %r, whose remote layer could not read the file "
        "it names (return the file's content to cache it remotely)",
        name,
        cache,
    )
