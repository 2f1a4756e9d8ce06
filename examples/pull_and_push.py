"""Moving results between caches with ``fleche-remote pull`` and ``push``.

Runs on one machine: a private sshd on 127.0.0.1 plays the cluster. The
laptop's fleche.toml names the cluster (``cluster``, over ssh) and a
local cache (``laptop``). The story:

1. Jobs on the cluster have saved a sweep of ``simulate(n)`` and a few
   other calls.
2. ``fleche-remote pull cluster laptop --name simulate --where n=3``
   copies just one entry; then ``pull ... --name simulate`` copies the
   rest of the sweep and skips the one already there (which is also how
   an interrupted pull resumes). ``--dry-run`` says what would move.
3. The laptop computes something new; ``fleche-remote push laptop
   cluster`` sends only that.

The entries move as bytes in batches (one round trip each), nothing is
unpickled on the way. Run: ``.venv/bin/python examples/pull_and_push.py``
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from fleche_remote import Call, cached, load_cache
from fleche_remote.testing import private_sshd


def fleche_remote(*args: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    done = subprocess.run(
        [sys.executable, "-m", "fleche_remote", *args], capture_output=True, text=True, env=env, timeout=120
    )
    if done.returncode != 0:
        raise SystemExit(f"fleche-remote {' '.join(args)} failed: {done.stderr}")
    print(f"   $ fleche-remote {' '.join(args)}")
    return "\n".join("     " + line for line in done.stdout.splitlines())


def summarize(n: int) -> int:
    """Something the laptop computes."""
    return n * n


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="fleche-move-") as tmp, private_sshd() as cluster:
        cluster_disk, laptop = Path(tmp) / "cluster", Path(tmp) / "laptop"
        cluster_disk.mkdir()
        laptop.mkdir()
        (cluster_disk / "fleche.toml").write_text(
            '[default]\ncache = "results"\nroot = true\n[results]\ntemplate = "sql"\nroot = "db"\n'
        )
        options = ", ".join(f'"{o}"' for o in cluster.ssh_options)
        (laptop / "fleche.toml").write_text(
            '[default]\ncache = "laptop"\nroot = true\n\n'
            '[laptop]\ntemplate = "cloudpickle"\nroot = "cache"\n\n'
            f'[cluster]\ntype = "ssh"\nhost = "{cluster.host}"\npython = "{sys.executable}"\n'
            f'workdir = "{cluster_disk}"\nssh_options = [{options}]\n'
        )
        os.chdir(laptop)
        print("1. jobs on the cluster saved a sweep and a few other calls")
        remote = load_cache("cluster")
        remote.save_many([Call("work.simulate", {"n": n}, bytes(n << 16)) for n in range(1, 6)])
        remote.save_many([Call("work.prepare", {"path": f"/data/{i}.h5"}, i) for i in range(3)])
        remote.close()

        print("2. pull one entry, then the rest of the sweep")
        print(fleche_remote("pull", "cluster", "laptop", "--name", "simulate", "--where", "n=3"))
        print(fleche_remote("pull", "cluster", "laptop", "--name", "simulate", "--dry-run"))
        print(fleche_remote("pull", "cluster", "laptop", "--name", "simulate"))
        print(fleche_remote("ls", "laptop", "--no-header"))

        print("3. the laptop computes something new and pushes it")

        local = load_cache("laptop")
        cached(cache=local)(summarize)(7)
        local.close()
        print(fleche_remote("push", "laptop", "cluster"))
        remote = load_cache("cluster")
        print(f"   the cluster holds now: {sorted({r.name for r in remote.query_records()})}")
        remote.close()
    print("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
