"""Computing a sweep's misses in this process, or through a user's executor.

``f.map`` / ``f.starmap`` / ``f.map_kwargs`` hand their misses here when
they are not sent to a host (``on=``): serially in the calling thread, or
through any :class:`concurrent.futures.Executor` (threads, processes, a
dask cluster's ``get_executor()``). What each call returned is filed with
its wall time, so the caller can save the batch in one go.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Tuple

from .. import claiming

if TYPE_CHECKING:  # pragma: no cover
    from concurrent.futures import Executor

#: A miss as a sweep keeps it: positional and keyword arguments as given,
#: and the arguments as they enter the key.
Miss = Tuple[Tuple[Any, ...], Dict[str, Any], Dict[str, Any]]


def compute_here(
    function: Any,
    name: str,
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
            with claiming.computing(name, [key]):
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
