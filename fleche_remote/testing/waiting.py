"""Waiting for something to become true, with a deadline.

Tests of background work (a pusher thread, a server that exits after its
client died, a file that appears) must wait for an event, never sleep a
guessed time: a guess is either slow or flaky on a loaded machine. This
polls the condition often and fails with a message naming what did not
happen, after a deadline generous enough for a busy CI runner.
"""

from __future__ import annotations

import time
from typing import Any, Callable

#: Generous: the machine running the tests may be loaded.
DEFAULT_DEADLINE_S = 30.0

#: Between polls: short enough that a test waits barely longer than the
#: event takes, long enough not to compete with it for the CPU.
POLL_INTERVAL_S = 0.01

__all__ = ["DEFAULT_DEADLINE_S", "wait_until"]


def wait_until(
    condition: Callable[[], Any],
    what: str,
    deadline_s: float = DEFAULT_DEADLINE_S,
    *,
    interval_s: float = POLL_INTERVAL_S,
) -> float:
    """Poll ``condition()`` until it is true; the seconds that took.

    Raises AssertionError (so a test fails, naming ``what``) when it is
    still false after ``deadline_s`` seconds.
    """
    start = time.monotonic()
    while not condition():
        waited = time.monotonic() - start
        if waited > deadline_s:
            raise AssertionError(f"waited {deadline_s:g} s for {what}, and it did not happen")
        time.sleep(interval_s)
    return time.monotonic() - start
