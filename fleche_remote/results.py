"""How ``@cached`` reads and writes results through a cache without ever
costing the caller a computed result.

* A batch lookup that meets a corrupt stored entry looks the batch up one
  by one, so one bad entry is recomputed, not the whole sweep.
* A save that fails (a refusal, a full disk, a result that cannot be
  pickled) is logged, never raised; a batch that fails is saved one by
  one, so one bad result does not cost the others their save.
* A result that is (or plainly holds) a ``pathlib.Path`` names a file on
  this machine, which a remote layer could not read: it is saved to local
  layers only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, List, Optional, Sequence, Set

from .caches import BaseCache, CacheStack
from .call import Call, LazyCall
from .errors import CorruptEntryError, Rejected

log = logging.getLogger("fleche_remote.cached")


def find_stored(cache: BaseCache, keys: Sequence[str], name: str) -> List[Optional[LazyCall]]:
    """Stored calls with their results for ``keys`` (one round trip), None
    where absent or corrupt (logged: the caller recomputes it)."""
    try:
        return cache.load_many(keys, results=True)
    except CorruptEntryError as exc:
        log.warning("%s: a stored result in the batch is corrupt (%s); looking up one by one", name, exc)
    found: List[Optional[LazyCall]] = []
    for key in keys:
        try:
            found.extend(cache.load_many([key], results=True))
        except CorruptEntryError as exc:
            log.warning("stored result of %s (key %s) is corrupt, recomputing: %s", name, key[:12], exc)
            found.append(None)
    return found


def save_results(cache: BaseCache, calls: List[Call], name: str) -> None:
    """Save a sweep's new calls in one batch where it may go (results with
    a local ``Path`` into a local layer only)."""
    if not calls:
        return
    if cache.read_only:
        log.debug("%s: cache %r is read-only; %d results not saved", name, cache, len(calls))
        return
    with_paths: List[Call] = []
    elsewhere: List[Call] = []
    for call in calls:  # one look into each result: it may be a big container
        (with_paths if holds_local_path(call.result) else elsewhere).append(call)
    calls = elsewhere
    if with_paths:
        target = local_target(cache)
        if target is None:
            path_result_skipped(name, cache)
        else:
            _save_into(target, with_paths, name)
    _save_into(cache, calls, name)


def save_result(cache: BaseCache, call: Call, key: str) -> None:
    """Save one new call where it may go; a failure is logged, not raised."""
    name = call.name
    if cache.read_only:
        log.debug("%s: cache %r is read-only; result of key %s not saved", name, cache, key[:12])
        return
    target = cache
    if holds_local_path(call.result):
        local = local_target(cache)
        if local is None:
            path_result_skipped(name, cache)
            return
        target = local
    try:
        target.save(call)
    except Rejected as exc:
        log.debug("%s: cache refused key %s: %s", name, key[:12], exc)
    except Exception:
        # the caller asked for a result, not for a save: a full disk or a
        # result that cannot be pickled must not throw the result away
        log.warning("%s: could not save the result of key %s", name, key[:12], exc_info=True)


def _save_into(cache: BaseCache, calls: List[Call], name: str) -> None:
    if not calls:
        return
    try:
        cache.save_many(calls)
        return
    except Rejected as exc:
        log.debug("%s: cache refused %d results: %s", name, len(calls), exc)
        return
    except Exception:
        log.debug(
            "%s: saving %d results in one batch failed; saving one by one", name, len(calls), exc_info=True
        )
    # one unpicklable result must not cost the others their save
    failed = 0
    first: Optional[BaseException] = None
    for call in calls:
        try:
            cache.save(call)
        except Exception as exc:
            failed += 1
            first = first or exc
    if failed:
        log.warning("%s: could not save %d of %d results", name, failed, len(calls), exc_info=first)


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
