"""A laptop and a cluster sharing results through one ssh connection.

Runs on one machine: a private sshd on 127.0.0.1 plays the cluster's
login node, and two directories play the cluster's and the laptop's
disks. The story:

1. On the cluster, a job computes ``simulate(n)`` and its result lands in
   the cluster's own cache.
2. On the laptop, fleche.toml declares a stack: a local cache first, the
   cluster (``type = "ssh"``) second. Calling ``simulate(n)`` returns the
   cluster's result without recomputing it, and keeps a local copy.
3. The cluster goes away; the laptop still has the result, offline.
4. A colleague whose key is forced to ``serve --read-only`` can read the
   cluster's results, and their writes are refused.

Run: ``.venv/bin/python examples/laptop_and_cluster.py``
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fleche_remote import Rejected, SshCache, cached, load_cache
from fleche_remote.config import forget_loaded_caches
from fleche_remote.testing import private_sshd

CALLS = {"count": 0}


def simulate(n: int) -> np.ndarray:
    """Stands for hours of work on the cluster."""
    CALLS["count"] += 1
    time.sleep(0.5)
    return np.linalg.matrix_power(np.full((n, n), 1.0 / n), 3)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="fleche-demo-") as tmp, private_sshd() as cluster:
        cluster_disk = Path(tmp) / "cluster"
        laptop_disk = Path(tmp) / "laptop"
        cluster_disk.mkdir()
        laptop_disk.mkdir()
        (cluster_disk / "fleche.toml").write_text(
            '[default]\ncache = "results"\nroot = true\n\n[results]\ntemplate = "sql"\nroot = "cache"\n'
        )
        options = ", ".join(f'"{o}"' for o in cluster.ssh_options)
        (laptop_disk / "fleche.toml").write_text(
            f"""[default]
cache = "shared"
root = true

[[shared]]            # local layer: saves and back-fills land here
template = "cloudpickle"
root = "cache"

[[shared]]            # the cluster, through one ssh connection
type = "ssh"
host = "{cluster.host}"
python = "{sys.executable}"
workdir = "{cluster_disk}"
ssh_options = [{options}]
"""
        )

        print("1. the cluster computes simulate(200) and saves it in its own cache")
        on_cluster = SshCache(
            cluster.host, python=sys.executable, ssh_options=cluster.ssh_options, workdir=str(cluster_disk)
        )
        job = cached(cache=on_cluster)(simulate)
        job(200)
        print(
            f"   computed {CALLS['count']} time(s); the cluster serves {on_cluster.info()['cache']['calls']}"
        )
        on_cluster.close()

        os.chdir(laptop_disk)
        forget_loaded_caches()
        print("2. the laptop calls simulate(200) through its fleche.toml stack")
        laptop = cached(simulate)
        t0 = time.perf_counter()
        result = laptop(200)
        print(
            f"   got a {result.shape} array in {time.perf_counter() - t0:.2f} s without computing "
            f"(computations so far: {CALLS['count']})"
        )
        stack = load_cache()
        print(f"   local copy kept: {stack.layers[0].contains(laptop.key(200))}")
        stack.close()

        print("3. offline: the cluster is unreachable, the laptop still answers")
        text = (laptop_disk / "fleche.toml").read_text().replace(f'"{cluster.port}"', '"1"')
        (laptop_disk / "fleche.toml").write_text(text)
        forget_loaded_caches()
        again = cached(simulate)(200)
        print(f"   same result: {np.array_equal(again, result)}; computations so far: {CALLS['count']}")

        print("4. a colleague's key only runs `serve --read-only`")
        colleague_key = cluster.add_key(
            forced_command=f"cd {cluster_disk} && exec {sys.executable} -m fleche_remote serve --read-only"
        )
        colleague = SshCache(cluster.host, ssh_options=colleague_key)
        print(
            f"   read-only: {colleague.read_only}; reads work: "
            f"{np.array_equal(colleague.load_value(laptop.key(200)), result)}"
        )
        before = CALLS["count"]
        cached(cache=colleague)(simulate)(300)  # computed locally, not saved on the cluster
        print(
            f"   a new call is computed for them ({CALLS['count'] - before}) but not stored: "
            f"{not colleague.contains(laptop.key(300))}"
        )
        try:
            colleague.evict(laptop.key(200))
        except Rejected as exc:
            print(f"   evict refused: {exc}")
        colleague.close()
    print("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
