"""A bar for sweeps computed on this machine (``f.map(..., progress=True)``).

:class:`CountingExecutor` stands in front of the sweep's executor (or of
none: then each call runs when its result is asked for, in order, as the
plain loop does, so a failure still stops the calls after it) and moves a
tqdm bar on stderr as calls finish.
"""

from __future__ import annotations

import sys
import threading
from concurrent.futures import Executor, Future
from typing import Any, Callable, Optional


class _LazyFuture(Future):  # type: ignore[type-arg]
    """A call run in the thread that first asks for its result."""

    def __init__(self, fn: Callable[..., Any], args: Any, kwargs: Any) -> None:
        super().__init__()
        self._call = (fn, args, kwargs)

    def result(self, timeout: Optional[float] = None) -> Any:
        if not self.done() and self.set_running_or_notify_cancel():
            fn, args, kwargs = self._call
            try:
                self.set_result(fn(*args, **kwargs))
            except BaseException as exc:
                self.set_exception(exc)
        return super().result(timeout)


class CountingExecutor(Executor):
    """``inner`` (or in-order, lazy calls) with a bar of finished calls."""

    def __init__(self, inner: Optional[Executor], total: int, found: int, name: str) -> None:
        from tqdm import tqdm

        self.inner = inner
        self.lock = threading.Lock()
        self.failed = 0
        self.bar = tqdm(total=total, initial=found, desc=name, unit="call", file=sys.stderr, leave=True)
        self.bar.set_postfix(found=found, refresh=False)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:  # type: ignore[type-arg, override]
        future = (
            _LazyFuture(fn, args, kwargs) if self.inner is None else self.inner.submit(fn, *args, **kwargs)
        )
        future.add_done_callback(self._finished)
        return future

    def _finished(self, future: Future) -> None:  # type: ignore[type-arg]
        with self.lock:
            if future.cancelled() or future.exception() is not None:
                self.failed += 1
                self.bar.set_postfix(failed=self.failed, refresh=False)
            self.bar.update(1)
            if self.bar.n >= self.bar.total:
                self.bar.close()

    def shutdown(self, wait: bool = True, **kwargs: Any) -> None:
        self.bar.close()
