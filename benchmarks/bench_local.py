"""How fast are the local backends, next to diskcache and joblib.Memory?

Everything is measured in one run, on one machine and one temp directory,
so the ratios compare like with like. For every subject (each
fleche-remote backend, and diskcache / joblib as baselines when they are
importable) and every repeat, on fresh storage:

1. small save: ``--small`` distinct calls, each returning a list of ten
   floats, saved one by one (``cache.save(Call(...))``; diskcache
   ``set``; joblib: the first call of a ``memory.cache``-d function);
   the files the subject then has on disk are counted (``file+sqlite`` and
   ``file+postgres`` keep small values inline in their database);
2. small load: a *fresh* cache object on the same storage loads every
   result (``cache.load_value(key)``; diskcache ``get``; joblib: the same
   calls through a fresh ``Memory``, checked not to recompute);
3. big save: one float64 array of ``--big-mb`` MB (random, so
   incompressible), saved once through a fresh cache object;
4. big load: loaded once through another fresh cache object.

Each phase keeps the best (shortest) of ``--repeat`` rounds; the rounds
run every subject in turn, so drift in the machine is shared out rather
than pinned on one subject (see :func:`run_all`). Dirty pages are flushed
before each repeat, untimed. Opening the fresh cache object is inside the
timed region, as it is for a user. Loads follow the writes directly, so
they are served from the OS page cache, for every subject alike: they
measure the software, not the disk (dropping the page cache would need
root and disturb the machine).

Progress goes to stderr with wall and CPU seconds per phase; the report
(Markdown tables, pasted into benchmarks/README.md) goes to stdout.

Run: ``.venv/bin/python benchmarks/bench_local.py [--small 1000] [--big-mb 100]
[--backends file hdf5 diskcache ...] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib
import os
import platform
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

import fleche_remote
from fleche_remote import BaseCache, Cache, Call

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _sql_template

OURS = ("memory", "file", "file-gz", "file+sqlite", "file+postgres", "hdf5")
BASELINES = ("diskcache", "joblib")
PHASES = ("small_save", "small_load", "big_save", "big_load")

#: Length of each small result. Ten floats pickle to ~120 bytes: small
#: enough that per-call overhead, not bytes, decides the rate.
SMALL_LEN = 10


def small_result(i: int) -> List[float]:
    """Distinct per ``i``, so content addressing cannot share values."""
    return [i + k / SMALL_LEN for k in range(SMALL_LEN)]


# -- joblib needs module-level functions; the counter proves loads don't recompute

_JOBLIB_COMPUTED = [0]
_BIG: List[np.ndarray] = []


def joblib_small(i: int) -> List[float]:
    _JOBLIB_COMPUTED[0] += 1
    return small_result(i)


def joblib_big(r: int) -> np.ndarray:
    _JOBLIB_COMPUTED[0] += 1
    return _BIG[0]


# -- subjects: one class per kind of cache, four phases each -------------------


class Subject:
    """One cache under test; ``setup`` points it at fresh storage."""

    def setup(self, workdir: Path) -> None:
        raise NotImplementedError

    def save_small(self, n: int) -> List[Any]:
        raise NotImplementedError

    def load_small(self, keys: List[Any]) -> List[Any]:
        raise NotImplementedError

    def save_big(self, arr: np.ndarray) -> Any:
        raise NotImplementedError

    def load_big(self, key: Any) -> np.ndarray:
        raise NotImplementedError

    def teardown(self) -> None:
        """Release whatever ``setup`` opened (not timed)."""


class FlecheSubject(Subject):
    """A :class:`Cache` on backend ``name``; each phase opens fresh store
    objects on the same storage, as a new process would."""

    def __init__(self, name: str, postgres: Any = None) -> None:
        # import what the backend needs now, so a missing extra skips it cleanly
        if name not in OURS:
            raise ValueError(name)
        if name in ("file+sqlite", "file+postgres"):
            importlib.import_module("fleche_remote.storage.sql.stores")
        elif name == "hdf5":
            importlib.import_module("fleche_remote.storage.hdf5")
        self.name = name
        self.postgres = postgres
        self.dir = Path()
        self.url = ""
        self.memory: Tuple[Any, Any] = (None, None)

    def setup(self, workdir: Path) -> None:
        from fleche_remote.storage.memory import MemoryCallStore, MemoryValueStore

        self.dir = workdir
        if self.name == "file+sqlite":
            self.url = f"sqlite:///{workdir / 'calls.db'}"
        elif self.name == "file+postgres":
            self.url = self.postgres.new_database()  # one per repeat: fresh storage
        elif self.name == "memory":
            # the same store objects throughout: memory has no other "storage"
            self.memory = (MemoryValueStore(), MemoryCallStore())

    def _cache(self) -> Cache:
        from fleche_remote.storage.file import FileCallStore, FileValueStore

        d = self.dir
        if self.name == "memory":
            return Cache(*self.memory)
        if self.name == "file":
            return Cache(FileValueStore(d / "values"), FileCallStore(d / "calls"))
        if self.name == "file-gz":
            return Cache(
                FileValueStore(d / "values", compress=True), FileCallStore(d / "calls", compress=True)
            )
        if self.name == "hdf5":
            from fleche_remote.storage.hdf5 import Hdf5CallStore, Hdf5ValueStore

            # two files, as the "hdf5" template lays them out
            return Cache(Hdf5ValueStore(d / "values.h5"), Hdf5CallStore(d / "calls.h5"))
        from fleche_remote.storage.sql.stores import SqlCallStore

        return Cache(FileValueStore(d / "values"), SqlCallStore(self.url))

    def save_small(self, n: int) -> List[Any]:
        with self._cache() as cache:
            return [str(cache.save(Call("bench.small", {"i": i}, small_result(i)))) for i in range(n)]

    def load_small(self, keys: List[Any]) -> List[Any]:
        with self._cache() as cache:
            return [cache.load_value(k) for k in keys]

    def save_big(self, arr: np.ndarray) -> Any:
        with self._cache() as cache:
            return str(cache.save(Call("bench.big", {"mb": arr.nbytes}, arr)))

    def load_big(self, key: Any) -> np.ndarray:
        with self._cache() as cache:
            return cache.load_value(key)

    def teardown(self) -> None:
        self.memory = (None, None)


class DiskcacheSubject(Subject):
    def __init__(self) -> None:
        import diskcache

        self.diskcache = diskcache
        self.dir: Optional[Path] = None

    def setup(self, workdir: Path) -> None:
        self.dir = workdir

    def save_small(self, n: int) -> List[Any]:
        keys = [("bench.small", i) for i in range(n)]
        with self.diskcache.Cache(str(self.dir)) as cache:
            for key in keys:
                cache.set(key, small_result(key[1]))
        return keys

    def load_small(self, keys: List[Any]) -> List[Any]:
        with self.diskcache.Cache(str(self.dir)) as cache:
            return [cache.get(k) for k in keys]

    def save_big(self, arr: np.ndarray) -> Any:
        with self.diskcache.Cache(str(self.dir)) as cache:
            cache.set(("bench.big", arr.nbytes), arr)
        return ("bench.big", arr.nbytes)

    def load_big(self, key: Any) -> np.ndarray:
        with self.diskcache.Cache(str(self.dir)) as cache:
            return cache.get(key)


class JoblibSubject(Subject):
    def __init__(self) -> None:
        import joblib

        self.joblib = joblib
        self.dir: Optional[Path] = None

    def setup(self, workdir: Path) -> None:
        self.dir = workdir

    def _memory(self) -> Any:
        return self.joblib.Memory(location=str(self.dir), verbose=0)

    def save_small(self, n: int) -> List[Any]:
        f = self._memory().cache(joblib_small)
        for i in range(n):
            f(i)
        return list(range(n))

    def load_small(self, keys: List[Any]) -> List[Any]:
        f = self._memory().cache(joblib_small)
        before = _JOBLIB_COMPUTED[0]
        out = [f(i) for i in keys]
        if _JOBLIB_COMPUTED[0] != before:
            raise RuntimeError(f"joblib recomputed {_JOBLIB_COMPUTED[0] - before} small calls")
        return out

    def save_big(self, arr: np.ndarray) -> Any:
        _BIG[:] = [arr]
        self._memory().cache(joblib_big)(0)
        return 0

    def load_big(self, key: Any) -> np.ndarray:
        before = _JOBLIB_COMPUTED[0]
        out = self._memory().cache(joblib_big)(key)
        if _JOBLIB_COMPUTED[0] != before:
            raise RuntimeError("joblib recomputed the big call instead of loading it")
        return out

    def teardown(self) -> None:
        _BIG.clear()


# -- measuring ------------------------------------------------------------------


@dataclass
class Outcome:
    name: str
    best: Dict[str, float] = field(default_factory=dict)  # phase -> seconds
    files: int = 0  # files on disk after the small saves (most seen)
    error: Optional[str] = None


def timed(fn: Callable[[], Any]) -> Tuple[Any, float, float]:
    """``fn()``, its wall-clock seconds, and this process's CPU seconds."""
    gc.collect()  # don't bill one subject for another's garbage
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def quiesce() -> None:
    """Flush dirty pages left by the previous run (not timed), so that one
    subject's write-back does not land in the next subject's timings."""
    if hasattr(os, "sync"):
        os.sync()


def prefault(nbytes: int) -> None:
    """Touch and free ``nbytes`` of memory once, before anything is timed.

    On a VM (this was written on a Firecracker guest) faulting in fresh
    memory can cost ~10x what it does on bare metal (0.25 s of system time
    for 100 MB, against 0.01 s for reused pages), so the first subject to
    allocate big arrays would pay for the VM alone. This evens out the
    start; it does not remove the effect, which still hits whichever load
    needs the most fresh memory (see README.md).
    """
    np.ones(nbytes // 8).sum()


def run_once(outcome: Outcome, subject: Subject, workdir: Path, n: int, big: np.ndarray, label: str) -> None:
    """One repeat of the four phases on fresh storage; keeps the best times
    in ``outcome``, or sets ``outcome.error``."""
    expected_small = [small_result(i) for i in range(n)]
    workdir.mkdir()
    quiesce()
    try:
        subject.setup(workdir)
        keys, t_ss, c_ss = timed(functools.partial(subject.save_small, n))
        outcome.files = max(outcome.files, sum(len(files) for _, _, files in os.walk(workdir)))
        loaded, t_sl, c_sl = timed(functools.partial(subject.load_small, keys))
        if loaded != expected_small:
            bad = next(i for i, (a, b) in enumerate(zip(loaded, expected_small)) if a != b)
            raise RuntimeError(f"small result {bad} loaded as {loaded[bad]!r}")
        del loaded
        key, t_bs, c_bs = timed(functools.partial(subject.save_big, big))
        arr, t_bl, c_bl = timed(functools.partial(subject.load_big, key))
        if not (isinstance(arr, np.ndarray) and arr.dtype == big.dtype and np.array_equal(arr, big)):
            raise RuntimeError(f"big result loaded as {type(arr).__name__} {getattr(arr, 'shape', '')}")
        del arr
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        outcome.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
        return
    finally:
        subject.teardown()
        shutil.rmtree(workdir, ignore_errors=True)
    for phase, t in zip(PHASES, (t_ss, t_sl, t_bs, t_bl)):
        outcome.best[phase] = min(t, outcome.best.get(phase, float("inf")))
    print(
        f"  {outcome.name:<14} {label}, wall (cpu) s: small save {t_ss:.2f} ({c_ss:.2f}),"
        f" load {t_sl:.2f} ({c_sl:.2f}); big save {t_bs:.2f} ({c_bs:.2f}), load {t_bl:.2f} ({c_bl:.2f})",
        file=sys.stderr,
        flush=True,
    )


def run_all(
    subjects: Sequence[Tuple[str, Subject]], base: Path, n: int, big: np.ndarray, repeat: int
) -> Dict[str, Outcome]:
    """Every subject ``repeat`` times, interleaved.

    Round-robin, reversing the order every other round: the cost of
    creating a file on the VM this was written on drifted by 5x within
    minutes, and running each subject's repeats back to back let that
    drift decide the ranking. Interleaving spreads it over all subjects.
    """
    outcomes = {name: Outcome(name) for name, _ in subjects}
    for rep in range(repeat):
        order = subjects if rep % 2 == 0 else list(reversed(subjects))
        for name, subject in order:
            if outcomes[name].error is None:
                workdir = base / f"{name.replace('+', '_')}-{rep}"
                run_once(outcomes[name], subject, workdir, n, big, f"round {rep + 1}/{repeat}")
    return outcomes


def server_batches(
    subjects: Sequence[Tuple[str, Subject]], base: Path, n: int, repeat: int
) -> Dict[str, Tuple[float, float]]:
    """What a server's storage does for one batch of ``n`` small entries:
    ``Cache.save_records`` of records and blobs already made (as they arrive
    from a client), and ``Cache.load_entries`` with every body read. Best
    of ``repeat``, seconds, on fresh storage each time."""
    from fleche_remote.call import make_record
    from fleche_remote.codec.values import blob_digest, encode_value

    best: Dict[str, Tuple[float, float]] = {}
    for name, subject in subjects:
        if not isinstance(subject, FlecheSubject):
            continue
        for rep in range(repeat):
            workdir = base / f"batch-{name.replace('+', '_')}-{rep}"
            workdir.mkdir()
            try:
                subject.setup(workdir)
                items = []
                for i in range(n):
                    call = Call("bench.batch", {"i": i}, small_result(i))
                    blob = encode_value(call.result)
                    items.append((make_record(call, blob, blob_digest(blob)), blob))
                keys = [record.key for record, _ in items]
                with subject._cache() as cache:
                    cache.contains(keys[0])  # connect and create tables outside the timing
                    _, t_save, _ = timed(functools.partial(cache.save_records, items))
                    entries, t_load, _ = timed(functools.partial(_read_entries, cache, keys))
                if len(entries) != n:
                    raise RuntimeError(f"load_entries gave {len(entries)} entries, expected {n}")
                old = best.get(name, (float("inf"), float("inf")))
                best[name] = (min(old[0], t_save), min(old[1], t_load))
            finally:
                subject.teardown()
                shutil.rmtree(workdir, ignore_errors=True)
    return best


def _read_entries(cache: BaseCache, keys: List[str]) -> List[Any]:
    """Every entry with its whole body, as a server streams them out."""
    out = []
    for entry in cache.load_entries(keys):
        if entry is None:
            raise RuntimeError("an entry saved in the batch is missing")
        out.append((entry[0], entry[1].read_all()))
    return out


def rates(outcome: Outcome, n: int, mb: float) -> Dict[str, float]:
    """Phase -> calls/s (small) or MB/s (big); higher is better."""
    work = {"small_save": n, "small_load": n, "big_save": mb, "big_load": mb}
    return {p: work[p] / t for p, t in outcome.best.items()}


# -- reporting ------------------------------------------------------------------


def fmt_rate(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def fmt_ratio(ours: Optional[float], theirs: Optional[float]) -> str:
    if ours is None or theirs is None:
        return "n/a"
    return f"{ours / theirs:.2f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table: first column left-aligned, numbers right-aligned."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        padded = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "| " + " | ".join(padded) + " |"

    sep = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def fs_type(path: Path) -> str:
    """The file system holding ``path`` (Linux /proc/mounts), e.g. ext4 or tmpfs."""
    try:
        mounts = [line.split()[1:3] for line in open("/proc/mounts")]
    except OSError:
        return "unknown"
    real = os.path.realpath(path)
    best = max(
        (m for m in mounts if real == m[0] or real.startswith(m[0].rstrip("/") + "/")),
        key=lambda m: len(m[0]),
        default=None,
    )
    return f"{best[1]} (mounted on {best[0]})" if best else "unknown"


def load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "?"


def versions(postgres: Any) -> List[str]:
    def ver(mod: str) -> str:
        try:
            m = __import__(mod)
        except ImportError:
            return "not installed"
        return str(getattr(m, "__version__", "?"))

    try:
        commit = subprocess.run(
            ["git", "-C", str(Path(fleche_remote.__file__).parent), "describe", "--always", "--dirty"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip() or "?"  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    out = [
        f"python {platform.python_version()} ({platform.python_implementation()}) on "
        f"{platform.platform()}, {os.cpu_count()} cpus",
        f"fleche_remote {fleche_remote.__version__} (git {commit})",
        f"numpy {np.__version__}, cloudpickle {ver('cloudpickle')}, h5py {ver('h5py')}"
        + (f" (HDF5 {__import__('h5py').version.hdf5_version})" if ver("h5py")[0].isdigit() else ""),
        f"sqlalchemy {ver('sqlalchemy')}, psycopg {ver('psycopg')}, sqlite {sqlite3.sqlite_version}",
        f"diskcache {ver('diskcache')}, joblib {ver('joblib')}",
    ]
    if postgres is not None:
        out.append(f"postgresql {postgres_version(postgres)} (private, fsync off, 127.0.0.1)")
    return out


def postgres_version(postgres: Any) -> str:
    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(postgres.url)
        try:
            with engine.connect() as conn:
                return str(conn.execute(sqlalchemy.text("SHOW server_version")).scalar())
        finally:
            engine.dispose()
    except Exception as exc:  # a version string is not worth failing the run for
        return f"? ({type(exc).__name__})"


# -- main -----------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--small", type=int, default=1000, metavar="N", help="small calls per repeat (default 1000)"
    )
    p.add_argument(
        "--big-mb", type=float, default=100.0, help="big array size, MB of 10^6 bytes (default 100)"
    )
    p.add_argument(
        "--backends",
        nargs="+",
        default=list(OURS + BASELINES),
        metavar="NAME",
        help=f"subjects to run, space- or comma-separated (default all): {', '.join(OURS + BASELINES)}",
    )
    p.add_argument("--repeat", type=int, default=3, help="runs per subject; the best counts (default 3)")
    p.add_argument(
        "--tmp", default=None, help="where to make the temp storage (default: the system temp dir)"
    )
    p.add_argument(
        "--template-only",
        action="store_true",
        help="run only the sql template against diskcache, call for call (--small calls, --repeat rounds)",
    )
    args = p.parse_args(argv)
    names = [b for item in args.backends for b in item.split(",") if b]
    unknown = [b for b in names if b not in OURS + BASELINES]
    if unknown:
        p.error(f"unknown backend(s) {', '.join(unknown)}; expected some of: {', '.join(OURS + BASELINES)}")
    args.backends = list(dict.fromkeys(names))
    if args.small < 1 or args.repeat < 1 or args.big_mb <= 0:
        p.error("--small and --repeat must be >= 1 and --big-mb > 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    given = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join([os.path.relpath(sys.executable), os.path.relpath(__file__), *given])
    if args.template_only:
        return template_only(args, command)
    started = time.perf_counter()
    load_before = load_average()
    n_elems = int(args.big_mb * 1_000_000) // 8
    big = np.random.default_rng(0).random(n_elems)
    prefault(6 * big.nbytes)  # a load holds up to ~3 copies; twice that for slack
    mb = big.nbytes / 1e6

    skipped: Dict[str, str] = {}
    postgres = None
    with contextlib.ExitStack() as stack:
        base = Path(tempfile.mkdtemp(prefix="fleche-bench-local-", dir=args.tmp))
        stack.callback(shutil.rmtree, base, ignore_errors=True)
        if "file+postgres" in args.backends:
            try:
                from fleche_remote.testing import private_postgres

                print("starting a private PostgreSQL ...", file=sys.stderr, flush=True)
                postgres = stack.enter_context(private_postgres())
            except Exception as exc:
                skipped["file+postgres"] = f"no private PostgreSQL: {str(exc).splitlines()[0][:160]}"
        subjects: List[Tuple[str, Subject]] = []
        for name in args.backends:
            if name in skipped:
                continue
            try:
                if name == "diskcache":
                    subjects.append((name, DiskcacheSubject()))
                elif name == "joblib":
                    subjects.append((name, JoblibSubject()))
                else:
                    subjects.append((name, FlecheSubject(name, postgres)))
            except ImportError as exc:
                skipped[name] = f"not importable ({exc})"
        for name, reason in skipped.items():
            print(f"skipping {name}: {reason}", file=sys.stderr, flush=True)
        outcomes = run_all(subjects, base, args.small, big, args.repeat)
        template = None
        if "diskcache" in args.backends and outcomes["diskcache"].error is None:
            print("the sql template against diskcache ...", file=sys.stderr, flush=True)
            template = _sql_template.compare(base, args.small, max(args.repeat, 5))
        print("server-side batches ...", file=sys.stderr, flush=True)
        batches = server_batches(
            [(k, v) for k, v in subjects if outcomes[k].error is None], base, 1000, args.repeat
        )
        info = versions(postgres)
        where = f"{base.parent} on {fs_type(base.parent)}"
    elapsed = time.perf_counter() - started

    results = {name: rates(o, args.small, mb) for name, o in outcomes.items()}
    dc, jl = results.get("diskcache"), results.get("joblib")
    print(f"command: {command}")
    for line in info:
        print(line)
    print(f"storage: {where}; best of {args.repeat}; total {elapsed:.0f} s")
    print(
        f"load average (1 min) before {load_before}, after {load_average()}: "
        "other processes on the machine skew every number; compare within one run"
    )
    print(
        f"work: {args.small} small calls (a list of {SMALL_LEN} floats each); "
        f"one float64 array of {mb:g} MB (random); files: on disk after the small saves"
    )
    print()
    header = ("backend", "small save/s", "small load/s", "big save MB/s", "big load MB/s", "files")
    rows = []
    for name, o in outcomes.items():
        if o.error:
            rows.append([name, "FAILED", "-", "-", "-", "-"])
        else:
            rows.append([name, *(fmt_rate(results[name].get(p)) for p in PHASES), f"{o.files:,}"])
    for name in skipped:
        rows.append([name, "skipped", "-", "-", "-", "-"])
    print(table(header, rows))
    print()
    print("ours / theirs (>1: we are faster); dc = diskcache, jl = joblib.Memory")
    print()
    columns = ("small save", "small load", "big save", "big load")
    header2 = ["backend"] + [f"{col} {b}" for col in columns for b in ("dc", "jl")]
    rows2 = []
    for name in outcomes:
        if name in BASELINES or outcomes[name].error:
            continue
        r = results[name]
        rows2.append([name] + [fmt_ratio(r.get(p), (ref or {}).get(p)) for p in PHASES for ref in (dc, jl)])
    print(table(header2, rows2))
    if template:
        print()
        print(TEMPLATE_TITLE.format(n=args.small))
        print()
        print(_sql_template.report(template, args.small, table))
    if batches:
        print()
        print(
            "a server's storage part: one batch of 1000 small entries (Cache.save_records / load_entries), ms"
        )
        print()
        print(
            table(
                ["backend", "save_records", "load_entries"],
                [[k, f"{a * 1e3:.1f}", f"{b * 1e3:.1f}"] for k, (a, b) in batches.items()],
            )
        )
    failures = {name: o.error for name, o in outcomes.items() if o.error}
    if failures or skipped:
        print()
    for name, err in failures.items():
        print(f"{name} FAILED: {err}")
    for name, reason in skipped.items():
        print(f"{name} skipped: {reason}")
    return 1 if failures else 0


TEMPLATE_TITLE = (
    'template = "sql" against diskcache, call for call: {n} small results, cache opened before the clock; '
    "best of 5 or more rounds, interleaved"
)


def template_only(args: argparse.Namespace, command: str) -> int:
    """Only the sql template against diskcache (``--template-only``)."""
    load_before = load_average()
    base = Path(tempfile.mkdtemp(prefix="fleche-bench-local-", dir=args.tmp))
    try:
        best = _sql_template.compare(base, args.small, args.repeat)
        where = f"{base.parent} on {fs_type(base.parent)}"
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"command: {command}")
    for line in versions(None):
        print(line)
    print(f"storage: {where}; best of {args.repeat}")
    print(f"load average (1 min) before {load_before}, after {load_average()}")
    print()
    print(TEMPLATE_TITLE.format(n=args.small).replace("5 or more", str(args.repeat)))
    print()
    print(_sql_template.report(best, args.small, table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
