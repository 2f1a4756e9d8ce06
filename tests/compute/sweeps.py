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


from fleche_remote import cached  # noqa: E402
from fleche_remote.caches import Cache  # noqa: E402
from fleche_remote.storage.memory import MemoryCallStore, MemoryValueStore  # noqa: E402

#: A module-level cached function pickles by name, as an executor's
#: workers (dask) need.
DASK_CACHE = Cache(MemoryValueStore(), MemoryCallStore())


@cached(cache=DASK_CACHE)
def cube(x: int) -> int:
    return x**3


def counted(x: int) -> int:
    """Leaves a line per computation in the host's working directory."""
    time.sleep(0.3)
    with open("computed.log", "a") as fh:
        fh.write(f"{x}\n")
    return x
