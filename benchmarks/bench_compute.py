"""What ``f.map(points, on=...)`` costs beyond the computation itself.

1. Overhead: 400 points of 1 ms each, computed by the host's local pool
   (``workers = 2``) through the private sshd at 20 ms RTT (10 ms each
   way). The computation alone is 400 x 1 ms over 2 workers = 0.2 s; the
   overhead is the rest (packing, submitting, starting the pool,
   polling, fetching, back-filling). Goal: under 2 s in all.
2. Submissions: 10,000 points on the private Slurm with the default caps:
   how many ``sbatch`` calls and array tasks. Goal: one array job, within
   ``max_tasks``. (The array is cancelled once counted: the point is the
   submission, not 10,000 Python start-ups on 2 cores.)

    .venv/bin/python benchmarks/bench_compute.py [--points 400] [--delay-ms 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from fleche_remote import cached
from fleche_remote.caches import Cache, CacheStack
from fleche_remote.remote.client import SshCache
from fleche_remote.storage.memory import MemoryCallStore, MemoryValueStore
from fleche_remote.testing import private_sshd
from fleche_remote.testing.slurm import private_slurm


def one_ms(x: int) -> int:
    time.sleep(0.001)
    return x


def host(tmp: Path, compute: str) -> Path:
    path = tmp / "cluster"
    path.mkdir()
    (path / "fleche.toml").write_text(
        '[default]\ncache = "r"\n[r]\ntemplate = "cloudpickle"\nroot = "r"\n'
        f"[compute]\ndirectory = {str(tmp / 'jobs')!r}\n{compute}\n"
    )
    return path


def stack_for(server, where: Path, options, env=None) -> CacheStack:
    setup = [f"export {k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    remote = SshCache(server.host, workdir=str(where), python=sys.executable, ssh_options=options,
                      setup_commands=setup, timeout=60)  # fmt: skip
    return CacheStack([Cache(MemoryValueStore(), MemoryCallStore()), remote])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--points", type=int, default=400)
    parser.add_argument("--delay-ms", type=float, default=10.0)
    parser.add_argument("--slurm-points", type=int, default=10_000)
    args = parser.parse_args()
    with private_sshd() as server, tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "a").mkdir()
        where = host(tmp / "a", 'executor = "local"\nworkers = 2')
        stack = stack_for(server, where, server.slow_ssh_options(args.delay_ms))
        f = cached(cache=stack)(one_ms)
        stack.layers[1].ping()  # connect first: the connection is not the sweep's cost
        start = time.perf_counter()
        out = f.map(range(args.points), on=stack.layers[1], progress=False)
        took = time.perf_counter() - start
        assert out == list(range(args.points))
        compute = args.points * 0.001 / 2
        print(
            f"local pool, {args.points} x 1 ms points, {2 * args.delay_ms:.0f} ms RTT: {took:.2f} s in all, "
            f"{compute:.2f} s of computation, overhead {took - compute:.2f} s"
        )
        stack.close()

        with private_slurm() as slurm:
            (tmp / "b").mkdir()
            where = host(tmp / "b", 'executor = "slurm"')
            stack = stack_for(server, where, server.ssh_options, slurm.env)
            f = cached(cache=stack)(one_ms)
            records_keys = {f.key(x): ((x,), {}, f.arguments(x)) for x in range(args.slurm_points)}
            from fleche_remote.compute.submit import pack_function, pack_points

            records, arguments = pack_points(f, records_keys)
            about = {"name": f.name, "module": __name__, "qualname": "one_ms", "strict": False}
            start = time.perf_counter()
            stack.layers[1].compute_submit(pack_function(one_ms), about, records, arguments)
            took = time.perf_counter() - start
            (job,) = [
                json.loads((d / "job.json").read_text()) for d in (tmp / "b" / "jobs" / "run").iterdir()
            ]
            slurm.run("scancel", job["slurm_job"])
            print(f"slurm, {args.slurm_points} points: {job['sbatch_calls']} sbatch call(s), one array of "
                  f"{job['tasks']} tasks x {job['per_task']} points, submitted in {took:.2f} s")  # fmt: skip
            stack.close()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
