"""A parameter sweep with ``f.map``: one lookup and one save per batch.

Runs on one machine: a private sshd on 127.0.0.1 plays the cluster. The
laptop's cache is a stack (a local layer, then the cluster over ssh). The
story:

1. A sweep of 200 points through ``simulate.map`` computes every point and
   saves all of them in one batch: two requests to the cluster (one
   lookup, one batch of claims so that another laptop waits for these
   points instead of computing them), not hundreds (each would be a
   round trip on a real link). The ssh layer
   is ``write_behind``: saves land locally and are pushed to the cluster
   by a background thread.
2. The sweep is widened to 300 points: only the 100 new ones are computed.
3. A second process, with an empty local layer, asks for the same 300:
   all come from the cluster in one round trip and are kept locally (a
   listing this long is asked in two parts sent back to back, so the
   server reads one while the laptop unpacks the other: two requests).

Run: ``.venv/bin/python examples/sweep_with_map.py``
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fleche_remote import cached, load_cache
from fleche_remote.testing import private_sshd

COMPUTED = {"count": 0}


def simulate(x: float) -> float:
    """Stands for a costly point of the sweep."""
    COMPUTED["count"] += 1
    return sum((x * i) % 7.0 for i in range(2_000))


def ssh_requests(stack: Any) -> int:
    """Requests sent to the cluster (the stack's second layer) so far."""
    return int(stack.layers[1].request_count)


def sweep(points: int) -> None:
    stack = load_cache()
    f = cached(cache=stack)(simulate)
    before_computed, t0 = COMPUTED["count"], time.perf_counter()
    results = f.map([i / 10 for i in range(points)])
    print(
        f"   {points} points in {time.perf_counter() - t0:.2f} s: computed "
        f"{COMPUTED['count'] - before_computed}, requests to the cluster so far: {ssh_requests(stack)}"
    )
    assert len(results) == points


def main() -> int:
    if sys.argv[1:] == ["--second-process"]:
        print("3. another process with an empty local layer sweeps the same 300 points")
        sweep(300)
        print(f"   kept locally: {len(list(load_cache().layers[0].query_records()))}")  # type: ignore[attr-defined]
        return 0
    with tempfile.TemporaryDirectory(prefix="fleche-sweep-") as tmp, private_sshd() as cluster:
        cluster_disk, laptop, laptop2 = Path(tmp) / "cluster", Path(tmp) / "laptop", Path(tmp) / "laptop2"
        for d in (cluster_disk, laptop, laptop2):
            d.mkdir()
        (cluster_disk / "fleche.toml").write_text(
            '[default]\ncache = "results"\nroot = true\n[results]\ntemplate = "sql"\nroot = "db"\n'
        )
        options = ", ".join(f'"{o}"' for o in cluster.ssh_options)
        toml = (
            '[default]\ncache = "shared"\nroot = true\n\n'
            '[[shared]]\ntemplate = "cloudpickle"\nroot = "local"\n\n'
            f'[[shared]]\ntype = "ssh"\nhost = "{cluster.host}"\npython = "{sys.executable}"\n'
            f'workdir = "{cluster_disk}"\nssh_options = [{options}]\n'
            "write_behind = true   # saves also go to the cluster, in the background\n"
        )
        (laptop / "fleche.toml").write_text(toml)
        (laptop2 / "fleche.toml").write_text(toml)

        os.chdir(laptop)
        print("1. a sweep of 200 points")
        sweep(200)
        print("2. the sweep widened to 300 points")
        sweep(300)
        stack = load_cache()
        print(f"   pushed to the cluster in the background: {stack.flush(120)}")  # type: ignore[attr-defined]
        stack.close()

        os.chdir(laptop2)
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join(p for p in [os.environ.get("PYTHONPATH"), *sys.path] if p)
        )
        done = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--second-process"],
            cwd=laptop2,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        sys.stdout.write(done.stdout)
        if done.returncode != 0:
            sys.stderr.write(done.stderr)
            return 1
    print("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
