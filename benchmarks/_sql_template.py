"""The ``sql`` template against diskcache, call for call (run by bench_local.py).

What a user of ``template = "sql"`` does, next to what a diskcache user
does: ``cache.save(Call(...))`` against ``Cache.set``, then, through a
fresh object on the same storage, ``cache.load(key).result`` against
``Cache.get``, for ``n`` small results (a list of ten floats each). The two
run in turn, fresh storage each round, the order reversed every other
round; each keeps its best round. Opening the cache is outside the timed
loop here (the table's "file+sqlite" row times it inside, with
``load_value``): this is the per-call cost.
"""

from __future__ import annotations

import gc
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

from fleche_remote import Call
from fleche_remote.config import cache_from_config


def _small(i: int) -> List[float]:
    return [float(i + j) / 7 for j in range(10)]


def _ours(root: Path, n: int) -> Tuple[float, float]:
    cache = cache_from_config({"template": "sql", "root": str(root)})
    cache.contains("0" * 64)  # opened: the database and its tables exist
    calls = [Call("bench.small", {"i": i}, _small(i)) for i in range(n)]
    t0 = time.perf_counter()
    keys = [cache.save(c) for c in calls]
    save = time.perf_counter() - t0
    cache.close()
    cache = cache_from_config({"template": "sql", "root": str(root)})
    cache.contains("0" * 64)
    t0 = time.perf_counter()
    got = [cache.load(k).result for k in keys]
    load = time.perf_counter() - t0
    cache.close()
    if got != [_small(i) for i in range(n)]:
        raise RuntimeError("the sql template loaded something else than it saved")
    return save, load


def _diskcache(root: Path, n: int) -> Tuple[float, float]:
    import diskcache

    keys = [("bench.small", i) for i in range(n)]
    values = [_small(i) for i in range(n)]
    with diskcache.Cache(str(root)) as cache:
        t0 = time.perf_counter()
        for k, v in zip(keys, values):
            cache.set(k, v)
        save = time.perf_counter() - t0
    with diskcache.Cache(str(root)) as cache:
        t0 = time.perf_counter()
        got = [cache.get(k) for k in keys]
        load = time.perf_counter() - t0
    if got != values:
        raise RuntimeError("diskcache loaded something else than it saved")
    return save, load


def compare(base: Path, n: int, repeat: int) -> Dict[str, Tuple[float, float]]:
    """Best (save, load) seconds for ``n`` calls, per subject."""
    subjects: List[Tuple[str, Callable[[Path, int], Tuple[float, float]]]] = [
        ("sql template", _ours),
        ("diskcache", _diskcache),
    ]
    best: Dict[str, Tuple[float, float]] = {}
    for rep in range(repeat):
        for name, run in subjects if rep % 2 == 0 else subjects[::-1]:
            root = base / f"template-{name.replace(' ', '_')}-{rep}"
            gc.collect()
            save, load = run(root, n)
            shutil.rmtree(root, ignore_errors=True)
            old = best.get(name, (float("inf"), float("inf")))
            best[name] = (min(old[0], save), min(old[1], load))
    return best


def report(best: Dict[str, Tuple[float, float]], n: int, table: Callable[..., Any]) -> str:
    ours, theirs = best["sql template"], best["diskcache"]
    rows = [
        [f"{what}", f"{o / n * 1e6:.1f}", f"{t / n * 1e6:.1f}", f"{t / o:.2f}"]
        for what, o, t in (
            ("save(Call) vs set", ours[0], theirs[0]),
            ("load(key).result vs get", ours[1], theirs[1]),
        )
    ]
    return table(["operation", "sql template µs", "diskcache µs", "ours / theirs (>1: faster)"], rows)
