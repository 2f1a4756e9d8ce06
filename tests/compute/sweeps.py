"""Functions the compute tests sweep (pickled by value to the host)."""

from __future__ import annotations

import os
import time


class BadPoint(ValueError):
    """A failure of the function's own, which must come back as itself."""


def square(x: int) -> dict:
    if x == 13:
        raise BadPoint(f"13 is unlucky (pid {os.getpid()})")
    return {"x": x, "square": x * x, "pid": os.getpid(), "host_cwd": os.getcwd()}


def slow(x: int) -> int:
    time.sleep(x)
    return x
