"""The worker: where a sweep's points are unpickled and run.

``python -m fleche_remote.compute.worker task JOBDIR TASK`` runs one Slurm
array task's points; ``... local JOBDIR`` runs a whole sweep in a process
pool (:mod:`.local` starts it, detached). Either way each point is run,
its result saved into the host's cache under the laptop's key (the record
template the laptop built), and its state written to ``JOBDIR/state``.

This is the only code that unpickles what a client sent (the function and
the arguments), and it runs in processes of its own, never in the cache
server, which only moves those bytes.

The function: imported by name (the working directory first on
``sys.path``) when the host's copy has the laptop's code digest; else the
laptop's copy, unpickled from ``function.bin``; else, for a strict sweep,
every point fails with a :class:`~fleche_remote.errors.ComputeError`
naming the file that differs.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib
import json
import os
import pickle
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .code import function_digest, function_file, function_parts
from .jobs import DONE, FAILED, RUNNING, release_key, set_state
from .local import FINISHED


class Sweep:
    """A job directory, loaded: spec, points, function, and the cache."""

    def __init__(self, job_dir: Path) -> None:
        self.dir = job_dir
        self.spec: Dict[str, Any] = json.loads((job_dir / "job.json").read_bytes())
        with open(job_dir / "points.bin", "rb") as fh:
            self.points: List[Tuple[Any, bytes]] = pickle.load(fh)
        os.chdir(self.spec["cwd"])
        if self.spec["cwd"] not in sys.path:
            sys.path.insert(0, self.spec["cwd"])
        self.problem: Optional[str] = None
        self.func: Optional[Callable[..., Any]] = None
        try:
            self.func = self._function()
        except Exception as exc:
            self.problem = f"{type(exc).__name__}: {exc}"
            self.problem_tb = traceback.format_exc()
        self.cache = self._cache()

    def _function(self) -> Callable[..., Any]:
        about = self.spec["function"]
        mine = _import(about["module"], about["qualname"])
        if mine is not None and about.get("digest") and function_digest(mine) == about["digest"]:
            return mine
        if about.get("strict"):
            where = function_file(mine) if mine is not None else f"module {about['module']} (not importable)"
            ours = function_parts(mine) if mine is not None else None
            theirs = about.get("parts") or {}
            differ = sorted(
                p
                for p in set(theirs) | set(ours[1] if ours else {})
                if theirs.get(p) != (ours[1] if ours else {}).get(p)
            )
            if differ:
                where += f"; differing: {', '.join(differ[:8])}"
            raise CodeDiffers(
                f"{about['module']}.{about['qualname']} differs between the laptop and this host "
                f"({where} here, {about.get('file', '?')} on the laptop); the sweep is strict, so nothing "
                f"was computed: update the host's copy, or map without strict"
            )
        import cloudpickle

        return cloudpickle.loads((self.dir / "function.bin").read_bytes())  # type: ignore[no-any-return]

    def _cache(self) -> Any:
        from ..config import load_cache, load_config

        config = load_config(self.spec["config"]) if self.spec.get("config") else load_config()
        return load_cache(self.spec.get("cache"), config=config)

    def run(self, index: int) -> None:
        """Run one point and record what became of it; never raises."""
        key = self.spec["keys"][index]
        try:
            if self.func is None:
                raise CodeDiffers(self.problem or "the function could not be loaded")
            set_state(self.dir, index, RUNNING, pid=os.getpid())
            import cloudpickle

            from ..cached import _metadata
            from ..codec.values import blob_digest, encode_value

            template, packed = self.points[index]
            args, kwargs = cloudpickle.loads(packed)
            start = time.perf_counter()
            result = self.func(*args, **kwargs)
            wall = time.perf_counter() - start
            blob = encode_value(result)
            record = dataclasses.replace(
                template,
                value=str(blob_digest(blob)),
                value_kind=blob.kind,
                value_size=blob.size,
                metadata={
                    **_metadata(wall),
                    **dict(template.metadata),
                    "computed_by": "fleche-remote compute",
                },
            )
            self.cache.save_records([(record, blob)])
            set_state(self.dir, index, DONE)
        except BaseException as exc:  # the point's failure is its own; the others go on
            set_state(self.dir, index, FAILED, **describe(exc))
            if not isinstance(exc, Exception):
                raise
        finally:
            release_key(Path(self.spec["root"]), key, self.spec["job"])

    def run_many(self, indices: Sequence[int]) -> None:
        """Run points under the host store's claims: a point that a process
        on the cluster is already computing (a job calling ``f(x)``, another
        sweep's worker) is waited for and taken from the cache, not run
        twice; one whose holder died is taken over (see
        :mod:`fleche_remote.claiming`)."""
        from .. import claiming
        from ..storage.claims import DEFAULT_LEASE

        by_key = {self.spec["keys"][i]: i for i in indices}

        def lookup(keys: List[str]) -> List[str]:
            missing = []
            for key, present in zip(keys, self.cache.contains_many(keys)):
                if present:  # its holder saved it
                    set_state(self.dir, by_key[key], DONE, by="another holder")
                    release_key(Path(self.spec["root"]), key, self.spec["job"])
                else:
                    missing.append(key)
            return missing

        def compute(keys: List[str]) -> None:
            for key in keys:
                self.run(by_key[key])

        try:
            keeper = self.cache.claim_keeper()
        except Exception:
            keeper = None
        name = self.spec["name"]
        claiming.compute_batch(
            keeper, list(by_key), name, DEFAULT_LEASE, None, self.cache.contains_many, lookup, compute
        )


class CodeDiffers(Exception):
    """The host's copy of the function is not the laptop's (strict sweeps)."""


def _import(module: str, qualname: str) -> Optional[Callable[..., Any]]:
    """The bare function at ``module.qualname`` here, or None."""
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except Exception:
        return None
    inner = getattr(obj, "func", None)  # a @cached wrapper: run what it wraps
    return inner if callable(inner) and hasattr(obj, "name") else obj if callable(obj) else None


def describe(exc: BaseException) -> Dict[str, Any]:
    """A failure as JSON: type, message, traceback, and the exception
    itself pickled when it can be (so the laptop raises the same type)."""
    cls = type(exc)
    name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    if isinstance(exc, CodeDiffers):
        name = "fleche_remote.errors.ComputeError"
    info: Dict[str, Any] = {
        "type": name,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(cls, exc, exc.__traceback__)),
    }
    if not isinstance(exc, CodeDiffers):
        try:
            import cloudpickle

            info["pickled"] = base64.b64encode(cloudpickle.dumps(exc, protocol=4)).decode("ascii")
        except Exception:
            pass
    return info


def run_task(job_dir: Path, task: int) -> None:
    sweep = Sweep(job_dir)
    per = sweep.spec["per_task"]
    sweep.run_many(range(task * per, min((task + 1) * per, sweep.spec["count"])))


_SWEEP: Optional[Sweep] = None


def _pool_init(job_dir: str) -> None:
    global _SWEEP
    _SWEEP = Sweep(Path(job_dir))


def _pool_run(indices: Sequence[int]) -> None:
    assert _SWEEP is not None
    _SWEEP.run_many(indices)


def run_local(job_dir: Path) -> None:
    """The whole sweep in a pool of ``workers`` processes, a few points at
    a time (one 1 ms point per inter-process message would cost more than
    the point)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    spec = json.loads((job_dir / "job.json").read_bytes())
    count = spec["count"]
    workers = max(1, min(int(spec.get("workers") or 1), count))
    batch = max(1, min(16, count // (workers * 4)))
    batches = [list(range(i, min(i + batch, count))) for i in range(0, count, batch)]
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_pool_init, initargs=(str(job_dir),)
    ) as pool:
        for _ in pool.map(_pool_run, batches):
            pass
    (job_dir / FINISHED).write_text("")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``worker task JOBDIR TASK`` or ``worker local JOBDIR``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 3 and args[0] == "task":
        run_task(Path(args[1]), int(args[2]))
        return 0
    if len(args) == 2 and args[0] == "local":
        run_local(Path(args[1]))
        return 0
    print("usage: python -m fleche_remote.compute.worker (task JOBDIR TASK | local JOBDIR)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
