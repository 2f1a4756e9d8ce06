"""Computing a sweep's misses in this process, or through a user's executor.

``f.map`` / ``f.starmap`` / ``f.map_kwargs`` hand their misses here when
they are not sent to a host (``on=``): serially in the calling thread, or
through any :class:`concurrent.futures.Executor` (threads, processes, a
dask cluster's ``get_executor()``). What each call returned is filed with
its wall time, so the caller can save the batch in one go.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple

from .. import claiming
from ..caches.base import BaseCache
from ..codec.digest import Digest
from ..results import find_stored

if TYPE_CHECKING:  # pragma: no cover
    from concurrent.futures import Executor

#: A miss as a sweep keeps it: positional and keyword arguments as given,
#: and the arguments as they enter the key.
Miss = Tuple[Tuple[Any, ...], Dict[str, Any], Dict[str, Any]]


def sweep_misses(
    function: Any,
    cache: BaseCache,
    todo: Dict[Any, Miss],
    executor: Optional[Executor],
    results: Dict[Any, Any],
    progress: Optional[bool] = None,
) -> None:
    """Compute a sweep's misses here, each once across processes: the
    misses are claimed as a batch (see :mod:`fleche_remote.claiming`);
    points held by others are waited for while this process computes its
    own. Results land in ``results`` and are saved in batches through
    ``function.save_batch``.

    Args:
        function: the ``CachedFunction`` (its ``name``, ``claims``,
            ``lease``, ``claim_timeout`` and ``save_batch``).
    """

    def look_up(keys: List[str]) -> List[str]:
        ready = [Digest(k) for k in keys]
        for key, lazy in zip(ready, find_stored(cache, ready, function.name)):
            if lazy is not None:
                results[key] = lazy.result
        return [k for k in ready if k not in results]

    def compute(keys: List[str]) -> None:
        batch = {Digest(k): todo[Digest(k)] for k in keys}
        _compute_batch(function, cache, batch, executor, results, progress)

    keeper = cache.claim_keeper() if function.claims else None
    claiming.compute_batch(
        keeper,
        list(todo),
        function.name,
        function.lease,
        function.claim_timeout,
        cache.contains_many,
        look_up,
        compute,
    )


def _compute_batch(
    function: Any,
    cache: BaseCache,
    todo: Mapping[Any, Miss],
    executor: Optional[Executor],
    results: Dict[Any, Any],
    progress: Optional[bool] = None,
) -> None:
    if not todo:
        return
    computed: Dict[Any, Tuple[Any, float]] = {}
    runner = with_bar(executor, progress, len(results) + len(todo), len(todo), function.name)
    try:
        compute_here(function, todo, runner, computed)
    finally:
        if runner is not executor:
            runner.shutdown()
        # saved even when a call failed or the sweep was interrupted:
        # a rerun then starts where this one stopped
        function.save_batch(cache, todo, computed)
    results.update((key, result) for key, (result, _) in computed.items())


def compute_here(
    function: Any,
    todo: Mapping[Any, Miss],
    executor: Optional[Executor],
    computed: Dict[Any, Tuple[Any, float]],
) -> None:
    """Run ``function`` (a ``CachedFunction``) for each miss in ``todo``,
    filing ``(result, wall_time)`` under its key in ``computed``.

    Results computed before a failure stay in ``computed`` (the caller
    saves them); the first failure in ``todo``'s order is raised once the
    calls already running have finished, and the ones not started are
    cancelled.
    """
    if executor is None:
        for key, (args, kwargs, _) in todo.items():
            with claiming.computing(function.name, [key]):
                computed[key] = run_timed(function, args, kwargs)
        return
    from concurrent.futures import CancelledError

    futures = {
        key: executor.submit(run_timed, function, args, kwargs) for key, (args, kwargs, _) in todo.items()
    }
    failure: Optional[BaseException] = None
    try:
        for key, future in futures.items():
            try:
                computed[key] = future.result()
            except Exception as exc:
                if failure is None:
                    failure = exc
                    for other in futures.values():
                        other.cancel()  # those not started; running ones finish and are kept
            except CancelledError:
                continue
    except BaseException:
        for other in futures.values():
            other.cancel()
        raise
    if failure is not None:
        raise failure


def with_bar(executor: Optional[Executor], progress: Optional[bool], total: int, todo: int, name: str) -> Any:
    """``executor``, counting finished calls on a bar when one is wanted."""
    from .. import progress as bars

    if not bars.wanted(progress):
        return executor
    from .bar import CountingExecutor

    return CountingExecutor(executor, total, total - todo, name.rsplit(".", 1)[-1])


def run_timed(function: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[Any, float]:
    """Run the bare function and time it; module-level, and given the
    wrapper (which pickles by name), so a process pool can run it."""
    start = time.perf_counter()
    result = function.func(*args, **kwargs)
    return result, time.perf_counter() - start
