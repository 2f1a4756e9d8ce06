"""What code in the key costs: the added time per hit on a warm process, and
the one-time digest at first use.

A hit of ``@cached`` (code hashed, the default) is timed against the same
function with ``hash_code=False``, on a memory cache so that nothing but
the key differs; rounds alternate between the two, best of ``ROUNDS``.
"""

from __future__ import annotations

import platform
import sys
import time

from fleche_remote import cached
from fleche_remote.caches import Cache
from fleche_remote.codec.code import code_digest
from fleche_remote.storage.memory import MemoryCallStore, MemoryValueStore

HITS = 20_000
ROUNDS = 7
SCALE = 3


def helper(x: int) -> int:
    return x * SCALE


def body(x: int) -> int:
    return helper(x) + 1


def main() -> None:
    store = Cache(MemoryValueStore(), MemoryCallStore())
    hashed = cached(cache=store)(body)
    plain = cached(cache=store, hash_code=False)(body)
    start = time.perf_counter()
    digest = code_digest(body)
    first_use = time.perf_counter() - start
    hashed(1), plain(1)  # warm: digest computed, result stored
    best = {"hashed": float("inf"), "plain": float("inf")}
    for _ in range(ROUNDS):
        for label, f in (("hashed", hashed), ("plain", plain)):
            start = time.perf_counter()
            for _ in range(HITS):
                f(1)
            best[label] = min(best[label], (time.perf_counter() - start) / HITS)
    print(f"python {platform.python_version()} on {platform.platform()}; {HITS} hits, best of {ROUNDS}")
    print(f"code digest at first use: {first_use * 1e3:.2f} ms ({len(digest.parts)} parts)")
    print(f"hit, hash_code=False: {best['plain'] * 1e6:.2f} us")
    print(f"hit, code in the key: {best['hashed'] * 1e6:.2f} us")
    print(f"added per hit: {(best['hashed'] - best['plain']) * 1e6:+.2f} us")


if __name__ == "__main__":
    sys.exit(main())
