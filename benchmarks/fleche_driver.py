"""The ``fleche`` package's side of the remote benchmarks.

Runs under the side virtualenv's python (``benchmarks/setup_fleche.sh``),
never under ours: fleche is what we compare against, not a dependency.
It takes one JSON argument (host, ssh_options, python, workdir and the
pieces of work to do), drives ``fleche.remote.SshCache`` against the same
private sshd as our benchmarks, and prints one JSON line of timings in
seconds. A piece of work that fails reports ``{"error": "..."}`` and the
others still run, so that the table shows what broke instead of stopping.

Results are read as ``load(key).result``: fleche's ``load_value`` takes
the digest of a *value*, not a call's key. RPCs are counted by wrapping
the connection's ``call`` (fleche has no counter of its own).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List

import fleche
from fleche.caches import Cache, CacheStack
from fleche.call import Call
from fleche.remote import SshCache


def square(x: int) -> int:
    return x * x


class Counted:
    """A fleche SshCache whose RPCs are counted."""

    def __init__(self, spec: Dict[str, Any]) -> None:
        self.cache = SshCache(
            spec["host"],
            python=spec["python"],
            ssh_options=tuple(spec["ssh_options"]),
            workdir=spec["workdir"],
        )
        self.rpcs = 0
        conn = self.cache._conn
        inner = conn.call

        def call(method: str, *args: Any, **kwargs: Any) -> Any:
            self.rpcs += 1
            return inner(method, *args, **kwargs)

        conn.call = call  # type: ignore[method-assign]

    def close(self) -> None:
        self.cache.close()


def _contains(spec: Dict[str, Any], work: Dict[str, Any]) -> Dict[str, Any]:
    c = Counted(spec)
    try:
        key = c.cache.save(Call("bench.small", {"x": 1}, result=1.0))
        samples = []
        for _ in range(work["rounds"]):
            t0 = time.perf_counter()
            c.cache.contains(key)
            samples.append(time.perf_counter() - t0)
        return {"median": statistics.median(samples)}
    finally:
        c.close()


def _threads(spec: Dict[str, Any], work: Dict[str, Any]) -> Dict[str, Any]:
    c = Counted(spec)
    try:
        key = c.cache.save(Call("bench.small", {"x": 1}, result=1.0))
        n_threads, per = work["threads"], work["per_thread"]
        t0 = time.perf_counter()
        for _ in range(n_threads * per):
            c.cache.contains(key)
        serial = time.perf_counter() - t0

        def worker() -> None:
            for _ in range(per):
                c.cache.contains(key)

        threads = [threading.Thread(target=worker) for _ in range(n_threads)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return {"serial": serial, "threaded": time.perf_counter() - t0}
    finally:
        c.close()


def _small(spec: Dict[str, Any], work: Dict[str, Any]) -> Dict[str, Any]:
    """n small saves, then n loads of record and value (fleche has no batch
    forms, so each is a loop over single calls)."""
    c = Counted(spec)
    try:
        n, tag = work["n"], work.get("tag", "")
        calls = [Call("bench.small_many", {"i": i, "tag": tag}, result=[float(i)] * 10) for i in range(n)]
        c.cache.contains("0" * 64)  # connected
        before = c.rpcs
        t0 = time.perf_counter()
        keys = [c.cache.save(call) for call in calls]
        save = time.perf_counter() - t0
        save_rpcs = c.rpcs - before
        before = c.rpcs
        t0 = time.perf_counter()
        for i, key in enumerate(keys):
            assert c.cache.load(key).result == [float(i)] * 10
        load = time.perf_counter() - t0
        return {"save": save, "save_rpcs": save_rpcs, "load": load, "load_rpcs": c.rpcs - before}
    finally:
        c.close()


def _decorated(spec: Dict[str, Any], work: Dict[str, Any]) -> Dict[str, Any]:
    """n calls of a @fleche function whose results the remote already has,
    through a stack of an empty local file cache and the ssh cache."""
    n = work["n"]
    f = fleche.fleche(square)
    direct = Cache.from_config({"template": "cloudpickle", "root": str(Path(spec["workdir"]) / "store")})
    with fleche.cache(direct):
        for i in range(n):
            f(i)
    c = Counted(spec)
    with tempfile.TemporaryDirectory(prefix="fleche-bench-local-") as local_dir:
        local = Cache.from_config({"template": "cloudpickle", "root": local_dir})
        stack = CacheStack((local, c.cache))
        try:
            c.cache.contains("0" * 64)  # connected: the start-up is a row of its own
            before = c.rpcs
            with fleche.cache(stack):
                t0 = time.perf_counter()
                got = [f(i) for i in range(n)]
                took = time.perf_counter() - t0
            assert got == [square(i) for i in range(n)]
            return {"loop": took, "loop_rpcs": c.rpcs - before}
        finally:
            c.close()


def _first(spec: Dict[str, Any], work: Dict[str, Any]) -> Dict[str, Any]:
    c = Counted(spec)
    key = c.cache.save(Call("bench.small", {"x": 1}, result=1.0))
    c.close()
    samples = []
    for _ in range(work["starts"]):
        t0 = time.perf_counter()
        fresh = Counted(spec)
        # fleche's load_value takes a *value* digest; a call's result is load(key).result
        assert fresh.cache.load(key).result == 1.0
        samples.append(time.perf_counter() - t0)
        fresh.close()
    return {"median": statistics.median(samples)}


def _big(spec: Dict[str, Any], work: Dict[str, Any]) -> Dict[str, Any]:
    import numpy as np

    nbytes = work["mb"] << 20
    arr = np.random.default_rng(1).integers(0, 255, size=nbytes, dtype=np.uint8)
    c = Counted(spec)
    out: Dict[str, Any] = {}
    try:
        t0 = time.perf_counter()
        key = c.cache.save(Call("bench.big", {"mb": work["mb"]}, result=arr))
        out["save"] = time.perf_counter() - t0
        del arr
        t0 = time.perf_counter()
        back = c.cache.load(key).result
        out["load"] = time.perf_counter() - t0
        assert back.nbytes == nbytes
    except Exception as exc:  # the save time, if any, is still worth reporting
        out["error"] = _describe(exc)
    finally:
        c.close()
    return out


def _import(spec: Dict[str, Any], work: Dict[str, Any]) -> Dict[str, Any]:
    import subprocess

    def run(code: str) -> float:
        samples = []
        for _ in range(work.get("rounds", 5)):
            t0 = time.perf_counter()
            subprocess.run([spec["python"], "-c", code], check=True, capture_output=True, timeout=120)
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples)

    return {"bare": run("pass"), "server": run("import fleche.remote, fleche.config")}


WORK: Dict[str, Callable[[Dict[str, Any], Dict[str, Any]], Dict[str, Any]]] = {
    "contains": _contains,
    "threads": _threads,
    "small": _small,
    "decorated": _decorated,
    "first": _first,
    "big": _big,
    "import": _import,
}


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def main(argv: List[str]) -> int:
    spec = json.loads(argv[1])
    out: Dict[str, Any] = {"fleche_version": getattr(fleche, "__version__", "unknown")}
    for name, fn in WORK.items():
        if name not in spec:
            continue
        try:
            out[name] = fn(spec, spec[name])
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            out[name] = {"error": _describe(exc)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
